"""CGOPipe offload engine: expert weights paged from pinned host memory, KV cache and decode attention
on the CPU, GPU work, CPU work and host-to-device copies overlapped over micro-batches.

Placement (DESIGN.md §1, §3):
  * non-expert weights (attention, norms, router, shared experts, embeddings, LM head) stay on the GPU;
  * expert weights: a fraction r_w resident in GPU slots, the rest in `pinned_host` memory, streamed into
    a double buffer (`moe_jax.expert_pages`) and addressed by the expert kernel's page table;
  * the KV cache lives in host memory (`host_ops`), decode attention runs there in a worker thread.

Schedule of one decode step, layer i, micro-batch k (each GPU call is one jitted function):
  GPU  post_attention(i, k) -> pre_attention(i+1, k) -> q, k, v  [+ device_put of chunk k of layer i+1]
  CPU  append k, v to the host cache; attention(i+1, k)            (worker thread, GIL released)
The GPU works on micro-batch k+1 while the CPU attends for k, and the next layer's experts arrive
inside the same jitted calls, the only way JAX overlaps a copy with compute (DESIGN.md §3). A fetched
chunk is a separate output, independent of the step's compute (the measured overlapping pattern);
when layer i+1 starts, one device-local call installs the chunks into the streamed slots. The last
layer samples the next token and starts layer 0 of the next step. Prefill runs whole layers on the
GPU per micro-batch (attention over the prompt itself), writing k/v to the host cache.
The layer math is `moe_jax.model`'s, shared with the resident engine.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
import time
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import SingleDeviceSharding

from host_ops import HostKVCache
from moe_jax import model
from moe_jax.config import ModelConfig
from moe_jax.expert_pages import ExpertPages
from moe_jax.microbatches import balanced_micro_batches, waves
from moe_jax.offload_policy import Policy
from moe_jax.params import global_bytes, layer_param_specs
from moe_jax.requests import Request, finish_reason
from moe_jax.resident_engine import bucket, device_memory_limit, precise
from moe_jax.sampling import sample

log = logging.getLogger("moe_jax")
PREFILL_SCORE_BYTES = 1 << 30  # cap on one prefill call's attention scores [rows, Hq, T, T] float32


def prefill_rows_per_call(cfg: ModelConfig, T: int, rows: int) -> int:
    """Rows of a prefill call at prompt bucket T: its float32 scores [rows, Hq, T, T] stay under the cap."""
    return bucket(min(max(1, PREFILL_SCORE_BYTES // (cfg.num_heads * T * T * 4)), rows), 1)


def prefill_gpu_bytes(cfg: ModelConfig, dtype, batch: int, mu: int, T: int) -> int:
    """GPU bytes of a prefill at prompt bucket T beyond the weights: every row's hidden state [batch, T, H]
    (all micro-batches advance layer by layer) plus one call's scores and routed float32 activations."""
    rows = prefill_rows_per_call(cfg, T, mu)
    call = rows * T * (cfg.num_heads * T * 4 + cfg.experts_per_token * (3 * cfg.expert_ffn_size + 2 * cfg.hidden_size) * 4
                       + 4 * cfg.hidden_size * 4)
    return batch * T * cfg.hidden_size * np.dtype(dtype).itemsize + call


class OffloadMemoryError(MemoryError):
    """The policy does not fit the GPU memory cap or the host memory; raised before any work."""


def host_available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_host_memory(policy, what: str, need: int) -> None:
    avail = host_available_bytes()
    if avail is not None and need > avail:
        raise OffloadMemoryError(f"policy {policy} needs {need / 2**30:.2f} GiB of host memory for {what} but "
                                 f"only {avail / 2**30:.2f} GiB is available: lower batch_size or raise "
                                 f"resident_expert_fraction")


# ---- jitted pieces (cfg, moe_impl and the device sharding are bound with functools.partial) ----

def _with_slots(p, slots):
    return dict(p, **slots)


def _fetch(to_device, chunk):
    """A host chunk ({name: [c, ...]} in pinned_host) copied to the GPU; None stays None."""
    return None if chunk is None else jax.device_put(chunk, to_device)


def _install(slots, fetched, starts):
    """Write the fetched chunks into the streamed slots: chunk c at slot starts[c]."""
    for chunk, at in zip(fetched, starts):
        slots = {k: jax.lax.dynamic_update_slice_in_dim(slots[k], chunk[k], at, 0) for k in slots}
    return slots


def _post(cfg, impl, p, slots, table, x, attn):
    return model.post_attention(cfg, _with_slots(p, slots), x, attn, expert_slots=table, moe_impl=impl)


def _start_token(cfg, glob, p0, h, positions, temperature, top_p, top_k, seeds, counters):
    """Sample from hidden h [b, H], embed the token, pre-attention of layer 0 at `positions` [b, 1]."""
    keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.PRNGKey(s), c))(seeds, counters)
    tokens = sample(model.lm_head(cfg, glob, h), temperature, top_p, top_k, keys)
    x = model.embed(glob, tokens[:, None])
    return (tokens, x, *model.pre_attention(cfg, p0, x, positions))


def _decode_mid(cfg, impl, to_device, p, p_next, slots, table, x, attn, positions, chunk):
    x = _post(cfg, impl, p, slots, table, x, attn)
    return (x, *model.pre_attention(cfg, p_next, x, positions), _fetch(to_device, chunk))


def _decode_last(cfg, impl, to_device, p, glob, p0, slots, table, x, attn, positions, samp, chunk):
    x = _post(cfg, impl, p, slots, table, x, attn)
    return (*_start_token(cfg, glob, p0, x[:, 0], positions, *samp), _fetch(to_device, chunk))


def _prefill_layer(cfg, impl, to_device, p, slots, table, x, positions, chunk):
    q, k, v = model.pre_attention(cfg, p, x, positions)
    x = _post(cfg, impl, p, slots, table, x, model.attention(q, k, v, positions))
    return x, k, v, _fetch(to_device, chunk)


@functools.lru_cache(maxsize=None)
def _jitted(cfg: ModelConfig, moe_impl: str, to_device):
    """The engine's jitted functions, shared by every engine of the same model (compiled once per shape)."""
    bind = lambda f: functools.partial(f, cfg, moe_impl, to_device)
    return (jax.jit(bind(_decode_mid)), jax.jit(bind(_decode_last)), jax.jit(bind(_prefill_layer)),
            jax.jit(functools.partial(_fetch, to_device)), jax.jit(_install, donate_argnames="slots"),
            jax.jit(functools.partial(_start_token, cfg)))


@dataclasses.dataclass
class OffloadStats:
    """Seconds per layer, summed over one `generate` call. cpu: attention in the worker; gpu_wait: the
    worker waiting for GPU results (GPU-bound time the CPU could not hide); main_wait: the dispatching
    thread waiting for CPU attention (CPU-bound time). h2d_bytes: expert bytes streamed."""

    layers: int
    cpu: np.ndarray
    gpu_wait: np.ndarray
    main_wait: np.ndarray
    h2d_bytes: int = 0
    decode_steps: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    peak_gpu_bytes: int | None = None

    @classmethod
    def empty(cls, layers: int) -> "OffloadStats":
        return cls(layers, np.zeros(layers), np.zeros(layers), np.zeros(layers))

    def bottleneck(self) -> str:
        terms = {"cpu attention": self.cpu.sum(), "gpu compute or h2d": self.gpu_wait.sum()}
        return max(terms, key=terms.get)

    def summary(self) -> str:
        per = max(self.decode_steps, 1) * self.layers
        peak = f", peak GPU {self.peak_gpu_bytes / 2**30:.2f} GiB" if self.peak_gpu_bytes else ""
        return (f"offload: prefill {self.prefill_s:.2f} s, decode {self.decode_s:.2f} s over {self.decode_steps} steps; "
                f"per layer-step: cpu attention {self.cpu.sum() / per * 1e3:.2f} ms, waiting for gpu "
                f"{self.gpu_wait.sum() / per * 1e3:.2f} ms, waiting for cpu {self.main_wait.sum() / per * 1e3:.2f} ms; "
                f"streamed {self.h2d_bytes / 2**30:.2f} GiB{peak}; bottleneck: {self.bottleneck()}")


PREFETCH = ("split", "whole")


class OffloadEngine:
    """prefetch: "split" sends the next layer's streamed experts in one chunk per micro-batch step (as the
    original), "whole" sends them all with the first micro-batch's step."""

    def __init__(self, cfg: ModelConfig, weights, dtype, policy: Policy, *, moe_impl: str = "auto",
                 prefetch: str = "split"):
        if prefetch not in PREFETCH:
            raise ValueError(f"prefetch must be one of {PREFETCH}, got {prefetch!r}")
        if policy.attention_device != "cpu" or policy.kv_device != "cpu":
            raise ValueError(f"offload engine: attention_device={policy.attention_device!r}, kv_device="
                             f"{policy.kv_device!r} is not implemented; only CPU attention over a host KV cache")
        self.cfg, self.dtype, self.policy = cfg, np.dtype(dtype), policy
        dev = jax.devices()[0]
        self.on_device = SingleDeviceSharding(dev, memory_kind="device")
        self.on_host = SingleDeviceSharding(dev, memory_kind="pinned_host")
        self.pages = ExpertPages.plan(cfg.num_layers, cfg.num_experts, policy.resident_expert_fraction,
                                      policy.num_micro_batches if prefetch == "split" else 1)
        self.specs = layer_param_specs(cfg)
        self.gpu_bytes = self._check_gpu_memory()
        check_host_memory(policy, "the streamed experts (pinned)",
                          sum(map(len, self.pages.streamed)) * self._expert_bytes())
        mid, last, prefill, self._fetch, self._install, start = _jitted(cfg, moe_impl, self.on_device)
        self._mid, self._last, self._prefill, self._start = (precise(f, dtype) for f in (mid, last, prefill, start))
        self._embed = jax.jit(model.embed)
        self._load(weights)
        self.stats = OffloadStats.empty(cfg.num_layers)
        log.info("offload engine: %s; %d resident expert slots, 2 x %d streamed (slots + chunks in flight, up "
                 "to %d per layer); GPU plan %.2f GiB", policy, self.pages.num_resident, self.pages.max_streamed,
                 self.pages.split, self.gpu_bytes / 2**30)

    # ---- memory plan and weight placement ----

    def _expert_bytes(self) -> int:
        return sum(s.nbytes(self.dtype) // s.shape[0] for k, s in self.specs.items() if s.expert)

    def _check_gpu_memory(self, extra: int = 0, extra_what: str = "") -> int:
        """Bytes the GPU must hold: non-expert weights, expert slots, activations of one micro-batch
        (+ `extra` bytes for `extra_what`)."""
        cfg, p = self.cfg, self.pages
        dense = cfg.num_layers * sum(s.nbytes(self.dtype) for s in self.specs.values() if not s.expert)
        need = dense + global_bytes(cfg, self.dtype) + (p.num_slots + p.max_streamed) * self._expert_bytes()
        tokens = self.policy.micro_batch_size * cfg.experts_per_token
        need += 4 * tokens * (cfg.hidden_size + 3 * cfg.expert_ffn_size) * 4  # routed activations, float32
        need += extra
        cap = self.policy.gpu_memory_gb
        limit = device_memory_limit()
        for name, value in (("gpu_memory_gb cap", cap * 2**30 if cap else None), ("device memory", limit)):
            if value and need > value:
                raise OffloadMemoryError(
                    f"policy {self.policy} needs {need / 2**30:.2f} GiB on the GPU ({dense / 2**30:.2f} GiB non-expert "
                    f"weights, {p.num_slots + p.max_streamed} expert slots of {self._expert_bytes() / 2**20:.1f} MiB"
                    f"{f', {extra / 2**30:.2f} GiB for the {extra_what}' if extra else ''}) but the "
                    f"{name} is {value / 2**30:.2f} GiB: lower resident_expert_fraction or micro_batch_size")
        return need

    def _load(self, weights) -> None:
        """Place weights layer by layer: dense ones on the GPU, experts in resident slots or pinned host chunks."""
        p, dt = self.pages, self.dtype
        self.glob = jax.device_put(weights.globals(dt), self.on_device)
        experts = [k for k, s in self.specs.items() if s.expert]
        self.slots = {k: jnp.zeros((p.num_slots, *self.specs[k].shape[1:]), dt, device=self.on_device) for k in experts}
        self.dense, self.host_chunks = [], []
        for i in range(self.cfg.num_layers):
            w = weights.layer(i, dt)
            self.dense.append(jax.device_put({k: v for k, v in w.items() if not self.specs[k].expert}, self.on_device))
            if p.resident[i]:  # this layer's resident experts fill consecutive slots
                ids = list(p.resident[i])
                resident = jax.device_put({k: w[k][ids] for k in experts}, self.on_device)
                self.slots = self._install(self.slots, [resident], [p.resident_slot(i, ids[0])])
            ids = np.asarray(p.streamed[i], np.int64)
            self.host_chunks.append([jax.device_put({k: np.ascontiguousarray(w[k][ids[a:b]]) for k in experts},
                                                    self.on_host) for a, b in p.chunks(i)])
        self.tables = [jnp.asarray(p.page_table(i)) for i in range(self.cfg.num_layers)]
        self.installed = None  # the layer whose streamed experts are in the streamed slots
        self._fetch_for(0)

    def _fetch_for(self, layer: int) -> None:
        """Chunks in flight from now on belong to `layer`."""
        self.fetching, self.fetched = layer, [None] * len(self.host_chunks[layer])

    def _begin_layer(self, layer: int) -> jax.Array:
        """Make `layer`'s experts addressable (install its fetched chunks); returns its page table."""
        if self.installed != layer:
            if self.fetching != layer:  # nothing in flight for this layer: fetch it now
                self._fetch_for(layer)
            self._complete_fetch()
            if self.fetched:
                starts = [self.pages.chunk_slot(a) for a, _ in self.pages.chunks(layer)]
                self.slots = self._install(self.slots, self.fetched, starts)
            self._fetch_for((layer + 1) % self.cfg.num_layers)
        self.installed = layer
        return self.tables[layer]

    def _chunk(self, step: int):
        """The host chunk that a layer's `step`-th call carries to the GPU, or None when none is left."""
        if step >= len(self.fetched):
            return None
        a, b = self.pages.chunks(self.fetching)[step]
        self.stats.h2d_bytes += (b - a) * self._expert_bytes()
        return self.host_chunks[self.fetching][step]

    def _store(self, step: int, fetched) -> None:
        if fetched is not None:
            self.fetched[step] = fetched

    def _complete_fetch(self) -> None:
        """Fetch the chunks of the next layer that no call carried (calls fewer than chunks)."""
        for c, f in enumerate(self.fetched):
            if f is None:
                self.fetched[c] = self._fetch(self._chunk(c))

    # ---- generation ----

    def generate(self, requests: Sequence[Request]) -> Iterator[tuple[Request, list[int], str]]:
        """Yields (request, generated token ids, finish_reason) as requests finish, wave by wave."""
        if not requests:
            return
        cfg, pol = self.cfg, self.policy
        self.stats = OffloadStats.empty(cfg.num_layers)  # the stats of this call
        budget = [min(r.params.max_new_tokens, cfg.max_positions - len(r.prompt)) for r in requests]
        context = bucket(max(len(r.prompt) + b for r, b in zip(requests, budget)))
        check_host_memory(pol, f"the KV cache ({pol.batch_size} sequences x {context} positions)",
                          HostKVCache.footprint(cfg.num_layers, pol.batch_size, context, cfg.num_kv_heads,
                                                cfg.head_dim, self.dtype))
        T = bucket(max(len(r.prompt) for r in requests))
        self._check_gpu_memory(prefill_gpu_bytes(cfg, self.dtype, pol.batch_size, pol.micro_batch_size, T),
                               f"prefill of prompts up to {T} tokens")
        cache = HostKVCache(cfg.num_layers, pol.batch_size, context, cfg.num_kv_heads, cfg.head_dim, self.dtype)
        lengths = [len(r.prompt) for r in requests]
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="cpu-attention") as cpu:
            for wave in waves(lengths, pol.batch_size):
                groups = balanced_micro_batches(wave, lengths, pol.micro_batch_size)
                yield from _Wave(self, cache, cpu, [[requests[i] for i in g] for g in groups],
                                 [[budget[i] for i in g] for g in groups]).run()
        stats = jax.devices()[0].memory_stats() or {}
        self.stats.peak_gpu_bytes = stats.get("peak_bytes_in_use")
        log.info("%s", self.stats.summary())


class _Wave:
    """One wave of at most N requests in micro-batches; micro-batch k's rows take consecutive host KV slots."""

    def __init__(self, eng: OffloadEngine, cache, cpu, groups: list[list[Request]], budgets: list[list[int]]):
        self.eng, self.cache, self.cpu, self.groups, self.budgets = eng, cache, cpu, groups, budgets
        self.mu = eng.policy.micro_batch_size
        starts = np.cumsum([0] + [len(g) for g in groups])
        self.kv_slots = [np.arange(starts[k], starts[k + 1]) for k in range(len(groups))]
        self.generated = [[[] for _ in g] for g in groups]
        self.done = [np.zeros(len(g), bool) for g in groups]
        self.lens = [np.array([len(r.prompt) for r in g]) for g in groups]
        self.samp = []
        for g in groups:
            s = [np.zeros(self.mu, np.float32), np.ones(self.mu, np.float32), np.zeros(self.mu, np.int32),
                 np.zeros(self.mu, np.uint32)]
            for b, r in enumerate(g):
                s[0][b], s[1][b], s[2][b], s[3][b] = (r.params.temperature, r.params.top_p, r.params.top_k,
                                                      r.params.seed % 2**32)
            self.samp.append(s)

    def _pad(self, rows: np.ndarray, fill=0) -> np.ndarray:
        out = np.full((self.mu, *rows.shape[1:]), fill, rows.dtype)
        out[:len(rows)] = rows
        return out

    def _positions(self, k: int, ahead: int = 0) -> np.ndarray:
        """[μ, 1] position of each row's last token (+ ahead). Rows that are done stay inside the cache."""
        pos = self.lens[k] + np.array([len(g) for g in self.generated[k]]) - 1 + ahead
        return self._pad(np.minimum(pos, self.cache.max_context - 1).astype(np.int32)[:, None])

    def _counters(self, k: int) -> np.ndarray:
        return self._pad(np.array([len(g) for g in self.generated[k]], np.int32))

    # CPU worker tasks: wait for the GPU's q/k/v, write k/v to the host cache, attend.
    def _attend(self, layer: int, k: int, positions: np.ndarray, q, kk, v, tokens=None):
        st, n = self.eng.stats, len(self.groups[k])
        t0 = time.perf_counter()
        q, kk, v = np.asarray(q)[:n, 0], np.asarray(kk)[:n, 0], np.asarray(v)[:n, 0]
        tokens = None if tokens is None else np.asarray(tokens)[:n]
        t1 = time.perf_counter()
        pos = positions[:n, 0]
        self.cache.write(layer, self.kv_slots[k], pos, kk, v)
        out = self.cache.attend(layer, self.kv_slots[k], q.astype(np.float32), pos + 1)
        t2 = time.perf_counter()
        st.gpu_wait[layer] += t1 - t0
        st.cpu[layer] += t2 - t1
        return self._pad(out.astype(self.eng.dtype)[:, None]), tokens

    def _prefill_writeback(self, layer: int, k: int, rows: np.ndarray, kk, v):
        n = len(rows)
        kk, v = np.asarray(kk)[:n], np.asarray(v)[:n]
        for r, b in enumerate(rows):
            length = self.lens[k][b]
            self.cache.write(layer, self.kv_slots[k][b:b + 1].repeat(length), np.arange(length), kk[r, :length], v[r, :length])

    def prefill(self):
        """Whole layers on the GPU per prefill call; k/v to the host cache. Returns last hidden per micro-batch."""
        eng, cfg = self.eng, self.eng.cfg
        calls = []  # (micro-batch, row indices, tokens, positions)
        for k, g in enumerate(self.groups):
            T = bucket(int(self.lens[k].max()))
            rows_per_call = prefill_rows_per_call(cfg, T, len(g))
            for s in range(0, len(g), rows_per_call):
                rows = np.arange(s, min(s + rows_per_call, len(g)))
                tokens = np.zeros((rows_per_call, T), np.int32)
                for r, b in enumerate(rows):
                    tokens[r, :self.lens[k][b]] = g[b].prompt
                positions = np.broadcast_to(np.arange(T, dtype=np.int32), tokens.shape)
                calls.append((k, rows, tokens, positions))
        xs = [eng._embed(eng.glob, t) for _, _, t, _ in calls]
        writes = []
        for i in range(cfg.num_layers):
            table = eng._begin_layer(i)
            for c, (k, rows, _, positions) in enumerate(calls):
                xs[c], kk, v, fetched = eng._prefill(eng.dense[i], eng.slots, table, xs[c], positions, eng._chunk(c))
                eng._store(c, fetched)
                writes.append(self.cpu.submit(self._prefill_writeback, i, k, rows, kk, v))
            eng._complete_fetch()
        for w in writes:
            w.result()
        last = [np.zeros((self.mu, cfg.hidden_size), np.float32) for _ in self.groups]
        for c, (k, rows, _, _) in enumerate(calls):  # gather each row's last position on the device
            last[k][rows] = np.asarray(xs[c][np.arange(len(rows)), self.lens[k][rows] - 1].astype(jnp.float32))
        return [jnp.asarray(h, eng.dtype) for h in last]

    def _record(self, k: int, tokens: np.ndarray):
        """Append sampled tokens of micro-batch k; yield the requests that finish."""
        for b in np.flatnonzero(~self.done[k]):
            self.generated[k][b].append(int(tokens[b]))
            if reason := finish_reason(self.groups[k][b], self.generated[k][b], self.budgets[k][b],
                                       self.eng.cfg.eos_token_ids):
                self.done[k][b] = True
                yield self.groups[k][b], self.generated[k][b], reason

    def run(self):
        eng, cfg = self.eng, self.eng.cfg
        L, n_mb = cfg.num_layers, len(self.groups)
        t0 = time.perf_counter()
        last = self.prefill()
        futs, xs = {}, [None] * n_mb
        for k in range(n_mb):  # sample the first token and start layer 0 of the first decode step
            pos = self._positions(k, ahead=1)
            tokens, xs[k], q, kk, v = eng._start(eng.glob, eng.dense[0], last[k], pos, *self.samp[k], self._counters(k))
            futs[0, k] = self.cpu.submit(self._attend, 0, k, pos, q, kk, v, tokens)
        eng.stats.prefill_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        try:
            while True:
                for i in range(L):
                    table = eng._begin_layer(i)
                    nxt = (i + 1) % L
                    for k in range(n_mb):
                        if (i, k) not in futs:  # a micro-batch whose rows are all done
                            continue
                        w0 = time.perf_counter()
                        attn, tokens = futs.pop((i, k)).result()
                        eng.stats.main_wait[i] += time.perf_counter() - w0
                        if i == 0:  # the token sampled at the end of the previous step is known now
                            yield from self._record(k, tokens)
                            if self.done[k].all():
                                continue
                        pos = self._positions(k)
                        if i < L - 1:
                            xs[k], q, kk, v, fetched = eng._mid(eng.dense[i], eng.dense[nxt], eng.slots, table,
                                                                xs[k], attn, pos, eng._chunk(k))
                            futs[nxt, k] = self.cpu.submit(self._attend, nxt, k, pos, q, kk, v)
                        else:
                            pos = self._positions(k, ahead=1)
                            tokens, xs[k], q, kk, v, fetched = eng._last(
                                eng.dense[i], eng.glob, eng.dense[0], eng.slots, table, xs[k], attn, pos,
                                (*self.samp[k], self._counters(k)), eng._chunk(k))
                            futs[0, k] = self.cpu.submit(self._attend, 0, k, pos, q, kk, v, tokens)
                        eng._store(k, fetched)
                    if i == 0:
                        if all(d.all() for d in self.done):
                            return
                        eng.stats.decode_steps += 1
                    eng._complete_fetch()
        finally:
            for f in futs.values():
                f.result()
            eng.stats.decode_s += time.perf_counter() - t0
