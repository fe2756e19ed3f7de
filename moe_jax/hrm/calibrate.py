"""Measure this machine into a hardware profile for HRM.

    python -m moe_jax.hrm.calibrate --output PROFILE.json [--quick] [--name NAME] [--moe-impl IMPL]

The accelerator is whatever JAX runs on (on a CPU-only machine the CPU backend stands in for the GPU):
dense bf16 matmul FLOP/s, device-memory copy bandwidth, pinned host→device copy bandwidth and the
wall time of a tiny jitted call (launch_seconds). The host:
DRAM read bandwidth (NumPy sums, one thread per core). When importable, the CPU decode attention of
`host_ops.HostKVCache` gives `attention_bandwidth` at Mixtral's shape, where it is memory-bound (over an
int8 cache, `int8_attention_bandwidth`), the time of its query rows apart (`attention_row_seconds`, from the
same bytes at a short context), and `cpu_flops` at DeepSeek-V2-Lite's latent shape (16 query heads
over one 576-dim head), where it is compute-bound: HRM's only CPU op is this attention, so its own rates are
the CPU's roofs (where the kernel cannot run, cpu_flops is NumPy's f32 matmul rate, noted). The expert
kernel `pallas_kernels.moe_ffn` (`--moe-impl`, default "auto": the engine's), timed at a few token counts,
gives `expert_flops` (the largest count's rate); the profile's "notes" keep the device, the sizes, the
expert kernel, the per-size expert rates and what was not measured. Each figure is the best of 3 runs after a warm-up.
`--quick` uses small sizes and finishes in seconds; its figures only check the plumbing.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import SingleDeviceSharding

from moe_jax.host_memory import total_bytes as host_memory_bytes
from pallas_kernels import IMPLS
from moe_jax.hrm.hardware import Hardware

log = logging.getLogger("moe_jax.hrm")


@dataclasses.dataclass(frozen=True)
class Sizes:
    """matmul: n of the n×n bf16 device matmul; copy: bytes; attention: (batch, context, q heads, kv heads,
    head_dim), and short_context: the context of as many bytes in more rows, for the rows' own time;
    latent_attention: (batch, context, q heads, head_dim, value_dim) over one KV head holding the values in its
    keys; experts: token counts for an expert layer of (experts, top-k, hidden, ffn)."""

    matmul: int
    cpu_matmul: int
    device_copy: int
    link_copy: int
    host_read: int
    attention: tuple[int, int, int, int, int]
    short_context: int
    latent_attention: tuple[int, int, int, int, int]
    expert_tokens: tuple[int, ...]
    expert_layer: tuple[int, int, int, int]


FULL = Sizes(8192, 4096, 2**30, 2**30, 2**31, (256, 1024, 32, 8, 128), 64, (64, 1024, 16, 576, 512),
             (2048, 8192, 32768), (8, 2, 4096, 14336))
QUICK = Sizes(256, 256, 2**24, 2**24, 2**26, (4, 128, 8, 2, 64), 16, (4, 128, 8, 48, 32), (64, 256), (4, 2, 128, 256))


def best_seconds(fn, repeats: int = 3) -> float:
    """Best wall time of `fn()` (which must block until done) after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def device_matmul_flops(n: int) -> float:
    a = jnp.ones((n, n), jnp.bfloat16)
    f = jax.jit(jnp.matmul)
    return 2 * n**3 / best_seconds(lambda: f(a, a).block_until_ready())


def device_copy_bandwidth(nbytes: int) -> float:
    """Read + write bytes/s of an elementwise op over a device array."""
    x = jnp.zeros((nbytes // 4,), jnp.float32)
    f = jax.jit(lambda x: x + 1)
    return 2 * nbytes / best_seconds(lambda: f(x).block_until_ready())


def launch_seconds() -> float:
    """Wall time of one tiny jitted call: the fixed cost of a dispatch."""
    x = jnp.zeros((8,), jnp.float32)
    f = jax.jit(lambda x: x + 1)
    return best_seconds(lambda: f(x).block_until_ready(), repeats=20)


def link_bandwidth(nbytes: int) -> float:
    """Bytes/s of `jax.device_put` from a `pinned_host` array to device memory."""
    dev = jax.devices()[0]
    host = jax.device_put(np.ones((nbytes // 4,), np.float32), SingleDeviceSharding(dev, memory_kind="pinned_host"))
    to = SingleDeviceSharding(dev, memory_kind="device")
    return nbytes / best_seconds(lambda: jax.device_put(host, to).block_until_ready())


def host_read_bandwidth(nbytes: int, threads: int) -> float:
    """Bytes/s of `threads` NumPy sums over disjoint slices of one array (NumPy releases the GIL)."""
    chunks = np.array_split(np.ones((nbytes // 8,), np.float64), threads)
    with ThreadPoolExecutor(threads) as pool:
        return nbytes / best_seconds(lambda: list(pool.map(np.sum, chunks)))


def host_matmul_flops(n: int) -> float:
    a = np.ones((n, n), np.float32)
    return 2 * n**3 / best_seconds(lambda: a @ a)


def _timed_host_attention(batch: int, context: int, q_heads: int, kv_heads: int, head_dim: int, dtype: str,
                          value_dim: int | None = None):
    """(cache, seconds): the best time of `host_ops.HostKVCache.attend` over a `dtype` cache of random bfloat16
    keys and values (the values in the keys' first `value_dim` dims where given): one layer, `batch` sequences
    of `context` cached tokens, as the offload engine calls it."""
    from host_ops import HostKVCache

    rng = np.random.default_rng(0)
    cache = HostKVCache(1, batch, context, kv_heads, head_dim, dtype, value_dim)
    slots = np.arange(batch)
    kv = rng.standard_normal((batch * context, kv_heads, head_dim), np.float32).astype("bfloat16")
    cache.write(0, np.repeat(slots, context), np.tile(np.arange(context), batch), kv, None if value_dim else kv)
    q = rng.standard_normal((batch, q_heads, head_dim), np.float32)
    lengths = np.full((batch,), context)
    return cache, best_seconds(lambda: cache.attend(0, slots, q, lengths))


def host_attention_bandwidth(batch: int, context: int, q_heads: int, kv_heads: int, head_dim: int,
                             dtype: str = "bfloat16", row_seconds: float = 0.0) -> float:
    """KV bytes/s (int8: with their scales, as HRM counts them) of `host_ops.HostKVCache.attend` over a
    `dtype` cache: one layer, `batch` sequences of `context` cached tokens, as the offload engine calls it; the
    time its query rows take apart (`row_seconds` per row and query head, `host_attention_rates`) not counted."""
    cache, seconds = _timed_host_attention(batch, context, q_heads, kv_heads, head_dim, dtype)
    return _bytes_rate(cache, seconds, batch * q_heads, row_seconds)


def _bytes_rate(cache, seconds: float, head_rows: int, row_seconds: float) -> float:
    """The cache's bytes over the seconds that its `head_rows` query rows x heads did not take apart."""
    rest = seconds - head_rows * row_seconds
    if not rest > 0:
        raise ValueError(f"the query rows' time ({head_rows * row_seconds:.3g} s at {row_seconds:.3g} s a row and "
                         f"head) fills the whole call ({seconds:.3g} s): timing noise, nothing left for the bytes")
    return cache.nbytes / rest


ROW_SHARE = 0.5  # at most this share of the long-context call's time is credited to its query rows


def host_attention_rates(batch: int, context: int, q_heads: int, kv_heads: int, head_dim: int,
                         short_context: int) -> tuple[float, float | None, str | None]:
    """(KV bytes/s, seconds per query row and query head, why the latter is None) of `HostKVCache.attend` over a
    bfloat16 cache, from its time over `batch` sequences of `context` tokens and over as many bytes in sequences
    of `short_context` tokens (more rows): t = rows · q_heads · per row + bytes / bandwidth. The time per row is
    None (nothing to price; the bandwidth then the bytes' over the whole time) where the short context ran no
    slower, or so much slower that the long context's rows would take more than ROW_SHARE of its time, where its
    bytes dominate: noise on a busy machine either way."""
    rows = batch * context // short_context
    cache, long_s = _timed_host_attention(batch, context, q_heads, kv_heads, head_dim, "bfloat16")
    _, short_s = _timed_host_attention(rows, short_context, q_heads, kv_heads, head_dim, "bfloat16")
    per_row, why = (short_s - long_s) / ((rows - batch) * q_heads), None
    if not per_row > 0:
        per_row, why = None, "none: the short context ran no slower than the long one"
    elif per_row * batch * q_heads > ROW_SHARE * long_s:
        per_row, why = None, (f"none: the short context ran {short_s / long_s:.2f}x the long one's time, which would "
                              f"give the long one's rows over {ROW_SHARE:.0%} of it (timing noise)")
    return _bytes_rate(cache, long_s, batch * q_heads, per_row or 0.0), per_row, why


def host_attention_flops(batch: int, context: int, q_heads: int, head_dim: int, value_dim: int) -> float:
    """FLOP/s (2 per multiply-add, scores and weighted sum) of `host_ops.HostKVCache.attend` over a bfloat16
    cache of one KV head whose first `value_dim` dims are the values (latent attention): one layer, `batch`
    sequences of `context` cached tokens."""
    _, seconds = _timed_host_attention(batch, context, q_heads, 1, head_dim, "bfloat16", value_dim)
    return 2 * batch * context * q_heads * (head_dim + value_dim) / seconds


def expert_flops(tokens: int, experts: int, top_k: int, hidden: int, ffn: int, impl: str = "auto") -> float:
    """FLOP/s of `pallas_kernels.moe_ffn` (bf16, kernel `impl`) for `tokens` tokens routed uniformly at random."""
    import pallas_kernels

    rng = np.random.default_rng(0)
    ids = jnp.asarray(np.argsort(rng.random((tokens, experts)), axis=1)[:, :top_k], jnp.int32)
    weights = jnp.full((tokens, top_k), 1.0 / top_k, jnp.float32)
    x = jnp.ones((tokens, hidden), jnp.bfloat16)
    w_in = jnp.ones((experts, hidden, ffn), jnp.bfloat16) * 0.01
    w_out = jnp.ones((experts, ffn, hidden), jnp.bfloat16) * 0.01
    f = jax.jit(lambda *a: pallas_kernels.moe_ffn(*a, impl=impl))
    seconds = best_seconds(lambda: f(x, ids, weights, w_in, w_in, w_out).block_until_ready())
    return 2 * tokens * top_k * 3 * hidden * ffn / seconds


def _optional(what: str, fn, notes: dict):
    """fn(), or None where its kernel cannot be imported, compiled or run here (noted and logged, so that one
    kernel failing on a new machine costs its figure, not the profile)."""
    try:
        return fn()
    except Exception as e:  # ImportError, a compiler's error (e.g. a Mosaic GPU lowering), an API change
        notes[what] = f"not measured: {type(e).__name__}: {e}"
        log.warning("calibrate: %s not measured (%s)", what, e)
        return None


def calibrate(sizes: Sizes = FULL, name: str | None = None, moe_impl: str = "auto") -> tuple[Hardware, dict]:
    """Measures this machine: (profile, notes with every measured figure); moe_impl: the expert kernel timed."""
    dev = jax.devices()[0]
    host_memory = host_memory_bytes()  # with what a VM's balloon holds, or as MOE_JAX_HOST_MEMORY_GB declares
    gpu_memory = (dev.memory_stats() or {}).get("bytes_limit", host_memory)
    threads = os.cpu_count() or 1
    notes: dict = {"device": f"{dev.platform} {dev.device_kind}", "host_threads": threads,
                   "sizes": dataclasses.asdict(sizes), "moe_impl": moe_impl}
    rates = {e: _optional(f"expert_flops[{e}]", lambda e=e: expert_flops(e, *sizes.expert_layer, moe_impl), notes)
             for e in sizes.expert_tokens}
    notes["host_matmul_flops"] = host_matmul_flops(sizes.cpu_matmul)
    cpu_flops = _optional("cpu_flops", lambda: host_attention_flops(*sizes.latent_attention), notes)
    if cpu_flops is None:
        notes["cpu_flops"] += "; NumPy's f32 matmul rate (host_matmul_flops) instead"
    bandwidth, row_seconds, why = _optional("attention_bandwidth", lambda: host_attention_rates(
        *sizes.attention, sizes.short_context), notes) or (None, None, None)
    if why:
        notes["attention_row_seconds"] = why
    hw = Hardware(
        name=name or f"calibrated-{dev.platform}-{dev.device_kind}".replace(" ", "-"),
        gpu_memory=float(gpu_memory),
        gpu_bandwidth=device_copy_bandwidth(sizes.device_copy),
        gpu_flops=device_matmul_flops(sizes.matmul),
        cpu_flops=cpu_flops or notes["host_matmul_flops"],
        host_memory=float(host_memory),
        host_bandwidth=host_read_bandwidth(sizes.host_read, threads),
        link_bandwidth=link_bandwidth(sizes.link_copy),
        attention_bandwidth=bandwidth,
        attention_row_seconds=row_seconds,
        int8_attention_bandwidth=_optional("int8_attention_bandwidth", lambda: host_attention_bandwidth(
            *sizes.attention, "int8", row_seconds or 0.0), notes),
        expert_flops=rates[max(sizes.expert_tokens)],
        launch_seconds=launch_seconds(),
    )
    notes["expert_flops_by_tokens"] = {str(e): r for e, r in rates.items() if r is not None}
    return hw, notes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m moe_jax.hrm.calibrate", description=__doc__.split("\n")[0])
    ap.add_argument("--output", required=True, help="JSON profile to write (accepted by --hardware)")
    ap.add_argument("--quick", action="store_true", help="small sizes: seconds, rough figures")
    ap.add_argument("--name", help="profile name (default: from the device)")
    ap.add_argument("--moe-impl", default="auto", choices=IMPLS,
                    help="expert kernel timed for expert_flops (pallas_kernels.moe_ffn impl; the engine's default: auto)")
    args = ap.parse_args(argv)
    out = Path(args.output)
    if out.is_dir() or not out.parent.is_dir():  # found now, not after minutes of measuring
        ap.error(f"--output {args.output}: give a file in an existing directory")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    hw, notes = calibrate(QUICK if args.quick else FULL, args.name, args.moe_impl)
    profile = {**dataclasses.asdict(hw), "notes": notes}
    Path(args.output).write_text(json.dumps(profile, indent=2) + "\n")
    print(f"wrote {args.output}: " + ", ".join(f"{k}={v:.3g}" for k, v in dataclasses.asdict(hw).items()
                                               if isinstance(v, float)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
