"""Lay routed (token, expert) pairs out as rows grouped by weight slot, with static shapes.

Each slot's rows are padded to a multiple of `block_m`, so every `block_m`-row tile belongs to
exactly one slot: a grouped-GEMM kernel can then handle a tile as one dense matmul, and slots
without tokens get no tile at all. `block_m=1` gives the plain sorted layout (no padding) that
`lax.ragged_dot` and the Mosaic GPU kernel (`mgpu.ragged_dot`) take.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class GroupedLayout(NamedTuple):
    """Rows grouped by slot. R = num_tiles · block_m rows; pad rows read token 0 and are never used.

    row_token: int32 `[R]` token whose activations feed each row.
    pair_row: int32 `[T, k]` row that holds pair (t, j).
    tile_slot: int32 `[num_tiles]` slot of each `block_m`-row tile; -1 for tiles past the end.
    group_sizes: int32 `[S]` pairs per slot (unpadded; sums to T·k).
    """

    row_token: jax.Array
    pair_row: jax.Array
    tile_slot: jax.Array
    group_sizes: jax.Array


def max_tiles(num_pairs: int, num_slots: int, block_m: int) -> int:
    """Static upper bound on Σ_s ceil(n_s / block_m) over slot loads n_s summing to num_pairs."""
    return max(0, min(num_pairs, -(-num_pairs // block_m) + min(num_slots, num_pairs) - 1))


def grouped_layout(topk_ids: jax.Array, expert_slots: jax.Array | None, num_slots: int,
                   block_m: int = 1) -> GroupedLayout:
    """Group the T·k routed pairs by the weight slot of their expert (on device, jit-safe).

    Args:
      topk_ids: int32 `[T, k]` expert ids.
      expert_slots: int32 `[E]` expert id → slot, or None for the identity.
      num_slots: S, the number of weight slots.
      block_m: rows per tile; each slot's rows start on a tile boundary.
    """
    T, k = topk_ids.shape
    M = T * k
    ids = topk_ids.reshape(M).astype(jnp.int32)
    slots = ids if expert_slots is None else jnp.asarray(expert_slots, jnp.int32)[ids]
    order = jnp.argsort(slots, stable=True).astype(jnp.int32)
    group_sizes = jnp.zeros((num_slots,), jnp.int32).at[slots].add(1)
    tiles = -(-group_sizes // block_m)
    tile_end = jnp.cumsum(tiles)
    slot_row = (tile_end - tiles) * block_m
    slot_pair = jnp.cumsum(group_sizes) - group_sizes
    sorted_slots = slots[order]
    row = slot_row[sorted_slots] + jnp.arange(M, dtype=jnp.int32) - slot_pair[sorted_slots]
    num_tiles = max_tiles(M, num_slots, block_m)
    row_token = jnp.zeros((num_tiles * block_m,), jnp.int32).at[row].set(order // k)
    pair_row = jnp.zeros((M,), jnp.int32).at[order].set(row).reshape(T, k)
    tile = jnp.arange(num_tiles, dtype=jnp.int32)
    tile_slot = jnp.searchsorted(tile_end, tile, side="right").astype(jnp.int32)
    tile_slot = jnp.where(tile < tile_end[-1], tile_slot, -1)
    return GroupedLayout(row_token, pair_row, tile_slot, group_sizes)
