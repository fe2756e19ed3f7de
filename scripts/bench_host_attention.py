"""Host decode attention vs host memory bandwidth.

Measures (1) a STREAM-like read bandwidth: a multi-threaded numba sum over a large float32 array,
and (2) the effective KV-read bandwidth of `HostKVCache.attend` (the offload engine's call) at
Mixtral 8x7B's decode shape (Hq=32, Hk=8, D=128, bfloat16 KV, every sequence at full context),
for several batch sizes and contexts; prints their ratio. Best of --repeats for every figure.

    PYTHONPATH=. python scripts/bench_host_attention.py                       # 24 GiB / 2 cores
    PYTHONPATH=. python scripts/bench_host_attention.py --batch 64 256 512 --context 1024 4096 \\
        --stream-gib 8 --max-kv-gib 16                                        # 125 GiB / 16 cores
"""
from __future__ import annotations

import argparse

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


def attention_gbs(batch: int, context: int, q_heads: int, kv_heads: int, head_dim: int, repeats: int):
    """(seconds, GB/s of K+V read) of one `attend` over `batch` slots of `context` positions."""
    rng = np.random.default_rng(0)
    cache = HostKVCache(1, batch, context, kv_heads, head_dim, "bfloat16")
    kv = rng.standard_normal((context, kv_heads, head_dim), np.float32)
    positions = np.arange(context)
    for slot in range(batch):
        cache.write(0, np.full(context, slot), positions, kv, kv[::-1])
    q = rng.standard_normal((batch, q_heads, head_dim), np.float32)
    slots, lengths = np.arange(batch), np.full(batch, context)
    out = np.empty_like(q)
    seconds = best_seconds(lambda: cache.attend(0, slots, q, lengths, out=out), repeats)
    return seconds, cache.nbytes / seconds / 1e9


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[32, 128, 256])
    p.add_argument("--context", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--stream-gib", type=float, default=2.0, help="array size of the bandwidth measurement")
    p.add_argument("--max-kv-gib", type=float, default=2.0, help="skip configurations with more K+V than this")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=numba.config.NUMBA_NUM_THREADS,
                   help="numba threads for both measurements (default: all cores)")
    args = p.parse_args(argv)
    numba.set_num_threads(args.threads)

    stream = stream_read_gbs(args.stream_gib, args.repeats)
    print(f"numba {numba.__version__}, {numba.get_num_threads()} threads, threading layer {numba.threading_layer()}")
    print(f"host read bandwidth (numba parallel sum over {args.stream_gib:g} GiB): {stream:.1f} GB/s\n")
    print(f"decode attention, Hq={args.q_heads} Hk={args.kv_heads} D={args.head_dim} bf16 KV, full context:")
    print(f"{'batch':>6} {'context':>8} {'KV MiB':>8} {'ms':>8} {'GB/s':>7} {'/ read bw':>9}")
    best = 0.0
    for context in args.context:
        for batch in args.batch:
            nbytes = HostKVCache.footprint(1, batch, context, args.kv_heads, args.head_dim, "bfloat16")
            if nbytes > args.max_kv_gib * 2**30:
                print(f"{batch:>6} {context:>8} {nbytes / 2**20:>8.0f}  skipped (> --max-kv-gib)")
                continue
            seconds, gbs = attention_gbs(batch, context, args.q_heads, args.kv_heads, args.head_dim, args.repeats)
            best = max(best, gbs)
            print(f"{batch:>6} {context:>8} {nbytes / 2**20:>8.0f} {seconds * 1e3:>8.2f} {gbs:>7.1f} "
                  f"{gbs / stream:>9.2f}")
    print("\n| host read GB/s | best attention KV GB/s | ratio |")
    print("|---|---|---|")
    print(f"| {stream:.1f} | {best:.1f} | {best / stream:.2f} |")


if __name__ == "__main__":
    main()
