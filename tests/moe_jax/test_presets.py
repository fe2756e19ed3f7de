"""Presets: every tiny preset generates text; real-shape presets parse and materialise lazily."""
from __future__ import annotations

import numpy as np
import pytest

import moe_jax
from moe_jax.params import layer_bytes, layer_specs, model_bytes
from moe_jax.presets import PRESETS, TINY_PRESETS, RandomWeights, preset_config


@pytest.mark.parametrize("name", TINY_PRESETS)
def test_tiny_presets_generate_text(name):
    llm = moe_jax.LLM(name, dtype="float32", policy="resident")
    outs = llm.generate(["Hello", "a longer prompt here"], moe_jax.SamplingParams(max_new_tokens=5, ignore_eos=True))
    assert [len(o.token_ids) for o in outs] == [5, 5] and all(isinstance(o.text, str) for o in outs)
    logits = llm.logits([llm.encode("Hello")])[0]
    assert np.isfinite(logits).all() and logits.std() > 0.5


def test_real_shape_presets_sizes():
    gib = {n: model_bytes(preset_config(n), "bfloat16") / 2**30 for n in PRESETS if not n.startswith("tiny")}
    assert 85 < gib["mixtral-8x7b"] < 88  # 46.7 B parameters
    assert 255 < gib["mixtral-8x22b"] < 265  # 141 B
    assert 235 < gib["dbrx"] < 250  # 132 B
    assert 55 < gib["qwen3-30b-a3b"] < 58  # 30.5 B
    assert 12 < gib["olmoe-1b-7b"] < 13.5  # 6.9 B
    assert 29 < gib["deepseek-v2-lite"] < 30  # 15.7 B
    lite = preset_config("deepseek-v2-lite")  # latent cache: 576 dims of one head per token and layer
    assert (lite.dense_layers, lite.head_dim, lite.value_dim, lite.num_kv_heads) == ((0,), 576, 512, 1)
    cfg = preset_config("mixtral-8x7b")
    assert layer_bytes(cfg, "bfloat16", expert=True) == 3 * 8 * 4096 * 14336 * 2
    published = {"mixtral-8x7b": (32, 8, 128, 8, 2), "mixtral-8x22b": (48, 8, 128, 8, 2), "dbrx": (48, 8, 128, 16, 4),
                 "qwen3-30b-a3b": (32, 4, 128, 128, 8), "olmoe-1b-7b": (16, 16, 128, 64, 8)}  # heads, KV heads, dim, E, k
    for name, shape in published.items():  # the KV cache's bytes and attention's cost follow these
        c = preset_config(name)
        assert (c.num_heads, c.num_kv_heads, c.head_dim, c.num_experts, c.experts_per_token) == shape, name


def test_random_weights_are_deterministic_per_layer():
    cfg = preset_config("tiny-olmoe")
    a, b = RandomWeights(cfg, seed=1), RandomWeights(cfg, seed=1)
    b.layer(0, np.float32)  # order of materialisation must not matter
    for k, v in a.layer(1, np.float32).items():
        np.testing.assert_array_equal(v, b.layer(1, np.float32)[k])
    assert not np.array_equal(a.layer(0, np.float32)["wq"], a.layer(1, np.float32)["wq"])


def test_pooled_tensors_are_the_pool_from_a_random_offset_wrapping_around():
    """Large tensors are copied from the pool in pieces on several threads: element j is pool[(start + j) %
    POOL] whatever the pieces (a small pool here, so that a tensor spans many pieces and wraps)."""
    class Small(RandomWeights):
        POOL = 1 << 10

    cfg = preset_config("tiny-olmoe")
    w = Small(cfg, seed=3)
    name, spec = next((k, s) for k, s in layer_specs(cfg, 0).items()
                      if s.init == "normal" and int(np.prod(s.shape)) >= Small.POOL * 3)
    got = w._tensor(0, name, spec, np.float32)
    pool = w._pool(spec.shape[-2] ** -0.5, np.float32)
    flat = got.reshape(-1)
    start = int(np.flatnonzero(pool == flat[0])[0])
    np.testing.assert_array_equal(flat, pool[(start + np.arange(flat.size)) % Small.POOL])
    np.testing.assert_array_equal(got, Small(cfg, seed=3)._tensor(0, name, spec, np.float32))


def test_resident_kv_cache_must_fit_the_cap():
    llm = moe_jax.LLM("tiny-mixtral", dtype="float32", policy="resident", gpu_memory_gb=0.0014)  # 1.0 MB of weights fit
    with pytest.raises(MemoryError, match=r"GiB for the KV cache of 1 sequences x 2048 positions \(and the float32 "
                                          r"attention scores of 8 tokens each\) but the gpu_memory_gb cap is 0.0014 GiB "
                                          r"\(90% of it usable\)"):
        llm.generate(["x"], moe_jax.SamplingParams(max_new_tokens=2000))
