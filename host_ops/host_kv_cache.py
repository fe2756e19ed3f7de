"""The host-memory KV cache of the offload engine, with attention over it in its native layout."""
from __future__ import annotations

import logging
import mmap
import os
import time

import numpy as np

from host_ops import _kernel, _validate

SCALE_BYTES = 4  # the float32 scale of each int8 row
log = logging.getLogger("host_ops")


def _host_ram_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _capacities(num_slots: int, max_context) -> np.ndarray:
    """[num_slots] int64 positions per slot from one positive int or `num_slots` of them."""
    caps = np.asarray(max_context)
    if caps.ndim == 0:
        caps = np.full(num_slots, caps)
    if caps.shape != (num_slots,) or caps.dtype.kind not in "iu" or (caps < 1).any():
        raise ValueError(f"max_context must be a positive integer or {num_slots} of them (one per slot), "
                         f"got {max_context!r}")
    return caps.astype(np.int64)


def _distinct(storage: tuple) -> list[np.ndarray]:
    """The arrays of a cache's storage (k, v, k_scales, v_scales), each once: v is k where the values are in
    the keys, the scales None for the float dtypes."""
    return list({id(a): a for a in storage if a is not None}.values())


def _zeroed(elements: int, dtype, huge_pages: bool) -> np.ndarray:
    """[elements] zeros of `dtype` in a fresh anonymous mapping, its pages 2 MiB (transparent huge pages, as NumPy
    asks for its own large arrays) if `huge_pages` else 4 KiB (madvise; where the OS refuses the advice, its
    default pages, warned once). On the 2-core VM (Firecracker, THP on madvise; 2026-11-27,
    benchmarks/RESULTS.md) fresh memory faulted in at 0.8-1.0 GB/s in huge pages against 5.8-6.3 GB/s in 4 KiB
    ones, and attention over huge pages ran 2-9% faster; `scripts/bench_host_attention.py --pages` measures both."""
    nbytes = max(int(elements) * np.dtype(dtype).itemsize, 1)
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    name = "MADV_HUGEPAGE" if huge_pages else "MADV_NOHUGEPAGE"
    try:
        buf.madvise(getattr(mmap, name))
    except (AttributeError, OSError) as e:  # no such advice here (a kernel without THP: EINVAL): only a hint
        if name not in _ADVICE_REFUSED:
            _ADVICE_REFUSED.add(name)
            log.warning("HostKVCache: the OS refused %s (%s); the cache takes the OS's default pages", name, e)
    return np.frombuffer(buf, dtype, count=elements)


_ADVICE_REFUSED: set[str] = set()  # the page advice the OS refused, warned about once each
PAGES_VAR = "MOE_JAX_KV_HUGE_PAGES"  # "0": caches whose page size is not given take 4 KiB pages


def huge_pages_wanted() -> bool:
    """The page size a cache takes where none is given: 2 MiB, unless MOE_JAX_KV_HUGE_PAGES=0 (read at each call)."""
    return os.environ.get(PAGES_VAR) != "0"


def row_bytes(head_dim: int, dtype) -> int:
    """Bytes of one cached row (one position of one KV head, K or V) of `dtype` elements: head_dim of them,
    plus a float32 scale for int8 (the cache's quantised rows)."""
    dtype = np.dtype(dtype)
    return head_dim * dtype.itemsize + (SCALE_BYTES if dtype == _kernel.INT8 else 0)


class HostKVCache:
    """K and V for `num_slots` sequences, every layer, in host memory; slot s holds up to capacities[s]
    positions (`max_context`: one int for every slot, or one per slot, so that each slot is as long as the
    sequences it will hold and no more).

    Storage (preallocated and faulted in at construction, in parallel, so that no write pays for a page's first
    touch: `fault_in_s` seconds; zero-filled, unless taken over from another cache, `reuse`, with 0 seconds;
    all of it is resident from then on): `k`, `v` of shape [num_layers, elements], bfloat16, float32 or int8, where slot s of a layer is the region [kv_heads, capacities[s], head_dim] at
    element offsets[s] (`slot_kv` gives it that shape). Head-major, so the positions of one (slot, KV head)
    are one contiguous block that attention streams.
    int8 (lossy, half of bfloat16's bytes for attention to read and the host to hold): each row of
    head_dim elements (one position of one KV head) is quantised symmetrically on write, its float32
    scale max|row| / 127 in `k_scales`/`v_scales` [num_layers, elements // head_dim] at the row's element
    offset // head_dim; None for the float dtypes.
    `lengths` [num_layers, num_slots] int64: per layer, 1 + the highest position written to each slot
    since it was last freed; attention uses it unless given lengths explicitly.
    `value_dim` (latent attention): the values are the keys' first value_dim dims, so only K is stored (`v`
    is `k`), writes take no v, and attention weighs those dims only, returning value_dim dims per head.
    None: V is stored apart, head_dim dims like K.
    `reuse`: a cache whose storage this one takes instead of allocating (it must `fits` these arguments: same
    dtype and values layout, at least as many elements), so that a process running job after job pays for the
    allocation and its page faults once, as an inference server keeps its KV cache. Its data stays (attention
    reads only the positions written since); the old cache must not be used after.
    `huge_pages`: the storage in 2 MiB pages (attention reads them a little faster) or 4 KiB ones (faulted in 6x
    faster on a VM; `_zeroed`); None: huge unless MOE_JAX_KV_HUGE_PAGES=0 (`huge_pages_wanted`), so that a run
    on a host whose first touch of huge pages is slow picks 4 KiB ones without code (gpu_suite.sh measures both).
    """

    def __init__(self, num_layers: int, num_slots: int, max_context, kv_heads: int, head_dim: int,
                 dtype="bfloat16", value_dim: int | None = None, reuse: "HostKVCache | None" = None,
                 huge_pages: bool | None = None):
        nbytes = self.footprint(num_layers, num_slots, max_context, kv_heads, head_dim, dtype, value_dim)
        values_in_keys = value_dim is not None
        caps = _capacities(num_slots, max_context)
        dtype = _validate.cache_dtype(dtype)
        shape = (num_layers, int(caps.sum()) * kv_heads * head_dim)
        self.capacities = caps
        self.offsets = np.concatenate([[0], np.cumsum(caps[:-1])]) * (kv_heads * head_dim)
        self.lengths = np.zeros((num_layers, num_slots), np.int64)
        self._in_use = np.zeros(num_slots, bool)
        self.num_layers, self.num_slots = num_layers, num_slots
        self.kv_heads, self.head_dim = kv_heads, head_dim
        self.values_in_keys, self.value_dim = values_in_keys, value_dim if values_in_keys else head_dim
        if reuse is not None:
            if not reuse.fits(num_layers, num_slots, max_context, kv_heads, head_dim, dtype, value_dim):
                raise ValueError(f"reuse: a cache of {reuse.storage_bytes:,} bytes of {reuse.dtype} storage (values "
                                 f"{'in the keys' if reuse.values_in_keys else 'apart'}) cannot hold one of {nbytes:,} "
                                 f"bytes of {dtype} (values {'in the keys' if values_in_keys else 'apart'})")
            self._take(reuse._storage, shape)
            self.fault_in_s, self.huge_pages = 0.0, reuse.huge_pages
            return

        positions = (f"{caps[0]} positions" if (caps == caps[0]).all() else
                     f"{caps.sum():,} positions in all (per slot {caps.min()} to {caps.max()})")
        per_row = (f"({head_dim} x 1 byte + a {SCALE_BYTES}-byte scale)" if dtype == _kernel.INT8 else
                   f"{head_dim} x {dtype.itemsize} bytes")
        what = (f"HostKVCache of {nbytes / 1e9:,.2f} GB ({num_layers} layers x {num_slots} slots x {positions} "
                f"x {kv_heads} KV heads x {per_row} x "
                f"{'1 for K (the values in it)' if values_in_keys else '2 for K and V'} = {nbytes:,} bytes)")
        ram = _host_ram_bytes()
        if ram is not None and nbytes > ram:
            raise MemoryError(f"{what} does not fit in this host's {ram / 1e9:.1f} GB of RAM")
        elements = shape[0] * shape[1]
        huge_pages = self.huge_pages = huge_pages_wanted() if huge_pages is None else bool(huge_pages)
        try:
            k = _zeroed(elements, dtype, huge_pages)
            storage = (k, k if values_in_keys else _zeroed(elements, dtype, huge_pages), None, None)
            if dtype == _kernel.INT8:
                k_scales = _zeroed(elements // head_dim, np.float32, huge_pages)
                storage = (*storage[:2], k_scales,
                           k_scales if values_in_keys else _zeroed(elements // head_dim, np.float32, huge_pages))
        except (MemoryError, OSError, ValueError) as e:
            raise MemoryError(f"cannot allocate {what}: {e}") from e
        _kernel.fault_in_zeros(np.zeros(1, np.uint8))  # compiled (or loaded from numba's cache) outside the time
        t0 = time.perf_counter()
        for x in _distinct(storage):
            _kernel.fault_in_zeros(x)
        self.fault_in_s = time.perf_counter() - t0
        self._take(storage, shape)

    def _take(self, storage: tuple, shape: tuple[int, int]) -> None:
        """k, v [num_layers, elements] and the int8 scales, C-contiguous views of the first elements of the flat
        `storage` (k, v, k_scales, v_scales; the scales None for the float dtypes, v k's own where the values
        are in the keys)."""
        self._storage = storage
        n, (k, v, ks, vs) = shape[0] * shape[1], storage
        self.k = k[:n].reshape(shape)
        self.v = self.k if v is k else v[:n].reshape(shape)
        self.k_scales = self.v_scales = None if ks is None else ks[:n // self.head_dim].reshape(shape[0], -1)
        if vs is not ks:
            self.v_scales = vs[:n // self.head_dim].reshape(shape[0], -1)

    def fits(self, num_layers: int, num_slots: int, max_context, kv_heads: int, head_dim: int, dtype="bfloat16",
             value_dim: int | None = None) -> bool:
        """Whether a cache of these arguments can take this one's storage (`reuse=`): the same dtype and values
        layout, and no more elements."""
        elements = num_layers * int(_capacities(num_slots, max_context).sum()) * kv_heads * head_dim
        scales = self._storage[2]  # int8: one scale per head_dim elements, so a smaller head_dim needs more
        return (_validate.cache_dtype(dtype) == self.dtype and (value_dim is not None) == self.values_in_keys
                and elements <= self._storage[0].size and (scales is None or elements // head_dim <= scales.size))

    @property
    def storage_bytes(self) -> int:
        """Bytes of the storage this cache holds (its `nbytes`, or more where it reuses a larger cache's)."""
        return sum(x.nbytes for x in _distinct(self._storage))

    @staticmethod
    def footprint(num_layers: int, num_slots: int, max_context, kv_heads: int, head_dim: int,
                  dtype="bfloat16", value_dim: int | None = None) -> int:
        """Bytes of K and V storage (with int8's scales) such a cache allocates (= its `nbytes`), computed
        without allocating."""
        dims = {"num_layers": num_layers, "num_slots": num_slots, "kv_heads": kv_heads, "head_dim": head_dim}
        for name, n in dims.items():
            if not isinstance(n, (int, np.integer)) or n < 1:
                raise ValueError(f"{name} must be a positive integer, got {n!r}")
        if value_dim is not None and (isinstance(value_dim, bool) or not isinstance(value_dim, (int, np.integer))
                                      or not 0 < value_dim <= head_dim):
            raise ValueError(f"value_dim must be None or an integer in 1..head_dim={head_dim}, got {value_dim!r}")
        positions = int(_capacities(num_slots, max_context).sum())  # Python ints from here: no overflow
        copies = 1 if value_dim is not None else 2  # K, and V unless the values are in the keys
        return copies * positions * int(num_layers) * int(kv_heads) * row_bytes(head_dim, _validate.cache_dtype(dtype))

    def slot_kv(self, layer: int, slot: int) -> tuple[np.ndarray, np.ndarray]:
        """Views of slot `slot`'s K and V in `layer`, each [kv_heads, capacities[slot], head_dim] (int8: the
        quantised values, without their scales)."""
        layer, slot = self._layer(layer), int(self._slots([slot])[0])
        shape = (self.kv_heads, int(self.capacities[slot]), self.head_dim)
        a = self.offsets[slot]
        return tuple(x[layer, a:a + np.prod(shape)].reshape(shape) for x in (self.k, self.v))

    @property
    def nbytes(self) -> int:
        """Bytes of K and V storage with int8's scales (the bookkeeping arrays, O(num_layers × num_slots),
        not counted)."""
        copies = 1 if self.values_in_keys else 2
        return copies * (self.k.nbytes + (0 if self.k_scales is None else self.k_scales.nbytes))

    @property
    def dtype(self) -> np.dtype:
        return self._storage[0].dtype

    # ---- slots ----

    def allocate(self, n: int) -> np.ndarray:
        """n free slot ids (lowest first), marked in use, lengths 0."""
        free = np.flatnonzero(~self._in_use)
        if not 0 <= n <= free.size:
            raise ValueError(f"asked for {n} slots, only {free.size} of {self.num_slots} are free")
        slots = free[:n]
        self._in_use[slots] = True
        self.lengths[:, slots] = 0  # a write to a slot never allocated left its length
        return slots

    def free(self, slots) -> None:
        """Returns slots to the free pool and resets their lengths (data stays until overwritten)."""
        slots = self._slots(slots)
        if not self._in_use[slots].all():
            raise ValueError(f"slots {slots[~self._in_use[slots]].tolist()} are not allocated")
        self._in_use[slots] = False
        self.lengths[:, slots] = 0

    # ---- writes ----

    def write(self, layer: int, slots, positions, k, v, rows=None) -> None:
        """Row rows[m] of k, v [R, Hk, D] goes to position positions[m] of slot slots[m] in `layer` (cast to
        the cache dtype; int8: quantised per row). slots, positions, rows: [M] ints; rows None: row m (M = R),
        else any rows of k, v, e.g. the prompt positions of a padded batch of prompts without copying them
        out. v is None where the values are in the keys (`values_in_keys`)."""
        layer = self._layer(layer)
        if (v is None) != self.values_in_keys:
            raise ValueError("this cache holds the values in the keys: v must be None" if self.values_in_keys else
                             "v is missing: this cache stores values apart from the keys")
        k = np.asarray(k)
        v = k if v is None else np.asarray(v)
        for name, x in (("k", k), ("v", v)):
            if x.ndim != 3 or x.shape[1:] != (self.kv_heads, self.head_dim) or x.shape != k.shape:
                raise ValueError(f"{name} must have shape [M, Hk={self.kv_heads}, D={self.head_dim}] like k, "
                                 f"got k {k.shape}, v {v.shape}")
            if x.dtype not in _validate.FLOAT_DTYPES:
                raise ValueError(f"{name} must have a float dtype, got {x.dtype} with shape {x.shape}")
        if rows is None:
            M, what = k.shape[0], f"M from k {k.shape}"
        else:
            if np.ndim(rows) != 1:
                raise ValueError(f"rows must be one index into k {k.shape} per position written, got shape "
                                 f"{np.shape(rows)}")
            M = len(rows)
            rows = _validate.ints("rows", rows, (M,), "[M]", 0, k.shape[0] - 1, f"rows of k {k.shape}")
            what = f"M from rows {rows.shape}"
        slots = self._slots(slots, (M,), what)
        positions = _validate.ints("positions", positions, (M,), what, 0, None, "positions from 0")
        self._within_capacity("positions", positions + 1, slots)
        D = self.head_dim
        offsets, head_strides = self.offsets[slots] + positions * D, self.capacities[slots] * D
        quantised = self.k_scales is not None
        stores = ((self.k, k, self.k_scales),) + (() if self.values_in_keys else ((self.v, v, self.v_scales),))
        for cache, x, scales in stores:
            _kernel.scatter(cache[layer], x if quantised else x.astype(self.dtype, copy=False), offsets, head_strides,
                            None if scales is None else scales[layer], rows)
        np.maximum.at(self.lengths[layer], slots, positions + 1)

    def append(self, layer: int, slots, k, v=None) -> np.ndarray:
        """One new position per slot: k, v [B, Hk, D] go to position lengths[layer, slots[b]] (distinct
        slots). Returns the new lengths [B]."""
        slots = self._slots(slots)
        if np.unique(slots).size != slots.size:
            raise ValueError(f"append needs distinct slots, got {slots.tolist()}")
        positions = self.lengths[self._layer(layer), slots]
        full = positions >= self.capacities[slots]
        if full.any():
            raise ValueError(f"slots {slots[full].tolist()} are full (capacities {self.capacities[slots[full]].tolist()})")
        self.write(layer, slots, positions, k, v)
        return positions + 1

    # ---- attention ----

    def attend(self, layer: int, slots, q, lengths=None, out=None, scale=None) -> np.ndarray:
        """Decode attention: q [B, Hq, D] (bfloat16 or float32 read as it is); query row b attends to positions
        [0, lengths[b]) of slot slots[b] (lengths: [B] ints up to the slot's capacity, default the tracked
        lengths, which must be >= 1; a row given length 0 attends to nothing and gets zeros, so that a batch's
        idle rows can go through the same call). Returns out [B, Hq, value_dim] float32 (written into `out`,
        float32 or bfloat16, if given)."""
        q = _validate.query("q", q, "B, Hq, D")
        slots, lengths = self._slots_lengths(layer, slots, q, lengths, empty_rows=True)
        out = _validate.out(out, (*q.shape[:-1], self.value_dim))
        self._run(layer, q[:, None], slots, lengths - 1, lengths, out[:, None], scale)
        return out

    def attend_prefill(self, layer: int, slots, q, lengths_before, lengths=None, out=None, scale=None) -> np.ndarray:
        """Causal attention for T new positions per slot, already written: q [B, T, Hq, D]; query t of
        row b sits at position lengths_before[b] + t and attends to positions
        [0, min(lengths_before[b] + t + 1, lengths[b])) of slot slots[b] (so padded queries past a
        row's stored length see only stored positions). lengths: [B], default the tracked lengths;
        lengths_before[b] < lengths[b]. Returns out [B, T, Hq, value_dim] float32 (written into `out`, float32
        or bfloat16, if given)."""
        q = _validate.query("q", q, "B, T, Hq, D")
        slots, lengths = self._slots_lengths(layer, slots, q, lengths)
        before = _validate.ints("lengths_before", lengths_before, lengths.shape, f"B from q {q.shape}", 0, None,
                                "positions from 0")
        if (before >= lengths).any():
            b = int(np.flatnonzero(before >= lengths)[0])
            raise ValueError(f"lengths_before[{b}] = {before[b]} must be < lengths[{b}] = {lengths[b]} "
                             f"(the first new position must be stored)")
        out = _validate.out(out, (*q.shape[:-1], self.value_dim))
        self._run(layer, q, slots, before, lengths, out, scale)
        return out

    # ---- helpers ----

    def _run(self, layer, q, slots, starts, ends, out, scale):
        D = self.head_dim
        scales = (None, None) if self.k_scales is None else (self.k_scales[layer], self.v_scales[layer])
        _kernel.run(q, _kernel.flat_kv(self.k[layer]), _kernel.flat_kv(self.v[layer]), self.kv_heads,
                    self.offsets[slots], self.capacities[slots] * D, D, starts, ends, _validate.scale(scale, D), out,
                    *scales)

    def _within_capacity(self, name: str, ends: np.ndarray, slots: np.ndarray) -> None:
        """ends [B] (one past the last position used) must not pass the capacity of slots [B]."""
        bad = np.flatnonzero(ends > self.capacities[slots])
        if bad.size:
            i = int(bad[0])
            raise ValueError(f"{name}[{i}] reaches position {ends[i] - 1} of slot {slots[i]}, which holds "
                             f"{self.capacities[slots[i]]} positions")

    def _layer(self, layer) -> int:
        if not isinstance(layer, (int, np.integer)) or not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be an int in [0, {self.num_layers}), got {layer!r}")
        return int(layer)

    def _slots(self, slots, shape=None, shape_note="") -> np.ndarray:
        slots = np.asarray(slots)
        if shape is None:
            if slots.ndim != 1:
                raise ValueError(f"slots must have shape [B], got {slots.shape}")
            shape, shape_note = slots.shape, "B"
        return _validate.ints("slots", slots, shape, shape_note, 0, self.num_slots - 1, f"num_slots={self.num_slots}")

    def _slots_lengths(self, layer, slots, q, lengths, empty_rows=False) -> tuple[np.ndarray, np.ndarray]:
        """Checks layer, slots [B] and lengths [B] (default tracked) against q [B, ..., Hq, D]; lengths given
        may be 0 where `empty_rows`, the tracked ones never."""
        layer = self._layer(layer)
        B, Hq, D = q.shape[0], q.shape[-2], q.shape[-1]
        if D != self.head_dim:
            raise ValueError(f"q of shape {q.shape} has D={D}, the cache has head_dim={self.head_dim}")
        _validate.heads("q", Hq, "the cache", self.kv_heads)
        slots = self._slots(slots, (B,), f"B from q {q.shape}")
        lowest, note = 1, "a slot with nothing written has length 0"
        if lengths is None:
            lengths = self.lengths[layer, slots]
        elif empty_rows:
            lowest, note = 0, "0: the row attends to nothing"
        lengths = _validate.ints("lengths", lengths, (B,), f"B from q {q.shape}", lowest, None, note)
        self._within_capacity("lengths", lengths, slots)
        return slots, lengths
