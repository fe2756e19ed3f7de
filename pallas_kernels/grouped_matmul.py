"""Grouped GEMM over slot-aligned tiles as a Pallas kernel (Triton lowering on GPU, interpret on CPU).

Rows come in the `layout.grouped_layout` order: tile i (`block_m` rows) multiplies by the weights
of slot `tile_slot[i]`, read from the whole `[S, K, N]` weight array at that slot (the page table
is read inside the kernel, so no weight copy is made); tiles with slot -1 are skipped. One program
per (tile, N-block), in a grouped launch order (`_tile_and_n_block`); the K loop runs inside the
kernel with float32 accumulators. With two weight arrays the kernel is the fused SwiGLU
`silu(lhs·w_gate) ⊙ (lhs·w_up)`, sharing the lhs loads and never writing the two products.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """Block sizes (elements), Triton launch parameters, and tiles per launch-order group."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    group_m: int = 8


def _largest_pow2_divisor(n: int, cap: int) -> int:
    b = 1
    while b * 2 <= cap and n % (b * 2) == 0:
        b *= 2
    return b


def pick_block_m(num_pairs: int, num_slots: int) -> int:
    """Rows per tile: the mean slot load rounded up to a power of two, within [16, 128]."""
    mean = max(1, -(-num_pairs // num_slots))
    return min(128, max(16, 1 << (mean - 1).bit_length()))


def pick_config(block_m: int, K: int, N: int, fused: bool) -> TileConfig:
    """Default tiles for `[R, K] × [S, K, N]`; block_n halves for the two fused accumulators."""
    return TileConfig(block_m=block_m,
                      block_n=_largest_pow2_divisor(N, 64 if fused else 128),
                      block_k=_largest_pow2_divisor(K, 64),
                      num_warps=8 if block_m >= 64 else 4)


def triton_compatible(K: int, N: int) -> bool:
    """Triton's dot needs every block dimension ≥ 16; blocks must divide K and N."""
    return K % 16 == 0 and N % 16 == 0


def _tile_and_n_block(pid, num_tiles: int, n_blocks: int, group_m: int):
    """Launch order: runs of `group_m` consecutive tiles sweep all N-blocks together, so a wave
    of programs shares weight strips (tiles of one slot) and lhs rows in L2."""
    width = group_m * n_blocks
    first = pid // width * group_m
    rows = jnp.minimum(num_tiles - first, group_m)
    return first + pid % width % rows, pid % width // rows


def grouped_matmul(lhs, tile_slot, weights, *, config: TileConfig, out_dtype, interpret: bool):
    """`out[rows of tile i] = lhs[rows] · w[tile_slot[i]]` (one weight) or the fused SwiGLU (two).

    Args:
      lhs: `[R, K]`, R = len(tile_slot) · block_m.
      tile_slot: int32 `[R / block_m]` slot per tile, -1 to skip.
      weights: tuple of one or two `[S, K, N]` arrays (gate, up for SwiGLU).
      config: tiles; block_k must divide K and block_n must divide N.
      out_dtype: dtype of the `[R, N]` result (accumulation is float32 regardless).
    Rows of skipped tiles are left unwritten.
    """
    R, K = lhs.shape
    N = weights[0].shape[2]
    bm, bn, bk = config.block_m, config.block_n, config.block_k
    num_tiles = tile_slot.shape[0]
    assert R == num_tiles * bm and K % bk == 0 and N % bn == 0, (lhs.shape, N, config)
    precision = (jax.lax.Precision.HIGHEST if lhs.dtype == jnp.float32
                 else jax.lax.Precision.DEFAULT)

    n_blocks = N // bn
    coords = lambda pid: _tile_and_n_block(pid, num_tiles, n_blocks, config.group_m)

    def kernel(tile_slot_ref, lhs_ref, *refs):
        *w_refs, out_ref = refs
        tile, n_block = coords(pl.program_id(0))
        slot = tile_slot_ref[tile]
        n_cols = pl.ds(pl.multiple_of(n_block * bn, bn), bn)

        @pl.when(slot >= 0)
        def _():
            def step(kb, accs):
                k_rows = pl.ds(pl.multiple_of(kb * bk, bk), bk)
                a = lhs_ref[:, k_rows]
                return tuple(
                    acc + jnp.dot(a, w_ref[slot, k_rows, n_cols], precision=precision,
                                  preferred_element_type=jnp.float32)
                    for acc, w_ref in zip(accs, w_refs))

            zero = jnp.zeros((bm, bn), jnp.float32)
            accs = jax.lax.fori_loop(0, K // bk, step, (zero,) * len(w_refs))
            out = accs[0] if len(accs) == 1 else jax.nn.silu(accs[0]) * accs[1]
            out_ref[...] = out.astype(out_ref.dtype)

    whole = lambda a: pl.BlockSpec(a.shape, lambda pid: (0,) * a.ndim)
    return pl.pallas_call(
        kernel,
        grid=(num_tiles * n_blocks,),
        in_specs=[whole(tile_slot), pl.BlockSpec((bm, K), lambda pid: (coords(pid)[0], 0)),
                  *(whole(w) for w in weights)],
        out_specs=pl.BlockSpec((bm, bn), coords),
        out_shape=jax.ShapeDtypeStruct((R, N), out_dtype),
        compiler_params=pltriton.CompilerParams(num_warps=config.num_warps,
                                                num_stages=config.num_stages),
        interpret=interpret,
        name="grouped_swiglu" if len(weights) == 2 else "grouped_matmul",
    )(tile_slot, lhs, *weights)
