"""LLM: the policy "auto" chooses."""
from __future__ import annotations

import moe_jax
from moe_jax.params import model_bytes
from moe_jax.presets import preset_config


def test_auto_runs_resident_only_with_a_margin_under_the_cap():
    """policy "auto" keeps the model resident only where its weights take under 85% of the accelerator's memory
    (the cap here): the KV cache, activations and sampling need the rest; 90% full is offloaded."""
    gib = model_bytes(preset_config("tiny-mixtral"), "bfloat16") / 2**30
    assert moe_jax.LLM("tiny-mixtral", policy="auto", gpu_memory_gb=gib / 0.8).policy == "resident"
    assert moe_jax.LLM("tiny-mixtral", policy="auto", gpu_memory_gb=gib / 0.9).policy == "offload"
