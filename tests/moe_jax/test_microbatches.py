"""MoE-Lightning's balanced partition: fewest micro-batches, none over capacity, token counts balanced."""
from __future__ import annotations

import numpy as np

from moe_jax.microbatches import balanced_micro_batches


def test_partition_is_complete_within_capacity_and_balanced():
    lengths = np.random.default_rng(0).integers(1, 200, 37).tolist()
    groups = balanced_micro_batches(range(37), lengths, capacity=8)
    assert len(groups) == 5 and all(len(g) <= 8 for g in groups)
    assert sorted(i for g in groups for i in g) == list(range(37))
    tokens = [sum(lengths[i] for i in g) for g in groups]
    assert max(tokens) - min(tokens) <= max(lengths)  # greedy longest-first: within one request


def test_a_full_micro_batch_takes_no_more():
    """The long request's micro-batch has the fewest tokens after it, but fills up at capacity."""
    groups = balanced_micro_batches([0, 1, 2, 3], [100, 1, 1, 1], capacity=2)
    assert sorted(len(g) for g in groups) == [2, 2] and sorted(i for g in groups for i in g) == [0, 1, 2, 3]


def test_micro_batches_take_the_longest_first():
    """Longest first, each to the micro-batch with the fewest tokens and room: prompts of 50, 100, 50 tokens in
    two micro-batches are 100 | 50 + 50, where shortest first gives 150 | 50 (one micro-batch's prefill and CPU
    attention half again as long, the other's rows idle), a partition the bound above lets through."""
    for lengths, capacity, want in (([50, 100, 50], 2, [100, 100]), ([1, 7, 4, 5, 3], 3, [10, 10])):
        groups = balanced_micro_batches(range(len(lengths)), lengths, capacity)
        assert sorted(sum(lengths[i] for i in g) for g in groups) == want, groups
