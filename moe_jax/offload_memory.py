"""GPU working memory of the offload engine beyond its weights, in bytes: one formula for what HRM plans
with and for what the engine checks before it runs. Arguments may be NumPy arrays (HRM's grid).

Decode: one micro-batch of μ rows, its activations (`activation_bytes`, float32) and its
logits [μ, V] float32. Prefill: every row's hidden state [batch, T, H] (all micro-batches advance layer by
layer) plus one call of `prefill_rows_per_call` rows: its activations over rows·T tokens and its attention
scores [rows, Hq, T, T] float32.
"""
from __future__ import annotations

import numpy as np

from moe_jax.config import ModelConfig
from moe_jax.shape_buckets import bucket

PREFILL_CALL_BYTES = 1 << 30  # cap on one prefill call's working set: activations and attention scores


def activation_bytes(cfg: ModelConfig, tokens):
    """Peak GPU working set of one layer over `tokens` tokens, every element counted at 4 bytes
    (f32 accumulators): input and residual, q/k/v and attention output, router probabilities, the
    k routed rows through the experts (gathered input, gate, up, SwiGLU, output) and the shared expert."""
    H, F, Fs = cfg.hidden_size, cfg.expert_ffn_size, cfg.shared_expert_ffn_size
    per_token = (2 * H + 2 * cfg.q_size + 2 * cfg.kv_size + cfg.num_experts
                 + cfg.experts_per_token * (2 * H + 3 * F) + (3 * Fs + H if Fs else 0))
    return 4 * tokens * per_token


def prefill_rows_per_call(cfg: ModelConfig, T: int, rows: int) -> int:
    """Rows of a prefill call at prompt bucket T: its working set (activations over rows·T tokens, float32
    scores [rows, Hq, T, T]) stays under the cap, rounded up to a bucket (few shapes compile). The cap,
    not μ, bounds the call, so a larger micro-batch costs the decode little GPU memory."""
    per_row = activation_bytes(cfg, T) + 4 * cfg.num_heads * T * T
    return bucket(min(max(1, PREFILL_CALL_BYTES // per_row), rows), 1)


def decode_bytes(cfg: ModelConfig, mu):
    """One decode micro-batch of μ rows: its activations and float32 logits."""
    return activation_bytes(cfg, mu) + 4 * mu * cfg.vocab_size


def prefill_bytes(cfg: ModelConfig, dtype, batch, mu, T: int):
    """A prefill of `batch` prompts padded to T tokens in micro-batches of μ: the hidden states of all of
    them and one call's working set."""
    rows = np.vectorize(lambda m: prefill_rows_per_call(cfg, T, int(m)), otypes=[np.int64])(mu)
    return (batch * T * cfg.hidden_size * np.dtype(dtype).itemsize
            + activation_bytes(cfg, rows * T) + 4 * rows * cfg.num_heads * T * T)
