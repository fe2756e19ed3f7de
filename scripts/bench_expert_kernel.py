"""Benchmark the grouped SwiGLU expert FFN: Pallas kernels vs `lax.ragged_dot` vs dense bf16.

For each model shape, routed token count T and routing (uniform / skewed), times the expert FFN
(gate, up, down: 6·T·k·H·F useful FLOPs) of every kernel that can run here on rows already
grouped by expert (ours, and as baselines `lax.ragged_dot` and jax's shipped Mosaic GPU
`ragged_dot_mgpu`, from which `pallas_mgpu` is built), a dense bf16 FFN of the same FLOPs in the
same run, and the whole `moe_ffn`
(impl="auto": routing, gather, FFN, combine). Prints one line per row as it goes and a markdown
table last. `--small` scales shapes down so the script runs on CPU (Pallas in interpret mode)
as a smoke test.

  PYTHONPATH=. python scripts/bench_expert_kernel.py [--small] [--json R.json] [--out R.md]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import jax
import jax.numpy as jnp

from pallas_kernels import moe_ffn
from pallas_kernels.moe_ffn import block_m_for, expert_ffn, resolve_impl
from pallas_kernels.layout import grouped_layout

# name: (H, F, E, k)
MODELS = {"mixtral-8x7b": (4096, 14336, 8, 2), "qwen3-30b-a3b": (2048, 768, 128, 8)}
SMALL_MODELS = {"mixtral-small": (256, 512, 8, 2), "qwen3-small": (128, 96, 32, 8)}
TOKENS, SMALL_TOKENS = (256, 1024, 4096, 16384), (64, 256)
KERNELS = ("pallas_mgpu", "jax_mgpu", "pallas_triton", "xla")


def route(key, T, E, k, routing):
    """int32 `[T, k]` distinct ids. skewed: expert 0 in ~every top-k, a quarter of experts unused."""
    logits = jax.random.gumbel(key, (T, E))
    if routing == "skewed":
        logits = logits.at[:, 0].add(8.0).at[:, E - E // 4:].set(-jnp.inf)
    return jax.lax.top_k(logits, k)[1].astype(jnp.int32)


def seconds_per_call(f, *args, budget_s=0.3):
    """Mean wall time of back-to-back calls after a warm-up (compile) call."""
    jax.block_until_ready(f(*args))
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    n = max(3, min(100, int(budget_s / max(time.perf_counter() - t0, 1e-6))))
    t0 = time.perf_counter()
    for _ in range(n):
        out = f(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / n


def bench_row(model, H, F, E, k, T, routing, interpret):
    key = jax.random.split(jax.random.key(0), 6)
    dt = jnp.bfloat16
    x = jax.random.normal(key[0], (T, H), dt)
    w_gate = (jax.random.normal(key[1], (E, H, F)) / H**0.5).astype(dt)
    w_up = (jax.random.normal(key[2], (E, H, F)) / H**0.5).astype(dt)
    w_down = (jax.random.normal(key[3], (E, F, H)) / F**0.5).astype(dt)
    ids = route(key[4], T, E, k, routing)
    weights = jax.nn.softmax(jax.random.normal(key[5], (T, k)), axis=-1)
    M = T * k
    flops = 6 * M * H * F
    row = {"model": model, "H": H, "F": F, "E": E, "k": k, "T": T, "M": M, "routing": routing,
           "backend": jax.default_backend(), "auto": resolve_impl("auto", dt, H, F, rows_per_expert=M / E)}

    dense = jax.jit(lambda a, g, u, d: (jax.nn.silu(a @ g) * (a @ u)) @ d)
    row["dense_tflops"] = flops / seconds_per_call(
        dense, x[jnp.arange(M) % T], w_gate[0], w_up[0], w_down[0]) / 1e12
    for kernel in KERNELS:
        row[f"{kernel}_tflops"] = None
        try:
            if resolve_impl(kernel, dt, H, F) != kernel:
                raise ValueError(f"{kernel} falls back to another kernel here")
            layout = jax.jit(grouped_layout, static_argnums=(1, 2, 3))(
                ids, None, E, block_m_for(kernel, M, E))
            xs = x[layout.row_token]
            ffn = jax.jit(lambda xs, lay, g, u, d, kernel=kernel: expert_ffn(
                kernel, xs, lay, g, u, d, interpret=interpret))
            row[f"{kernel}_tflops"] = flops / seconds_per_call(
                ffn, xs, layout, w_gate, w_up, w_down) / 1e12
        except Exception as e:  # a kernel that cannot run or fails here: record, go on
            row[f"{kernel}_error"] = f"{type(e).__name__}: {e}"[:500]
    row["moe_ffn_auto_ms"] = None
    try:
        e2e = jax.jit(lambda *a: moe_ffn(*a, impl="auto"))
        row["moe_ffn_auto_ms"] = 1e3 * seconds_per_call(e2e, x, ids, weights, w_gate, w_up, w_down)
    except Exception as e:  # the default kernel failing here: record, keep the other kernels' columns
        row["moe_ffn_auto_error"] = f"{type(e).__name__}: {e}"[:500]
    return row


def markdown(rows):
    """Markdown table; each kernel cell is `TFLOP/s (fraction of dense)`."""
    cols = ["model", "routing", "T", "T·k", "dense TF/s", "ragged_dot TF/s", "jax ragged_dot_mgpu TF/s",
            "pallas_triton TF/s", "pallas_mgpu TF/s", "auto →", "moe_ffn(auto) ms"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        d = r["dense_tflops"]
        cell = lambda v: "n/a" if v is None else f"{v:.3g} ({v / d:.2f})"
        cells = [r["model"], r["routing"], r["T"], r["M"], f"{d:.3g}", cell(r["xla_tflops"]),
                 cell(r["jax_mgpu_tflops"]), cell(r["pallas_triton_tflops"]), cell(r["pallas_mgpu_tflops"]), r["auto"],
                 "error" if r["moe_ffn_auto_ms"] is None else f"{r['moe_ffn_auto_ms']:.2f}"]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="scaled-down shapes (CPU smoke test)")
    p.add_argument("--tokens", type=int, nargs="+", help="routed token counts T to run")
    p.add_argument("--models", nargs="+", help="subset of model names")
    p.add_argument("--json", help="write the rows as JSON here (rewritten after every row)")
    p.add_argument("--out", help="write the markdown table here")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    models = SMALL_MODELS if a.small else MODELS
    models = {m: models[m] for m in (a.models or models)}
    tokens = a.tokens or (SMALL_TOKENS if a.small else TOKENS)
    interpret = jax.default_backend() != "gpu"
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.devices()[0]}", flush=True)
    rows = []
    try:
        for model, (H, F, E, k) in models.items():
            for T in tokens:
                for routing in ("uniform", "skewed"):
                    rows.append(bench_row(model, H, F, E, k, T, routing, interpret))
                    print(json.dumps(rows[-1]), flush=True)
                    if a.json:  # whole or not at all: an interrupt may come at any moment
                        with open(a.json + ".tmp", "w") as f:
                            json.dump(rows, f, indent=1)
                        os.replace(a.json + ".tmp", a.json)
    except KeyboardInterrupt:  # Ctrl-C or gpu_suite's time limit: the table of the rows measured so far
        print(f"interrupted after {len(rows)} rows", flush=True)
    table = markdown(rows)
    if a.out:
        with open(a.out, "w") as f:
            f.write(table + "\n")
    print(table)


if __name__ == "__main__":
    sys.exit(main())
