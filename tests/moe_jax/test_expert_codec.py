"""The exp4 expert codec is lossless: every bfloat16 bit pattern comes back, in NumPy and in JAX."""
from __future__ import annotations

import jax
import ml_dtypes
import numpy as np
import pytest

from moe_jax import expert_codec
from moe_jax.expert_codec import BF16, coded_nbytes, decode, encode
from moe_jax.presets import preset_config

SPECIALS = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-40, -3e-39, 3.3e38, -1.0, 65504.0], np.float32)


def _matrices():
    rng = np.random.default_rng(0)
    gauss = rng.standard_normal((64, 1001), np.float32) * 0.02  # odd columns: a padded last nibble
    gauss.reshape(-1)[:SPECIALS.size] = SPECIALS
    heavy = rng.standard_t(2, (37, 256)).astype(np.float32) * 1e-3  # tails far outside 15 exponents
    every_bit_pattern = np.arange(2**16, dtype=np.uint16).view(BF16).reshape(256, 256)
    return {"gauss": gauss.astype(BF16), "heavy": heavy.astype(BF16), "all16": every_bit_pattern}


@pytest.mark.parametrize("name", ["gauss", "heavy", "all16"])
def test_round_trip_is_exact(name):
    x = _matrices()[name]
    coded = encode(x)
    assert coded.sm.nbytes + coded.nib.nbytes == coded_nbytes(x.shape)
    y = jax.jit(decode)(coded.sm, coded.nib, np.int32(coded.base), coded.escape_index, coded.escape_bits)
    assert y.dtype == jax.numpy.bfloat16
    assert (np.asarray(y).view(np.uint16) == x.view(np.uint16)).all()


def test_gaussian_weights_escape_rarely_and_repeated_escapes_are_harmless():
    x = _matrices()["gauss"]
    coded = encode(x)
    assert SPECIALS.size <= coded.escape_index.size < 1e-3 * x.size + SPECIALS.size
    index = np.concatenate([coded.escape_index, coded.escape_index[:3]])  # padding repeats an escape
    bits = np.concatenate([coded.escape_bits, coded.escape_bits[:3]])
    y = decode(coded.sm, coded.nib, np.int32(coded.base), index, bits)
    assert (np.asarray(y).view(np.uint16) == x.view(np.uint16)).all()


def test_refuses_what_it_cannot_code():
    with pytest.raises(ValueError, match="bfloat16 matrix"):
        encode(np.ones((4, 4), np.float32))
    with pytest.raises(ValueError, match="bfloat16 matrix"):
        encode(np.ones((2, 4, 4), ml_dtypes.bfloat16))
    cfg = preset_config("mixtral-8x7b")
    with pytest.raises(ValueError, match="codes bfloat16 weights; the model runs in float32"):
        expert_codec.streamed_expert_bytes(cfg, np.float32, "exp4")
    with pytest.raises(ValueError, match="must be one of"):
        expert_codec.check("zstd", BF16)


def test_streamed_expert_bytes():
    cfg = preset_config("mixtral-8x7b")
    full = expert_codec.streamed_expert_bytes(cfg, BF16, "none")
    assert full == 3 * 4096 * 14336 * 2
    assert expert_codec.streamed_expert_bytes(cfg, BF16, "exp4") == 0.75 * full


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
def test_gpu_decode_is_exact_at_mixtral_shape():
    """The offload engine's decoding, on the GPU, of one Mixtral 8x7B expert matrix [4096, 14336]."""
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((4096, 14336), np.float32) * 4096**-0.5).astype(BF16)
    coded = encode(x)
    y = jax.jit(decode)(coded.sm, coded.nib, np.int32(coded.base), coded.escape_index, coded.escape_bits)
    assert (np.asarray(y).view(np.uint16) == x.view(np.uint16)).all()
