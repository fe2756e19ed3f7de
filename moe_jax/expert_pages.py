"""Where each expert's weights live in the offload engine: resident on the GPU or streamed from host.

The GPU holds one slot array per expert weight (`[slots, ...]`, the layout `pallas_kernels.moe_ffn`
takes): `R` resident slots (a fraction r_w of all (layer, expert) pairs, spread evenly over layers)
followed by `M` streamed slots holding the executing layer's streamed experts. The next layer's
streamed experts arrive meanwhile in up to `split` separate chunks of nearly equal size, each expert
sent once: with the streamed slots they form the double buffer, 2·M experts.
A page table `[E]` per MoE layer maps expert id -> slot; dense layers have no experts.
"""
from __future__ import annotations

import dataclasses
from typing import Collection

import numpy as np


@dataclasses.dataclass(frozen=True)
class ExpertPages:
    num_layers: int
    num_experts: int
    resident: tuple[tuple[int, ...], ...]  # per layer: resident expert ids
    streamed: tuple[tuple[int, ...], ...]  # per layer: streamed expert ids
    split: int  # chunks per layer (at most; a layer with fewer streamed experts has one expert per chunk)

    @classmethod
    def plan(cls, num_layers: int, num_experts: int, resident_fraction: float, split: int,
             dense_layers: Collection[int] = ()) -> "ExpertPages":
        """A fraction of the (layer, expert) pairs of the MoE layers resident, spread evenly over them (the
        first ones hold one more where it does not divide); `dense_layers` have no experts."""
        moe = [i for i in range(num_layers) if i not in dense_layers]
        total = round(resident_fraction * len(moe) * num_experts)
        per_layer = [0] * num_layers
        for j, i in enumerate(moe):
            per_layer[i] = total // len(moe) + (1 if j < total % len(moe) else 0)
        resident = tuple(tuple(range(n)) for n in per_layer)
        streamed = tuple(() if i in dense_layers else tuple(range(n, num_experts)) for i, n in enumerate(per_layer))
        return cls(num_layers, num_experts, resident, streamed, max(1, split))

    @classmethod
    def for_model(cls, cfg, resident_fraction: float, split: int) -> "ExpertPages":
        """`plan` for a `ModelConfig`'s layers and experts."""
        return cls.plan(cfg.num_layers, cfg.num_experts, resident_fraction, split, cfg.dense_layers)

    def has_experts(self, layer: int) -> bool:
        return bool(self.resident[layer] or self.streamed[layer])

    @property
    def num_resident(self) -> int:
        return sum(len(r) for r in self.resident)

    @property
    def num_streamed(self) -> int:
        return sum(len(s) for s in self.streamed)

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
