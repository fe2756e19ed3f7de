"""`moe_ffn`: the routed SwiGLU expert FFN of one MoE layer, with a selectable implementation.

Kernels (what `impl` resolves to; the choice and every fallback are logged once per distinct
case on the "pallas_kernels" logger):
  "xla"            `lax.ragged_dot` over pairs sorted by slot. CPU default and the reference.
  "pallas_mgpu"    our Mosaic GPU grouped GEMM (`mgpu.ragged_dot`, Hopper wgmma, bf16/f16): jax's
                   shipped `ragged_dot_mgpu` (2.5-5× `lax.ragged_dot` on H100, DESIGN.md §3)
                   made to skip the tiles of empty slots. Interpret mode (jax's GPU simulator on
                   the CPU) exists from jax 0.11 on, not in jax 0.10 (CI).
  "jax_mgpu"       jax's shipped `ragged_dot_mgpu` (a full tile per slot, used or not), rows padded
                   to a multiple of 8 as ours (it does not compile otherwise): the benchmark's
                   baseline, and what gpu_suite.sh runs the engine with should our kernel fail its
                   check on a GPU. Only when asked for.
  "pallas_triton"  our Pallas grouped GEMM (`grouped_matmul`) over slot-aligned tiles with a
                   fused gate/up SwiGLU; Triton on GPU, interpret mode on CPU (so CI tests it).
                   jax 0.11 deprecates its Pallas Triton backend: on Hopper, mgpu is the path
                   except for calls of few rows per expert (below).
"pallas" picks pallas_mgpu where it runs natively and pallas_triton otherwise; "auto" is "pallas"
on GPU and "xla" elsewhere, except that on GPU a call with fewer than TRITON_ROWS_PER_EXPERT routed
rows per expert runs pallas_triton, whose smaller tiles waste less on the experts' few rows: on an
H200 it ran 1.27–1.50× pallas_mgpu's TFLOP/s there (Mixtral at T = 256, Qwen3-30B-A3B at T <= 1024; the
two tie at 256 rows per expert and pallas_mgpu leads above; benchmarks/RESULTS.md). The offload engine's
decode steps are such calls (a micro-batch of 254 tokens over Mixtral's 8 experts: 64 rows each), its
prefill calls are not. A Triton-incompatible shape (H or F not a multiple of 16) on GPU falls back to
"xla". `scripts/bench_expert_kernel.py` times all three so the default can follow data.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import mgpu
from pallas_kernels.grouped_matmul import (grouped_matmul, pick_block_m, pick_config,
                                           triton_compatible)
from pallas_kernels.layout import GroupedLayout, grouped_layout

IMPLS = ("auto", "pallas", "pallas_mgpu", "jax_mgpu", "pallas_triton", "xla")
TRITON_ROWS_PER_EXPERT = 256  # "auto" on GPU: pallas_triton below this many routed rows per expert
log = logging.getLogger("pallas_kernels")
_logged: set[tuple] = set()


def _log_once(msg: str, *args) -> None:
    if (msg, args) not in _logged:
        _logged.add((msg, args))
        log.info(msg, *args)


def resolve_impl(impl: str, dtype, H: int, F: int, interpret: bool = False,
                 rows_per_expert: float | None = None) -> str:
    """The kernel `impl` runs as here: "xla", "pallas_mgpu", "jax_mgpu" or "pallas_triton" (logged once).
    interpret: only an explicit "pallas_mgpu" or "jax_mgpu" uses the Mosaic GPU simulator.
    rows_per_expert: the call's routed (token, expert) pairs over its number of experts, which "auto"
    weighs on GPU (see the module docstring); None: not weighed."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    backend = jax.default_backend()
    kernel = impl
    if kernel == "auto":
        kernel = "pallas" if backend == "gpu" else "xla"
        if (kernel == "pallas" and rows_per_expert is not None and rows_per_expert < TRITON_ROWS_PER_EXPERT
                and triton_compatible(H, F)):
            _log_once("moe_ffn: impl='auto' takes pallas_triton for calls of fewer than %d rows per expert",
                      TRITON_ROWS_PER_EXPERT)
            kernel = "pallas_triton"
    if kernel in ("pallas", "pallas_mgpu", "jax_mgpu"):
        sim = interpret and kernel != "pallas"
        reason = mgpu.unavailable_reason(dtype, H, F, sim) or mgpu.unavailable_reason(dtype, F, H, sim)
        if reason and kernel != "pallas":
            raise ValueError(f"impl={kernel!r} cannot run here: {reason}")
        if reason:
            _log_once("moe_ffn: Mosaic GPU kernel unavailable (%s); using pallas_triton", reason)
            kernel = "pallas_triton"
        elif kernel == "pallas":
            kernel = "pallas_mgpu"
    if kernel == "pallas_triton" and backend == "gpu" and not triton_compatible(H, F):
        _log_once("moe_ffn: H=%d, F=%d not multiples of 16 for Triton; falling back to xla", H, F)
        kernel = "xla"
    _log_once("moe_ffn: impl=%r runs as %s on backend %s", impl, kernel, backend)
    return kernel


def block_m_for(kernel: str, num_pairs: int, num_groups: int) -> int:
    """Rows per tile of the layout `kernel` takes (1: plain sorted rows), for `num_pairs` routed rows over the
    `num_groups` slots that can receive them (at most the number of experts)."""
    return pick_block_m(num_pairs, num_groups) if kernel == "pallas_triton" else 1


def expert_ffn(kernel: str, xs, layout: GroupedLayout, w_gate, w_up, w_down, *, interpret: bool):
    """Grouped SwiGLU FFN on rows grouped by slot: `[R, H]` → float32 `[R, H]`.

    xs must be in the weights' dtype and laid out with `block_m_for(kernel, ...)` rows per tile.
    """
    f32 = jnp.float32
    if kernel == "pallas_triton":
        _, H, F = w_gate.shape
        bm = xs.shape[0] // layout.tile_slot.shape[0]
        h = grouped_matmul(xs, layout.tile_slot, (w_gate, w_up), out_dtype=xs.dtype,
                           config=pick_config(bm, H, F, fused=True), interpret=interpret)
        return grouped_matmul(h, layout.tile_slot, (w_down,), out_dtype=f32,
                              config=pick_config(bm, F, H, fused=False), interpret=interpret)
    if kernel in ("pallas_mgpu", "jax_mgpu"):
        dot = lambda a, w: mgpu.ragged_dot(a, w, layout.group_sizes, interpret=interpret,
                                           jax_kernel=kernel == "jax_mgpu")
    else:
        precision = jax.lax.Precision.HIGHEST if xs.dtype == f32 else jax.lax.Precision.DEFAULT
        dot = lambda a, w: jax.lax.ragged_dot(a, w, layout.group_sizes, precision=precision,
                                              preferred_element_type=f32)
    h = jax.nn.silu(dot(xs, w_gate).astype(f32)) * dot(xs, w_up).astype(f32)
    return dot(h.astype(xs.dtype), w_down).astype(f32)


def moe_ffn(x, topk_ids, topk_weights, w_gate, w_up, w_down, *,
            expert_slots=None, impl="auto", interpret=None):
    """Routed SwiGLU experts: `y[t] = Σ_j topk_weights[t, j] · FFN_{topk_ids[t, j]}(x[t])`.

    `FFN_e(v) = (silu(v·w_gate[s]) ⊙ (v·w_up[s]))·w_down[s]` with `s = expert_slots[e]`.
    Matmuls run in the weights' dtype with float32 accumulation (HIGHEST precision for float32);
    the weighted combine is float32. pallas_mgpu/jax_mgpu write each matmul's result in the weights' dtype, so
    there the gate/up products and each expert's output are rounded to it first (bfloat16: about twice the
    other kernels' error against float64, within the tests' bounds). Jit-safe: all shapes are static.

    Args:
      x: `[T, H]` activations.
      topk_ids: int32 `[T, k]` expert ids.
      topk_weights: float32 `[T, k]` combine weights.
      w_gate, w_up: `[S, H, F]`; w_down: `[S, F, H]`; S weight slots.
      expert_slots: int32 `[E]` expert id → slot; None means identity (ids index slots).
      impl: one of IMPLS (see the module docstring).
      interpret: run Pallas kernels in interpret mode; None → exactly when no GPU is present.

    Returns:
      `[T, H]` in x.dtype.
    """
    S, H, F = w_gate.shape
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    # at most num_experts of the S slots receive rows (a pager's buffer holds other layers' experts too)
    num_experts = max(1, S if expert_slots is None else np.shape(expert_slots)[0])
    kernel = resolve_impl(impl, w_gate.dtype, H, F, interpret, rows_per_expert=topk_ids.size / num_experts)
    if topk_ids.size == 0:
        return jnp.zeros_like(x)
    if kernel == "xla" and expert_slots is not None and S > num_experts and jax.default_backend() != "gpu":
        # XLA's CPU ragged_dot is a dense dot over every group: over this layer's experts alone, not every slot
        # (S / E times the work, and a non-finite weight in a slot no row reads would reach every row through its
        # zero mask). Not on a GPU, where the copy of a layer's experts (2.8 GB for Mixtral) is more than its
        # memory plan counts
        w_gate, w_up, w_down = (w[expert_slots] for w in (w_gate, w_up, w_down))
        expert_slots, S = None, num_experts
    bm = block_m_for(kernel, topk_ids.size, min(S, num_experts))
    layout = grouped_layout(topk_ids, expert_slots, S, bm)
    xs = x[layout.row_token].astype(w_gate.dtype)
    ys = expert_ffn(kernel, xs, layout, w_gate, w_up, w_down, interpret=interpret)
    y = jnp.einsum("tkh,tk->th", ys[layout.pair_row], topk_weights.astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST)
    return y.astype(x.dtype)
