"""The numba attention kernel shared by the dense entry points and the host KV cache.

One kernel covers decode and causal prefill: query ``(b, t)`` attends to KV positions
``[0, min(starts[b] + t + 1, ends[b]))`` of its row's KV (decode: ``T = 1``,
``starts = lengths - 1``, ``ends = lengths``). K/V are passed flat, with per-row element offsets and
head strides and one position stride, so that the cache's head-major layout (one region per slot, as
long as that slot's capacity) and the dense ``[B, S, Hk, D]`` layout share one compiled kernel per
KV dtype. bfloat16 is read as its uint16 bits and widened to float32 by a shift; int8 (the cache's
quantised storage, written by `scatter`) is widened and multiplied by its row's float32 scale (one per D
elements: the scale of the row at element offset o is scales[o // D]), folded into the score for K and
into the probability for V. The queries are read in their own dtype (bfloat16 or float32) and scaled per
task, and the outputs written in theirs (bfloat16 rounded to nearest even), so that a caller holding
bfloat16 activations makes no float32 copies of its own: at the offload engine's decode shape (880 rows x
32 heads x 128) those were three single-threaded passes, 2 ms of a 19 ms call on the 2-core VM. All
arithmetic is float32. Inputs are validated by the callers; nothing here checks shapes.
"""
from __future__ import annotations

import math
import os

import ml_dtypes
import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from host_ops import numba_target  # noqa: F401  (numba's target, set before the first @njit below)

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
FLOAT32 = np.dtype(np.float32)
INT8 = np.dtype(np.int8)
KV_DTYPES = (BFLOAT16, FLOAT32)  # what the kernel reads as they are
_TINY = np.float32(1e-30)  # int8 rows whose largest magnitude is at most this are stored as zeros
_NO_SCALES = np.ones(1, np.float32)  # bf16/f32 rows: every row's scale is _NO_SCALES[0] (row mask 0)

# No nnan/ninf: the running max starts at -inf. Reassociation lets LLVM vectorise the dot products.
_FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}
_JIT = dict(nogil=True, fastmath=_FASTMATH, error_model="numpy", cache=True)
# A write of fewer elements than these runs on the calling thread: waking the threads for a parallel region may
# cost more than the work (H200 host, 2026-11-27: the engine's decode writes of 16 rows, parallel, took 0.42 ms a
# call). Not much more: with the bound at 2**20 elements (Mixtral's 1024 rows), the same host's 4-layer runs wrote
# 125 rows a call in 0.94 ms where in parallel they had taken 0.53, and the full run 880 rows in 6.1 ms (then
# paying a page fault at each new page, which the cache now takes at allocation). 2**16 is 64 of Mixtral's rows;
# quantising to int8 costs about twice as much per element as a copy, so its bound is a quarter.
SERIAL_COPY_ELEMENTS = 2**16
SERIAL_QUANTIZE_ELEMENTS = 2**14
try:
    PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")  # the OS's page: what `fault_in_zeros` writes one byte of
except (ValueError, OSError, AttributeError):
    PAGE_BYTES = 4096
_BLOCK = 64  # KV positions per online-softmax step (a multiple of 4)
_ROWS_PER_THREAD = 4  # from this many query rows per thread, a thread claims a row's KV heads at once
_LINE = 64  # bytes of a cache line: the stride of the prefetches
_I32 = ir.IntType(32)


@intrinsic
def _as_f32(typingctx, x):
    """One KV element as float32: uint16 (bfloat16 bits) shifted into the top half, int8 converted, or
    float32 as is. Done in LLVM so the widening stays 32-bit (numba would promote integer arithmetic to int64)."""
    if x == types.float32:
        return types.float32(x), lambda context, builder, sig, args: args[0]
    if x == types.int8:
        return types.float32(x), lambda context, builder, sig, args: builder.sitofp(args[0], ir.FloatType())
    if x == types.uint16:
        def codegen(context, builder, sig, args):
            bits = builder.shl(builder.zext(args[0], _I32), ir.Constant(_I32, 16))
            return builder.bitcast(bits, ir.FloatType())
        return types.float32(x), codegen
    return None


@intrinsic
def _from_f32(typingctx, x, like):
    """float32 x as an element of array `like`'s dtype: float32 as is, or bfloat16 bits (uint16) rounded to
    nearest even, a NaN to the quiet NaN of its sign (as ml_dtypes casts)."""
    if x != types.float32 or not isinstance(like, types.Array):
        return None
    if like.dtype == types.float32:
        return types.float32(x, like), lambda context, builder, sig, args: args[0]
    if like.dtype != types.uint16:
        return None

    def codegen(context, builder, sig, args):
        def c(n):
            return ir.Constant(_I32, n)
        bits = builder.bitcast(args[0], _I32)
        upper = builder.lshr(bits, c(16))
        rounded = builder.lshr(builder.add(bits, builder.add(c(0x7FFF), builder.and_(upper, c(1)))), c(16))
        quiet_nan = builder.or_(builder.and_(upper, c(0x8000)), c(0x7FC0))
        nan = builder.fcmp_unordered("uno", args[0], args[0])
        return builder.trunc(builder.select(nan, quiet_nan, rounded), ir.IntType(16))
    return types.uint16(x, like), codegen


@intrinsic
def _prefetch(typingctx, arr, idx):
    """Hint the cache line holding arr[idx] into the caches (llvm.prefetch: a read, kept in every level).
    Never faults, so idx may point past the rows that will be used."""
    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        i8p = ir.IntType(8).as_pointer()
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, _I32, _I32, _I32]),
                                            "llvm.prefetch.p0")
        builder.call(fn, [builder.bitcast(builder.gep(ary.data, [args[1]]), i8p), ir.Constant(_I32, 0),
                          ir.Constant(_I32, 3), ir.Constant(_I32, 1)])
        return context.get_dummy_value()
    return types.none(arr, idx), codegen


@intrinsic
def _claim(typingctx, counter):
    """Atomically counter[0] += 1 (an int64 array shared by the threads); returns the value before: the index
    of the task the calling thread takes (llvm atomicrmw add, monotonic: the parallel loop's join orders the
    tasks' writes)."""
    if not (isinstance(counter, types.Array) and counter.dtype == types.int64):
        return None

    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        return builder.atomic_rmw("add", ary.data, ir.Constant(ir.IntType(64), 1), "monotonic")
    return types.int64(counter), codegen


@intrinsic
def _line_elements(typingctx, arr):
    """Elements of `arr`'s dtype in a cache line, a compile-time constant."""
    n = max(_LINE * 8 // arr.dtype.bitwidth, 1)
    return types.int64(arr), lambda context, builder, sig, args: ir.Constant(ir.IntType(64), n)


@njit(**_JIT)
def _prefetch_rows(a, o, n, pos_stride):
    """Prefetch 4 rows of n elements of `a` from element offset o, pos_stride apart (a row that does not start
    on a cache line ends on one line more: its end is prefetched too)."""
    line = _line_elements(a)
    for r in range(4):
        for e in range(0, n + line - 1, line):
            _prefetch(a, o + r * pos_stride + e)


@intrinsic
def _exp2_int(typingctx, t):
    """2**t for an integer-valued float32 t in [-126, 127], built from the exponent bits."""
    def codegen(context, builder, sig, args):
        biased = builder.add(builder.fptosi(args[0], _I32), ir.Constant(_I32, 127))
        return builder.bitcast(builder.shl(biased, ir.Constant(_I32, 23)), ir.FloatType())
    return types.float32(types.float32), codegen


@njit(**_JIT)
def _exp_minus(s, n, mx):
    """s[:n] <- exp(s[:n] - mx) for s <= mx (Cephes expf polynomial, vectorisable); returns their sum."""
    total = np.float32(0.0)
    for j in range(n):
        x = max(s[j] - mx, np.float32(-87.0))
        t = np.floor(x * np.float32(1.4426950408889634) + np.float32(0.5))
        r = x - t * np.float32(0.693359375) + t * np.float32(2.12194440e-4)
        p = ((((np.float32(1.9875691500e-4) * r + np.float32(1.3981999507e-3)) * r + np.float32(8.3334519073e-3)) * r
              + np.float32(4.1665795894e-2)) * r + np.float32(1.6666665459e-1)) * r + np.float32(5.0000001201e-1)
        e = (p * (r * r) + r + np.float32(1.0)) * _exp2_int(t)
        s[j] = e
        total += e
    return total


@njit(**_JIT)
def _four_rows(row0, j, nb, pos_stride):
    """Offsets of rows j..j+3 of a block starting at row0; rows past nb-1 repeat row nb-1.
    (Returning offsets, not views, keeps the callers' loops vectorised as well as inline slicing.)"""
    return (row0 + j * pos_stride, row0 + min(j + 1, nb - 1) * pos_stride, row0 + min(j + 2, nb - 1) * pos_stride,
            row0 + min(j + 3, nb - 1) * pos_stride)


@njit(**_JIT)
def _attend_group(q, scale, k, v, k_scales, v_scales, row_mask, base, pos_stride, n, out, qs, acc, s, m, l,
                  next_base):
    """Softmax attention of the G query heads sharing one KV head, single pass over n positions (n = 0: out
    gets zeros).

    q [G, D], out [G, Dv]: float32, or bfloat16 as uint16 bits; q is multiplied by scale into qs [G, D]
    float32 first. Position p's K/V row is k/v[base + p*pos_stride :][:D], its
    scales k/v_scales[(o // D) & row_mask] for o its element offset (row_mask 0: one scale for all); only
    the first Dv <= D dims of V rows are read (Dv < D: values that are the keys' first dims).
    acc [Ge, Dv], s [Ge, _BLOCK], m, l [Ge]: float32 scratch, Ge = G rounded up to even (an odd G's
    last head is computed twice and the copy dropped). Each K and V row is read once per group;
    the inner loops take two heads by four rows, so each widened K/V element and each load of q
    or acc serves several multiply-adds.
    Prefetches keep the memory busy ahead of the arithmetic: the scores' pass over a block asks for its V
    rows, and the weighted sum's pass for the next block's K rows, or, in the last block, for the first
    rows at next_base, the KV the calling thread attends next. (Without them, on a 2-core Zen 4, one
    thread read KV from DRAM at 11 GB/s against 19 GB/s from cache, and the short (row, head) ranges of a
    decode at context ~100 at 7 GB/s.)
    """
    G, D = q.shape
    Ge, Dv = acc.shape
    for g in range(G):
        for d in range(D):
            qs[g, d] = _as_f32(q[g, d]) * scale
    for g in range(Ge):
        m[g] = -np.inf
        l[g] = 0.0
        for d in range(Dv):
            acc[g, d] = 0.0
    for start in range(0, n, _BLOCK):
        nb = min(_BLOCK, n - start)
        row0 = base + start * pos_stride
        for j in range(0, nb, 4):  # scores s = q k^T; s[:, nb:] get junk, zeroed below
            o0, o1, o2, o3 = _four_rows(row0, j, nb, pos_stride)
            k0, k1, k2, k3 = k[o0:o0 + D], k[o1:o1 + D], k[o2:o2 + D], k[o3:o3 + D]
            _prefetch_rows(v, o0, Dv, pos_stride)
            c0, c1, c2, c3 = (k_scales[(o0 // D) & row_mask], k_scales[(o1 // D) & row_mask],
                              k_scales[(o2 // D) & row_mask], k_scales[(o3 // D) & row_mask])
            for g in range(0, Ge, 2):
                qg, qh = qs[g], qs[min(g + 1, G - 1)]
                a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = np.float32(0.0)
                for d in range(D):
                    e0, e1, e2, e3 = _as_f32(k0[d]), _as_f32(k1[d]), _as_f32(k2[d]), _as_f32(k3[d])
                    x, y = qg[d], qh[d]
                    a0 += x * e0
                    a1 += x * e1
                    a2 += x * e2
                    a3 += x * e3
                    b0 += y * e0
                    b1 += y * e1
                    b2 += y * e2
                    b3 += y * e3
                s[g, j], s[g, j + 1], s[g, j + 2], s[g, j + 3] = a0 * c0, a1 * c1, a2 * c2, a3 * c3
                s[g + 1, j], s[g + 1, j + 1], s[g + 1, j + 2], s[g + 1, j + 3] = b0 * c0, b1 * c1, b2 * c2, b3 * c3
        for g in range(Ge):  # online softmax: probabilities, rescaled by the new running max
            sg, ag = s[g], acc[g]
            mx = m[g]
            for j in range(nb):
                mx = max(mx, sg[j])
            alpha = np.exp(m[g] - mx)
            m[g] = mx
            l[g] = l[g] * alpha + _exp_minus(sg, nb, mx)
            for j in range(nb, (nb + 3) // 4 * 4):
                sg[j] = 0.0
            for d in range(Dv):
                ag[d] *= alpha
        for j in range(0, nb, 4):  # acc += s v
            o0, o1, o2, o3 = _four_rows(row0, j, nb, pos_stride)
            v0, v1, v2, v3 = v[o0:o0 + Dv], v[o1:o1 + Dv], v[o2:o2 + Dv], v[o3:o3 + Dv]
            _prefetch_rows(k, (row0 + _BLOCK * pos_stride if start + _BLOCK < n else next_base) + j * pos_stride, D,
                           pos_stride)
            f0, f1, f2, f3 = (v_scales[(o0 // D) & row_mask], v_scales[(o1 // D) & row_mask],
                              v_scales[(o2 // D) & row_mask], v_scales[(o3 // D) & row_mask])
            for g in range(0, Ge, 2):
                ag, ah = acc[g], acc[g + 1]
                p0, p1, p2, p3 = s[g, j] * f0, s[g, j + 1] * f1, s[g, j + 2] * f2, s[g, j + 3] * f3
                r0, r1, r2, r3 = s[g + 1, j] * f0, s[g + 1, j + 1] * f1, s[g + 1, j + 2] * f2, s[g + 1, j + 3] * f3
                for d in range(Dv):
                    c0, c1, c2, c3 = _as_f32(v0[d]), _as_f32(v1[d]), _as_f32(v2[d]), _as_f32(v3[d])
                    a = ag[d]
                    a += p0 * c0
                    a += p1 * c1
                    a += p2 * c2
                    a += p3 * c3
                    ag[d] = a
                    b = ah[d]
                    b += r0 * c0
                    b += r1 * c1
                    b += r2 * c2
                    b += r3 * c3
                    ah[d] = b
    for g in range(G):
        inv = np.float32(1.0) / l[g] if n else np.float32(0.0)  # n = 0: acc is zeros
        for d in range(Dv):
            out[g, d] = _from_f32(acc[g, d] * inv, out)


@njit(parallel=True, **_JIT)
def _attention_kernel(q, scale, k, v, k_scales, v_scales, row_mask, offsets, head_strides, pos_stride, starts,
                      ends, threads, out):
    """q [B, T, Hk, G, D], out [B, T, Hk, G, Dv] (float32, or bfloat16 as uint16 bits; scale: the softmax's);
    k, v flat; query row b's KV head h, position p is
    the D elements at offsets[b] + h * head_strides[b] + p * pos_stride; k/v_scales, row_mask: see `_attend_group`;
    threads: numba's thread count (numba.get_num_threads() inside a kernel defeats caching).

    Tasks are (query, KV head) pairs, sorted by context length, longest first, and claimed from a shared atomic
    counter: a thread that shares its core (with the engine's dispatching thread, a runtime's spinning wait)
    takes fewer tasks instead of holding the others up, as a fixed division would: on 2 cores with one of them
    busy, a call at the engine's decode shape took 2.3-2.5x its time on free cores when the tasks were dealt
    round-robin, and 1.4-1.5x claimed (`bench_host_attention --busy-cores 1`). A claim takes one unit: all KV
    heads of a query row where there are at least _ROWS_PER_THREAD rows per thread, else one task. A row's
    heads lie one after the other in the cache, so a thread streams them as one range where, claimed one at a
    time, the threads' consecutive tasks were other rows' (2-core VM, context 109, 256-880 rows: 1.11-1.13x;
    equal at context 1024). Each thread claims its next unit before it attends to the current one, and
    prefetches the next task's first K rows while it finishes each; its first unit is its own (unit w of
    worker w), so that with about as many units as threads the first thread to wake does not claim them all
    while the others start (2 tasks on 2 threads: one thread ran both, 1.9x the time, until the first tasks
    were dealt).
    """
    B, T, Hk, G, D = q.shape
    n_ctx = np.empty(B * T, np.int64)
    for b in range(B):
        for t in range(T):
            n_ctx[b * T + t] = min(starts[b] + t + 1, ends[b])
    order = np.argsort(n_ctx)[::-1]
    n_tasks = B * T * Hk
    per = Hk if B * T >= _ROWS_PER_THREAD * threads else 1  # tasks per claim: a query row's KV heads, or one
    n_units = n_tasks // per
    workers = min(threads, n_units)
    Ge, Dv = G + G % 2, out.shape[-1]
    counter = np.full(1, workers, np.int64)  # unit w is thread w's first; the rest are claimed
    for w in prange(workers):
        qs = np.empty((G, D), np.float32)
        acc = np.empty((Ge, Dv), np.float32)
        s = np.empty((Ge, _BLOCK), np.float32)
        m = np.empty(Ge, np.float32)
        l = np.empty(Ge, np.float32)
        u = w + 0  # (a copy: numba refuses to overwrite the loop index)
        while u < n_units:
            nxt = _claim(counter)
            for i in range(u * per, (u + 1) * per):
                bt, h = order[i // Hk], i % Hk
                b, t = bt // T, bt % T
                # the first K rows of the next task (this unit's next, or the next unit's first) are prefetched
                ahead = i + 1 if i + 1 < (u + 1) * per else min(nxt * per, n_tasks - 1)
                b2 = order[ahead // Hk] // T
                _attend_group(q[b, t, h], scale, k, v, k_scales, v_scales, row_mask,
                              offsets[b] + h * head_strides[b], pos_stride, n_ctx[bt], out[b, t, h], qs, acc, s,
                              m, l, offsets[b2] + ahead % Hk * head_strides[b2])
            u = nxt


@njit(**_JIT)
def _scatter_row(dst, src, rows, offsets, head_strides, m):
    """dst[offsets[m] + h * head_strides[m] :][:D] = src[rows[m], h] for every head h (src [R, Hk, D], both as
    uint16 bits or float32; offsets already include each row's position)."""
    Hk, D = src.shape[1:]
    r = rows[m]
    for h in range(Hk):
        o = offsets[m] + h * head_strides[m]
        dst[o:o + D] = src[r, h]  # a slice: twice the element loop's speed (2-core VM, 256-byte rows)


@njit(parallel=True, **_JIT)
def _scatter_rows(dst, src, rows, offsets, head_strides, serial):
    """`_scatter_row` for every m: in parallel over m, or on the calling thread alone where `serial`."""
    if serial:
        for m in range(rows.shape[0]):
            _scatter_row(dst, src, rows, offsets, head_strides, m)
    else:
        for m in prange(rows.shape[0]):
            _scatter_row(dst, src, rows, offsets, head_strides, m)


@njit(**_JIT)
def _quantize_row(dst, scales, src, rows, offsets, head_strides, m):
    """As `_scatter_row` into int8 dst, each row (m, h) symmetric-quantised: scales[o // D] = max|row| / 127,
    dst[o + d] = round(src[rows[m], h, d] / scale) in [-127, 127] (src float32, or bfloat16 as its uint16 bits).
    A row of zeros (max|row| <= _TINY) is stored as zeros with scale 1; a row holding a NaN or an infinity as
    zeros with scale NaN, so that attention over it gives NaN as it would over the row itself."""
    Hk, D = src.shape[1:]
    for h in range(Hk):
        o = offsets[m] + h * head_strides[m]
        row = src[rows[m], h]
        amax = np.float32(0.0)
        finite = np.float32(0.0)  # stays 0 unless an element is NaN or infinite (x * 0 is NaN then)
        for d in range(D):
            x = _as_f32(row[d])
            amax = max(amax, abs(x))
            finite += x * np.float32(0.0)
        if finite != 0:
            scale, inv = np.float32(np.nan), np.float32(0.0)
        elif amax > _TINY:
            scale = amax / np.float32(127.0)
            inv = np.float32(127.0) / amax
        else:
            scale, inv = np.float32(1.0), np.float32(0.0)
        for d in range(D):
            dst[o + d] = np.int8(np.rint(min(max(_as_f32(row[d]) * inv, np.float32(-127.0)), np.float32(127.0))))
        scales[o // D] = scale


@njit(parallel=True, **_JIT)
def _quantize_rows(dst, scales, src, rows, offsets, head_strides, serial):
    """`_quantize_row` for every m: in parallel over m, or on the calling thread alone where `serial`."""
    if serial:
        for m in range(rows.shape[0]):
            _quantize_row(dst, scales, src, rows, offsets, head_strides, m)
    else:
        for m in prange(rows.shape[0]):
            _quantize_row(dst, scales, src, rows, offsets, head_strides, m)


@njit(parallel=True, **_JIT)
def _fault_in(flat, stride):
    """A zero at every stride-th byte of flat and at its last (the array need not start on a page)."""
    for i in prange((flat.shape[0] + stride - 1) // stride):
        flat[i * stride] = 0
    if flat.shape[0]:
        flat[-1] = 0


def fault_in_zeros(x: np.ndarray) -> None:
    """Write a zero byte into every page of the zero-filled, C-contiguous array x, in parallel, so that the
    OS maps its pages now rather than at the first write of each (x stays all zeros). Fresh memory (a large
    np.zeros, an anonymous mapping) is mapped lazily; each first write then stops its thread for a page fault, and on a virtual machine whose
    host has not yet backed that memory, for the host too: on the 2-core VM a first write ran at 0.4-0.9 GB/s
    where a second ran at 9 GB/s; on the H200 host (a fresh VM each session) the prompts' k/v writes into a
    new 45 GB cache took 40 s of the CPU worker (2026-11-27; the VM's first touch is the suspect)."""
    if not x.flags.c_contiguous:
        raise ValueError(f"fault_in_zeros needs a C-contiguous array, got strides {x.strides} for shape {x.shape}")
    _fault_in(x.reshape(-1).view(np.uint8), PAGE_BYTES)


def _bits(x: np.ndarray) -> np.ndarray:
    return x.view(np.uint16 if x.dtype == BFLOAT16 else x.dtype)


def flat_kv(x: np.ndarray) -> np.ndarray:
    """C-contiguous bf16/f32/int8 array (or float32 scales) -> read-only flat view the kernel reads (uint16
    bits for bf16). Always read-only, so writable and read-only inputs share one compiled specialisation."""
    flat = _bits(x.reshape(-1))
    flat.flags.writeable = False
    return flat


def _int64(x, n: int) -> np.ndarray:
    return np.ascontiguousarray(np.broadcast_to(np.asarray(x, dtype=np.int64), (n,)))


def run(q, k_flat, v_flat, kv_heads, offsets, head_strides, pos_stride, starts, ends, scale, out,
        k_scales=None, v_scales=None) -> None:
    """Attention on validated inputs, written into out [B, T, Hq, Dv] float32 or bfloat16 (C-contiguous; Dv <= D:
    the first Dv dims of the V rows, e.g. values that are the keys' first dims).

    q [B, T, Hq, D]: bfloat16 or float32, read as it is (another float dtype is cast to float32 first);
    k_flat, v_flat from `flat_kv`; offsets, head_strides: [B] ints (or one for all), element offset of each
    query row's KV and of its next head; pos_stride: elements from one position to the next; starts, ends:
    [B] ints (see module doc; a row whose context is empty gets zeros); scale: softmax scale; k_scales,
    v_scales: flat float32 row scales of int8 K/V (see module doc; None for bf16/f32 K/V).
    """
    B, T, Hq, D = q.shape
    shape5 = (B, T, kv_heads, Hq // kv_heads, D)
    q = np.ascontiguousarray(q if q.dtype in KV_DTYPES else q.astype(FLOAT32))
    qs = _bits(q).reshape(shape5)
    qs.flags.writeable = False  # read-only, given writable or not: one numba build
    quantised = k_scales is not None
    k_scales, v_scales = (flat_kv(x) for x in ((k_scales, v_scales) if quantised else (_NO_SCALES, _NO_SCALES)))
    ints = [_int64(a, B) for a in (offsets, head_strides)]
    _attention_kernel(qs, np.float32(scale), k_flat, v_flat, k_scales, v_scales, -1 if quantised else 0, *ints,
                      int(pos_stride), *(_int64(a, B) for a in (starts, ends)), numba.get_num_threads(),
                      _bits(out).reshape(*shape5[:-1], out.shape[-1]))


def scatter(dst: np.ndarray, src: np.ndarray, offsets, head_strides, scales=None, rows=None) -> None:
    """Rows of src [R, Hk, D] into the flat C-contiguous array dst: row rows[m] (default m: M = R), head h at
    element offsets[m] + h * head_strides[m]. dst bf16/f32: src already in dst's dtype, copied. dst int8: src
    of any float dtype (bf16 and f32 read as they are), quantised per row, each row's scale into the flat
    float32 `scales` (see `_quantize_row`). In parallel over m, or on the calling thread where the rows hold
    fewer elements than SERIAL_COPY_ELEMENTS (SERIAL_QUANTIZE_ELEMENTS for int8); releases the GIL."""
    rows = np.arange(src.shape[0]) if rows is None else np.asarray(rows)
    rows = _int64(rows, rows.shape[0])  # read-only, given or not: one numba build
    M = rows.shape[0]
    offsets, head_strides = _int64(offsets, M), _int64(head_strides, M)
    elements = M * math.prod(src.shape[1:])
    if dst.dtype == INT8:
        src = np.ascontiguousarray(src if src.dtype in KV_DTYPES else src.astype(FLOAT32))
        _quantize_rows(dst, scales, _bits(src), rows, offsets, head_strides, elements < SERIAL_QUANTIZE_ELEMENTS)
    else:
        _scatter_rows(_bits(dst), _bits(np.ascontiguousarray(src)), rows, offsets, head_strides,
                      elements < SERIAL_COPY_ELEMENTS)
