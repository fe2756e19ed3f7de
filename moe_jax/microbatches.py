"""Micro-batches from requests (MoE-Lightning's balanced partition)."""
from __future__ import annotations

import heapq
from typing import Sequence


def balanced_micro_batches(indices: Sequence[int], lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Split `indices` into the fewest micro-batches of at most `capacity`, balancing token counts:
    longest first, each to the micro-batch with the fewest tokens that still has room."""
    n = -(-len(indices) // capacity)
    heap = [(0, g) for g in range(n)]
    groups: list[list[int]] = [[] for _ in range(n)]
    for i in sorted(indices, key=lambda i: -lengths[i]):
        full = []
        tokens, g = heapq.heappop(heap)
        while len(groups[g]) >= capacity:
            full.append((tokens, g))
            tokens, g = heapq.heappop(heap)
        groups[g].append(i)
        heapq.heappush(heap, (tokens + lengths[i], g))
        for item in full:
            heapq.heappush(heap, item)
    return groups
