"""Where each expert's weights live in the offload engine: resident on the GPU or streamed from host.

The GPU holds one slot array per expert weight (`[slots, ...]`, the layout `pallas_kernels.moe_ffn`
takes): `R` resident slots (a fraction r_w of all (layer, expert) pairs, spread evenly over layers)
followed by `M` streamed slots holding the executing layer's streamed experts. The next layer's
streamed experts arrive meanwhile in up to `split` separate chunks of nearly equal size, each expert
sent once: with the streamed slots they form the double buffer, 2·M experts.
A page table `[E]` per layer maps expert id -> slot.
"""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class ExpertPages:
    num_layers: int
    num_experts: int
    resident: tuple[tuple[int, ...], ...]  # per layer: resident expert ids
    streamed: tuple[tuple[int, ...], ...]  # per layer: streamed expert ids
    split: int  # chunks per layer (at most; a layer with fewer streamed experts has one expert per chunk)

    @classmethod
    def plan(cls, num_layers: int, num_experts: int, resident_fraction: float, split: int) -> "ExpertPages":
        total = round(resident_fraction * num_layers * num_experts)
        per_layer = [total // num_layers + (1 if i < total % num_layers else 0) for i in range(num_layers)]
        resident = tuple(tuple(range(n)) for n in per_layer)
        streamed = tuple(tuple(range(n, num_experts)) for n in per_layer)
        return cls(num_layers, num_experts, resident, streamed, max(1, split))

    @property
    def num_resident(self) -> int:
        return sum(len(r) for r in self.resident)

    @property
    def max_streamed(self) -> int:
        """M: streamed slots, the most streamed experts of any layer."""
        return max(len(s) for s in self.streamed)

    @property
    def num_slots(self) -> int:
        return self.num_resident + self.max_streamed

    def resident_slot(self, layer: int, expert: int) -> int:
        return sum(len(r) for r in self.resident[:layer]) + self.resident[layer].index(expert)

    def chunks(self, layer: int) -> list[tuple[int, int]]:
        """[start, end) ranges of `layer`'s streamed experts, one per transfer, sizes differing by at most 1."""
        m = len(self.streamed[layer])
        n = min(self.split, m)
        return [(k * m // n, (k + 1) * m // n) for k in range(n)]

    def chunk_slot(self, start: int) -> int:
        """Slot where a chunk starting at streamed position `start` lands."""
        return self.num_resident + start

    def page_table(self, layer: int) -> np.ndarray:
        """int32 [E]: expert id -> slot while `layer` is installed."""
        table = np.empty(self.num_experts, np.int32)
        for e in self.resident[layer]:
            table[e] = self.resident_slot(layer, e)
        for j, e in enumerate(self.streamed[layer]):
            table[e] = self.num_resident + j
        return table
