"""The resident engine's continuous batching: a request's tokens do not depend on what shares its batch,
and rows of finished requests take waiting ones."""
from __future__ import annotations

import logging

import jax
import numpy as np
import pytest

import moe_jax
from moe_jax.model_source import ModelSource, open_model
from moe_jax.presets import RandomWeights, preset_config
from moe_jax.requests import Request
from moe_jax.resident_engine import ResidentEngine
from moe_jax.sampling import SamplingParams

PROMPTS = [tuple(range(3, 3 + n)) for n in (9, 1, 17, 4, 30, 2, 11)]
BUDGETS = (2, 9, 3, 12, 1, 5, 7)


def run(engine, prompts, params):
    out = {r.index: ids for r, ids, _ in engine.generate([Request(i, p, sp) for i, (p, sp) in enumerate(zip(prompts, params))])}
    assert sorted(out) == list(range(len(prompts)))
    return [out[i] for i in range(len(prompts))]


def test_rows_of_finished_requests_take_waiting_ones():
    source = open_model("tiny-olmoe")
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True, temperature=0.8 * (i % 2), seed=i)
              for i, n in enumerate(BUDGETS)]
    engine = ResidentEngine(source.cfg, source.weights, np.float32, max_batch_size=2)
    got = run(engine, PROMPTS, params)
    alone = ResidentEngine(source.cfg, source.weights, np.float32, max_batch_size=1)
    assert got == [run(alone, [p], [sp])[0] for p, sp in zip(PROMPTS, params)]
    assert [len(g) for g in got] == list(BUDGETS)
    order = sorted(range(len(PROMPTS)), key=lambda i: -len(PROMPTS[i]))  # waves of 2, longest prompts first
    wave_steps = sum(max(BUDGETS[i] for i in order[w:w + 2]) - 1 for w in range(0, len(order), 2))
    assert engine.decode_steps < wave_steps, (engine.decode_steps, wave_steps)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
def test_gpu_expert_kernels_agree_inside_the_model(caplog):
    """One OLMoE-1B-7B layer (H=2048, F=1024, 64 experts, top-8; random bf16 weights) on the GPU: the model
    run with the Pallas kernel `auto` picks there gives the XLA kernel's logits and greedy tokens."""
    cfg = preset_config("olmoe-1b-7b").replace(num_layers=1)
    source = ModelSource("olmoe-1b-7b (1 layer)", cfg, RandomWeights(cfg, 0), None)
    tokens = [list(range(5, 5 + n)) for n in (37, 200, 3)]
    with caplog.at_level(logging.INFO, logger="pallas_kernels"):
        pallas = moe_jax.LLM(source, dtype="bfloat16", policy="resident", moe_impl="pallas").logits(tokens)
    assert "runs as pallas_mgpu" in caplog.text or "runs as pallas_triton" in caplog.text
    xla = moe_jax.LLM(source, dtype="bfloat16", policy="resident", moe_impl="xla").logits(tokens)
    for a, b in zip(pallas, xla):
        assert np.abs(a - b).max() < 0.05 * np.abs(b).max()
        assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.9


@pytest.mark.parametrize("policy", ["resident", "offload"])
def test_an_unknown_expert_kernel_is_refused_at_construction(policy):
    with pytest.raises(ValueError, match=r"moe_impl must be one of auto, pallas, .*got 'cuda'"):
        moe_jax.LLM("tiny-mixtral", policy=policy, moe_impl="cuda")
