"""Every family against transformers: float32 logits and greedy generation from sharded checkpoints."""
from __future__ import annotations

import numpy as np
import pytest

import moe_jax
from tests.conftest import FAMILIES, build_hf_model

PROMPTS = [[1, 5, 17, 33, 60, 7, 9, 11, 42, 3, 88], [1, 70], [1, 4, 4, 4, 91, 23, 15]]


@pytest.fixture(scope="module")
def f32_llms(hf_checkpoints):
    return {f: moe_jax.LLM(str(hf_checkpoints[f][0]), dtype="float32", policy="resident") for f in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers_f32(family, hf_checkpoints, f32_llms):
    import torch

    model = hf_checkpoints[family][1]
    ours = f32_llms[family].logits(PROMPTS)
    for prompt, got in zip(PROMPTS, ours):
        with torch.no_grad():
            want = model(torch.tensor([prompt])).logits[0].numpy()
        assert got.shape == want.shape
        assert want.std() > 0.5, "logits nearly uniform: the test would prove little"
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("family, rope", [
    ("qwen3_moe", dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=32, rope_theta=1e4)),
    ("olmoe", dict(rope_type="yarn", factor=8.0, original_max_position_embeddings=64, mscale=1.0, mscale_all_dim=0.5,
                   beta_fast=16, rope_theta=1e4)),
    ("mixtral", dict(rope_type="linear", factor=3.0, rope_theta=1e4)),
    ("mixtral", dict(rope_type="default", rope_theta=1e4, partial_rotary_factor=0.5)),  # ignored, as transformers does
])
def test_scaled_rope_logits_match_transformers(family, rope, tmp_path):
    """RoPE scaling (YaRN's blended frequencies and attention factor; linear) over prompts past the original
    context, on the first and the last positions alike."""
    model = build_hf_model(family, rope_parameters=rope)  # skips where torch is not installed (not in CI)
    import torch

    model.save_pretrained(tmp_path)
    llm = moe_jax.LLM(str(tmp_path), dtype="float32", policy="resident")
    prompts = [list(np.random.default_rng(1).integers(3, 96, 80)), PROMPTS[0]]
    for prompt, got in zip(prompts, llm.logits(prompts)):
        with torch.no_grad():
            want = model(torch.tensor([prompt])).logits[0].numpy()
        assert want.std() > 0.5
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.fixture(scope="module")
def dense_layer_checkpoints(tmp_path_factory):
    """Qwen MoE checkpoints with dense layers: the first (as DeepSeek's), and every other (a sparse step)."""
    out = {}
    for family, changes in (("qwen2_moe", dict(num_hidden_layers=4, mlp_only_layers=[0])),
                            ("qwen3_moe", dict(num_hidden_layers=4, decoder_sparse_step=2, mlp_only_layers=[3]))):
        model = build_hf_model(family, **changes)
        path = tmp_path_factory.mktemp(family)
        model.save_pretrained(path, max_shard_size="100KB")
        out[family] = path, model
    return out


@pytest.mark.parametrize("family, dense", [("qwen2_moe", (0,)), ("qwen3_moe", (0, 2, 3))])
def test_dense_layers_match_transformers(family, dense, dense_layer_checkpoints):
    """Layers whose FFN is a dense MLP (mlp_only_layers, decoder_sparse_step): logits and greedy tokens."""
    import torch

    path, model = dense_layer_checkpoints[family]
    assert [i for i, layer in enumerate(model.model.layers) if not hasattr(layer.mlp, "experts")] == list(dense)
    llm = moe_jax.LLM(str(path), dtype="float32", policy="resident")
    assert llm.cfg.dense_layers == dense
    for prompt, got in zip(PROMPTS, llm.logits(PROMPTS)):
        with torch.no_grad():
            want = model(torch.tensor([prompt])).logits[0].numpy()
        assert want.std() > 0.5
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    outs = llm.generate(PROMPTS, moe_jax.SamplingParams(max_new_tokens=8))
    for prompt, out in zip(PROMPTS, outs):
        with torch.no_grad():
            ref = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=2,
                                 pad_token_id=0)[0, len(prompt):].tolist()
        assert out.token_ids == ref


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generate_matches_transformers(family, hf_checkpoints, f32_llms):
    import torch

    model = hf_checkpoints[family][1]
    n_new = 12
    outs = f32_llms[family].generate(PROMPTS, moe_jax.SamplingParams(max_new_tokens=n_new))
    for prompt, out in zip(PROMPTS, outs):
        with torch.no_grad():
            ref = model.generate(torch.tensor([prompt]), max_new_tokens=n_new, do_sample=False,
                                 eos_token_id=2, pad_token_id=0)[0, len(prompt):].tolist()
        assert out.token_ids == ref
        assert out.finish_reason == ("stop" if ref[-1] == 2 else "length")
        assert out.text is None  # these checkpoints have no tokenizer.json


@pytest.mark.parametrize("family", ["mixtral", "dbrx"])
def test_bfloat16_logits_close_to_float32(family, hf_checkpoints, f32_llms):
    bf16 = moe_jax.LLM(str(hf_checkpoints[family][0]), dtype="bfloat16", policy="resident")
    for got, want in zip(bf16.logits(PROMPTS), f32_llms[family].logits(PROMPTS)):
        assert got.dtype == np.float32
        # bf16 keeps 8 bits of mantissa; errors compound over the layers
        assert np.abs(got - want).max() <= 0.08 * np.abs(want).max()
        assert np.mean(got.argmax(-1) == want.argmax(-1)) >= 0.8


def test_a_tied_config_with_a_stored_lm_head_of_its_own_uses_it_as_transformers_does(tmp_path, caplog):
    """config.json says tie_word_embeddings but the checkpoint stores an lm_head.weight that differs from the
    embeddings (an untied model whose config was edited, or saved so): transformers loads the stored one ("will
    NOT tie them"), and so does the loader, saying so."""
    import json

    model = build_hf_model("mixtral")  # skips where torch is not installed (not in CI)
    import torch
    from transformers import AutoModelForCausalLM

    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with caplog.at_level("WARNING", logger="moe_jax"):
        llm = moe_jax.LLM(str(tmp_path), dtype="float32", policy="resident")
    assert "ties the embeddings (tie_word_embeddings) but the checkpoint's lm_head.weight differs" in caplog.text
    assert not llm.cfg.tie_embeddings
    for prompt, got in zip(PROMPTS, llm.logits(PROMPTS)):
        with torch.no_grad():
            want = reloaded(torch.tensor([prompt])).logits[0].numpy()
        assert want.std() > 0.5
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
