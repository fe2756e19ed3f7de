"""Host decode attention vs host memory bandwidth.

Measures (1) a STREAM-like read bandwidth: a multi-threaded numba sum over a large float32 array,
and (2) the effective KV-read bandwidth of `HostKVCache.attend` (the offload engine's call) at
Mixtral 8x7B's decode shape (Hq=32, Hk=8, D=128, bfloat16 KV, every sequence at full context),
for several batch sizes and contexts; prints their ratio. With `--kv-dtype bfloat16 int8` (the default)
the same attention over an int8 cache (`--kv-cache-dtype int8`: half the bytes, plus a scale per row)
runs beside it, and the table gives its speed-up over bfloat16 at each shape. Best of --repeats for
every figure.

    PYTHONPATH=. python scripts/bench_host_attention.py                       # 24 GiB / 2 cores
    PYTHONPATH=. python scripts/bench_host_attention.py --batch 64 256 512 --context 1024 4096 \\
        --stream-gib 8 --max-kv-gib 16                                        # 125 GiB / 16 cores
"""
from __future__ import annotations

import argparse
import time

import numba
import numpy as np
from numba import njit, prange

from host_ops import HostKVCache
from moe_jax.hrm.calibrate import best_seconds


@njit(parallel=True, nogil=True, fastmath=True)  # no cache=True: a script's cache breaks when it is imported
def _row_sums(a):
    """a [R, C] float32 -> float32 sum, rows in parallel (a read-only pass over a)."""
    sums = np.empty(a.shape[0], np.float32)
    for r in prange(a.shape[0]):
        row = a[r]
        s = np.float32(0.0)
        for c in range(row.shape[0]):
            s += row[c]
        sums[r] = s
    return sums.sum()


def stream_read_gbs(gib: float, repeats: int) -> float:
    rows = max(64, int(gib * 2**30) // (4 * 2**16))
    a = np.ones((rows, 2**16), np.float32)
    return a.nbytes / best_seconds(lambda: _row_sums(a), repeats) / 1e9


def attention_gbs(batch: int, context: int, q_heads: int, kv_heads: int, head_dim: int, repeats: int,
                  dtypes=("bfloat16",)) -> list[tuple[float, float]]:
    """Per cache dtype, (seconds, GB/s of K+V read, int8's scales included) of one `attend` over `batch` slots
    of `context` positions: the best of `repeats`, the dtypes' calls taking turns so that a machine whose
    speed drifts (a shared VM) gives them the same conditions."""
    rng = np.random.default_rng(0)
    kv = rng.standard_normal((context, kv_heads, head_dim), np.float32)
    positions = np.arange(context)
    caches = []
    for dtype in dtypes:
        cache = HostKVCache(1, batch, context, kv_heads, head_dim, dtype)
        for slot in range(batch):
            cache.write(0, np.full(context, slot), positions, kv, kv[::-1])
        caches.append(cache)
    q = rng.standard_normal((batch, q_heads, head_dim), np.float32)
    slots, lengths = np.arange(batch), np.full(batch, context)
    out = np.empty_like(q)
    best = [float("inf")] * len(caches)
    for r in range(repeats + 1):  # round 0 warms up
        for i, cache in enumerate(caches):
            t0 = time.perf_counter()
            cache.attend(0, slots, q, lengths, out=out)
            if r:
                best[i] = min(best[i], time.perf_counter() - t0)
    return [(s, cache.nbytes / s / 1e9) for s, cache in zip(best, caches)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[32, 128, 256])
    p.add_argument("--context", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--stream-gib", type=float, default=2.0, help="array size of the bandwidth measurement")
    p.add_argument("--max-kv-gib", type=float, default=2.0, help="skip configurations with more K+V than this")
    p.add_argument("--kv-dtype", nargs="+", choices=("bfloat16", "int8"), default=["bfloat16", "int8"],
                   help="cache dtypes to time; int8 is reported as its speed-up over bfloat16")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=numba.config.NUMBA_NUM_THREADS,
                   help="numba threads for both measurements (default: all cores)")
    args = p.parse_args(argv)
    numba.set_num_threads(args.threads)

    stream = stream_read_gbs(args.stream_gib, args.repeats)
    print(f"numba {numba.__version__}, {numba.get_num_threads()} threads, threading layer {numba.threading_layer()}")
    print(f"host read bandwidth (numba parallel sum over {args.stream_gib:g} GiB): {stream:.1f} GB/s\n")
    dtypes = list(dict.fromkeys(args.kv_dtype))
    print(f"decode attention, Hq={args.q_heads} Hk={args.kv_heads} D={args.head_dim}, full context; KV MiB and GB/s "
          f"of {dtypes[0]} K+V" + (", int8's speed-up over it" if len(dtypes) > 1 else "") + ":")
    print(f"{'batch':>6} {'context':>8} {'KV MiB':>8} {'ms':>8} {'GB/s':>7} {'/ read bw':>9}"
          + "".join(f" {d + ' ms':>10} {'x':>5}" for d in dtypes[1:]))
    best = {d: 0.0 for d in dtypes}
    speedups = []
    for context in args.context:
        for batch in args.batch:
            nbytes = HostKVCache.footprint(1, batch, context, args.kv_heads, args.head_dim, dtypes[0])
            if nbytes > args.max_kv_gib * 2**30:
                print(f"{batch:>6} {context:>8} {nbytes / 2**20:>8.0f}  skipped (> --max-kv-gib)")
                continue
            (seconds, gbs), *others = attention_gbs(batch, context, args.q_heads, args.kv_heads, args.head_dim,
                                                    args.repeats, dtypes)
            best[dtypes[0]] = max(best[dtypes[0]], gbs)
            row = f"{batch:>6} {context:>8} {nbytes / 2**20:>8.0f} {seconds * 1e3:>8.2f} {gbs:>7.1f} {gbs / stream:>9.2f}"
            for d, (s, g) in zip(dtypes[1:], others):
                best[d] = max(best[d], g)
                speedups.append(seconds / s)
                row += f" {s * 1e3:>10.2f} {seconds / s:>5.2f}"
            print(row)
    print(f"\n| host read GB/s | best attention KV GB/s ({dtypes[0]}) | ratio |"
          + (f" {dtypes[1]} speed-up, range |" if len(dtypes) > 1 else ""))
    print("|---|---|---|" + ("---|" if len(dtypes) > 1 else ""))
    print(f"| {stream:.1f} | {best[dtypes[0]]:.1f} | {best[dtypes[0]] / stream:.2f} |"
          + (f" {min(speedups):.2f}-{max(speedups):.2f}x |" if speedups else ""))

if __name__ == "__main__":
    main()
