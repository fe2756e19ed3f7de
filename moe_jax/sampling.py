"""Sampling parameters and the on-device token sampler (greedy, temperature, top-k, top-p)."""
from __future__ import annotations

import dataclasses
import math
import numbers
import zlib
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.integers import integer_ids, is_integer


DEFAULT_MAX_NEW_TOKENS = 16  # as vLLM's max_tokens
MAX_TOP_LOGPROBS = 20  # most likely tokens a position reports at most (OpenAI's limit, as vLLM's default)
# `sample` sorts the whole vocabulary of each row: XLA's temporaries were 7.0x the [rows, V] float32 logits at
# every shape measured (CPU backend's memory analysis; a GPU's sort may need more), so rows go through it in
# chunks whose temporaries stay near SAMPLE_TEMP_BYTES, counted as TEMP_BUFFERS logits-sized buffers per chunk.
SAMPLE_TEMP_BYTES = 512 << 20
TEMP_BUFFERS = 8


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Per-request generation settings. temperature 0 is greedy; top_k 0 (or -1, as vLLM's) and top_p 1 disable
    those filters; generation stops at `max_new_tokens`, at a stop token, (unless ignore_eos) at EOS, or at
    a stop string (`stop`: a string or several, None for none; the text is cut before it; needs a tokenizer).
    logprobs: None, or return each generated token's log-probability (`Completion.logprobs`) and, when
    >= 1, that many most likely tokens at each position (`Completion.top_logprobs`, at most
    MAX_TOP_LOGPROBS), as vLLM's `logprobs`: under the model's own distribution (log-softmax of its
    float32 logits, before temperature, top-k and top-p).
    seed: a request's samples depend on its seed and prompt only (not on the batch or the policy; `key_seed`), so
    requests with the same prompt and seed sample the same tokens, as vLLM's requests with an explicit seed, and
    different prompts sample independently; give repeats of a prompt their own seeds for independent samples (the
    CLI mixes each line's id into --seed)."""

    max_new_tokens: int | None = None  # None: DEFAULT_MAX_NEW_TOKENS (or max_tokens where given)
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    stop: tuple[str, ...] = ()
    logprobs: int | None = None
    max_tokens: dataclasses.InitVar[int | None] = None  # vLLM's name for max_new_tokens: either sets it

    def __post_init__(self, max_tokens):
        if max_tokens is not None:
            if self.max_new_tokens is not None and self.max_new_tokens != max_tokens:
                raise ValueError(f"give one of max_new_tokens ({self.max_new_tokens}) or max_tokens ({max_tokens})")
            object.__setattr__(self, "max_new_tokens", max_tokens)
        elif self.max_new_tokens is None:
            object.__setattr__(self, "max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
        object.__setattr__(self, "stop_token_ids", integer_ids(self.stop_token_ids, "stop_token_ids"))
        try:
            stop = () if self.stop is None else (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        except TypeError:  # not a sequence at all
            stop = (None,)
        if not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop must be a non-empty string or a sequence of them, got {self.stop!r}")
        object.__setattr__(self, "stop", stop)
        if not is_integer(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        for name in ("temperature", "top_p"):
            if not isinstance(getattr(self, name), numbers.Real) or isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a number, got {getattr(self, name)!r}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not is_integer(self.top_k) or self.top_k < -1:
            raise ValueError(f"top_k must be an integer >= 0 (or -1: none, as 0), got {self.top_k!r}")
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        if not is_integer(self.seed) or not 0 <= self.seed < 2**32:  # the sampler's key takes 32 bits
            raise ValueError(f"seed must be an integer in 0..2**32 - 1, got {self.seed!r}")
        if not isinstance(self.ignore_eos, (bool, np.bool_)):
            raise ValueError(f"ignore_eos must be True or False, got {self.ignore_eos!r}")
        if self.logprobs is not None and not (is_integer(self.logprobs) and 0 <= self.logprobs <= MAX_TOP_LOGPROBS):
            raise ValueError(f"logprobs must be None or an integer in 0..{MAX_TOP_LOGPROBS}, got {self.logprobs!r}")
        if any(t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be >= 0, got {list(self.stop_token_ids)}")
        for name, kind in (("max_new_tokens", int), ("top_k", int), ("seed", int), ("temperature", float),
                           ("top_p", float), ("ignore_eos", bool)):  # NumPy scalars as Python's
            object.__setattr__(self, name, kind(getattr(self, name)))
        if self.logprobs is not None:
            object.__setattr__(self, "logprobs", int(self.logprobs))

    def replace(self, **changes) -> "SamplingParams":
        return dataclasses.replace(self, **changes)


def sampling_rows(n: int) -> list[np.ndarray]:
    """`sample`'s per-row inputs for n rows, [temperature, top_p, top_k, key seed], set to greedy."""
    return [np.zeros(n, np.float32), np.ones(n, np.float32), np.zeros(n, np.int32), np.zeros(n, np.uint32)]


def key_seed(seed: int, prompt: Sequence[int]) -> int:
    """The 32 bits a request's sampling key is made from: its seed mixed with its prompt's token ids, so that
    requests of different prompts sample independently under one seed (the default 0 included), and a prompt
    sampled twice with one seed samples the same tokens."""
    return zlib.crc32(np.asarray(prompt, np.uint32).tobytes(), seed % 2**32)


def row_keys(seeds: jax.Array, counters: jax.Array) -> jax.Array:
    """Each row's sampling key [B, 2] uint32 from its `key_seed` and its token's number: fold_in(PRNGKey(seed),
    counter), so that a request's samples depend on nothing but its seed, prompt and step."""
    return jax.vmap(lambda s, c: jax.random.fold_in(jax.random.PRNGKey(s), c))(seeds, counters)


def set_sampling_rows(arrays: list[np.ndarray], rows, requests) -> list[np.ndarray]:
    """Copies of `sampling_rows` arrays with row rows[j] set for requests[j] (its params and `key_seed`; copies,
    so that a call in flight still reads the old ones)."""
    out = [a.copy() for a in arrays]
    for b, r in zip(rows, requests):
        p = r.params  # a top_k past int32 keeps every token, as one of V does
        out[0][b], out[1][b], out[2][b], out[3][b] = p.temperature, p.top_p, min(p.top_k, 2**31 - 1), key_seed(
            p.seed, r.prompt)
    return out


class Sampled(NamedTuple):
    """One sampling step, per row: tokens [B] int32; logprob [B] float32, the token's log-probability under
    the model's distribution (log-softmax of the logits, before temperature, top-k and top-p); top_ids,
    top_logprobs [B, K] the K = min(MAX_TOP_LOGPROBS, vocab) most likely tokens and theirs, descending."""

    tokens: jax.Array
    logprob: jax.Array
    top_ids: jax.Array
    top_logprobs: jax.Array


def sample_rows(vocab_size: int) -> int:
    """Rows `sample` takes through its sort at once at most: a power of two whose temporaries (TEMP_BUFFERS x
    rows x V float32) stay within SAMPLE_TEMP_BYTES, at least 8."""
    return max(8, 1 << max(SAMPLE_TEMP_BYTES // (TEMP_BUFFERS * 4 * vocab_size), 1).bit_length() - 1)


def sample_bytes(vocab_size: int, rows):
    """GPU bytes of `sample`'s temporaries over `rows` rows (a number or a NumPy array) of V logits, with 1 MiB
    for what does not scale with them (XLA's excess over 8 buffers was at most 256 KiB, at tiny vocabularies)."""
    return TEMP_BUFFERS * 4 * np.minimum(rows, sample_rows(vocab_size)) * vocab_size + (1 << 20)


def sample(logits: jax.Array, temperature: jax.Array, top_p: jax.Array, top_k: jax.Array,
           keys: jax.Array) -> Sampled:
    """logits [B, V] float32; temperature, top_p [B] float32; top_k [B] int32; keys [B, 2] uint32.
    Rows with temperature 0 take the argmax. More than `sample_rows(V)` rows go through in n equal chunks
    of at most that many (a loop; the last chunk ends at row B, overlapping the one before), each row
    sampled as it would be alone."""
    B, V = logits.shape
    n = -(-B // sample_rows(V))
    args = (logits, temperature, top_p, top_k, keys)
    if n <= 1:
        return _sample(*args)
    rows = -(-B // n)

    def chunk(i, out):
        start = jnp.minimum(i * rows, B - rows)
        part = _sample(*(jax.lax.dynamic_slice_in_dim(x, start, rows) for x in args))
        return Sampled(*(jax.lax.dynamic_update_slice_in_dim(o, p, start, 0) for o, p in zip(out, part)))

    one = jax.eval_shape(_sample, *(x[:rows] for x in args))  # a chunk's outputs: their dtypes and widths
    return jax.lax.fori_loop(0, n, chunk, Sampled(*(jnp.zeros((B, *o.shape[1:]), o.dtype) for o in one)))


def _sample(logits, temperature, top_p, top_k, keys) -> Sampled:
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    t = jnp.where(temperature > 0, temperature, 1.0)[:, None]
    vals, idx = jax.lax.top_k(logits / t, logits.shape[-1])  # sorted descending
    rank = jnp.arange(logits.shape[-1])[None, :]
    vals = jnp.where((top_k[:, None] > 0) & (rank >= top_k[:, None]), -jnp.inf, vals)  # top-k first, then
    probs = jax.nn.softmax(vals, axis=-1)  # top-p over the renormalised survivors (as transformers and vLLM)
    drop_p = (jnp.cumsum(probs, axis=-1) - probs) >= top_p[:, None]  # keep the smallest prefix reaching top_p
    vals = jnp.where(drop_p, -jnp.inf, vals)
    choice = jax.vmap(jax.random.categorical)(keys, vals)
    sampled = jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
    tokens = jnp.where(temperature > 0, sampled, greedy)
    # idx orders the raw logits too (dividing by t > 0 keeps the order): its first K are the top K.
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    top_ids = idx[:, :min(MAX_TOP_LOGPROBS, logits.shape[-1])].astype(jnp.int32)
    return Sampled(tokens, jnp.take_along_axis(log_probs, tokens[:, None], axis=-1)[:, 0], top_ids,
                   jnp.take_along_axis(log_probs, top_ids, axis=-1))


def host_sampled(s: Sampled, logprobs: bool) -> Sampled:
    """`s` fetched to the host as NumPy arrays: the tokens, and the log-probabilities only when `logprobs`
    (some row's request asks for them; None otherwise, so that a job without them fetches nothing more)."""
    if not logprobs:
        return Sampled(np.asarray(s.tokens), None, None, None)
    return Sampled(*(np.asarray(a) for a in s))


def logprob_entry(s: Sampled, row: int, n: int) -> tuple[float, list[tuple[int, float]]]:
    """Row `row` of host-side `s`: (the token's log-probability, the n most likely (token id, log-probability))."""
    top = zip(s.top_ids[row, :n].tolist(), s.top_logprobs[row, :n].tolist())
    return float(s.logprob[row]), [(i, lp) for i, lp in top]
