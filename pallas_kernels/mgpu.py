"""JAX's shipped Mosaic GPU ragged dot (`ragged_dot_mgpu`, Hopper wgmma) as a grouped GEMM.

Rows in the unpadded sorted layout (`grouped_layout(..., block_m=1)`). The block config is the
best of a small H100 sweep (DESIGN.md §3): 128×128 tiles, block_k 64, 4 pipeline stages,
grid_block_n 4. Mosaic GPU kernels have no interpret mode, so this path is GPU-only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

BLOCK_M, BLOCK_N, BLOCK_K, STAGES = 128, 128, 64, 4


def unavailable_reason(dtype, K: int, N: int) -> str | None:
    """Why `ragged_dot` below cannot run here for `[M, K] × [S, K, N]`, or None if it can."""
    if jax.default_backend() != "gpu":
        return "no GPU"
    cc = getattr(jax.devices()[0], "compute_capability", "")
    if cc != "9.0":
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


def ragged_dot(lhs, rhs, group_sizes):
    """`[M, K]` rows sorted by group × `[S, K, N]` → `[M, N]` in lhs.dtype (float32 accumulate)."""
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu

    grid_n = rhs.shape[2] // BLOCK_N
    grid_block_n = next(g for g in (4, 2, 1) if grid_n % g == 0)
    return ragged_dot_mgpu.ragged_dot(
        lhs, rhs, group_sizes=group_sizes, block_m=BLOCK_M, block_n=BLOCK_N, block_k=BLOCK_K,
        max_concurrent_steps=STAGES, grid_block_n=grid_block_n)
