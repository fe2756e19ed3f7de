"""Host decode attention vs host memory bandwidth.

Measures (1) a STREAM-like read bandwidth: a multi-threaded numba sum over a large float32 array,
and (2) the effective KV-read bandwidth of `HostKVCache.attend` (the offload engine's call) at
Mixtral 8x7B's decode shape (Hq=32, Hk=8, D=128, bfloat16 KV, every sequence at full context),
for several batch sizes and contexts; prints their ratio. With `--kv-dtype bfloat16 int8` (the default)
the same attention over an int8 cache (`--kv-cache-dtype int8`: half the bytes, plus a scale per row)
runs beside it, and the table gives its speed-up over bfloat16 at each shape. With `--latent B C ...`,
DeepSeek-V2-Lite's latent attention (16 query heads over one 576-dim KV head, values its first 512 dims;
compute-bound, HRM's `cpu_flops`) at each batch B and context C, in GFLOP/s against NumPy's f32 matmul and,
where numba compiles for 512-bit vectors against LLVM's 256-bit preference (Sapphire Rapids and later:
`host_ops.numba_target`), against the same kernel compiled with LLVM's own vector width for the CPU (a
subprocess with NUMBA_CPU_FEATURES set to the host's features). With `--busy-cores N`, the engine's decode
micro-batch with N processes spinning beside the kernel's threads, at each of `--busy-threads` thread counts
(fewer threads than cores leave cores to the others). With `--link-load` (a GPU only), the same micro-batch
while a thread copies pinned host memory to the GPU in a loop, as the offload engine streams experts beside
the kernel (the link's DMA reads share the host's DRAM), at one layer re-read by every call and at the working
set. The engine's decode micro-batch is `--engine-shape` (default batch 256, context 128; g64's is 880, 109).
Every attention figure goes round the layers of a cache of about `--working-set-gib` GiB (default 2) of its
shape, so that no call reads KV a recent call read: it comes from DRAM, as each of the engine's calls' does,
not from the last-level cache (the GPU host's may hold a 128 MiB layer; figures recorded before 2026-11-27's
sixth session re-read one layer). Best of --repeats for every figure (the latent rows and the matmul: best of
3, as calibrate; --busy-cores and --link-load: medians of --repeats).

    PYTHONPATH=. python scripts/bench_host_attention.py                       # 24 GiB / 2 cores
    PYTHONPATH=. python scripts/bench_host_attention.py --batch 64 256 512 --context 1024 4096 \\
        --stream-gib 8 --max-kv-gib 16                                        # 125 GiB / 16 cores
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numba
import numpy as np
from numba import njit, prange

from host_ops import HostKVCache, numba_target
from moe_jax.hrm.calibrate import best_seconds, host_attention_flops, host_matmul_flops

LATENT = (16, 576, 512)  # DeepSeek-V2-Lite: query heads, latent (key) dims, value dims


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


def attention_seconds(batch: int, context: int, q_heads: int, kv_heads: int, head_dim: int, repeats: int,
                      dtypes=("bfloat16",), gap: float = 0.0, layers: int = 1, huge_pages=(True,)
                      ) -> tuple[list[HostKVCache], list[list[float]]]:
    """(per cache, the cache and the seconds of each of `repeats` calls of `attend` over its `batch` slots of
    `context` positions), a cache per dtype of `dtypes` and page size of `huge_pages` (`HostKVCache`'s, dtypes
    outer; default the engine's 2 MiB), the caches' calls taking turns so that a machine whose speed drifts (a shared VM) gives them the
    same conditions; after one warm-up round. layers: each cache's, every one filled, the calls going round
    them as the engine's do. gap: seconds the process sleeps before each call (the engine's worker waits for
    the GPU between its calls), 0: back to back."""
    rng = np.random.default_rng(0)
    kv = rng.standard_normal((context, kv_heads, head_dim), np.float32)
    positions = np.arange(context)
    caches = []
    for dtype in dtypes:
        for huge in huge_pages:
            cache = HostKVCache(layers, batch, context, kv_heads, head_dim, dtype, huge_pages=huge)
            for layer in range(layers):
                for slot in range(batch):
                    cache.write(layer, np.full(context, slot), positions, kv, kv[::-1])
            caches.append(cache)
    q = rng.standard_normal((batch, q_heads, head_dim), np.float32)
    slots, lengths = np.arange(batch), np.full(batch, context)
    out = np.empty_like(q)
    times = [[] for _ in caches]
    for r in range(repeats + 1):  # round 0 warms up
        for i, cache in enumerate(caches):
            time.sleep(gap)
            t0 = time.perf_counter()
            cache.attend(r % layers, slots, q, lengths, out=out)
            if r:
                times[i].append(time.perf_counter() - t0)
    return caches, times


def layers_for(gib: float, batch: int, context: int, kv_heads: int, head_dim: int) -> int:
    """Layers of `batch` slots of `context` positions that make about `gib` GiB of bfloat16 KV (at least one)."""
    return max(1, round(gib * 2**30 / HostKVCache.footprint(1, batch, context, kv_heads, head_dim)))


def page_sizes(gib: float, batch: int, context: int, q_heads: int, kv_heads: int, head_dim: int, repeats: int
               ) -> list[tuple[float, float]]:
    """For a bfloat16 cache of about `gib` GiB (as many layers of `batch` slots of `context` positions) in 4 KiB
    pages, then one in 2 MiB pages, both allocated from memory this process has not used before: (GB/s of its
    fault-in, the median seconds of one `attend`, the calls going round its layers)."""
    layers = layers_for(gib, batch, context, kv_heads, head_dim)
    caches, times = attention_seconds(batch, context, q_heads, kv_heads, head_dim, repeats, layers=layers,
                                      huge_pages=(False, True))
    return [(c.storage_bytes / c.fault_in_s / 1e9, float(np.median(t))) for c, t in zip(caches, times)]


def attention_gbs(batch: int, context: int, q_heads: int, kv_heads: int, head_dim: int, repeats: int,
                  dtypes=("bfloat16",), layers: int = 1) -> list[tuple[float, float]]:
    """Per cache dtype, (seconds, GB/s of K+V read, int8's scales included) of one `attend` (`attention_seconds`,
    going round `layers` layers): the best of `repeats`."""
    caches, times = attention_seconds(batch, context, q_heads, kv_heads, head_dim, repeats, dtypes, layers=layers)
    return [(min(t), cache.nbytes / cache.num_layers / min(t) / 1e9) for cache, t in zip(caches, times)]


def median_seconds(batch: int, context: int, q_heads: int, kv_heads: int, head_dim: int, repeats: int,
                   layers: int = 1, gap: float = 0.0) -> float:
    """Median seconds of one bfloat16 `attend` over `repeats` calls going round `layers` layers
    (`attention_seconds`, `gap` before each)."""
    return float(np.median(attention_seconds(batch, context, q_heads, kv_heads, head_dim, repeats, gap=gap,
                                             layers=layers)[1][0]))


def busy_seconds(busy: int, batch: int, context: int, q_heads: int, kv_heads: int, head_dim: int,
                 repeats: int, layers: int = 1) -> tuple[float, float]:
    """Median seconds of one bfloat16 `attend` (going round `layers` layers) with the cores free, and with `busy`
    processes spinning (as the engine's dispatching thread and a GPU runtime's spinning waits hold cores while
    the kernel runs)."""
    shape = (batch, context, q_heads, kv_heads, head_dim, repeats, layers)
    free = median_seconds(*shape)
    spinners = []
    try:
        spinners += [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
        time.sleep(0.5)
        return free, median_seconds(*shape)
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


def link_load_seconds(batch: int, context: int, q_heads: int, kv_heads: int, head_dim: int, repeats: int,
                      layers: int = 1, mib: int = 256) -> tuple[float, float, float]:
    """(median seconds of one bfloat16 `attend` going round `layers` layers with the link idle, the same while a
    thread copies `mib` MiB of pinned host memory to the GPU in a loop, the link's GB/s meanwhile). The thread
    dispatches and waits for its copies as the engine's dispatching thread does, so its own CPU time counts as
    it would there. Needs a GPU backend."""
    import threading

    import jax
    from jax.sharding import SingleDeviceSharding

    dev = jax.devices()[0]
    host = jax.device_put(np.ones(mib << 20, np.uint8), SingleDeviceSharding(dev, memory_kind="pinned_host"))
    to_gpu = jax.jit(lambda x: x, out_shardings=SingleDeviceSharding(dev, memory_kind="device"))
    to_gpu(host).block_until_ready()
    shape = (batch, context, q_heads, kv_heads, head_dim, repeats, layers)
    idle = median_seconds(*shape)
    stop, done, failed = threading.Event(), [], []  # done: each copy's end time

    def stream():
        try:
            while not stop.is_set():
                to_gpu(host).block_until_ready()
                done.append(time.perf_counter())
        except Exception as e:  # re-raised below: a loaded figure over an idle link would mislead
            failed.append(e)

    loader = threading.Thread(target=stream, daemon=True)
    loader.start()
    try:
        time.sleep(0.2)
        t0 = time.perf_counter()
        busy = median_seconds(*shape)
        t1 = time.perf_counter()
    finally:
        stop.set()
        loader.join()
    if failed:
        raise RuntimeError("--link-load: the copies to the GPU failed") from failed[0]
    gbs = sum(t0 <= t <= t1 for t in done) * host.nbytes / (t1 - t0) / 1e9
    return idle, busy, gbs


def latent_gflops(shapes, features: str | None = None, threads: int | None = None) -> list[float]:
    """GFLOP/s of the latent attention at each (batch, context) of `shapes`; with `features`, measured in a
    subprocess whose numba compiles for exactly those target features, on `threads` threads."""
    if features is None:
        return [host_attention_flops(b, c, *LATENT) / 1e9 for b, c in shapes]
    code = ("import json, sys; from moe_jax.hrm.calibrate import host_attention_flops as f; "
            "shapes, latent = json.loads(sys.argv[1]); print(json.dumps([f(b, c, *latent) / 1e9 for b, c in shapes]))")
    env = {**os.environ, "NUMBA_CPU_FEATURES": features, **({"NUMBA_NUM_THREADS": str(threads)} if threads else {})}
    done = subprocess.run([sys.executable, "-c", code, json.dumps([shapes, LATENT])], env=env, capture_output=True,
                          text=True)
    if done.returncode or not done.stdout.strip():
        raise SystemExit(f"the reference run with LLVM's own vector width failed (exit {done.returncode}):\n"
                         f"{done.stderr[-2000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def print_latent(shapes, threads: int) -> None:
    """The latent attention's table: GFLOP/s at each (batch, context), against NumPy's matmul and, where numba
    compiles for 512-bit vectors against LLVM's preference, against LLVM's own width (`latent_gflops`)."""
    plain = numba_target.host_features()
    reference = numba_target.NO_256_BIT_PREFERENCE in numba_target.compiled_features().split(",")
    # the reference first: a failed subprocess then throws nothing measured away
    theirs = latent_gflops(shapes, plain, threads) if reference else [None] * len(shapes)
    sgemm = host_matmul_flops(2048) / 1e9
    ours = latent_gflops(shapes)
    Hq, D, Dv = LATENT
    print(f"\nlatent attention, Hq={Hq} over one KV head of D={D} (values: its first {Dv}), bfloat16, full context; "
          f"NumPy f32 matmul (2048^3): {sgemm:.0f} GFLOP/s" + ("; reference: LLVM's own vector width" if reference
                                                                else " (no reference: numba compiles with LLVM's own tuning here)"))
    print(f"{'batch':>6} {'context':>8} {'GFLOP/s':>8} {'/ matmul':>9}" + (f" {'reference':>10} {'x':>5}" if reference else ""))
    for (b, c), g, r in zip(shapes, ours, theirs):
        print(f"{b:>6} {c:>8} {g:>8.0f} {g / sgemm:>9.2f}" + (f" {r:>10.0f} {g / r:>5.2f}" if reference else ""))


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
    p.add_argument("--latent", type=int, nargs="+", default=[], metavar="B C",
                   help="also time DeepSeek's latent attention at these (batch, context) pairs, e.g. 64 1024 256 128")
    p.add_argument("--busy-cores", type=int, default=0, metavar="N",
                   help="also time the engine's decode micro-batch (--engine-shape, bfloat16) with N other "
                        "processes spinning, against the cores free (median of --repeats)")
    p.add_argument("--busy-threads", type=int, nargs="+", default=[], metavar="T",
                   help="with --busy-cores: time it at each of these numba thread counts too (default: --threads)")
    p.add_argument("--link-load", action="store_true",
                   help="also time the engine's decode micro-batch while the link streams pinned memory to the GPU")
    p.add_argument("--idle-gap", type=float, nargs="+", default=[], metavar="MS",
                   help="also time the engine's decode micro-batch after the process sleeps MS ms before each call "
                        "(as the engine's worker waits for the GPU between calls), against back to back")
    p.add_argument("--pages", type=float, metavar="GIB",
                   help="first (before this process frees any memory, so that both take fresh memory), the KV cache in "
                        "4 KiB pages against 2 MiB huge pages: a GIB-GiB cache of each, its fault-in GB/s and the "
                        "median ms of attention at the engine's decode micro-batch going round its layers")
    p.add_argument("--engine-shape", type=int, nargs=2, default=[256, 128], metavar=("B", "C"),
                   help="the engine's decode micro-batch that --pages, --busy-cores, --idle-gap and --link-load time: "
                        "B sequences of context C (default 256 128; Mixtral's g64 policy: 880 109)")
    p.add_argument("--working-set-gib", type=float, default=2.0, metavar="GIB",
                   help="each attention figure goes round the layers of a cache of about this many GiB of its shape "
                        "(at least one layer), so that its KV comes from DRAM as the engine's does")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=numba.config.NUMBA_NUM_THREADS,
                   help="numba threads for both measurements (default: all cores)")
    args = p.parse_args(argv)
    if args.busy_cores < 0:
        p.error(f"--busy-cores must be >= 0, got {args.busy_cores}")
    if args.busy_threads and not args.busy_cores:
        p.error("--busy-threads times the --busy-cores measurement: give --busy-cores too")
    if any(not 1 <= t <= numba.config.NUMBA_NUM_THREADS for t in args.busy_threads):
        p.error(f"--busy-threads must lie in 1..{numba.config.NUMBA_NUM_THREADS} (NUMBA_NUM_THREADS), "
                f"got {args.busy_threads}")
    if any(g < 0 for g in args.idle_gap):
        p.error(f"--idle-gap must be >= 0 ms, got {args.idle_gap}")
    if len(args.latent) % 2:
        p.error(f"--latent takes (batch, context) pairs, got {len(args.latent)} numbers")
    if args.link_load:
        import jax

        if jax.devices()[0].platform != "gpu":
            p.error(f"--link-load needs a GPU; JAX's device here is {jax.devices()[0].platform}")
    if args.pages is not None and not args.pages > 0:
        p.error(f"--pages must be a positive number of GiB, got {args.pages}")
    if not args.working_set_gib > 0:
        p.error(f"--working-set-gib must be a positive number of GiB, got {args.working_set_gib}")
    if min(args.engine_shape) < 1:
        p.error(f"--engine-shape takes a batch and a context of at least 1, got {args.engine_shape}")
    numba.set_num_threads(args.threads)

    eb, ec = args.engine_shape
    engine_shape = (eb, ec, args.q_heads, args.kv_heads, args.head_dim, args.repeats)  # its decode micro-batch
    engine_layers = layers_for(args.working_set_gib, eb, ec, args.kv_heads, args.head_dim)
    engine = (f"batch {eb}, context {ec}, going round {engine_layers} layer(s) "
              f"({HostKVCache.footprint(engine_layers, eb, ec, args.kv_heads, args.head_dim) / 2**30:.2f} GiB)")
    if args.pages:
        (small_gbs, small_s), (huge_gbs, huge_s) = page_sizes(args.pages, *engine_shape)
        print(f"KV cache pages ({args.pages:g} GiB bfloat16 each, fresh memory), batch {eb}, context {ec}, median ms "
              f"of attention; x: 2 MiB against 4 KiB")
        print(f"{'pages':>6} {'fault-in GB/s':>14} {'attend ms':>10}")
        print(f"{'4 KiB':>6} {small_gbs:>14.2f} {small_s * 1e3:>10.2f}")
        print(f"{'2 MiB':>6} {huge_gbs:>14.2f} {huge_s * 1e3:>10.2f}")
        print(f"{'x':>6} {huge_gbs / small_gbs:>14.2f} {huge_s / small_s:>10.2f}\n")

    stream = stream_read_gbs(args.stream_gib, args.repeats)
    print(f"numba {numba.__version__}, {numba.get_num_threads()} threads, threading layer {numba.threading_layer()}, "
          f"target {numba_target.describe()}")
    print(f"host read bandwidth (numba parallel sum over {args.stream_gib:g} GiB): {stream:.1f} GB/s\n")
    dtypes = list(dict.fromkeys(args.kv_dtype))
    print(f"decode attention, Hq={args.q_heads} Hk={args.kv_heads} D={args.head_dim}, full context, each shape going "
          f"round the layers of a ~{args.working_set_gib:g} GiB cache; KV MiB (a layer's) and GB/s "
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
            layers = layers_for(args.working_set_gib, batch, context, args.kv_heads, args.head_dim)
            (seconds, gbs), *others = attention_gbs(batch, context, args.q_heads, args.kv_heads, args.head_dim,
                                                    args.repeats, dtypes, layers)
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
    if args.busy_cores:
        print(f"\nwith {args.busy_cores} busy process(es) (spinning), {engine}, median ms; x: against "
              f"the cores free at {args.threads} threads")
        print(f"{'threads':>8} {'free':>8} {'busy':>8} {'x':>6} {'even spread':>12}")  # x if the work spread evenly over the free cores
        reference, cores = None, len(os.sched_getaffinity(0))
        for n in dict.fromkeys([args.threads, *args.busy_threads]):
            numba.set_num_threads(n)
            free, busy = busy_seconds(args.busy_cores, *engine_shape, engine_layers)
            reference = reference or free
            spread = min(args.threads, cores) / min(n, max(cores - args.busy_cores, 1))
            print(f"{n:>8} {free * 1e3:>8.2f} {busy * 1e3:>8.2f} {busy / reference:>6.2f} {spread:>12.2f}")
        numba.set_num_threads(args.threads)
    if args.idle_gap:
        layer = os.environ.get("NUMBA_THREADING_LAYER", "default") + ", OMP_WAIT_POLICY " + os.environ.get(
            "OMP_WAIT_POLICY", "unset")
        print(f"\nafter an idle gap before each call (threading layer {numba.threading_layer()}; NUMBA_THREADING_LAYER "
              f"{layer}), {engine}, median ms; x: against back to back")
        print(f"{'gap ms':>8} {'ms':>8} {'x':>6}")
        back_to_back = median_seconds(*engine_shape, engine_layers)
        print(f"{0:>8g} {back_to_back * 1e3:>8.2f} {1:>6.2f}")
        for gap in args.idle_gap:
            t = median_seconds(*engine_shape, engine_layers, gap=gap / 1e3)
            print(f"{gap:>8g} {t * 1e3:>8.2f} {t / back_to_back:>6.2f}")
    if args.link_load:
        wait = os.environ.get("TF_CUDA_PLATFORM_GPU_DEVICE_SCHEDULE", "CUDA's default: spinning")
        print(f"\nwith the link streaming pinned host memory to the GPU (the copying thread's waits: {wait}), batch "
              f"{eb}, context {ec}, median ms; x: loaded against idle")
        print(f"{'layers':>7} {'GiB':>6} {'idle':>8} {'loaded':>8} {'x':>6} {'link GB/s':>10}")
        # one layer re-read by every call (it may sit in the last-level cache), then the working set (from DRAM)
        for layers in dict.fromkeys([1, engine_layers]):
            idle, loaded, gbs = link_load_seconds(*engine_shape, layers)
            gib = HostKVCache.footprint(layers, eb, ec, args.kv_heads, args.head_dim) / 2**30
            print(f"{layers:>7} {gib:>6.2f} {idle * 1e3:>8.2f} {loaded * 1e3:>8.2f} {loaded / idle:>6.2f} {gbs:>10.1f}")
    if args.latent:
        print_latent(list(zip(args.latent[::2], args.latent[1::2])), numba.get_num_threads())

if __name__ == "__main__":
    main()
