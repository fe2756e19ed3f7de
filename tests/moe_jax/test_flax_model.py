"""The Flax NNX decoder: the same numbers as the engines, and differentiable."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import moe_jax
from moe_jax.flax_model import MoEDecoder

PROMPTS = [[1, 5, 17, 33, 60, 7, 9, 11], [1, 70, 4, 4, 91, 23, 15, 8]]


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "dbrx", "deepseek_v3"])
def test_logits_equal_the_engine(family, hf_checkpoints):
    path = str(hf_checkpoints[family][0])
    decoder = MoEDecoder.from_pretrained(path)
    got = np.asarray(decoder(jnp.asarray(PROMPTS, jnp.int32)))
    want = moe_jax.LLM(path, dtype="float32", policy="resident").logits(PROMPTS)
    np.testing.assert_allclose(got, np.stack(want), rtol=1e-5, atol=1e-5 * np.abs(want[0]).max())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_float32_decoder_asks_for_full_precision_matmuls_under_jit(dtype):
    """As the engines (`precise`): on an accelerator float32 matmuls default to rounder modes. The HLO says which."""
    decoder = MoEDecoder.from_pretrained("tiny-mixtral", dtype=dtype)
    hlo = nnx.jit(lambda m, t: m(t)).lower(decoder, jnp.asarray(PROMPTS, jnp.int32)).as_text()
    assert ("precision = [DEFAULT, DEFAULT]" in hlo) == (dtype == "bfloat16")  # float32: every matmul HIGHEST


def test_gradients_reach_every_parameter():
    decoder = MoEDecoder.from_pretrained("tiny-olmoe")
    tokens = jnp.asarray(PROMPTS, jnp.int32)

    def loss(m, t):
        logits = m(t[:, :-1])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), t[:, 1:, None], axis=-1))

    grads = nnx.grad(loss)(decoder, tokens)
    norms = {(i, k): float(jnp.linalg.norm(g[...])) for i in range(len(decoder.layers)) for k, g in grads.layers[i].items()}
    norms.update({k: float(jnp.linalg.norm(g[...])) for k, g in grads.globals.items()})
    assert len(norms) > 20 and all(np.isfinite(v) for v in norms.values())
    assert [k for k, v in norms.items() if v == 0] == []  # every parameter of every layer, embeddings and head too


def test_bad_tokens_are_refused_with_what_is_wrong():
    decoder = MoEDecoder.from_pretrained("tiny-mixtral")
    n, vocab = decoder.cfg.max_positions, decoder.cfg.vocab_size
    for bad, message in (([1, 2, 3], r"integer token ids of shape \[batch, seq\], got int32 \(3,\)"),
                         ([[1.0, 2.0]], r"integer token ids of shape \[batch, seq\], got float32 \(1, 2\)"),
                         ([[1, vocab]], rf"token ids must lie in \[0, {vocab}\), got 1..{vocab}"),
                         ([[1] * (n + 1)], f"tokens has {n + 1} positions; the model has {n}")):
        with pytest.raises(ValueError, match=message):
            decoder(bad)
    assert decoder([[1, 2, 3]]).shape == (1, 3, vocab)  # a nested list is fine
    assert decoder([[0, 1, 2]]).shape == (1, 3, vocab)  # token 0 is a token
    decoder.cfg = decoder.cfg.replace(max_positions=16)
    assert decoder([[1] * 16]).shape == (1, 16, vocab)  # the whole context


def test_decoder_runs_the_differentiable_xla_experts_on_a_gpu_too(monkeypatch):
    """nnx.grad goes through the decoder on a GPU too: its experts are XLA's ragged_dot there, not the engines'
    Pallas kernels (which have no gradient), with the backend faked."""
    decoder = MoEDecoder.from_pretrained("tiny-mixtral")
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    text = str(jax.make_jaxpr(lambda t: decoder(t))(jnp.asarray(PROMPTS, jnp.int32)))
    assert "ragged_dot" in text and "pallas_call" not in text
