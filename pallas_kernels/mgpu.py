"""JAX's shipped Mosaic GPU ragged dot (`ragged_dot_mgpu`, Hopper wgmma) as a grouped GEMM.

Rows in the unpadded sorted layout (`grouped_layout(..., block_m=1)`). The block config is the
best of a small H100 sweep (DESIGN.md §3): 128×128 tiles, block_k 64, 4 pipeline stages,
grid_block_n 4. jax >= 0.11 can interpret Mosaic GPU kernels on the CPU
(`force_gpu_interpret_mode`, a GPU simulator): `interpret=True` runs the same kernel there, so its
numerics are testable without a GPU; jax 0.10 cannot, and this path is GPU-only there.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp

BLOCK_M, BLOCK_N, BLOCK_K, STAGES = 128, 128, 64, 4


def _interpret_mode():
    """jax's Mosaic GPU interpret-mode context manager, or None (jax < 0.11)."""
    try:
        from jax.experimental.pallas.mosaic_gpu import force_gpu_interpret_mode
    except ImportError:
        return None
    return force_gpu_interpret_mode


def unavailable_reason(dtype, K: int, N: int, interpret: bool = False) -> str | None:
    """Why `ragged_dot` below cannot run here for `[M, K] × [S, K, N]`, or None if it can."""
    if interpret:
        if _interpret_mode() is None:
            return f"jax {jax.__version__} has no Mosaic GPU interpret mode (jax >= 0.11 has)"
    elif jax.default_backend() != "gpu":
        return "no GPU"
    elif (cc := getattr(jax.devices()[0], "compute_capability", "")) != "9.0":
        return f"compute capability {cc!r} is not Hopper (9.0)"
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"dtype {jnp.dtype(dtype)} (wgmma path takes bfloat16/float16)"
    if K % BLOCK_K or N % BLOCK_N:
        return f"K={K} or N={N} not a multiple of {BLOCK_K} / {BLOCK_N}"
    try:
        from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu  # noqa: F401
    except ImportError as e:
        return f"jax.experimental.pallas.ops.gpu.ragged_dot_mgpu not importable ({e})"
    return None


def ragged_dot(lhs, rhs, group_sizes, *, interpret: bool = False):
    """`[M, K]` rows sorted by group × `[S, K, N]` → `[M, N]` in lhs.dtype (float32 accumulate).
    interpret: run the kernel in jax's GPU simulator on the CPU (see `unavailable_reason`)."""
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu

    grid_n = rhs.shape[2] // BLOCK_N
    grid_block_n = next(g for g in (4, 2, 1) if grid_n % g == 0)
    with _interpret_mode()() if interpret else contextlib.nullcontext():
        return ragged_dot_mgpu.ragged_dot(
            lhs, rhs, group_sizes=group_sizes, block_m=BLOCK_M, block_n=BLOCK_N, block_k=BLOCK_K,
            max_concurrent_steps=STAGES, grid_block_n=grid_block_n)
