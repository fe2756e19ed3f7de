"""Resident engine: all weights and the KV cache on the accelerator.

Requests (longest prompts first) run on B <= `max_batch_size` rows with continuous batching: one jitted
`step` (the same function for a prefill of T = prompt bucket tokens and a decode of 1) prefills the
requests that take free rows, then decodes every row, step after step; a finished request frees its row
for the next waiting one. Free rows are refilled once a quarter of the batch is free (or all that is
left fits), so that one prefill serves several rows and a job compiles few shapes. Batch, prompt and
cache lengths are rounded up to 2^k or 3·2^(k-1).
KV cache: k and v of `[layers, rows, cache_len, kv_heads, head_dim]` (no v where the values are the keys'
first dims, as in latent attention); row b's token at position p sits at
[:, b, p]; positions start at 0 for every sequence, so causal masking alone is exact (a row's new
occupant overwrites positions 0.. before it reads them).
"""
from __future__ import annotations

import collections
import functools
import logging
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax import model
from moe_jax.config import ModelConfig
from moe_jax.params import gib, layer_specs, model_bytes
from moe_jax.requests import Request, finish_reason, token_budget
from moe_jax.sampling import (Sampled, host_sampled, logprob_entry, row_keys, sample, sampling_rows,
                              set_sampling_rows)
from moe_jax.shape_buckets import bucket

log = logging.getLogger("moe_jax")


JAX_SHARE_VAR, JAX_DEFAULT_SHARE = "XLA_PYTHON_CLIENT_MEM_FRACTION", 0.75  # of a GPU's memory, what JAX may allocate
JAX_MEMORY_SHARE = f"JAX's allocator limit: {JAX_SHARE_VAR} of the card, {JAX_DEFAULT_SHARE:g} unless set (before JAX starts)"


def device_memory_limit() -> int | None:
    """Bytes JAX may allocate on the first device (its `bytes_limit`: `JAX_MEMORY_SHARE`), or None where it does
    not say (CPU)."""
    return (jax.devices()[0].memory_stats() or {}).get("bytes_limit")


def precise(fn, dtype):
    """fn, called under full float32 matmul precision when the model runs in float32 (where accelerators
    default to faster, rounder modes); bound to each call, so no precision setting escapes to the caller."""
    if np.dtype(dtype) != np.float32:
        return fn

    @functools.wraps(fn)
    def call(*args):
        with jax.default_matmul_precision("highest"):
            return fn(*args)
    return call


def layer_runs(cfg: ModelConfig) -> list[range]:
    """The layers in maximal runs of one kind (MoE or dense), in order: each run is one `lax.scan`."""
    runs = [range(0, 1)]
    for i in range(1, cfg.num_layers):
        if cfg.is_moe_layer(i) == cfg.is_moe_layer(runs[-1].start):
            runs[-1] = range(runs[-1].start, i + 1)
        else:
            runs.append(range(i, i + 1))
    return runs


def forward(cfg: ModelConfig, moe_impl: str, glob, layers, tokens, positions, cache_k, cache_v, rows=None):
    """tokens, positions [B, T] -> hidden [B, T, H] and the updated caches (k/v of each token written at
    its position). layers: per run of `layer_runs`, each parameter stacked `[run length, ...]`. rows [B]
    int32: the cache row of each sequence (None: sequence b is row b, the whole cache)."""
    x = model.embed(glob, tokens)
    at = (jnp.arange(tokens.shape[0]) if rows is None else rows)[:, None]

    def layer(carry, xs):
        x, ck, cv = carry
        p, i = xs
        q, k, v = model.pre_attention(cfg, p, x, positions)
        ck = ck.at[i, at, positions].set(k)
        kk = ck[i] if rows is None else ck[i][rows]
        if cv is not None:  # else v is None: the values are the keys' first dims
            cv = cv.at[i, at, positions].set(v)
            v = cv[i] if rows is None else cv[i][rows]
        a = model.attention(cfg, q, kk, v, positions)
        return (model.post_attention(cfg, p, x, a, moe_impl=moe_impl), ck, cv), None

    for run, stacked in zip(layer_runs(cfg), layers):
        (x, cache_k, cache_v), _ = jax.lax.scan(layer, (x, cache_k, cache_v),
                                                (stacked, jnp.arange(run.start, run.stop)))
    return x, cache_k, cache_v


def step(cfg: ModelConfig, moe_impl: str, glob, layers, tokens, positions, last, cache_k, cache_v,
         temperature, top_p, top_k, seeds, counters, rows=None):
    """Forward, then sample one token per row from the hidden state at index `last` [B].
    Row b's sampling key is `row_keys`' (seeds: `key_seed`s): a request's samples depend only on its own seed,
    prompt and step, never on its batch. Returns (`Sampled`, cache_k, cache_v)."""
    x, cache_k, cache_v = forward(cfg, moe_impl, glob, layers, tokens, positions, cache_k, cache_v, rows)
    h = jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
    return sample(model.lm_head(cfg, glob, h), temperature, top_p, top_k, row_keys(seeds, counters)), cache_k, cache_v


DEFAULT_MAX_BATCH = 64  # rows decoding at once when the caller does not say
PREFILL_MIN_CHUNK = 16  # tokens: the smallest chunk of a prompt a prefill call takes where a whole one does not fit


class ResidentEngine:
    def __init__(self, cfg: ModelConfig, weights, dtype, *, max_batch_size: int | None = None, moe_impl: str = "auto",
                 gpu_memory_bytes: int | None = None):
        self.cfg, self.dtype, self.max_batch_size = cfg, np.dtype(dtype), max_batch_size or DEFAULT_MAX_BATCH
        self._check_fits(gpu_memory_bytes)
        self.glob = jax.device_put(weights.globals(self.dtype))
        self.layers = []
        for run in layer_runs(cfg):
            stacked = {k: np.empty((len(run), *s.shape), s.dtype(self.dtype))
                       for k, s in layer_specs(cfg, run.start).items()}
            for j, i in enumerate(run):
                for k, v in weights.layer(i, self.dtype).items():
                    stacked[k][j] = v
            self.layers.append(jax.device_put(stacked))
            del stacked
        self._step = precise(jax.jit(functools.partial(step, cfg, moe_impl), donate_argnums=(5, 6)), dtype)
        self._forward = precise(jax.jit(functools.partial(forward, cfg, moe_impl)), dtype)
        self._lm_head = precise(jax.jit(functools.partial(model.lm_head, cfg)), dtype)
        self.decode_steps = 0  # decode steps of the last `generate`

    def _check_fits(self, cap: int | None, kv: int = 0, what_kv: str = "") -> None:
        """Weights (+ `kv` bytes of KV cache) must fit the accelerator and the cap, with room for activations."""
        self._cap = cap
        limit = device_memory_limit()
        weights = model_bytes(self.cfg, self.dtype)
        for what, value in (("the gpu_memory_gb cap", cap), (f"the accelerator's ({JAX_MEMORY_SHARE})", limit)):
            if value and weights + kv > 0.9 * value:
                extra = f" and {gib(kv)} GiB for the KV cache of {what_kv}" if kv else " for the weights alone"
                raise MemoryError(f"policy 'resident' needs {gib(weights)} GiB{extra} but {what} is "
                                  f"{gib(value)} GiB (90% of it usable): use a smaller max_batch_size or policy "
                                  f"'offload'")

    def _cache_shapes(self, batch: int, length: int, query_tokens: int = 0, logits: bool = False,
                      query_rows: int | None = None):
        """Shapes of the KV cache's k and v (None where the values are the keys' first dims, `values_in_keys`),
        checked to fit with the weights beside one layer's float32 attention scores of `query_rows` (default
        `batch`) sequences' `query_tokens` tokens over the `length` positions, [rows, heads, query_tokens, length]
        (a prefill call's: `model.attention` writes them out), and with `logits` their float32 logits
        [rows, query_tokens, vocab] (`logits`)."""
        cfg = self.cfg
        rows = batch if query_rows is None else query_rows
        shape = (cfg.num_layers, batch, length, cfg.num_kv_heads)
        k_shape, v_shape = (*shape, cfg.head_dim), None if cfg.values_in_keys else (*shape, cfg.value_dim)
        kv = sum(int(np.prod(s)) for s in (k_shape, v_shape) if s) * self.dtype.itemsize
        scores = 4 * rows * query_tokens * (cfg.num_heads * length + (cfg.vocab_size if logits else 0))
        of = f"{query_tokens} tokens each" if rows == batch else f"{rows} sequences x {query_tokens} tokens"
        scored = f" (and the float32 attention scores{' and logits' if logits else ''} of {of})" if query_tokens else ""
        self._check_fits(self._cap, kv + scores, f"{batch} sequences x {length} positions{scored}")
        return k_shape, v_shape

    def _plan(self, requests: Sequence[Request], budgets: Sequence[int], say: bool = True):
        """(rows B, positions S, cache shapes, prefill call rows, prefill call tokens) of a `generate` call: its KV
        cache of the bucketed batch x the bucketed largest need, and the prefill calls' size, whose float32
        attention scores must fit beside it. A call takes every new row's whole prompt (padded to the longest's
        bucket T) where that fits, else fewer rows (halving), then one row's prompt in chunks of fewer tokens
        (powers of two down to PREFILL_MIN_CHUNK): MemoryError where not even that fits. `say`: log a smaller call."""
        B = bucket(min(len(requests), self.max_batch_size), 1)
        S = bucket(max(len(r.prompt) + b for r, b in zip(requests, budgets)))
        T = bucket(max(len(r.prompt) for r in requests))
        calls = [(B >> i, T) for i in range(B.bit_length()) if B >> i]
        calls += [(1, 1 << i) for i in reversed(range(PREFILL_MIN_CHUNK.bit_length() - 1, (T - 1).bit_length()))]
        for rows, tokens in calls:
            try:
                shapes = self._cache_shapes(B, S, tokens, query_rows=rows)
            except MemoryError:
                if (rows, tokens) == calls[-1]:
                    raise
                continue
            if say and (rows, tokens) != calls[0]:
                log.info("resident prefill in calls of at most %d rows x %d tokens: the float32 attention scores of "
                         "%d rows x %d tokens would not fit beside the KV cache", rows, tokens, B, T)
            return B, S, shapes, rows, tokens

    def prepare(self, requests: Sequence[Request]) -> None:
        """The memory check of a `generate` of these requests (its KV cache beside the weights), without
        running it: MemoryError before any work."""
        if requests:
            self._plan(requests, [token_budget(r, self.cfg.max_positions) for r in requests], say=False)

    def logits(self, prompts: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """float32 [len_i, vocab] per prompt, in batches of at most max_batch_size."""
        out: list[np.ndarray | None] = [None] * len(prompts)
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        for w in range(0, len(order), self.max_batch_size):
            wave = order[w:w + self.max_batch_size]
            B, T = bucket(len(wave), 1), bucket(len(prompts[wave[0]]))
            tokens = np.zeros((B, T), np.int32)
            for r, i in enumerate(wave):
                tokens[r, :len(prompts[i])] = prompts[i]
            positions = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
            x, _, _ = self._forward(self.glob, self.layers, tokens, positions,
                                    *self._zeros(self._cache_shapes(B, T, T, logits=True)))
            logits = np.asarray(self._lm_head(self.glob, x))
            for r, i in enumerate(wave):
                out[i] = logits[r, :len(prompts[i])]
        return out

    def generate(self, requests: Sequence[Request]) -> Iterator[tuple[Request, list[int], str, list | None]]:
        """Yields (request, generated token ids, finish_reason, logprobs) as each request finishes; logprobs:
        one `logprob_entry` per token where the request asks for them (params.logprobs), else None."""
        if not requests:
            return
        cfg = self.cfg
        budgets = [token_budget(r, cfg.max_positions) for r in requests]
        waiting = collections.deque(sorted(zip(requests, budgets), key=lambda rb: -len(rb[0].prompt)))
        usable = min(len(requests), self.max_batch_size)  # rows that take requests; the rest pad the bucket
        B, S, shapes, call_rows, call_tokens = self._plan(requests, budgets)
        cache = self._zeros(shapes)
        req: list[Request | None] = [None] * B
        budget = np.zeros(B, np.int64)
        generated: list[list[int]] = [[] for _ in range(B)]
        logprobs: list[list | None] = [None] * B
        lens, last_token = np.ones(B, np.int32), np.zeros(B, np.int32)
        samp = sampling_rows(B)

        def record(b: int, s, r: int):
            """Row b's request takes the token sampled in row r of host-side `s`."""
            generated[b].append(int(s.tokens[r]))
            last_token[b] = s.tokens[r]
            if logprobs[b] is not None:
                logprobs[b].append(logprob_entry(s, r, req[b].params.logprobs))
            if reason := finish_reason(req[b], generated[b], budget[b], cfg.eos_token_ids):
                yield req[b], generated[b], reason, logprobs[b]
                req[b] = None

        self.decode_steps = 0
        while True:
            free = [b for b in range(usable) if req[b] is None]
            if waiting and free and len(free) >= min(max(1, B // 4), len(waiting)):
                new = free[:len(waiting)]
                for b in new:
                    req[b], budget[b] = waiting.popleft()
                    generated[b], lens[b] = [], len(req[b].prompt)
                    logprobs[b] = [] if req[b].params.logprobs is not None else None
                samp = set_sampling_rows(samp, new, [req[b] for b in new])
                nxt, cache = self._prefill(new, req, lens, samp, cache, call_rows, call_tokens)
                for r, b in enumerate(new):
                    yield from record(b, nxt, r)
            active = np.array([r is not None for r in req])
            if not active.any():
                if waiting:
                    continue
                return
            positions = np.minimum(lens + np.array([len(g) for g in generated]) - 1, S - 1).astype(np.int32)
            counters = np.array([len(g) for g in generated], np.int32)
            nxt, *cache = self._step(self.glob, self.layers, last_token[:, None], positions[:, None],
                                     np.zeros(B, np.int32), *cache, *samp, counters)
            nxt = host_sampled(nxt, any(logprobs[b] is not None for b in np.flatnonzero(active)))
            self.decode_steps += 1
            for b in np.flatnonzero(active):
                yield from record(b, nxt, b)

    def _zeros(self, shapes):
        """The KV cache of `_cache_shapes`: k, and v (None where the values are the keys' first dims)."""
        return tuple(None if shape is None else jnp.zeros(shape, self.dtype) for shape in shapes)

    def _prefill(self, new: list[int], req, lens, samp, cache, call_rows: int, call_tokens: int):
        """Prefill the requests of rows `new` (longest prompts first) into their cache rows, in calls of at most
        `call_rows` rows, each padded to its longest prompt's bucket or, past `call_tokens`, in chunks of
        `call_tokens` positions (the last one ending at the bucket, overlapping the one before it: positions
        written again with the same tokens; none after the one holding the call's last prompt token); a row samples
        its first token in the first chunk holding its last prompt token. Returns their first tokens (host-side
        `Sampled`, rows in `new`'s order) and the cache."""
        logprobs = any(req[row].params.logprobs is not None for row in new)
        picks = []  # per row of `new`: (the host-side Sampled holding its first token, its row there)
        for g in range(0, len(new), call_rows):
            group = new[g:g + call_rows]
            b, T = bucket(len(group), 1), bucket(int(lens[group].max()))
            rows = np.array(group + [group[-1]] * (b - len(group)), np.int32)
            tokens = np.zeros((b, T), np.int32)
            for r, row in enumerate(rows):
                tokens[r, :lens[row]] = req[row].prompt
            C = min(T, call_tokens)
            starts = [*range(0, T - C, C), T - C]
            last = lens[rows] - 1
            chunk_of = np.searchsorted(np.array(starts) + C, last, side="right")  # the first chunk holding `last`
            fetched = {}
            for c, start in enumerate(starts[:int(chunk_of.max()) + 1]):  # the chunks after hold padding alone
                positions = np.broadcast_to(np.arange(start, start + C, dtype=np.int32), (b, C))
                nxt, *cache = self._step(self.glob, self.layers, tokens[:, start:start + C], positions,
                                         np.clip(last - start, 0, C - 1).astype(np.int32), *cache,
                                         *(a[rows] for a in samp), np.zeros(b, np.int32), rows)
                if (chunk_of == c).any():
                    fetched[c] = nxt  # fetched to the host after the last chunk is dispatched
            fetched = {c: host_sampled(s, logprobs) for c, s in fetched.items()}
            picks += [(fetched[chunk_of[r]], r) for r in range(len(group))]
        return Sampled(*(None if picks[0][0][f] is None else np.stack([s[f][r] for s, r in picks])
                         for f in range(len(Sampled._fields)))), cache
