"""Where each expert's weights live in the offload engine: resident on the GPU or streamed from host.

The GPU holds one slot array per expert weight (`[slots, ...]`, the layout `pallas_kernels.moe_ffn`
takes): `R` resident slots (a fraction r_w of all (layer, expert) pairs, spread evenly over layers)
followed by `M` streamed slots holding the executing layer's streamed experts. The next layer's
streamed experts arrive meanwhile in `num_chunks` separate chunks of `chunk` experts (the last chunk
may overlap the one before it): with the streamed slots they form the double buffer, 2·M experts.
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
    streamed: tuple[tuple[int, ...], ...]  # per layer: streamed expert ids (padded to M by repetition)
    max_streamed: int  # M, streamed slots per half
    chunk: int  # experts per transfer chunk
    num_chunks: int

    @classmethod
    def plan(cls, num_layers: int, num_experts: int, resident_fraction: float, num_chunks: int) -> "ExpertPages":
        total = round(resident_fraction * num_layers * num_experts)
        per_layer = [total // num_layers + (1 if i < total % num_layers else 0) for i in range(num_layers)]
        resident = tuple(tuple(range(n)) for n in per_layer)
        M = num_experts - min(per_layer)
        streamed = []
        for n in per_layer:
            ids = list(range(n, num_experts))
            streamed.append(tuple(ids + [ids[-1]] * (M - len(ids))) if ids else tuple([0] * M))
        num_chunks = max(1, min(num_chunks, M)) if M else 0
        chunk = -(-M // num_chunks) if M else 0
        return cls(num_layers, num_experts, resident, tuple(streamed), M, chunk, num_chunks)

    @property
    def num_resident(self) -> int:
        return sum(len(r) for r in self.resident)

    @property
    def num_slots(self) -> int:
        return self.num_resident + self.max_streamed

    def resident_slot(self, layer: int, expert: int) -> int:
        return sum(len(r) for r in self.resident[:layer]) + self.resident[layer].index(expert)

    def chunk_start(self, k: int) -> int:
        """First streamed position carried by chunk k."""
        return min(k * self.chunk, self.max_streamed - self.chunk)

    def chunk_slot(self, k: int) -> int:
        """Slot where chunk k lands."""
        return self.num_resident + self.chunk_start(k)

    def page_table(self, layer: int) -> np.ndarray:
        """int32 [E]: expert id -> slot while `layer` is installed."""
        table = np.empty(self.num_experts, np.int32)
        for e in self.resident[layer]:
            table[e] = self.resident_slot(layer, e)
        for j, e in enumerate(self.streamed[layer]):
            if e not in self.resident[layer] and j == self.streamed[layer].index(e):
                table[e] = self.num_resident + j
        return table
