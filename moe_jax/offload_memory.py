"""GPU working memory of the offload engine beyond its weights, in bytes: one formula for what HRM plans
with and for what the engine checks before it runs. Arguments may be NumPy arrays (HRM's grid).

Decode: one micro-batch of μ rows, its activations (`activation_bytes`, float32), its
logits [μ, V] float32 and the sampling's sort over them. Prefill: every call's hidden states [rows, T, H] (all
micro-batches advance layer by layer) plus one call's working set at the longest prompt's bucket T, which
no call passes (`prefill_call_rows`): its activations over rows·T tokens and its attention scores
[rows, Hq, T, T] float32.
"""
from __future__ import annotations

import functools

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


def _row_bytes(cfg: ModelConfig, T):
    """A prefill call's working set per prompt row padded to T tokens: activations over T tokens, float32
    scores [Hq, T, T]."""
    return activation_bytes(cfg, T) + 4 * cfg.num_heads * T * T


def prefill_rows_per_call(cfg: ModelConfig, T: int, rows: int) -> int:
    """Rows of a prefill call at prompt bucket T for a micro-batch of `rows` rows: a bucket (few shapes
    compile) whose working set (`_row_bytes` each) stays within PREFILL_CALL_BYTES. The limit, not μ, bounds
    the call, so a larger micro-batch costs the decode little GPU memory."""
    return min(bucket(rows, 1), bucket_below(PREFILL_CALL_BYTES // _row_bytes(cfg, T)))


def prefill_call_rows(cfg: ModelConfig, T_call: int, T: int, mu: int, left: int) -> int:
    """Rows of the engine's next prefill call of a micro-batch of μ rows (`_Run._start_prefill`), padded to bucket
    T_call ≤ T, with `left` rows still to prefill, in a job whose longest prompt's bucket is T: as many as fit
    the working set of a call at T (`prefill_rows_per_call`, the one `prefill_bytes` plans) while at least that
    many are left, so that the shorter prompts run in fewer, larger calls (each re-reads the layer's weights),
    then the largest bucket of rows within those left, or, for the last few, as many as a call at T takes (a
    refill of fewer rows than that takes them, as before). So only a micro-batch's last call pads, by at most
    T's rows - 1 rows, and a bucket's calls compile the row buckets between T's rows and its own."""
    at_T = prefill_rows_per_call(cfg, T, mu)
    full = min(bucket(mu, 1), bucket_below(at_T * _row_bytes(cfg, T) // _row_bytes(cfg, T_call)))
    return full if left >= full else max(at_T, bucket_below(left))


def decode_bytes(cfg: ModelConfig, mu):
    """One decode micro-batch of μ rows: its activations, float32 logits and the sampling's temporaries
    (`moe_jax.sampling.sample_bytes`)."""
    return activation_bytes(cfg, mu) + 4 * mu * cfg.vocab_size + sample_bytes(cfg.vocab_size, mu)


@functools.lru_cache(maxsize=None)
def _micro_batch_calls(cfg: ModelConfig, mu: int, T: int, T_rest: int) -> tuple[int, int, int, int, int]:
    """`prefill_calls` for one μ and one bucket T_rest ≤ T."""
    first = prefill_rows_per_call(cfg, T, mu)
    left = max(mu - first, 0)
    full = prefill_call_rows(cfg, T_rest, T, mu, mu)
    calls, left = left // full, left % full
    tail_calls = tail_rows = 0
    while left > 0:
        n = prefill_call_rows(cfg, T_rest, T, mu, left)
        tail_calls, tail_rows, left = tail_calls + 1, tail_rows + n, max(left - n, 0)
    return first, full, calls, tail_calls, tail_rows


def prefill_calls(cfg: ModelConfig, mu, T: int, T_rest=None):
    """The engine's prefill calls (`prefill_call_rows`) for a micro-batch of μ prompts (μ may be a NumPy array)
    whose longest pads to bucket T and the others to T_rest tokens (a length, or an array like μ's, taken to its
    bucket; default T): (rows of the first call, at T; rows of each full call after it, how many of those; how
    many calls take the last rows, and their rows in all, padding included), each an array like μ's."""
    T_rest = T if T_rest is None else T_rest
    one = lambda m, t: _micro_batch_calls(cfg, int(m), T, min(bucket(int(np.ceil(t))), T))
    return np.vectorize(one, otypes=[np.int64] * 5)(mu, T_rest)


def peak_prefill_positions(prompt_lens) -> np.ndarray:
    """[R + 1] totals for a job's R prompts: the most prompt tokens, each padded to its own bucket, that n of them
    hold (n = 0..R): the sum of the n largest buckets. At most `batch` prompts prefill at once, so these bound
    the prefill's hidden states (`prefill_bytes`) whichever prompts the engine admits together."""
    buckets = np.sort([bucket(int(n)) for n in prompt_lens])[::-1]
    return np.concatenate([[0], np.cumsum(buckets)]).astype(np.int64)


def prefill_bytes(cfg: ModelConfig, dtype, batch, mu, T: int, peak_positions=None):
    """A prefill of `batch` prompts of at most T tokens (bucket) in micro-batches of μ: the hidden states of
    every call's rows (all advance layer by layer) and one call's working set at T, the largest any call has.
    The hidden states, per micro-batch, are at most μ + T's rows per call - 1 rows of T tokens
    (`prefill_call_rows`), or, given `peak_positions` ([R + 1] totals of own buckets whose entry `batch` bounds what
    the prompts prefilling at once hold: `peak_prefill_positions`, or a job of the first `batch` prompts' own in
    order), that many tokens, plus per micro-batch (rows of its widest call - 1) x T for the calls' padding
    (its prompts run longest first and a call pads each row to the bucket of its first, at most that many rows
    before it) and (T's rows - 1) x T for the rows its last call adds: whichever is smaller. At g64 (Mixtral,
    2640 MTBench-like prompts, μ = 880) 2.2 GiB where the first gives 3.9; the engine's calls hold 1.9."""
    mu, batch = np.asarray(mu), np.asarray(batch)
    rows = prefill_calls(cfg, mu, T)[0]  # a call's rows at T
    micro_batches = -(-batch // mu)
    tokens = micro_batches * (mu + rows - 1) * T
    if peak_positions is not None:
        peak = np.asarray(peak_positions)
        R = peak.size - 1
        shortest = int(np.diff(peak).min())  # the smallest bucket (in any order): its calls take the most rows
        widest = np.vectorize(lambda m: prefill_call_rows(cfg, shortest, T, int(m), int(m)), otypes=[np.int64])(mu)
        padding = micro_batches * (widest - 1 + rows - 1) * T
        tokens = np.minimum(tokens, peak[np.minimum(batch, R).astype(np.int64)] + padding)
    return tokens * cfg.hidden_size * np.dtype(dtype).itemsize + rows * _row_bytes(cfg, T)
