"""GPU working memory of the offload engine beyond its weights, in bytes: one formula for what HRM plans
with and for what the engine checks before it runs. Arguments may be NumPy arrays (HRM's grid).

Decode: one micro-batch of μ rows, its activations (`activation_bytes`, float32), its
logits [μ, V] float32 and the sampling's sort over them. Prefill: every call's hidden states [rows, T, H] (all micro-batches advance layer by
layer) plus one call of `prefill_rows_per_call` rows: its activations over rows·T tokens and its attention
scores [rows, Hq, T, T] float32.
"""
from __future__ import annotations

import ml_dtypes  # noqa: F401  (registers "bfloat16" as a NumPy dtype name)
import numpy as np

from moe_jax.config import ModelConfig
from moe_jax.sampling import sample_bytes
from moe_jax.shape_buckets import bucket, bucket_below

PREFILL_CALL_BYTES = 1 << 30  # one prefill call's working set (activations, attention scores) stays within this


def activation_bytes(cfg: ModelConfig, tokens):
    """Peak GPU working set of one layer over `tokens` tokens, every element counted at 4 bytes
    (f32 accumulators): input and residual, q/k/v and attention output, router probabilities, the
    k routed rows through the experts (gathered input, gate, up, SwiGLU, output) and the shared expert, or
    a dense layer's FFN (gate, up, SwiGLU, output) where that is larger."""
    H, F, Fs, Fd = cfg.hidden_size, cfg.expert_ffn_size, cfg.shared_expert_ffn_size, cfg.dense_ffn_size
    moe = cfg.num_experts + cfg.experts_per_token * (2 * H + 3 * F) + (3 * Fs + H if Fs else 0)
    dense = 3 * Fd + H if cfg.dense_layers else 0
    return 4 * tokens * (2 * H + 2 * cfg.q_size + 2 * cfg.kv_size + max(moe, dense))


def prefill_rows_per_call(cfg: ModelConfig, T: int, rows: int) -> int:
    """Rows of a prefill call at prompt bucket T for a micro-batch of `rows` rows: a bucket (few shapes
    compile) whose working set (activations over rows·T tokens, float32 scores [rows, Hq, T, T]) stays
    within PREFILL_CALL_BYTES. The limit, not μ, bounds the call, so a larger micro-batch costs the decode
    little GPU memory; a micro-batch takes ceil(rows / this) calls, the last one padded."""
    per_row = activation_bytes(cfg, T) + 4 * cfg.num_heads * T * T
    return min(bucket(rows, 1), bucket_below(PREFILL_CALL_BYTES // per_row))


def decode_bytes(cfg: ModelConfig, mu):
    """One decode micro-batch of μ rows: its activations, float32 logits and the sampling's temporaries
    (`moe_jax.sampling.sample_bytes`)."""
    return activation_bytes(cfg, mu) + 4 * mu * cfg.vocab_size + sample_bytes(cfg.vocab_size, mu)


def prefill_calls(cfg: ModelConfig, mu, T: int):
    """(rows per call, calls per micro-batch) of μ prompts padded to T tokens; μ may be a NumPy array."""
    rows = np.vectorize(lambda m: prefill_rows_per_call(cfg, T, int(m)), otypes=[np.int64])(mu)
    return rows, -(-np.asarray(mu) // rows)


def prefill_bytes(cfg: ModelConfig, dtype, batch, mu, T: int):
    """A prefill of `batch` prompts padded to T tokens in micro-batches of μ: the hidden states of every
    call's rows (all advance layer by layer; a micro-batch's last call is padded) and one call's working set.
    An upper bound where prompts differ: the engine takes T's rows per call for every call and pads each
    call only to its own longest prompt."""
    rows, calls = prefill_calls(cfg, mu, T)
    alive = -(-np.asarray(batch) // np.asarray(mu)) * calls * rows
    return (alive * T * cfg.hidden_size * np.dtype(dtype).itemsize
            + activation_bytes(cfg, rows * T) + 4 * rows * cfg.num_heads * T * T)
