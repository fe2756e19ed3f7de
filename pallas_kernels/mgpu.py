"""Grouped GEMM for Hopper in Pallas Mosaic GPU (wgmma): `[M, K]` rows sorted by group × `[S, K, N]`.

Built on the structure of jax's shipped `ragged_dot_mgpu` (a persistent kernel: each SM walks
(row tile, column block) tasks; a tile that straddles a group boundary is computed once per group
and each group stores only its own rows). Two changes make its cost follow the rows, not the slots:
  - the task table (group, 128-row block, rows to store) is computed by XLA before the kernel, in
    one vectorised pass, instead of an unrolled select chain over all S groups in every tile;
  - tasks without rows (tasks past the last real one: the static grid has room for every group
    having rows) skip their K loop and store.
Jax's kernel runs the full K loop for every one of its `cdiv(M, 128) + S - 1` row tiles, so each
empty slot costs a full tile per column block: with the offload engine's slot array (every layer's
resident experts plus the streamed ones) or Qwen3's 128 experts that is most of its work.
`scripts/bench_expert_kernel.py` times both in one run.

Block config: the best of a small H100 sweep of jax's kernel (DESIGN.md §3): 128×128 tiles,
block_k 64, 4 pipeline stages, grid_block_n 4. jax >= 0.11 can interpret Mosaic GPU kernels on the
CPU (`force_gpu_interpret_mode`, a GPU simulator): `interpret=True` runs the same kernel there, so
its numerics are testable without a GPU; jax 0.10 cannot, and this path is GPU-only there.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
from typing import NamedTuple

import jax
import jax.numpy as jnp

BLOCK_M, BLOCK_N, BLOCK_K, STAGES = 128, 128, 64, 4
ROW_ALIGN = 8  # lhs rows are padded to a multiple of this (the TMA tiling of the lhs tile)
H100_SMS = 132  # streaming multiprocessors of an H100/H200 SXM: the persistent grid where the device has no count


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
        importlib.import_module("jax.experimental.pallas.mosaic_gpu")
    except ImportError as e:
        return f"jax.experimental.pallas.mosaic_gpu not importable ({e})"
    return None


class Tasks(NamedTuple):
    """Row tasks of a grouped GEMM, int32 `[num_tasks]` each; tasks with rows come first.

    group: the group (weight slot) whose rows the task computes.
    block: the `block_m`-row block of lhs it reads (rows block·block_m ...).
    first: the first row of the block that belongs to the group (offset within the block).
    rows: how many rows from `first` belong to the group; 0 for a task without work.
    """

    group: jax.Array
    block: jax.Array
    first: jax.Array
    rows: jax.Array


def num_tasks(M: int, S: int, block_m: int) -> int:
    """Static bound on the tasks: every block once, plus one more per group boundary inside a block."""
    return -(-M // block_m) + max(0, min(S, M) - 1)


def row_tasks(group_sizes: jax.Array, M: int, block_m: int) -> Tasks:
    """The (group, block) pairs that hold rows, in group order, padded with empty tasks.
    group_sizes: int32 `[S]` rows per group, summing to at most M."""
    S = group_sizes.shape[0]
    sizes = group_sizes.astype(jnp.int32)
    ends = jnp.cumsum(sizes)
    starts = ends - sizes
    first_block = starts // block_m
    blocks = jnp.where(sizes > 0, (ends - 1) // block_m - first_block + 1, 0)
    task_end = jnp.cumsum(blocks)
    t = jnp.arange(num_tasks(M, S, block_m), dtype=jnp.int32)
    group = jnp.minimum(jnp.searchsorted(task_end, t, side="right"), S - 1).astype(jnp.int32)
    block = first_block[group] + t - (task_end - blocks)[group]
    lo = jnp.maximum(starts[group], block * block_m)
    hi = jnp.minimum(ends[group], (block + 1) * block_m)
    rows = jnp.where(t < task_end[-1], hi - lo, 0)
    return Tasks(group, jnp.where(rows > 0, block, 0), lo - block * block_m, rows)


def ragged_dot(lhs, rhs, group_sizes, *, interpret: bool = False, jax_kernel: bool = False):
    """`[M, K]` rows sorted by group × `[S, K, N]` → `[M, N]` in lhs.dtype (float32 accumulate).
    Rows past `sum(group_sizes)` are left unwritten. interpret: run in jax's GPU simulator on the CPU.
    jax_kernel: run jax's shipped `ragged_dot_mgpu` instead, same blocks (the benchmark's baseline)."""
    grid_n = rhs.shape[2] // BLOCK_N
    grid_block_n = next(g for g in (4, 2, 1) if grid_n % g == 0)
    # The lhs tile's TMA is tiled by 8 rows: a row count above 8 that is not a multiple of 8 does not
    # compile (in jax's kernel too). Pad rows belong to no group: a tile may compute them, none stores them.
    M = lhs.shape[0]
    lhs = jnp.pad(lhs, ((0, -M % ROW_ALIGN), (0, 0)))
    with _interpret_mode()() if interpret else contextlib.nullcontext():
        if jax_kernel:
            from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu

            out = ragged_dot_mgpu.ragged_dot(
                lhs, rhs, group_sizes=group_sizes, block_m=BLOCK_M, block_n=BLOCK_N, block_k=BLOCK_K,
                max_concurrent_steps=STAGES, grid_block_n=grid_block_n)
        else:
            out = _ragged_dot(lhs, rhs, group_sizes, grid_block_n)
    return out[:M]


def _ragged_dot(lhs, rhs, group_sizes, grid_block_n: int):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    (M, K), N = lhs.shape, rhs.shape[2]
    tasks = row_tasks(group_sizes, M, BLOCK_M)
    grid_m, grid_n = tasks.rows.shape[0], N // BLOCK_N
    store_rows = min(BLOCK_M, M)

    def body(group_gmem, block_gmem, first_gmem, rows_gmem, lhs_gmem, rhs_gmem, out_gmem):
        @plgpu.nd_loop((grid_m * grid_n,), collective_axes="sm")
        def task_loop(loop_info):
            mi, ni = plgpu.planar_snake(loop_info.index[0], (grid_m, grid_n), 1, grid_block_n)
            group, block, first, rows = group_gmem[mi], block_gmem[mi], first_gmem[mi], rows_gmem[mi]

            @pl.when(rows > 0)
            def _():
                def acc_scope(acc_ref):
                    plgpu.emit_pipeline(
                        lambda _, lhs_smem, rhs_smem: plgpu.wgmma(acc_ref, lhs_smem, rhs_smem),
                        grid=(K // BLOCK_K,),
                        in_specs=[plgpu.BlockSpec((BLOCK_M, BLOCK_K), lambda k: (block, k), delay_release=1),
                                  plgpu.BlockSpec((BLOCK_K, BLOCK_N), lambda k: (k, ni), delay_release=1)],
                        max_concurrent_steps=STAGES,
                    )(lhs_gmem, rhs_gmem.at[group])
                    return acc_ref[...]

                acc = pl.run_scoped(acc_scope, plgpu.ACC((BLOCK_M, BLOCK_N)))

                @functools.partial(pl.run_scoped, out_smem=plgpu.SMEM((BLOCK_M, BLOCK_N), out_gmem.dtype))
                def store(out_smem):
                    out_smem[...] = acc.astype(out_smem.dtype)
                    plgpu.commit_smem()
                    # A TMA store has a static row count: store `rows` as a sum of powers of two,
                    # largest first (as jax's kernel does).
                    offset, size = first, store_rows
                    while size > 0:
                        n = 1 << (size.bit_length() - 1)
                        size //= 2

                        @pl.when(rows & n != 0)
                        def _():
                            plgpu.copy_smem_to_gmem(
                                out_smem.at[pl.ds(offset, n)],
                                out_gmem.at[pl.ds(block * BLOCK_M + offset, n), pl.ds(ni * BLOCK_N, BLOCK_N)])

                        offset = offset + (rows & n)
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    kernel = plgpu.kernel(
        body, out_type=jax.ShapeDtypeStruct((M, N), lhs.dtype),
        grid=(getattr(jax.devices()[0], "core_count", H100_SMS),), grid_names=("sm",),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup))
    return kernel(*tasks, lhs, rhs)
