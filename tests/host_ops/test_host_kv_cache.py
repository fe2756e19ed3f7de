"""HostKVCache: footprint, allocation errors, writes/appends for micro-batches of slots, slot reuse,
and attention in the cache's own layout against the float64 reference and the dense entry points."""
from __future__ import annotations

import os
import re
import threading
import time

import ml_dtypes
import numba
import numpy as np
import pytest

from host_ops import HostKVCache, decode_attention, prefill_attention
from host_ops import _kernel, host_kv_cache

BF16 = np.dtype(ml_dtypes.bfloat16)
KV_DTYPES = [BF16, np.dtype(np.float32)]


def dense(cache: HostKVCache, layer: int, slots) -> tuple[np.ndarray, np.ndarray]:
    """The slots' K and V as [B, S, Hk, D] (the dense entry points' layout), S the largest of their
    capacities, shorter slots padded with random values that no query may see."""
    S = int(cache.capacities[slots].max())
    pad = np.random.default_rng(1).standard_normal((len(slots), S, cache.kv_heads, cache.head_dim))
    kv = [pad.astype(cache.dtype), pad.astype(cache.dtype)]
    for b, s in enumerate(slots):
        for x, stored in zip(kv, cache.slot_kv(layer, s)):
            x[b, :stored.shape[1]] = stored.transpose(1, 0, 2)
    return tuple(kv)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32", BF16, np.float32])
def test_footprint_equals_nbytes(dtype):
    dims = (3, 5, 37, 3, 96)
    cache = HostKVCache(*dims, dtype)
    assert HostKVCache.footprint(*dims, dtype) == cache.nbytes == cache.k.nbytes + cache.v.nbytes
    assert cache.k.shape == (3, 5 * 37 * 3 * 96) and cache.k.dtype == np.dtype(dtype)
    assert cache.slot_kv(2, 4)[1].shape == (3, 37, 96) and np.shares_memory(cache.slot_kv(2, 4)[1], cache.v)
    assert cache.dtype.itemsize == (2 if np.dtype(dtype) == BF16 else 4)


def test_footprint_of_mixtral_cache_without_allocating():
    # 32 layers, 256 sequences x 4096 positions, 8 KV heads of 128, bf16: 2 * 32 * 256 * 4096 * 8 * 128 * 2 bytes
    assert HostKVCache.footprint(32, 256, 4096, 8, 128, "bfloat16") == 137_438_953_472
    with pytest.raises(ValueError, match="kv_heads must be a positive integer, got 0"):
        HostKVCache.footprint(32, 256, 4096, 0, 128)
    with pytest.raises(ValueError, match="dtype must be bfloat16 .*, float32 or int8, got float16"):
        HostKVCache.footprint(1, 1, 1, 1, 1, np.float16)
    # int8: a byte per element and a float32 scale per row of head_dim: (128 + 4) / 256 of bf16's bytes
    assert HostKVCache.footprint(32, 256, 4096, 8, 128, "int8") == 137_438_953_472 * 132 // 256


def test_absurd_allocation_gives_clear_error():
    # 2 * 250 * 1000 * 1000 * 1000 * 1000 * 2 bytes = 1e15 bytes
    with pytest.raises(MemoryError, match=r"HostKVCache of 1,000,000\.00 GB \(250 layers x 1000 slots.*"
                                          r"= 1,000,000,000,000,000 bytes\) does not fit in this host's"):
        HostKVCache(250, 1000, 1000, 1000, 1000, "bfloat16")


def test_allocation_failure_from_the_os_is_rewrapped(monkeypatch):
    monkeypatch.setattr(host_kv_cache, "_host_ram_bytes", lambda: None)  # skip the RAM check, let the mapping fail
    with pytest.raises(MemoryError, match=r"cannot allocate HostKVCache of 1,000,000\.00 GB"):
        HostKVCache(250, 1000, 1000, 1000, 1000, "bfloat16")


def _resident_bytes() -> int:
    return int(open("/proc/self/statm").read().split()[1]) * _kernel.PAGE_BYTES


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="counts resident pages in Linux's /proc")
@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_storage_is_faulted_in_at_construction_and_stays_zero(dtype):
    """The OS maps fresh memory lazily; the cache writes into every page at construction, so that the
    process holds its storage (128 MiB of bfloat16 K and V here) before any write, all of it still zeros."""
    dims = (2, 64, 512, 4, 128)  # 2 layers x 64 slots x 512 positions x 4 heads x 128 = 32 Mi elements each of K and V
    HostKVCache(1, 1, 1, 4, 128, dtype)  # the fault-in kernel compiled (or loaded) outside the count
    before = _resident_bytes()
    cache = HostKVCache(*dims, dtype)
    grown = _resident_bytes() - before
    assert grown >= 0.95 * cache.nbytes, (grown, cache.nbytes)
    assert cache.fault_in_s > 0
    for x in (cache.k, cache.v, cache.k_scales, cache.v_scales):
        assert x is None or not x.view(np.uint8).any()
    unfaulted = np.zeros(cache.k.shape, cache.k.dtype)  # the control: the same storage, not faulted in, holds almost nothing
    assert _resident_bytes() - before - grown < 0.05 * unfaulted.nbytes


def _thp_eligible(a: np.ndarray) -> bool:
    """Whether the mapping that holds the middle of `a` may take transparent huge pages (/proc/self/smaps'
    THPeligible; NumPy advises the pages of its arrays from the first whole one, splitting the mapping)."""
    addr = a.ctypes.data + a.nbytes // 2
    for block in re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", open("/proc/self/smaps").read()):
        lo, hi = (int(x, 16) for x in block.split()[0].split("-"))
        if lo <= addr < hi:
            return re.search(r"THPeligible:\s+(\d)", block).group(1) == "1"
    raise AssertionError(f"no mapping holds address {addr:#x}")


@pytest.mark.skipif(not os.path.exists("/sys/kernel/mm/transparent_hugepage/enabled"),
                    reason="Linux's transparent huge pages")
@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_storage_takes_huge_pages_unless_asked_for_4k_ones(dtype):
    """The cache's storage takes 2 MiB pages by default, as NumPy's large arrays, or 4 KiB ones where asked
    (faulted in 6x faster on a VM), every array of it (int8: the scales too)."""
    dims = (2, 16, 256, 4, 128)  # 8 MiB of bfloat16 K
    default, small = HostKVCache(*dims, dtype), HostKVCache(*dims, dtype, huge_pages=False)
    arrays = [(x, y) for x, y in zip((default.k, default.v, default.k_scales, default.v_scales),
                                     (small.k, small.v, small.k_scales, small.v_scales)) if x is not None]
    assert len(arrays) == (4 if dtype == "int8" else 2)
    assert not any(_thp_eligible(y) for _, y in arrays)
    if "[never]" in open("/sys/kernel/mm/transparent_hugepage/enabled").read():
        pytest.skip("transparent huge pages are off on this machine")
    assert all(_thp_eligible(x) for x, _ in arrays[:2])  # int8's scales, 1/128 of the values, may be under 2 MiB
    assert _thp_eligible(np.zeros(default.k.size, default.k.dtype))  # the control: NumPy's own array of that size


def test_the_default_page_size_follows_moe_jax_kv_huge_pages(monkeypatch):
    """MOE_JAX_KV_HUGE_PAGES=0: a cache given no page size takes 4 KiB pages (one given one keeps it); a cache
    on a kept one's storage has that one's pages."""
    dims = (2, 16, 256, 4, 128)
    assert HostKVCache(*dims).huge_pages
    monkeypatch.setenv(host_kv_cache.PAGES_VAR, "0")
    small = HostKVCache(*dims)
    assert not small.huge_pages and HostKVCache(*dims, huge_pages=True).huge_pages
    assert not HostKVCache(*dims, reuse=small).huge_pages
    if os.path.exists("/sys/kernel/mm/transparent_hugepage/enabled"):
        assert not _thp_eligible(small.k)


def test_page_advice_the_os_refuses_is_warned_once_not_fatal(monkeypatch, caplog):
    """A kernel without transparent huge pages refuses the advice (EINVAL): the cache takes the OS's pages and
    says so once."""
    import mmap

    monkeypatch.setattr(mmap, "MADV_HUGEPAGE", 9999)  # no such advice: EINVAL, as such a kernel answers
    monkeypatch.setattr(host_kv_cache, "_ADVICE_REFUSED", set())
    caches = [HostKVCache(1, 2, 16, 1, 8, "bfloat16") for _ in range(2)]
    assert all(c.k.flags.writeable and not c.k.view(np.uint16).any() for c in caches)
    warned = [r.getMessage() for r in caplog.records if "refused MADV_HUGEPAGE" in r.getMessage()]
    assert len(warned) == 1 and "the cache takes the OS's default pages" in warned[0]


def test_fault_in_needs_a_contiguous_array():
    with pytest.raises(ValueError, match=r"fault_in_zeros needs a C-contiguous array, got strides \(32, 16\)"):
        _kernel.fault_in_zeros(np.zeros((4, 4))[:, ::2])


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_a_cache_that_fits_takes_a_kept_caches_storage(ref, rng, dtype):
    """A new cache on an old one's storage (`reuse`): no allocation or fault-in, its own slot layout, and
    attention over what it writes, whatever the old one held there; one that needs more, or another dtype or
    values layout, is refused."""
    old = HostKVCache(2, 6, 40, 2, 64, dtype)
    old.write(1, np.repeat(np.arange(6), 40), np.tile(np.arange(40), 6),
              *(ref.random_kv(rng, (240, 2, 64), np.float32) for _ in range(2)))  # data the new cache must not see
    caps = np.array([7, 33, 2])
    assert old.fits(2, 3, caps, 2, 64, dtype) and old.fits(2, 6, 40, 2, 64, dtype)
    new = HostKVCache(2, 3, caps, 2, 64, dtype, reuse=old)
    assert new.fault_in_s == 0 and new.nbytes == HostKVCache.footprint(2, 3, caps, 2, 64, dtype) < old.nbytes
    assert new.storage_bytes == old.storage_bytes and np.shares_memory(new.k, old.k) and np.shares_memory(new.v, old.v)
    assert new.k.flags.c_contiguous and new.lengths.shape == (2, 3) and not new.lengths.any()
    slots = new.allocate(3)
    n = caps - 1
    k, v = (ref.random_kv(rng, (n.sum(), 2, 64), np.float32) for _ in range(2))
    new.write(1, np.repeat(slots, n), np.concatenate([np.arange(m) for m in n]), k, v)
    q = rng.standard_normal((3, 8, 64), np.float32)
    fresh = HostKVCache(2, 3, caps, 2, 64, dtype)
    fresh.write(1, np.repeat(slots, n), np.concatenate([np.arange(m) for m in n]), k, v)
    np.testing.assert_array_equal(new.attend(1, slots, q), fresh.attend(1, slots, q))
    assert not old.fits(2, 6, 41, 2, 64, dtype) and not old.fits(2, 3, caps, 2, 64, "float32")
    assert not old.fits(2, 3, caps, 2, 64, dtype, value_dim=32)
    assert old.fits(2, 6, 80, 2, 32, dtype) == (dtype != "int8")  # as many elements, but int8 needs 2x the scales
    with pytest.raises(ValueError, match=r"reuse: a cache of [\d,]+ bytes of \w+ storage \(values apart\) cannot "
                                         r"hold one of [\d,]+ bytes"):
        HostKVCache(2, 6, 41, 2, 64, dtype, reuse=old)


def test_ragged_capacities():
    """One capacity per slot: the storage is their sum, each slot's region as long as its capacity."""
    caps = np.array([5, 1, 70, 33])
    cache = HostKVCache(2, 4, caps, 3, 64, "float32")
    assert cache.nbytes == HostKVCache.footprint(2, 4, caps, 3, 64, "float32") == 2 * 2 * 109 * 3 * 64 * 4
    assert [cache.slot_kv(1, s)[0].shape[1] for s in range(4)] == cache.capacities.tolist() == caps.tolist()
    row = np.ones((1, 3, 64), np.float32)
    with pytest.raises(ValueError, match=r"positions\[0\] reaches position 1 of slot 1, which holds 1 positions"):
        cache.write(0, [1], [1], row, row)
    cache.write(0, [1], [0], row, row)
    with pytest.raises(ValueError, match=r"slots \[1\] are full \(capacities \[1\]\)"):
        cache.append(0, [1], row, row)
    with pytest.raises(ValueError, match=r"lengths\[0\] reaches position 5 of slot 0, which holds 5 positions"):
        cache.attend(0, [0], np.ones((1, 3, 64), np.float32), [6])
    for bad in ([5, 1, 0, 3], [5, 1, 70], [5.0, 1.0, 70.0, 33.0]):
        with pytest.raises(ValueError, match=r"max_context must be a positive integer or 4 of them \(one per slot\)"):
            HostKVCache(1, 4, np.array(bad), 3, 64)


@pytest.mark.parametrize("ragged", [False, True], ids=["uniform", "ragged"])
@pytest.mark.parametrize("dtype", KV_DTYPES, ids=str)
def test_append_for_a_micro_batch_of_slots_then_attend(ref, rng, dtype, ragged):
    L, N, S, Hk, G, D = 2, 6, 150, 2, 4, 96
    prompt = [5, 1, 70, 33]
    cache = HostKVCache(L, N, np.array([8, 4, 73, 36, 1, 150]) if ragged else S, Hk, D, dtype)  # ragged: prompt + 3
    slots = cache.allocate(4)
    np.testing.assert_array_equal(slots, [0, 1, 2, 3])
    for s, n in zip(slots, prompt):  # prompts written the way prefill does: positions 0..n-1 of one slot
        cache.write(1, np.full(n, s), np.arange(n), *(ref.random_kv(rng, (n, Hk, D), np.float32) for _ in range(2)))
    np.testing.assert_array_equal(cache.lengths[1, slots], prompt)
    np.testing.assert_array_equal(cache.lengths[0], 0)
    for step in range(3):  # decode steps: one new row per slot
        k_new, v_new = (ref.random_kv(rng, (4, Hk, D), np.float32) for _ in range(2))
        new_lengths = cache.append(1, slots, k_new, v_new)
        np.testing.assert_array_equal(new_lengths, np.array(prompt) + step + 1)
        for b, s in enumerate(slots):
            k_s, v_s = cache.slot_kv(1, s)
            np.testing.assert_array_equal(k_s[:, prompt[b] + step], k_new[b].astype(dtype))
            np.testing.assert_array_equal(v_s[:, prompt[b] + step], v_new[b].astype(dtype))
        q = rng.standard_normal((4, Hk * G, D), np.float32)
        out = cache.attend(1, slots, q)
        k, v = dense(cache, 1, slots)
        expected = ref.attention(q[:, None], k, v, new_lengths[:, None])[:, 0]
        assert ref.error(out, expected) < ref.tolerance[dtype]
        np.testing.assert_allclose(out, decode_attention(q, k, v, new_lengths), rtol=0, atol=1e-6)


def test_int8_cache_quantises_rows_and_attends_to_them(ref, rng):
    """int8 storage: each row of D elements within half a step (scale / 2) of what was written, scale max|row|
    / 127; attention equals the float64 reference over the dequantised K/V (f32 tolerance) and stays within
    2% of the one over the values written; the footprint counts the scales."""
    L, N, S, Hk, G, D = 2, 4, 50, 2, 4, 96
    cache = HostKVCache(L, N, S, Hk, D, "int8")
    assert cache.k.dtype == np.int8 and cache.k_scales.shape == (L, N * S * Hk)
    assert HostKVCache.footprint(L, N, S, Hk, D, "int8") == cache.nbytes == 2 * L * N * S * Hk * (D + 4)
    before, new = np.array([0, 31, 1, 12]), np.array([50, 6, 6, 6])
    written = [[ref.random_kv(rng, (n, Hk, D), np.float32) * rng.uniform(0.1, 30) for _ in range(2)]
               for n in before + new]
    written[1][0][3, 1] = 0.0  # a row of zeros (scale 1, all zero)
    written[2][1][:, 0, 5] = 500.0  # an outlier channel: its rows quantise coarsely
    for s, (k, v) in enumerate(written):
        cache.write(1, np.full(len(k), s), np.arange(len(k)), k, v)
    dequantised = []
    for s, (k, v) in enumerate(written):
        n, rows = len(k), cache.offsets[s] // D + np.arange(Hk)[:, None] * S + np.arange(len(k))  # [Hk, n]
        pair = []
        for x, stored, scales in zip((k, v), cache.slot_kv(1, s), (cache.k_scales[1], cache.v_scales[1])):
            sc = scales[rows][..., None]
            amax = np.abs(x).max(-1).T[..., None]  # [Hk, n, 1]
            np.testing.assert_allclose(sc, np.where(amax > 0, amax / 127, 1.0), rtol=1e-6)
            deq = stored[:, :n].astype(np.float32) * sc  # [Hk, n, D]
            assert (np.abs(deq - x.transpose(1, 0, 2)) <= sc * 0.5 * (1 + 1e-5)).all()
            pair.append(np.pad(deq.transpose(1, 0, 2), ((0, S - n), (0, 0), (0, 0))))
        dequantised.append(pair)
    assert not cache.k[1, cache.offsets[1] + 1 * S * D + 3 * D:][:D].any()
    k_deq, v_deq = (np.stack([p[i] for p in dequantised]) for i in range(2))
    k_true, v_true = (np.stack([np.pad(w[i], ((0, S - len(w[i])), (0, 0), (0, 0))) for w in written]) for i in range(2))
    slots = np.arange(N)
    q = rng.standard_normal((N, Hk * G, D), np.float32) * 0.2
    out = cache.attend(1, slots, q)
    n_ctx = (before + new)[:, None]
    assert ref.error(out, ref.attention(q[:, None], k_deq, v_deq, n_ctx)[:, 0]) < 1e-5
    assert ref.error(out, ref.attention(q[:, None], k_true, v_true, n_ctx)[:, 0]) < 2e-2
    T = 6
    qp = rng.standard_normal((N, T, Hk * G, D), np.float32) * 0.2
    out = cache.attend_prefill(1, slots, qp, before)
    n_ctx = np.minimum(before[:, None] + np.arange(1, T + 1), (before + new)[:, None])
    assert ref.error(out, ref.attention(qp, k_deq, v_deq, n_ctx)) < 1e-5
    for src in (BF16, np.float16):  # rows given in the model's dtype quantise as their float32 values do
        x = written[0][0][:5].astype(src)
        other = HostKVCache(1, 2, S, Hk, D, "int8")
        other.write(0, [0] * 5, np.arange(5), x, x)
        other.write(0, [1] * 5, np.arange(5), x.astype(np.float32), x.astype(np.float32))
        np.testing.assert_array_equal(other.slot_kv(0, 0)[0][:, :5], other.slot_kv(0, 1)[0][:, :5])
        np.testing.assert_array_equal(other.k_scales[0, :S * Hk].reshape(Hk, S)[:, :5],
                                      other.k_scales[0, S * Hk:].reshape(Hk, S)[:, :5])
    odd = np.ones((4, Hk, D), np.float32)
    odd[0, 0, 0], odd[1, 0, 0], odd[2] = np.nan, np.inf, 1e-35  # NaN, infinity, (nearly) zeros
    other = HostKVCache(1, 1, 4, Hk, D, "int8")
    other.write(0, [0] * 4, np.arange(4), odd, odd)
    assert np.isnan(other.k_scales[0, [0, 1]]).all() and (other.k_scales[0, [2, 4 + 2]] == 1).all()
    assert not other.k[0].reshape(Hk, 4, D)[0, :3].any() and (other.k[0].reshape(Hk, 4, D)[1, :2] == 127).all()
    q1 = np.ones((1, Hk * G, D), np.float32)
    for n in (1, 2):  # KV head 0 sees the NaN / the infinity, head 1 rows of ones
        out = other.attend(0, [0], q1, [n])
        assert np.isnan(out[:, :G]).all() and (out[:, G:] == 1).all()
    # head 1: three rows of ones (score sqrt(D)) and the zeros row (score 0, value 0)
    np.testing.assert_allclose(other.attend(0, [0], q1, [4])[:, G:], 3 / (3 + np.exp(-np.sqrt(D))), rtol=1e-6)
    with pytest.raises(ValueError, match="k must be bfloat16 .* or float32, got int8"):
        decode_attention(q, cache.slot_kv(1, 0)[0][None].transpose(0, 2, 1, 3), cache.slot_kv(1, 0)[1][None]
                         .transpose(0, 2, 1, 3), [1])


def test_slot_reuse_after_free(ref, rng):
    N, S, Hk, D = 4, 64, 1, 64
    cache = HostKVCache(2, N, S, Hk, D)
    np.testing.assert_array_equal(cache.allocate(N), np.arange(N))
    for layer in range(2):
        cache.write(layer, np.repeat(np.arange(N), S), np.tile(np.arange(S), N),
                    *(ref.random_kv(rng, (N * S, Hk, D), np.float32) for _ in range(2)))
    with pytest.raises(ValueError, match="asked for 1 slots, only 0 of 4 are free"):
        cache.allocate(1)
    cache.free([2, 0])
    np.testing.assert_array_equal(cache.lengths[:, [0, 2]], 0)
    np.testing.assert_array_equal(cache.lengths[:, [1, 3]], S)
    reused = cache.allocate(2)
    np.testing.assert_array_equal(reused, [0, 2])
    k_new, v_new = (ref.random_kv(rng, (2, Hk, D), np.float32) for _ in range(2))
    np.testing.assert_array_equal(cache.append(0, reused, k_new, v_new), [1, 1])
    q = rng.standard_normal((2, 4, D), np.float32)
    # one stored position: the output is that position's V, whatever the slot held before
    np.testing.assert_allclose(cache.attend(0, reused, q), np.repeat(v_new.astype(BF16).astype(np.float32), 4, 1),
                               rtol=1e-6)
    cache.free([1])
    with pytest.raises(ValueError, match=r"slots \[1\] are not allocated"):
        cache.free([1])
    cache.write(0, [1], [5], k_new[:1], v_new[:1])  # a slot written before it is allocated: length 6 ...
    assert cache.lengths[0, 1] == 6
    np.testing.assert_array_equal(cache.allocate(1), [1])
    np.testing.assert_array_equal(cache.lengths[:, 1], 0)  # ... which its allocation does not carry over


def test_attend_with_explicit_lengths_and_out(ref, rng):
    """The offload engine's call: cache.attend(layer, slots, q, lengths) on slots in any order."""
    N, S, Hk, G, D = 5, 90, 2, 8, 128
    cache = HostKVCache(1, N, S, Hk, D)
    cache.write(0, np.repeat(np.arange(N), S), np.tile(np.arange(S), N),
                *(ref.random_kv(rng, (N * S, Hk, D), np.float32) for _ in range(2)))
    slots, lengths = np.array([4, 0, 2]), np.array([90, 1, 45])
    q = rng.standard_normal((3, Hk * G, D), np.float32)
    out = np.empty_like(q)
    assert cache.attend(0, slots, q, lengths, out=out) is out
    k, v = dense(cache, 0, slots)
    assert ref.error(out, ref.attention(q[:, None], k, v, lengths[:, None])[:, 0]) < 1e-3


@pytest.mark.parametrize("dtype", KV_DTYPES, ids=str)
def test_rows_given_length_zero_get_zeros_and_leave_the_others_alone(ref, rng, dtype):
    """The offload engine's decode call over a whole micro-batch: rows not decoding are given length 0 and get
    zeros (even where their slot holds data, and in a bfloat16 out filled with NaN before); the others get what
    a call over them alone gives."""
    N, S, Hk, G, D = 6, 70, 2, 4, 64
    cache = HostKVCache(1, N, S, Hk, D, dtype)
    cache.write(0, np.repeat(np.arange(N), S), np.tile(np.arange(S), N),
                *(ref.random_kv(rng, (N * S, Hk, D), np.float32) for _ in range(2)))
    q = rng.standard_normal((N, Hk * G, D), np.float32).astype(BF16)
    lengths = np.array([0, 70, 0, 3, 1, 0])
    out = np.full(q.shape, np.nan, BF16)
    assert cache.attend(0, np.arange(N), q, lengths, out=out) is out
    idle = lengths == 0
    assert (out[idle].view(np.uint16) == 0).all()
    alone = cache.attend(0, np.flatnonzero(~idle), q[~idle], lengths[~idle])
    np.testing.assert_allclose(out[~idle].astype(np.float32), alone.astype(BF16).astype(np.float32), rtol=2**-7)
    k, v = dense(cache, 0, np.flatnonzero(~idle))
    assert ref.error(alone, ref.attention(q[~idle, None], k, v, lengths[~idle, None])[:, 0]) < 1e-2
    with pytest.raises(ValueError, match=r"lengths must be >= 0 \(0: the row attends to nothing\), got lengths\[1\] = -1"):
        cache.attend(0, [0, 1], q[:2], [1, -1])


@pytest.mark.parametrize("dtype", KV_DTYPES, ids=str)
def test_attend_prefill(ref, rng, dtype):
    """Causal prefill over stored positions; padded queries past a row's length see only stored rows."""
    N, S, Hk, G, D, T = 3, 40, 2, 4, 64, 6
    cache = HostKVCache(1, N, S, Hk, D, dtype)
    before, new = np.array([0, 10, 3]), np.array([6, 6, 2])  # row 2: 2 real queries, 4 padding
    for s in range(N):
        n = before[s] + new[s]
        cache.write(0, np.full(n, s), np.arange(n), *(ref.random_kv(rng, (n, Hk, D), np.float32) for _ in range(2)))
    q = rng.standard_normal((N, T, Hk * G, D), np.float32)
    out = cache.attend_prefill(0, np.arange(N), q, before)
    k, v = dense(cache, 0, np.arange(N))
    n_ctx = np.minimum(before[:, None] + np.arange(1, T + 1), (before + new)[:, None])
    assert ref.error(out, ref.attention(q, k, v, n_ctx)) < ref.tolerance[dtype]
    np.testing.assert_allclose(out[:2], prefill_attention(q[:2], k[:2], v[:2], before[:2]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "int8"])
def test_write_rows_of_a_padded_batch_equals_writing_each_prompt(rng, dtype):
    """`rows` picks the prompt positions out of a padded batch [n, T, Hk, D] (flattened, no copy): the cache
    then holds exactly what one write per prompt of its own positions leaves."""
    n, T, Hk, D = 5, 7, 2, 64
    lens, slots = np.array([7, 1, 4, 6, 2]), np.array([3, 0, 4, 1, 2])
    k, v = (rng.standard_normal((n, T, Hk, D)).astype(np.float32) for _ in range(2))
    one, each = (HostKVCache(1, n, T + 2, Hk, D, dtype) for _ in range(2))
    r, t = np.nonzero(np.arange(T)[None] < lens[:, None])
    one.write(0, slots[r], t, k.reshape(n * T, Hk, D), v.reshape(n * T, Hk, D), rows=r * T + t)
    for b in range(n):
        each.write(0, np.full(lens[b], slots[b]), np.arange(lens[b]), k[b, :lens[b]], v[b, :lens[b]])
    for a, b in ((one.k, each.k), (one.v, each.v)) + (((one.k_scales, each.k_scales),) if dtype == "int8" else ()):
        assert np.array_equal(a.view(np.uint8), b.view(np.uint8))
    assert np.array_equal(one.lengths, each.lengths) and set(one.lengths[0][slots]) == set(lens)
    assert np.abs(one.k.astype(np.float32)).sum() > 0  # something was written


@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "int8"])
def test_serial_and_parallel_writes_store_the_same(rng, monkeypatch, dtype):
    """Writes of fewer elements than `_kernel.SERIAL_COPY_ELEMENTS` (`SERIAL_QUANTIZE_ELEMENTS` for int8) run on
    the calling thread (no parallel region to wake the threads for), from that many on in parallel: both leave
    the same bytes, int8's scales and odd rows included."""
    M, Hk, D = 9, 2, 64
    k, v = (rng.standard_normal((M, Hk, D)).astype(np.float32) for _ in range(2))
    k[1, 0, 3], k[2, 1] = np.nan, 0.0
    slots, positions = rng.integers(0, 4, M), np.arange(M)
    bound = "SERIAL_QUANTIZE_ELEMENTS" if dtype == "int8" else "SERIAL_COPY_ELEMENTS"
    caches, seen = [], []
    for elements in (M * Hk * D, M * Hk * D + 1):  # the rows' elements at the bound: parallel; one below it: serial
        monkeypatch.setattr(_kernel, bound, elements)
        for name in ("_scatter_rows", "_quantize_rows"):
            kernel = getattr(_kernel, name)
            monkeypatch.setattr(_kernel, name, lambda *a, kernel=kernel: (seen.append(a[-1]), kernel(*a))[1])
        cache = HostKVCache(1, 4, M, Hk, D, dtype)
        cache.write(0, slots, positions, k, v)
        caches.append(cache)
        monkeypatch.undo()
    assert seen == [False, False, True, True]  # k and v, in parallel, then each on the calling thread
    one, other = caches
    for a, b in ((one.k, other.k), (one.v, other.v)) + (((one.k_scales, other.k_scales),) if dtype == "int8" else ()):
        assert np.array_equal(a.view(np.uint8), b.view(np.uint8))
    assert np.abs(np.nan_to_num(one.v.astype(np.float32))).sum() > 0


def test_write_rows_validation():
    cache, row = HostKVCache(1, 2, 8, 2, 64), np.ones((3, 2, 64), np.float32)
    with pytest.raises(ValueError, match=r"rows must lie in \[0, 2\] \(rows of k \(3, 2, 64\)\), got rows\[1\] = 3"):
        cache.write(0, [0, 0], [0, 1], row, row, rows=[0, 3])
    with pytest.raises(ValueError, match=r"slots must have shape \(2,\) \(M from rows \(2,\)\), got \(1,\)"):
        cache.write(0, [0], [0, 1], row, row, rows=[0, 2])
    with pytest.raises(ValueError, match=r"rows must be one index into k \(3, 2, 64\) per position written, got shape \(1, 2\)"):
        cache.write(0, [0, 0], [0, 1], row, row, rows=[[0, 2]])


def test_cache_validation_errors():
    cache = HostKVCache(2, 3, 8, 2, 64)
    row = np.ones((1, 2, 64), np.float32)
    with pytest.raises(ValueError, match=r"positions\[0\] reaches position 8 of slot 0, which holds 8 positions"):
        cache.write(0, [0], [8], row, row)
    with pytest.raises(ValueError, match=r"k must have shape \[M, Hk=2, D=64\] like k, got k \(1, 3, 64\)"):
        cache.write(0, [0], [0], np.ones((1, 3, 64)), row)
    with pytest.raises(ValueError, match=r"v must have a float dtype, got int64 with shape \(1, 2, 64\)"):
        cache.write(0, [0], [0], row, np.ones((1, 2, 64), np.int64))
    with pytest.raises(ValueError, match=r"slots must lie in \[0, 2\] \(num_slots=3\), got slots\[0\] = 3"):
        cache.write(0, [3], [0], row, row)
    with pytest.raises(ValueError, match=r"layer must be an int in \[0, 2\), got 2"):
        cache.write(2, [0], [0], row, row)
    q = np.ones((1, 4, 64), np.float32)
    with pytest.raises(ValueError, match=r"lengths must be >= 1 \(a slot with nothing written has length 0\), got lengths\[0\] = 0"):
        cache.attend(0, [1], q)  # nothing written to slot 1
    with pytest.raises(ValueError, match=r"q of shape \(1, 4, 32\) has D=32, the cache has head_dim=64"):
        cache.attend(0, [1], np.ones((1, 4, 32), np.float32), [1])
    with pytest.raises(ValueError, match=r"q has Hq=3 heads, not a multiple of the cache's Hk=2"):
        cache.attend(0, [1], np.ones((1, 3, 64), np.float32), [1])
    with pytest.raises(ValueError, match=r"slots must have shape \(1,\) \(B from q \(1, 4, 64\)\), got \(2,\)"):
        cache.attend(0, [0, 1], q, [1])
    cache.write(0, np.zeros(8, int), np.arange(8), np.ones((8, 2, 64)), np.ones((8, 2, 64)))
    with pytest.raises(ValueError, match=r"slots \[0\] are full \(capacities \[8\]\)"):
        cache.append(0, [0], row, row)
    with pytest.raises(ValueError, match="append needs distinct slots"):
        cache.append(1, [1, 1], np.ones((2, 2, 64)), np.ones((2, 2, 64)))
    with pytest.raises(ValueError, match=r"lengths_before\[0\] = 5 must be < lengths\[0\] = 5"):
        cache.attend_prefill(0, [0], q[:, None], [5], lengths=[5])
    with pytest.raises(ValueError, match=r"slots \[2\] are not allocated"):
        cache.free([2])


def test_attend_releases_the_gil():
    """A Python thread keeps counting while attention runs in another thread on a large input."""
    B, S, Hk, D = 64, 4096, 8, 128  # 1 GiB of bf16 K and V: calls long against the 5 ms GIL switch interval
    cache = HostKVCache(1, B, S, Hk, D)
    cache.k[...] = 0.5
    cache.v[...] = -0.25
    slots, lengths = np.arange(B), np.full(B, S)
    q = np.ones((B, 4 * Hk, D), np.float32)
    cache.attend(0, slots[:1], q[:1], lengths[:1])  # compile outside the measured call
    counter, during, stop = [0], [], threading.Event()

    def attend():
        numba.set_num_threads(1)  # leave the other core to the counting thread
        for _ in range(3):
            before, t0 = counter[0], time.perf_counter()
            cache.attend(0, slots, q, lengths)
            during.append((counter[0] - before, time.perf_counter() - t0))
        stop.set()

    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 0.05:  # the counter's rate with nothing else running
        counter[0] += 1
    rate = counter[0] / 0.05
    worker = threading.Thread(target=attend)
    worker.start()
    while not stop.is_set():
        counter[0] += 1
    worker.join()
    counted, seconds = max(during, key=lambda cs: cs[0] / cs[1])
    assert seconds > 0.05
    # holding the GIL, only the interpreter's forced switches (every 5 ms of Python) would let it count
    assert counted > 0.4 * rate * seconds, (during, rate)


@pytest.mark.parametrize("dtype", [BF16, "int8"])
def test_values_in_keys_store_only_keys(ref, rng, dtype):
    """Latent attention's cache (`value_dim`): one head of D = 24 dims, the values its first 16; K is stored
    once (half the footprint), writes refuse a v, and attention's 16 output dims are attention over those
    values (float64 reference; int8 against the dequantised keys the cache holds), decode and prefill, with
    a softmax scale of its own."""
    L, N, S, Hq, D, Dv, scale = 2, 3, 40, 8, 24, 16, 0.3
    cache = HostKVCache(L, N, S, 1, D, dtype, value_dim=Dv)
    assert cache.v is cache.k and cache.nbytes == HostKVCache.footprint(L, N, S, 1, D, dtype, Dv) == \
        HostKVCache.footprint(L, N, S, 1, D, dtype) // 2
    lengths = np.array([40, 1, 17])
    written = [ref.random_kv(rng, (n, 1, D), np.float32) for n in lengths]
    for s, k in enumerate(written):
        cache.write(1, np.full(len(k), s), np.arange(len(k)), k, None)
    with pytest.raises(ValueError, match="holds the values in the keys: v must be None"):
        cache.write(1, [0], [0], written[0][:1], written[0][:1])
    stored = np.zeros((N, S, 1, D), np.float32)  # what the cache holds (int8: dequantised)
    for s, n in enumerate(lengths):
        k_s = cache.slot_kv(1, s)[0][:, :n].astype(np.float32)
        if cache.k_scales is not None:
            k_s = k_s * cache.k_scales[1][cache.offsets[s] // D + np.arange(n)][None, :, None]
        stored[s, :n] = k_s.transpose(1, 0, 2)
    tolerance = ref.tolerance.get(np.dtype(dtype), 1e-5)
    q = rng.standard_normal((N, Hq, D), np.float32) * 0.3
    out = cache.attend(1, np.arange(N), q, scale=scale)
    want = ref.attention(q[:, None], stored, stored[..., :Dv], lengths[:, None], scale)[:, 0]
    assert out.shape == (N, Hq, Dv) and ref.error(out, want) < tolerance
    qp = rng.standard_normal((N, 4, Hq, D), np.float32) * 0.3
    before = lengths - np.minimum(lengths, 4)
    outp = cache.attend_prefill(1, np.arange(N), qp, before, scale=scale)
    n_ctx = np.minimum(before[:, None] + np.arange(1, 5), lengths[:, None])
    assert ref.error(outp, ref.attention(qp, stored, stored[..., :Dv], n_ctx, scale)) < tolerance
    for bad in (25, True):
        with pytest.raises(ValueError, match="value_dim must be None or an integer in 1..head_dim=24"):
            HostKVCache(L, N, S, 1, D, dtype, value_dim=bad)
