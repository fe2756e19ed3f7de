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


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "dbrx"])
def test_logits_equal_the_engine(family, hf_checkpoints):
    path = str(hf_checkpoints[family][0])
    decoder = MoEDecoder.from_pretrained(path)
    with jax.default_matmul_precision("highest"):
        got = np.asarray(decoder(jnp.asarray(PROMPTS, jnp.int32)))
    want = moe_jax.LLM(path, dtype="float32", policy="resident").logits(PROMPTS)
    np.testing.assert_allclose(got, np.stack(want), rtol=1e-5, atol=1e-5 * np.abs(want[0]).max())


def test_gradients_reach_every_parameter():
    decoder = MoEDecoder.from_pretrained("tiny-olmoe")
    tokens = jnp.asarray(PROMPTS, jnp.int32)

    def loss(m, t):
        logits = m(t[:, :-1])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), t[:, 1:, None], axis=-1))

    grads = nnx.grad(loss)(decoder, tokens)
    norms = {k: float(jnp.linalg.norm(g[...])) for k, g in grads.layers[0].items()}
    assert all(np.isfinite(v) for v in norms.values())
    assert norms["wq"] > 0 and norms["router"] > 0 and norms["w_gate"] > 0
