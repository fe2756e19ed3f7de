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
GPU (attention over the prompt itself), each micro-batch in calls of at most
`offload_memory.PREFILL_CALL_BYTES` of working set, writing k/v to the host cache: first for the first N
requests, then, for requests that take the rows of finished ones (continuous batching), as more GPU
calls per layer within the decode steps, while that layer's weights are on the GPU anyway.
The layer math is `moe_jax.model`'s, shared with the resident engine.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import gc
import logging
import time
from typing import Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import SingleDeviceSharding

try:
    import resource  # the page-fault counts of OffloadStats (Unix)
except ImportError:
    resource = None

from host_ops import HostKVCache
from moe_jax import compile_count, expert_codec, host_memory, host_views, model, pinned_pool
from moe_jax.config import ModelConfig
from moe_jax.expert_pages import ExpertPages
from moe_jax.microbatches import balanced_micro_batches
from moe_jax.offload_memory import decode_bytes, peak_prefill_positions, prefill_bytes, prefill_call_rows
from moe_jax.offload_policy import PREFETCH, Policy, kv_storage_dtype
from moe_jax.expert_codec import decode_overhead_bytes, streamed_expert_bytes
from moe_jax.params import expert_bytes, gib, non_expert_bytes
from moe_jax.requests import Request, finish_reason, token_budget
from moe_jax.resident_engine import JAX_MEMORY_SHARE, device_memory_limit, precise
from moe_jax.sampling import host_sampled, logprob_entry, row_keys, sample, sampling_rows, set_sampling_rows
from moe_jax.shape_buckets import bucket

log = logging.getLogger("moe_jax")


def planned_gpu_bytes(cfg: ModelConfig, dtype, micro_batch_size: int, pages: ExpertPages, codec: str = "none",
                      escape_bytes: int | None = None) -> int:
    """GPU bytes of the engine's plan before a prefill (`offload_memory.prefill_bytes` comes on top): the
    non-expert weights, the expert slots (resident and streamed), the next layer's chunks in flight (coded
    as `codec` says, with its decoding overhead: `escape_bytes` of escapes, None: the allowance) and one
    decode micro-batch's working set."""
    slots = pages.num_slots * expert_bytes(cfg, dtype) + pages.max_streamed * streamed_expert_bytes(cfg, dtype, codec)
    codec_bytes = decode_overhead_bytes(cfg, dtype, codec, pages.num_streamed, escape_bytes)
    return int(non_expert_bytes(cfg, dtype) + slots + codec_bytes + decode_bytes(cfg, micro_batch_size))


def admission_order(prompt_lens: Sequence[int], budgets: Sequence[int]) -> list[int]:
    """Request indices in the order the engine admits them: the largest KV need (prompt + budget positions)
    first, the longer prompt first among equal needs. A row's host KV slot holds the need of the first
    request it takes, so every request admitted later fits every row."""
    return sorted(range(len(prompt_lens)), key=lambda i: (-(prompt_lens[i] + budgets[i]), -prompt_lens[i]))


class JobShape(NamedTuple):
    """A job as HRM's search takes it (`hrm.choose_policy`'s arguments of the same names; the arrays None:
    every sequence as prompt_len, prefill_len and gen_len say)."""

    prompt_len: int
    gen_len: int
    prefill_len: int
    kv_positions: np.ndarray | None
    prompt_positions: np.ndarray | None = None
    prefill_positions: np.ndarray | None = None
    prefill_peak_positions: np.ndarray | None = None


def hrm_lengths(prompt_lens: Sequence[int], budgets: Sequence[int], max_positions: int, *,
                in_order: bool = False) -> JobShape:
    """A job's shape for HRM's search, as the engine runs it (budgets within the model's positions, as
    `token_budget`): the longest prompt; gen_len, the largest budget within max_positions − prompt_len (HRM
    prices decode contexts of the mean prompt + gen_len / 2); prefill_len, bucket(longest prompt), the padding
    the prefill's GPU memory is planned for; and, for a batch of the job's first n requests (n = 0..R), arrays
    [R + 1] of their totals: kv_positions, the host KV cache's positions (needs: prompt + budget);
    prompt_positions, their prompt tokens; prefill_positions, their prompts' tokens each padded to its own
    bucket (HRM's approximation of the engine's prefill calls, each padded to the bucket of its longest
    prompt after a micro-batch's prompts are sorted by length). The first n requests are those of
    `admission_order` (the n largest needs), or with `in_order` the first n as given (a job that will be the
    first n of these requests). prefill_peak_positions: the most of those padded tokens that n prompts of the
    job hold, which bound the prefill's hidden states on the GPU: the n largest own buckets'
    (`offload_memory.peak_prefill_positions`), or with `in_order`, the first n's (prefill_positions: that job
    prefills all of them at once)."""
    P = int(max(prompt_lens))
    budgets = np.minimum(budgets, max_positions - np.asarray(prompt_lens))
    order = np.arange(len(prompt_lens)) if in_order else np.array(admission_order(prompt_lens, budgets))
    prompts = np.asarray(prompt_lens)[order]
    totals = lambda x: np.concatenate([[0], np.cumsum(x)])
    padded = totals([bucket(int(n)) for n in prompts])
    return JobShape(P, int(min(budgets.max(), max_positions - P)), bucket(P), totals(prompts + budgets[order]),
                    totals(prompts), padded, padded if in_order else peak_prefill_positions(prompt_lens))


class _JobPlan(NamedTuple):
    """A `generate` call's requests as the engine runs them (`OffloadEngine._plan`)."""

    budget: list[int]  # per request, the tokens it may generate (`token_budget`)
    order: list[int]  # `admission_order`
    first: list[list[int]]  # the requests of each micro-batch's first fill
    capacities: np.ndarray  # host KV positions of each row's slot
    kv_dtype: np.dtype
    prefill_T: int  # the bucket of the job's longest prompt, which the prefill's memory is planned for


BATCH_FIELDS = ("batch_size", "micro_batch_size")  # the Policy fields a loaded engine can change (`rebatch`)


def layout_changes(a: Policy, b: Policy) -> list[str]:
    """The fields beside BATCH_FIELDS in which policies a and b differ: those place the weights, so an engine
    loaded for one runs the other only where there are none (`OffloadEngine.rebatch`)."""
    return [k for k in a.__dict__ if k not in BATCH_FIELDS and getattr(a, k) != getattr(b, k)]


class OffloadMemoryError(MemoryError):
    """The policy does not fit the GPU memory cap or the host memory; raised before any work."""


def check_host_memory(policy, what: str, need: int, planned: float | None = None, also: str = "",
                      batch_helps: bool = True, freed: int = 0) -> None:
    """Raise OffloadMemoryError if `need` bytes for `what` exceed what the host can still give
    (`moe_jax.host_memory.available_bytes`; planned: the host memory the job is planned with, bytes), with
    `freed` bytes given back first (a kept KV cache that the new one replaces); `also`: one more remedy to name,
    e.g. "use kv_cache_dtype='int8'"; batch_helps: a smaller batch_size needs less."""
    avail = host_memory.available_bytes(planned)
    avail = None if avail is None else avail + freed
    if avail is not None and need > avail:
        remedies = [*(["lower batch_size"] if batch_helps else []),
                    *(["raise resident_expert_fraction"] if policy.resident_expert_fraction < 1 else []),
                    *([also] if also else [])]
        raise OffloadMemoryError(f"policy {policy} needs {need / 2**30:.2f} GiB of host memory for {what} but "
                                 f"only {avail / 2**30:.2f} GiB is available: {', '.join(remedies[:-1])}"
                                 f"{' or ' * (len(remedies) > 1)}{remedies[-1]} (on a VM that shows less memory than "
                                 f"it has until used, set {host_memory.HOST_MEMORY_VAR} to its memory in GiB)")


def _cache_value_dim(cfg: ModelConfig) -> int | None:
    """HostKVCache's value_dim for the model: the latent's dims where the values are in the keys, else None."""
    return cfg.value_dim if cfg.values_in_keys else None


@functools.lru_cache(maxsize=None)
def _warm_host_kernels(cfg: ModelConfig, kv_dtype, dtype) -> None:
    """The CPU attention kernel and the KV writes for this cache dtype, compiled (or loaded from numba's cache)
    on a one-slot cache once per process, so that the first run's per-layer CPU time is the attention's."""
    warm = HostKVCache(1, 1, 1, cfg.num_kv_heads, cfg.head_dim, kv_dtype, _cache_value_dim(cfg))
    row = np.ones((1, cfg.num_kv_heads, cfg.head_dim), dtype)
    row.setflags(write=False)  # k/v read where JAX left them (read-only), their rows picked out: every call's
    warm.write(0, [0], [0], row, None if cfg.values_in_keys else row, rows=[0])
    q = np.ones((1, cfg.num_heads, cfg.head_dim), dtype)
    q.setflags(write=False)
    warm.attend(0, [0], q, [1], out=np.zeros((1, cfg.num_heads, cfg.value_dim), dtype), scale=cfg.attention_scale)


# ---- jitted pieces (cfg, moe_impl and the two shardings are bound with functools.partial) ----
# Between the GPU and the CPU worker, q/k/v (and prefill k/v) leave each step in pinned host memory and
# the attention output enters it from there: the copies are part of the jitted call, at pinned speed.

def _with_slots(p, slots):
    return dict(p, **slots)


def _fetch(to_device, chunk):
    """Host chunks ({name: [c, ...]} in pinned_host, or a tuple of them) copied to the GPU; None stays None."""
    return None if chunk is None else jax.device_put(chunk, to_device)


def _install(slots, fetched, starts):
    """Write the fetched chunks ({name: [c, ...]}) into the streamed slots: chunk c at slot starts[c]."""
    for chunk, at in zip(fetched, starts):
        slots = {k: jax.lax.dynamic_update_slice_in_dim(slots[k], chunk[k], at, 0) for k in slots}
    return slots


def _install_coded(s, sm, nib, base, expert, index, bits, j, at):
    """Write expert j of a fetched `expert_codec`-coded chunk of one weight (sm, nib [c, ...], base [c]) into
    slot at + j of its slot array s, setting the chunk's escapes of expert j (expert [n], flat index [n] within
    it, bits [n]; the other experts' fall outside and are dropped). One call per expert and weight, so that
    one decoded matrix at most is alive whatever the compiler fuses."""
    mine = jnp.where(expert == j, index, sm[j].size)  # past the end: dropped
    decoded = expert_codec.decode(sm[j], nib[j], base[j], mine, bits).astype(s.dtype)  # escapes set as bits: exact
    return jax.lax.dynamic_update_slice_in_dim(s, decoded[None], at + j, 0)


def _post(cfg, impl, to_device, p, slots, table, x, attn):
    """post_attention of the attention output `attn`, which comes from the CPU in pinned host memory."""
    attn = jax.device_put(attn, to_device)
    return model.post_attention(cfg, _with_slots(p, slots), x, attn, expert_slots=table, moe_impl=impl)


def _start_token(cfg, to_host, glob, p0, h, positions, temperature, top_p, top_k, seeds, counters):
    """Sample from hidden h [b, H], embed the token, pre-attention of layer 0 at `positions` [b, 1];
    returns the `Sampled` tokens, x and q, k, v (these in pinned host memory)."""
    sampled = sample(model.lm_head(cfg, glob, h), temperature, top_p, top_k, row_keys(seeds, counters))
    x = model.embed(glob, sampled.tokens[:, None])
    return (sampled, x, *jax.device_put(model.pre_attention(cfg, p0, x, positions), to_host))


def _decode_mid(cfg, impl, to_device, to_host, p, p_next, slots, table, x, attn, positions, chunk):
    x = _post(cfg, impl, to_device, p, slots, table, x, attn)
    return (x, *jax.device_put(model.pre_attention(cfg, p_next, x, positions), to_host), _fetch(to_device, chunk))


def _decode_last(cfg, impl, to_device, to_host, p, glob, p0, slots, table, x, attn, positions, samp, chunk, join):
    """The last layer, then the next token: sampled from the layer's output, or for the rows in
    join = (h [b, H], mask [b]) from h, their prompt's last hidden state (rows joining the batch)."""
    x = _post(cfg, impl, to_device, p, slots, table, x, attn)
    h = jnp.where(join[1][:, None], join[0], x[:, 0])
    return (*_start_token(cfg, to_host, glob, p0, h, positions, *samp), _fetch(to_device, chunk))


def _prefill_layer(cfg, impl, to_device, to_host, p, slots, table, x, positions, chunk):
    q, k, v = model.pre_attention(cfg, p, x, positions)
    x = model.post_attention(cfg, _with_slots(p, slots), x, model.attention(cfg, q, k, v, positions),
                             expert_slots=table, moe_impl=impl)
    return (x, *jax.device_put((k, v), to_host), _fetch(to_device, chunk))


@functools.lru_cache(maxsize=None)
def _jitted(cfg: ModelConfig, moe_impl: str, to_device, to_host):
    """The engine's jitted functions, shared by every engine of the same model (compiled once per shape). `attn`
    is never donated: the CPU worker writes the next one into the same buffer, through a view (`host_views`)."""
    bind = lambda f: functools.partial(f, cfg, moe_impl, to_device, to_host)
    return (jax.jit(bind(_decode_mid)), jax.jit(bind(_decode_last)), jax.jit(bind(_prefill_layer)),
            jax.jit(functools.partial(_fetch, to_device)), jax.jit(_install, donate_argnames="slots"),
            jax.jit(_install_coded, donate_argnums=0),
            jax.jit(functools.partial(_start_token, cfg, to_host)))


@dataclasses.dataclass
class OffloadStats:
    """Seconds per layer, summed over one `generate` call. cpu: attention in the worker (q/k/v fetched as NumPy
    arrays once the GPU has them, the decode's k/v writes into the host cache, the kernel, the outputs' hand-off
    to pinned memory); cpu_fetch, cpu_kernel, cpu_write, cpu_handoff: of it, the fetch (the GPU's q/k/v in
    pinned memory as NumPy arrays, and the sampled tokens: views where `host_views`, else `np.asarray`, a copy
    or none), the attention kernel's calls alone (`HostKVCache.attend`), the decode's k/v writes
    (`HostKVCache.write`) and the hand-off (the output, which the kernel writes in the engine's dtype, put in
    pinned memory, with any wait for the previous put to have read it; nothing to put where `host_views`: the
    kernel writes into a view of pinned memory); host_views: whether the worker used views (`moe_jax.host_views`);
    cpu_faults: the page faults the worker thread took in its decode tasks, the q/k/v's arrival from the GPU
    included (not numba's threads'; 0 where the OS does not count a thread's); run_faults: the whole process's during the run (None where unknown);
    gpu_wait: the worker waiting for GPU results to be ready (GPU-bound time the CPU could not hide); main_wait: the dispatching
    thread waiting for CPU attention (CPU-bound time). prefill_write: the worker writing prompts' k/v into the
    host cache (the first fill's and the refills'); prefill_wait: the dispatching thread waiting for those
    writes, so that at most `pinned_pool.STAGED_BYTES` of k/v wait in pinned memory; prefill_calls: the prefill's
    GPU calls, every layer's (prefill_s over those of the first fill is the time per call). h2d_bytes: expert bytes streamed. prefill_s: the
    first N prompts; decode_s: the rest, with the prefill of the `refilled` requests that took the rows of
    finished ones (interleaved with decode steps). kv_bytes, kv_dtype: the host KV cache (the storage held: a kept
    larger cache's where the job runs on it); kv_fault_in_s: the seconds
    its allocation spent faulting its pages in (`HostKVCache.fault_in_s`, before the run), kv_huge_pages their size
    (2 MiB, or 4 KiB); host_free_bytes: the host's
    MemAvailable at the end of the run, the cache still held (what the pinned pool, the cache and the rest
    left), and host_total_bytes its MemTotal then, None where unknown. compiles: the XLA compiles during the call
    (`compile_count`: new shapes of its jitted steps; a stall, seconds on a GPU, where it falls inside a
    timed run), the first prefill's and decode step's included."""

    layers: int
    cpu: np.ndarray
    cpu_fetch: np.ndarray
    cpu_kernel: np.ndarray
    cpu_write: np.ndarray
    cpu_handoff: np.ndarray
    cpu_faults: np.ndarray
    gpu_wait: np.ndarray
    main_wait: np.ndarray
    prefill_write: np.ndarray
    prefill_wait: np.ndarray
    h2d_bytes: int = 0
    host_views: bool = False
    prefill_calls: int = 0
    decode_steps: int = 0
    refilled: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    peak_gpu_bytes: int | None = None
    kv_bytes: int = 0
    kv_dtype: str = ""
    kv_fault_in_s: float = 0.0
    kv_huge_pages: bool = True
    run_faults: int | None = None
    host_free_bytes: int | None = None
    host_total_bytes: int | None = None
    compiles: compile_count.Compiles = compile_count.Compiles()

    @classmethod
    def empty(cls, layers: int) -> "OffloadStats":
        return cls(layers, *(np.zeros(layers) for _ in range(10)))

    def bottleneck(self) -> str:
        terms = {"cpu attention": self.cpu.sum(), "gpu compute or h2d": self.gpu_wait.sum()}
        return max(terms, key=terms.get)

    def summary(self) -> str:
        per = max(self.decode_steps, 1) * self.layers
        peak = f", peak GPU {self.peak_gpu_bytes / 2**30:.2f} GiB" if self.peak_gpu_bytes else ""
        free = (f", host free {self.host_free_bytes / 2**30:.1f} of {self.host_total_bytes / 2**30:.1f} GiB"
                if self.host_free_bytes is not None else "")
        return (f"offload: prefill {self.prefill_s:.2f} s ({self.prefill_calls} GPU calls; prompts' k/v writes "
                f"{self.prefill_write.sum():.2f} s on the "
                f"cpu, waits for them {self.prefill_wait.sum():.2f} s), decode {self.decode_s:.2f} s over "
                f"{self.decode_steps} steps; "
                f"per layer-step: cpu attention {self.cpu.sum() / per * 1e3:.2f} ms (kernel "
                f"{self.cpu_kernel.sum() / per * 1e3:.2f} ms, KV writes {self.cpu_write.sum() / per * 1e3:.2f} ms, "
                f"hand-off {self.cpu_handoff.sum() / per * 1e3:.2f} ms, fetch of q/k/v {self.cpu_fetch.sum() / per * 1e3:.2f} ms"
                f" ({'views of' if self.host_views else 'copies from and to'} pinned memory); "
                f"{self.cpu_faults.sum() / per:.0f} page faults in the worker), "
                f"waiting for gpu "
                f"{self.gpu_wait.sum() / per * 1e3:.2f} ms, waiting for cpu {self.main_wait.sum() / per * 1e3:.2f} ms; "
                f"streamed {self.h2d_bytes / 2**30:.2f} GiB{peak}; host KV cache {self.kv_bytes / 2**30:.2f} GiB {self.kv_dtype} "
                f"({'2 MiB' if self.kv_huge_pages else '4 KiB'} pages, faulted in in {self.kv_fault_in_s:.2f} s){free}; "
                f"{self.refilled} requests refilled rows; "
                f"{'' if self.run_faults is None else f'{self.run_faults:,} page faults in the run (the process); '}"
                f"{self.compiles.compiles} XLA compiles ({self.compiles.seconds:.2f} s); "
                f"bottleneck: {self.bottleneck()}")


class OffloadEngine:
    """prefetch: "split" sends the next layer's streamed experts in one chunk per micro-batch step (as the
    original), "whole" sends them all with the first micro-batch's step. host_memory_bytes: the host memory
    the policy was planned with (the HRM profile's), for the host checks on a VM that shows less than it
    has (`moe_jax.host_memory`); None: what /proc/meminfo shows."""

    def __init__(self, cfg: ModelConfig, weights, dtype, policy: Policy, *, moe_impl: str = "auto",
                 prefetch: str = "split", host_memory_bytes: float | None = None):
        if prefetch not in PREFETCH:
            raise ValueError(f"prefetch must be one of {PREFETCH}, got {prefetch!r}")
        if policy.attention_device != "cpu" or policy.kv_device != "cpu":
            raise ValueError(f"offload engine: attention_device={policy.attention_device!r}, kv_device="
                             f"{policy.kv_device!r} is not implemented; only CPU attention over a host KV cache")
        self.cfg, self.dtype, self.policy, self.host_memory_bytes = cfg, np.dtype(dtype), policy, host_memory_bytes
        expert_codec.check(policy.expert_codec, self.dtype)
        self.escape_bytes = None  # GPU bytes of the coded experts' escapes, once loaded
        dev = jax.devices()[0]
        self.on_device = SingleDeviceSharding(dev, memory_kind="device")
        self.on_host = SingleDeviceSharding(dev, memory_kind="pinned_host")
        # the same pinned chunks either way (one per micro-batch, so that the pool holds them alike: a layer's
        # weight whole, 672 MiB for Mixtral 8x7B, fragmented a 9 GiB pool that holds 7.55 GiB of chunks)
        self.pages = ExpertPages.for_model(cfg, policy.resident_expert_fraction, policy.num_micro_batches)
        self.whole = prefetch == "whole"
        self.expert_shapes = expert_codec.expert_shapes(cfg)  # {name: shape of one expert's weight}
        self.gpu_bytes = self._check_gpu_memory()
        streamed = pinned_pool.streamed_bytes(cfg, self.dtype, policy)
        pool = pinned_pool.fixed_cap_bytes()
        # on a GPU backend the pool reserves about its cap for them, as HRM counts (`pinned_pool.cap_bytes`)
        reserved = streamed if pool is None else int(pinned_pool.cap_bytes(streamed))
        check_host_memory(policy, "the streamed experts (pinned)" if pool is None else
                          "the streamed experts (pinned, in XLA's pool with its margin)", reserved, host_memory_bytes,
                          batch_helps=False)
        if pool is not None and reserved > pool:
            raise OffloadMemoryError(
                f"policy {policy} streams {streamed / 2**30:.2f} GiB of experts from pinned host memory (a pool of "
                f"{pinned_pool.setting_gib(streamed)} GiB with its margin) but XLA's "
                f"pinned-host pool is capped at {pool / 2**30:.1f} GiB ({pinned_pool.LIMIT_VAR}, read when JAX "
                f"started): set {pinned_pool.LIMIT_VAR}={pinned_pool.setting_gib(streamed)} before JAX starts, or "
                f"raise resident_expert_fraction")
        mid, last, prefill, self._fetch, self._install, self._install_coded, start = _jitted(
            cfg, moe_impl, self.on_device, self.on_host)
        self._mid, self._last, self._prefill, self._start = (precise(f, dtype) for f in (mid, last, prefill, start))
        self._embed = jax.jit(model.embed)
        # the CPU worker (and the load's coding of experts) read and write pinned memory through views, or copy
        copies = ("offload engine: the CPU worker copies the GPU's q/k/v out of pinned memory and its output into "
                  "it (and coded experts into it)")
        wanted = host_views.wanted()
        why = host_views.check(self.on_host, self.on_device) if wanted else None
        self.host_views = wanted and why is None
        self._copy_coded = False  # the load copies coded experts into pinned memory though views work (`_coded_buffers`)
        if not wanted:
            log.info("%s (%s=0)", copies, host_views.SWITCH_VAR)
        elif why:
            log.warning("%s (NumPy views of pinned memory fail on this backend: %s)", copies, why)
        else:
            log.info("offload engine: the CPU worker reads q/k/v and writes its output in pinned memory (views)")
        self._load(weights)
        self.gpu_bytes = self._check_gpu_memory()  # again, with the codec's escapes as loaded
        self.stats = OffloadStats.empty(cfg.num_layers)
        self.kv_cache: HostKVCache | None = None  # the last job's, whose storage the next job takes if it fits
        self.running = False  # a generate's steps are under way (its iterator neither exhausted nor closed)
        log.info("offload engine: %s; %d resident expert slots, 2 x %d streamed (slots + chunks in flight, up "
                 "to %d per layer); GPU plan %.2f GiB", policy, self.pages.num_resident, self.pages.max_streamed,
                 self.pages.split, self.gpu_bytes / 2**30)

    # ---- memory plan and weight placement ----

    def _expert_bytes(self) -> int:
        return expert_bytes(self.cfg, self.dtype)

    def _check_gpu_memory(self, extra: int = 0, extra_what: str = "") -> int:
        """Bytes the GPU must hold (`planned_gpu_bytes`, + `extra` bytes for `extra_what`)."""
        p = self.pages
        dense = non_expert_bytes(self.cfg, self.dtype)
        need = planned_gpu_bytes(self.cfg, self.dtype, self.policy.micro_batch_size, p, self.policy.expert_codec,
                                 self.escape_bytes) + extra
        cap = self.policy.gpu_memory_gb
        limit = device_memory_limit()
        for name, value in (("gpu_memory_gb cap", cap * 2**30 if cap else None),
                            (f"device memory ({JAX_MEMORY_SHARE})", limit)):
            if value and need > value:
                raise OffloadMemoryError(
                    f"policy {self.policy} needs {gib(need)} GiB on the GPU ({gib(dense)} GiB non-expert "
                    f"weights, {p.num_slots + p.max_streamed} expert slots of {self._expert_bytes() / 2**20:.1f} MiB"
                    f"{f', {gib(extra)} GiB for the {extra_what}' if extra else ''}) but the "
                    f"{name} is {gib(value)} GiB: lower resident_expert_fraction or micro_batch_size")
        return need

    def _load(self, weights) -> None:
        """Place weights layer by layer: non-expert ones on the GPU (`dense`: a dense layer's FFN among them),
        experts in resident slots or pinned host chunks."""
        p, dt = self.pages, self.dtype
        self.glob = jax.device_put(weights.globals(dt), self.on_device)
        experts = list(self.expert_shapes)
        self.slots = {k: jnp.zeros((p.num_slots, *shape), dt, device=self.on_device)
                      for k, shape in self.expert_shapes.items()}
        self.dense, self.host_chunks, escapes = [], [], []
        for i in range(self.cfg.num_layers):
            w = weights.layer(i, dt)
            self.dense.append(jax.device_put({k: v for k, v in w.items() if k not in self.expert_shapes},
                                             self.on_device))
            if not p.has_experts(i):
                self.host_chunks.append([])
                escapes.append([])
                continue
            if p.resident[i]:  # this layer's resident experts fill consecutive slots
                ids = list(p.resident[i])
                resident = jax.device_put({k: w[k][ids] for k in experts}, self.on_device)
                self.slots = self._install(self.slots, [resident], [p.resident_slot(i, ids[0])])
            ids = np.asarray(p.streamed[i], np.int64)
            try:
                chunks = [self._host_chunk({k: w[k] for k in experts}, ids[a:b]) for a, b in p.chunks(i)]
            except jax.errors.JaxRuntimeError as e:
                if "out of host memory" not in str(e).lower():
                    raise
                raise self._pool_exhausted(i) from e
            self.host_chunks.append([c for c, _ in chunks])
            escapes.append([e for _, e in chunks])
        self.escapes = self._place_escapes(escapes)
        self.tables = [jnp.asarray(p.page_table(i)) if p.has_experts(i) else None for i in range(self.cfg.num_layers)]
        self.installed = None  # the layer whose streamed experts are in the streamed slots
        self._fetch_for(self._next_moe_layer(-1))

    def _host_chunk(self, weights: dict[str, np.ndarray], ids: np.ndarray):
        """(the chunk of experts `ids` of a layer's expert `weights` {name: [E, ...]} in pinned memory, its
        escapes): the experts as they are and None, or coded ({name: {"sm", "nib"}}) and {name: (base [c],
        expert [n], index [n], bits [n], bits of expert 0's element 0)}, the chunk's escapes."""
        if self.policy.expert_codec == "none":  # a layer's streamed experts are a range of ids: views, no copy
            lo, hi = int(ids[0]), int(ids[-1]) + 1
            if not np.array_equal(ids, np.arange(lo, hi)):
                raise ValueError(f"a chunk's streamed experts must be a range of ids, got {ids.tolist()}")
            return jax.device_put({k: np.ascontiguousarray(x[lo:hi]) for k, x in weights.items()}, self.on_host), None
        host, escapes = {}, {}
        for k, x in weights.items():
            rows, cols = x.shape[1:]
            shapes = {"sm": (len(ids), rows, cols), "nib": (len(ids), rows, (cols + 1) // 2)}
            pinned, out = self._coded_buffers(shapes)
            coded = [expert_codec.encode(x[e], out["sm"][j], out["nib"][j]) for j, e in enumerate(ids)]
            host[k] = pinned if pinned is not None else jax.device_put(out, self.on_host)
            escapes[k] = (np.array([c.base for c in coded], np.int32),
                          np.concatenate([np.full(len(c.escape_index), j, np.int32) for j, c in enumerate(coded)]),
                          np.concatenate([c.escape_index for c in coded]), np.concatenate([c.escape_bits for c in coded]),
                          x[ids[0], 0, 0].view(np.uint16))
        return host, escapes

    def _coded_buffers(self, shapes: dict[str, tuple[int, ...]]):
        """uint8 arrays of `shapes` {name: shape} for a coded chunk: (pinned arrays or None, NumPy arrays to code
        into). With views: pinned arrays, zeroed by a copy from the GPU, and writable views of them, so that the
        coding writes memory the pool has touched already and nothing is copied after (on a fresh VM a first
        touch of host memory ran at 0.5-1 GB/s: benchmarks/RESULTS.md, 2026-11-27). Without: None and NumPy
        arrays, which the caller copies into pinned memory once coded. (The zeros on the GPU, one array at a time, 59 MB per
        Mixtral 8x7B expert of the chunk, at most 0.47 GB, lie inside the prefill's hidden states and the other
        buffers of a run that the GPU plan holds and the load does not use.)"""
        if self.host_views and not self._copy_coded:
            pinned = {n: jax.device_put(jnp.zeros(s, np.uint8, device=self.on_device), self.on_host)
                      for n, s in shapes.items()}
            try:
                return pinned, {n: host_views.host_view(a, writable=True) for n, a in pinned.items()}
            except ValueError as e:  # a layout the views check (2-D bfloat16) did not meet
                self._copy_coded = True
                log.warning("offload engine: coded experts are copied into pinned memory (no view of a %s array "
                            "there: %s)", next(iter(shapes.values())), e)
        return None, {n: np.empty(s, np.uint8) for n, s in shapes.items()}

    def _place_escapes(self, escapes):
        """Per layer, per chunk: its escapes on the GPU, every weight's padded to one bucketed length per chunk
        (few shapes to compile, at most 1.5x the bytes) with expert 0's element 0 and its own bits; None
        without a codec. Sets escape_bytes."""
        if self.policy.expert_codec == "none":
            self.escape_bytes = 0
            return [None] * len(escapes)

        def padded(chunk):
            n = bucket(max(len(e[1]) for e in chunk.values()), 1)
            out = {}
            for k, (base, expert, index, bits, first) in chunk.items():
                pad = n - len(index)
                out[k] = (base, np.concatenate([expert, np.zeros(pad, np.int32)]),
                          np.concatenate([index, np.zeros(pad, np.int32)]),
                          np.concatenate([bits, np.full(pad, first, np.uint16)]))
            return out

        placed = [[jax.device_put(padded(chunk), self.on_device) for chunk in layer] for layer in escapes]
        self.escape_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(placed))
        log.info("expert codec %s: streamed experts coded at %.3f of their bytes, %.1f MiB of escapes on the GPU",
                 self.policy.expert_codec,
                 streamed_expert_bytes(self.cfg, self.dtype, self.policy.expert_codec) / self._expert_bytes(),
                 self.escape_bytes / 2**20)
        return placed

    def _pool_exhausted(self, layer: int) -> OffloadMemoryError:
        """The error for XLA's pinned-host pool running out while placing `layer`'s streamed experts."""
        cap = pinned_pool.fixed_cap_bytes()
        streamed = pinned_pool.streamed_bytes(self.cfg, self.dtype, self.policy)
        return OffloadMemoryError(
            f"policy {self.policy}: XLA's pinned-host pool (cap {f'{cap / 2**30:.0f} GiB' if cap else 'unknown'}, "
            f"{pinned_pool.LIMIT_VAR}) ran out placing layer {layer} of {self.cfg.num_layers}'s streamed experts "
            f"({streamed / 2**30:.2f} GiB in all): set {pinned_pool.LIMIT_VAR} higher before JAX starts (the pool "
            f"fragments; the cap moe-jax sets is the streamed experts x {pinned_pool.MARGIN} + {pinned_pool.SLACK_GIB} "
            f"GiB) or raise resident_expert_fraction")

    def _next_moe_layer(self, layer: int) -> int:
        """The first layer after `layer` (wrapping around to the next step) that has experts."""
        L = self.cfg.num_layers
        return next(j % L for j in range(layer + 1, layer + 1 + L) if self.pages.has_experts(j % L))

    def _fetch_for(self, layer: int) -> None:
        """Chunks in flight from now on belong to `layer`."""
        self.fetching, self.fetched = layer, [None] * len(self.host_chunks[layer])

    def _begin_layer(self, layer: int) -> jax.Array:
        """Make `layer`'s experts addressable (install its fetched chunks); returns its page table (None for a
        dense layer, whose calls carry on with the chunks of the next layer that has experts)."""
        if not self.pages.has_experts(layer):
            return None
        if self.installed != layer:
            if self.fetching != layer:  # nothing in flight for this layer: fetch it now
                self._fetch_for(layer)
            self._complete_fetch()
            if self.fetched:
                starts = [self.pages.chunk_slot(a) for a, _ in self.pages.chunks(layer)]
                self._install_fetched(starts, self.escapes[layer])
            self._fetch_for(self._next_moe_layer(layer))
        self.installed = layer
        return self.tables[layer]

    def _install_fetched(self, starts: list[int], escapes) -> None:
        """The fetched chunks into the streamed slots at `starts`: as they are (escapes None), or decoded
        expert by expert with their escapes (per chunk {name: (base, expert, index, bits)})."""
        if escapes is None:
            self.slots = self._install(self.slots, self.fetched, starts)
            return
        for chunk, at, esc in zip(self.fetched, starts, escapes):
            for k, coded in chunk.items():
                for j in range(coded["sm"].shape[0]):
                    self.slots[k] = self._install_coded(self.slots[k], coded["sm"], coded["nib"], *esc[k], j, at)

    def _carried(self, step: int) -> list[int]:
        """The next layer's chunks that a layer's `step`-th call carries to the GPU: chunk `step` ("split"), or
        all of them with the first call ("whole"); less those on the GPU already (fetched before the previous
        `generate` call ended)."""
        n = len(self.fetched)
        picks = (range(n) if step == 0 else ()) if self.whole else ([step] if step < n else ())
        return [c for c in picks if self.fetched[c] is None]

    def _host_chunk_to_send(self, c: int):
        """Chunk c of the layer in flight, as the pool holds it, counted as streamed."""
        a, b = self.pages.chunks(self.fetching)[c]
        self.stats.h2d_bytes += (b - a) * streamed_expert_bytes(self.cfg, self.dtype, self.policy.expert_codec)
        return self.host_chunks[self.fetching][c]

    def _chunk(self, step: int):
        """The host chunks (a tuple) that a layer's `step`-th call carries to the GPU, or None."""
        carried = self._carried(step)
        return tuple(self._host_chunk_to_send(c) for c in carried) if carried else None

    def _store(self, step: int, fetched) -> None:
        """Keep what the `step`-th call fetched (what `_chunk(step)` gave it, on the GPU)."""
        if fetched is not None:
            for c, chunk in zip(self._carried(step), fetched, strict=True):
                self.fetched[c] = chunk

    def _complete_fetch(self) -> None:
        """Fetch the chunks of the next layer that no call carried (calls fewer than chunks)."""
        for c, f in enumerate(self.fetched):
            if f is None:
                self.fetched[c] = self._fetch(self._host_chunk_to_send(c))

    # ---- generation ----

    def prepare(self, requests: Sequence[Request]) -> None:
        """What a `generate` of these requests does before its first step, without running it: the memory checks
        (OffloadMemoryError before any work) and the host KV cache, allocated and faulted in (or a kept one
        taken over), kept for the `generate` calls that fit it."""
        self._refuse_while_running("prepare")
        if requests:
            self._cache_for(self._plan(requests))

    def release_kv_cache(self) -> None:
        """Give the kept host KV cache back to the OS (the next `prepare` or `generate` allocates a new one)."""
        self._refuse_while_running("release_kv_cache")
        self.kv_cache = None
        gc.collect()  # a reference cycle (an exception's traceback) may hold it

    def rebatch(self, policy: Policy) -> None:
        """Run later jobs at `policy`'s batch (batch_size N, micro_batch_size μ) on the weights as placed: the
        policy must keep every other field of this engine's (its layout: micro-batch count, resident experts,
        codec, cap, KV cache dtype; `hrm.choose_policy(num_micro_batches=, resident_expert_fraction=)` searches
        within one). The GPU plan is checked for the new μ (OffloadMemoryError, the policy unchanged); the kept
        host KV cache serves the next job if it fits it, as always."""
        self._refuse_while_running("rebatch")
        differ = layout_changes(self.policy, policy)
        if differ:
            raise ValueError(f"OffloadEngine.rebatch: {policy} differs from the loaded {self.policy} in "
                             f"{', '.join(differ)}, which place the weights: only {' and '.join(BATCH_FIELDS)} "
                             f"change on a loaded engine")
        old, self.policy = self.policy, policy
        try:
            self.gpu_bytes = self._check_gpu_memory()
        except OffloadMemoryError:
            self.policy = old
            raise
        log.info("offload engine: rebatched to %s; GPU plan %.2f GiB", policy, self.gpu_bytes / 2**30)

    def _refuse_while_running(self, what: str) -> None:
        if self.running:
            raise RuntimeError(f"OffloadEngine.{what}: a generate on this engine is still under way (it holds the "
                               f"engine's expert buffers and KV cache): exhaust or close its iterator first")

    def _kv_args(self, plan: "_JobPlan") -> tuple:
        cfg = self.cfg
        return (cfg.num_layers, len(plan.capacities), plan.capacities, cfg.num_kv_heads, cfg.head_dim, plan.kv_dtype,
                _cache_value_dim(cfg))

    def _plan(self, requests: Sequence[Request]) -> _JobPlan:
        """The requests' admission, KV slots, cache dtype and prefill rows per call (`_JobPlan`), the host and
        GPU memory for them checked (a kept KV cache that fits them needs no more host memory; one that does not
        is given back before the new one is allocated)."""
        cfg, pol = self.cfg, self.policy
        budget = [token_budget(r, cfg.max_positions) for r in requests]
        lengths = [len(r.prompt) for r in requests]
        order = admission_order(lengths, budget)
        first = balanced_micro_batches(order[:pol.batch_size], lengths, pol.micro_batch_size)
        # row b of micro-batch k owns KV slot (rows before it) + b, as long as its first request's need
        capacities = np.array([lengths[i] + budget[i] for group in first for i in group])
        kv_dtype = kv_storage_dtype(pol.kv_cache_dtype, self.dtype)
        T = bucket(max(lengths))
        plan = _JobPlan(budget, order, first, capacities, kv_dtype, T)
        kept, kv_args = self.kv_cache, self._kv_args(plan)
        if kept is None or not kept.fits(*kv_args):
            check_host_memory(pol, f"the KV cache ({len(capacities)} sequences, {capacities.sum()} positions, {kv_dtype})",
                              HostKVCache.footprint(*kv_args), self.host_memory_bytes,
                              "set kv_cache_dtype='int8' (lossy; about half the bytes)" if kv_dtype.kind == "f" else "",
                              freed=0 if kept is None else kept.storage_bytes)
        self._check_gpu_memory(int(prefill_bytes(cfg, self.dtype, pol.batch_size, pol.micro_batch_size, T,
                                                 peak_prefill_positions(lengths))),
                               f"prefill of prompts up to {T} tokens")
        return plan

    def _cache_for(self, plan: _JobPlan) -> HostKVCache:
        """The job's host KV cache, on the kept cache's storage where it fits, else new (the kept one given back
        first); kept for the next job."""
        args = self._kv_args(plan)
        kept, self.kv_cache = self.kv_cache, None
        if kept is not None and not kept.fits(*args):
            log.info("host KV cache: the kept one (%.2f GB) does not fit this job: given back for a new one",
                     kept.storage_bytes / 1e9)
            kept = None
            gc.collect()  # before the new one is allocated: a reference cycle (a failed run's) may hold the old
        cache = self.kv_cache = HostKVCache(*args, reuse=kept)
        if kept is None:
            log.info("host KV cache: %.2f GB in %s pages, faulted in in %.2f s", cache.nbytes / 1e9,
                     "2 MiB" if cache.huge_pages else "4 KiB", cache.fault_in_s)
        else:
            log.info("host KV cache: %.2f GB of the kept one's %.2f GB (no allocation)", cache.nbytes / 1e9,
                     kept.storage_bytes / 1e9)
        return cache

    def generate(self, requests: Sequence[Request]) -> Iterator[tuple[Request, list[int], str, list | None]]:
        """Yields (request, generated token ids, finish_reason, logprobs) as requests finish (logprobs as the
        resident engine's)."""
        if not requests:
            return
        self._refuse_while_running("generate")
        cfg, pol = self.cfg, self.policy
        self.stats = OffloadStats.empty(cfg.num_layers)  # the stats of this call
        self.running = True  # from here: the cache is this call's from its allocation on
        try:
            plan = self._plan(requests)
            cache = self._cache_for(plan)
            self.stats.kv_bytes, self.stats.kv_dtype = cache.storage_bytes, str(plan.kv_dtype)
            self.stats.kv_fault_in_s, self.stats.kv_huge_pages = cache.fault_in_s, cache.huge_pages
            self.stats.host_views = self.host_views
            _warm_host_kernels(cfg, plan.kv_dtype, self.dtype)
            faults, compiles = _page_faults(thread=False), compile_count.counts()
            with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="cpu-attention") as cpu:
                yield from _Run(self, cache, cpu, requests, plan.budget, plan.first, plan.order[pol.batch_size:],
                                plan.prefill_T).run()
        finally:
            self.running = False
        self.stats.run_faults = None if faults is None else _page_faults(thread=False) - faults
        self.stats.compiles = compile_count.counts() - compiles
        if self.stats.compiles.compiles:
            log.info("%d XLA compiles in this generate (%.2f s): new shapes of its steps", *self.stats.compiles)
        mem = host_memory.meminfo()  # the cache's pages written, still held
        self.stats.host_free_bytes, self.stats.host_total_bytes = (mem.available, mem.total) if mem else (None, None)
        stats = jax.devices()[0].memory_stats() or {}
        self.stats.peak_gpu_bytes = stats.get("peak_bytes_in_use")
        log.debug("%s", self.stats.summary())  # `LLM.stats.summary()`; the CLI prints it


FREE, PREFILL, JOIN, ACTIVE = range(4)  # a row's state (see _Run)


def _page_faults(thread: bool) -> int | None:
    """Page faults (minor and major) taken so far by the calling thread (Linux) or else by the whole process;
    None where the OS does not count them."""
    who = getattr(resource, "RUSAGE_THREAD", None) if thread else getattr(resource, "RUSAGE_SELF", None)
    if who is None:
        return None
    usage = resource.getrusage(who)
    return usage.ru_minflt + usage.ru_majflt


class _AttendBuffers(NamedTuple):
    """One micro-batch's host arrays for its decode attention (`_Run._attend`), reused by every call: out
    [μ, 1, heads, value_dim] in the engine's dtype (the kernel's output, handed to the GPU; rows past the
    micro-batch's stay zeros), lengths [rows] int64 (each row's context, 0 for the rows not decoding);
    pinned: the array in pinned memory that `out` is a view of, handed to the GPU as it is, or None (out is
    copied into pinned memory at each hand-off)."""

    out: np.ndarray
    lengths: np.ndarray
    pinned: jax.Array | None

    @classmethod
    def allocate(cls, mu: int, rows: int, cfg: ModelConfig, dtype, on_host) -> "_AttendBuffers":
        """on_host: a sharding of pinned memory, whose array `out` is then a view of (`host_views`), or None."""
        out, lengths = np.zeros((mu, 1, cfg.num_heads, cfg.value_dim), dtype), np.zeros(rows, np.int64)
        if on_host is None:
            return cls(out, lengths, None)
        pinned = jax.device_put(out, on_host)
        return cls(host_views.host_view(pinned, writable=True), lengths, pinned)


@dataclasses.dataclass
class _PrefillCall:
    """Prompt rows of micro-batch k going through the layers: x [r, T, H] on the GPU after `layer` layers."""

    k: int
    rows: np.ndarray  # row indices in micro-batch k (the call's first len(rows) rows; the rest is padding)
    lens: np.ndarray  # their prompt lengths
    positions: np.ndarray
    x: jax.Array
    layer: int = 0


class _Run:
    """All requests of one `generate` call on N rows: n_ub micro-batches of at most μ rows (`first`: the
    requests that fill them at the start), row b of micro-batch k owning host KV slot kv_slots[k][b], which
    holds the positions its first request needs (`admission_order`: the `waiting` requests need no more).

    A row is FREE, in PREFILL (its prompt runs through the layers, one GPU call per layer interleaved
    with the decode step, k/v written to its KV slot), JOIN (prompt done: its first token is sampled by
    the micro-batch's next last-layer call) or ACTIVE (decoding). The first N requests (in micro-batches
    balanced by prompt tokens) fill every row at the start; after that, at each step's layer 0, the
    rows of finished requests take the next waiting ones (continuous batching), so no KV slot idles while
    requests wait and a long request does not hold back the rest.
    """

    def __init__(self, eng: OffloadEngine, cache, cpu, requests: Sequence[Request], budgets: Sequence[int],
                 first: list[list[int]], waiting: Sequence[int], prefill_T: int):
        self.eng, self.cache, self.cpu, self.requests, self.budgets = eng, cache, cpu, requests, budgets
        self.prefill_T = prefill_T  # the job's longest prompt's bucket (`_start_prefill`)
        self.mu, H = eng.policy.micro_batch_size, eng.cfg.hidden_size
        self.first, self.waiting = list(first), collections.deque(waiting)
        sizes = [len(g) for g in self.first]
        starts = np.cumsum([0] + sizes)
        self.kv_slots = [np.arange(starts[k], starts[k + 1]) for k in range(len(sizes))]
        self.req = [[None] * s for s in sizes]  # index into requests, per row
        self.state = [np.full(s, FREE) for s in sizes]
        self.generated = [[[] for _ in range(s)] for s in sizes]
        self.logprobs: list[list[list | None]] = [[None] * s for s in sizes]  # per row, where its request asks
        self.lens = [np.ones(s, np.int64) for s in sizes]
        self.samp = [sampling_rows(self.mu) for _ in sizes]
        self.no_join = (jnp.zeros((self.mu, H), eng.dtype), np.zeros(self.mu, bool))
        on_host = eng.on_host if eng.host_views else None
        self.buffers = [_AttendBuffers.allocate(self.mu, s, eng.cfg, eng.dtype, on_host) for s in sizes]
        self.handed: list[jax.Array | None] = [None] * len(sizes)  # each micro-batch's last hand-off of buf.out
        self.fetch = host_views.host_view if eng.host_views else np.asarray  # a pinned array as NumPy
        self.h_join = [None] * len(sizes)  # [μ, H] last prompt hidden state of the JOIN rows, per micro-batch
        self.prefills: list[_PrefillCall] = []
        # prefill k/v writes in the CPU worker, oldest first, with the bytes of pinned k/v each holds
        self.writes: list[tuple[concurrent.futures.Future, int]] = []
        kv = 1 if cache.values_in_keys else 2  # a prefill call's k/v in pinned memory, bytes per position:
        self.staged_position_bytes = kv * cache.kv_heads * cache.head_dim * np.dtype(eng.dtype).itemsize

    def _pad(self, rows: np.ndarray, fill=0) -> np.ndarray:
        out = np.full((self.mu, *rows.shape[1:]), fill, rows.dtype)
        out[:len(rows)] = rows
        return out

    def _positions(self, k: int, ahead: int = 0) -> np.ndarray:
        """[μ, 1] position of each row's last token (+ ahead); rows not decoding are kept inside their KV slot
        (a decoding row past its slot reaches the cache's capacity check)."""
        pos = self.lens[k] + np.array([len(g) for g in self.generated[k]]) - 1 + ahead
        pos = np.where(self.state[k] == ACTIVE, pos, np.minimum(pos, self.cache.capacities[self.kv_slots[k]] - 1))
        return self._pad(pos.astype(np.int32)[:, None])

    def _counters(self, k: int) -> np.ndarray:
        return self._pad(np.array([len(g) for g in self.generated[k]], np.int32))

    # ---- rows: filling, recording ----

    def _fill(self) -> None:
        """Give FREE rows the next requests (the balanced first fill, then the waiting ones) and start
        their prompts' prefill calls."""
        for k, first in enumerate(self.first):
            rows = []
            for b in np.flatnonzero(self.state[k] == FREE):
                i = first[b] if first else (self.waiting.popleft() if self.waiting else None)
                if i is None:
                    break
                self.req[k][b], self.state[k][b], self.generated[k][b] = i, PREFILL, []
                self.logprobs[k][b] = [] if self.requests[i].params.logprobs is not None else None
                self.lens[k][b] = len(self.requests[i].prompt)
                rows.append(b)
            self.eng.stats.refilled += len(rows) if first is None else 0
            self.first[k] = None
            if rows:
                self.samp[k] = set_sampling_rows(self.samp[k], rows, [self.requests[self.req[k][b]] for b in rows])
                self._start_prefill(k, np.array(rows))
        for w in [w for w in self.writes if w[0].done()]:  # finished KV writes: surface any error, let go
            w[0].result()
            self.writes.remove(w)

    def _start_prefill(self, k: int, rows: np.ndarray) -> None:
        """Prefill calls for micro-batch k's `rows`, longest prompts first, each call padded to the bucket of its
        own longest prompt, with as many rows as fit the working set of a call at the job's longest bucket, then
        fewer as fewer are left (`offload_memory.prefill_call_rows`): the shorter prompts run in fewer, larger
        calls, each call's working set and all calls' hidden states within what `prefill_bytes` plans, and a
        refill of fewer rows than a call at the longest bucket takes compiles no new shape in the middle of the
        decode (60 requests of 1-400 tokens on 16 rows of tiny-mixtral: 28 shapes of the prefill call, where a
        row count per refill size made 44)."""
        eng, s = self.eng, 0
        rows = rows[np.argsort(-self.lens[k][rows], kind="stable")]
        while s < len(rows):
            T = bucket(int(self.lens[k][rows[s]]))
            n = prefill_call_rows(eng.cfg, T, self.prefill_T, self.mu, len(rows) - s)
            part, s = rows[s:s + n], s + n
            tokens = np.zeros((n, T), np.int32)
            for r, b in enumerate(part):
                tokens[r, :self.lens[k][b]] = self.requests[self.req[k][b]].prompt
            positions = np.broadcast_to(np.arange(T, dtype=np.int32), tokens.shape)
            self.prefills.append(_PrefillCall(k, part, self.lens[k][part].copy(), positions,
                                              eng._embed(eng.glob, tokens)))

    def _record(self, k: int, sampled):
        """Append the tokens (host-side `Sampled`) of micro-batch k's ACTIVE rows; yield the requests that finish."""
        for b in np.flatnonzero(self.state[k] == ACTIVE):
            i = self.req[k][b]
            self.generated[k][b].append(int(sampled.tokens[b]))
            if self.logprobs[k][b] is not None:
                self.logprobs[k][b].append(logprob_entry(sampled, b, self.requests[i].params.logprobs))
            reason = finish_reason(self.requests[i], self.generated[k][b], self.budgets[i], self.eng.cfg.eos_token_ids)
            if reason:
                self.state[k][b] = FREE
                yield self.requests[i], self.generated[k][b], reason, self.logprobs[k][b]

    # ---- CPU worker tasks ----

    def _attend(self, layer: int, k: int, rows: np.ndarray, positions: np.ndarray, q, kk, v, tokens=None,
                logprobs: bool = False):
        """Wait for the GPU's q/k/v; for the decoding `rows`, write k/v to the host cache and attend.
        tokens: the `Sampled` of the step's last layer, fetched with the log-probabilities when `logprobs`.
        One kernel call over all of micro-batch k's rows, the others given length 0 (zeros out), reads q in the
        engine's dtype and writes its output into the micro-batch's reused buffer (`_AttendBuffers`): no copy
        of q or of the output, and no new array a call (a new array costs page faults: on the 2-core VM, 966 a
        call at μ=880, 2-5 ms of 19)."""
        st, cfg, buf = self.eng.stats, self.eng.cfg, self.buffers[k]
        t0, f0 = time.perf_counter(), _page_faults(thread=True)
        jax.block_until_ready((q, kk, v, tokens))
        t_ready = time.perf_counter()
        q, kk = self.fetch(q)[:, 0], self.fetch(kk)[:, 0]  # [μ, heads, dims] (k/v: the rows written picked by `rows`)
        v = None if v is None else self.fetch(v)[:, 0]  # None: the values are the keys' first dims
        tokens = None if tokens is None else host_sampled(tokens, logprobs)
        t1 = time.perf_counter()
        st.cpu_fetch[layer] += t1 - t_ready
        pos, slots = positions[rows, 0], self.kv_slots[k]
        self.cache.write(layer, slots[rows], pos, kk, v, rows=rows)
        t2 = time.perf_counter()
        st.cpu_write[layer] += t2 - t1
        # buf.out's last copy to pinned memory (asynchronous) has read it; a view of pinned memory: every GPU step
        # that took it has had its outputs awaited, by this call (above) or an earlier one of micro-batch k
        if self.handed[k] is not None:
            self.handed[k].block_until_ready()
        t3 = time.perf_counter()
        buf.lengths[:] = 0
        buf.lengths[rows] = pos + 1
        n = len(slots)
        self.cache.attend(layer, slots, q[:n], buf.lengths, out=buf.out[:n, 0], scale=cfg.attention_scale)
        t4 = time.perf_counter()
        st.cpu_kernel[layer] += t4 - t3
        if buf.pinned is None:  # pinned, for the next GPU step to take in
            out = self.handed[k] = jax.device_put(buf.out, self.eng.on_host)
        else:
            out = buf.pinned
        st.cpu_handoff[layer] += time.perf_counter() - t4 + t3 - t2
        st.gpu_wait[layer] += t_ready - t0
        st.cpu[layer] += time.perf_counter() - t_ready
        if f0 is not None:
            st.cpu_faults[layer] += _page_faults(thread=True) - f0
        return out, tokens

    def _prefill_writeback(self, layer: int, call: _PrefillCall, kk, v):
        """The call's prompts' k/v [rows, T, Hk, D] into their KV slots, in one write (a parallel pass each for
        k and v: a write per prompt cost two passes per prompt, 1528 prompts a layer in bench_offload). The
        stats count the write, not the wait for the GPU's k/v before it."""
        flat = [None if x is None else self.fetch(x).reshape(-1, *x.shape[2:]) for x in (kk, v)]  # waits for the GPU
        t0, T = time.perf_counter(), kk.shape[1]
        r, t = np.nonzero(np.arange(T)[None] < call.lens[:, None])  # each prompt's positions, in the padded call
        self.cache.write(layer, self.kv_slots[call.k][call.rows][r], t, *flat, rows=r * T + t)
        self.eng.stats.prefill_write[layer] += time.perf_counter() - t0

    # ---- GPU calls of one layer ----

    def _prefill_calls(self, i: int, table, calls: int) -> int:
        """Dispatch layer i of the prefill calls that are there; returns the layer's GPU call count."""
        eng, L = self.eng, self.eng.cfg.num_layers
        for call in self.prefills:
            if call.layer != i:
                continue
            staged, w0 = call.positions.size * self.staged_position_bytes, time.perf_counter()
            while self.writes and sum(b for _, b in self.writes) + staged > pinned_pool.STAGED_BYTES:
                self.writes.pop(0)[0].result()  # the pool holds the k/v until they are written
            eng.stats.prefill_wait[i] += time.perf_counter() - w0
            call.x, kk, v, fetched = eng._prefill(eng.dense[i], eng.slots, table, call.x, call.positions,
                                                  eng._chunk(calls))  # its k/v, `staged` bytes, take pinned memory
            eng._store(calls, fetched)
            calls += 1
            eng.stats.prefill_calls += 1
            self.writes.append((self.cpu.submit(self._prefill_writeback, i, call, kk, v), staged))
            call.layer += 1
            if call.layer == L:  # the prompt is through: its rows join at the next last-layer call
                n = len(call.rows)
                h = self.h_join[call.k] if self.h_join[call.k] is not None else self.no_join[0]
                self.h_join[call.k] = h.at[call.rows].set(call.x[np.arange(n), call.lens - 1])
                self.state[call.k][call.rows] = JOIN
        self.prefills = [c for c in self.prefills if c.layer < L]
        return calls

    def _join(self, k: int):
        """(h_join, mask) for micro-batch k's last-layer call; its JOIN rows become ACTIVE."""
        mask = self.state[k] == JOIN
        if not mask.any():
            return self.no_join
        self.state[k][mask] = ACTIVE
        h, self.h_join[k] = self.h_join[k], None
        return h, self._pad(mask)

    def run(self):
        eng, cfg = self.eng, self.eng.cfg
        L, n_mb = cfg.num_layers, len(self.first)
        futs, xs = {}, [None] * n_mb
        t0, step, finished = time.perf_counter(), 0, False
        try:
            while True:
                for i in range(L):
                    table = eng._begin_layer(i)
                    calls = 0
                    if 0 < i == L - 1:  # prompts finishing here join this layer's sampling: before it
                        calls = self._prefill_calls(i, table, calls)
                    for k in range(n_mb):
                        fut = futs.pop((i, k), None)
                        if fut is not None:
                            w0 = time.perf_counter()
                            attn, tokens = fut.result()
                            eng.stats.main_wait[i] += time.perf_counter() - w0
                            if i == 0:  # the tokens sampled at the end of the previous step
                                yield from self._record(k, tokens)
                        decoding = fut is not None and (self.state[k] == ACTIVE).any()
                        if not decoding and not (i == L - 1 and (self.state[k] == JOIN).any()):
                            continue
                        if i < L - 1:
                            pos, nxt, tokens = self._positions(k), i + 1, None
                            xs[k], q, kk, v, fetched = eng._mid(eng.dense[i], eng.dense[nxt], eng.slots, table,
                                                                xs[k], attn, pos, eng._chunk(calls))
                        else:  # the next token, for the decoding rows and the rows that join now
                            join = self._join(k)
                            pos, nxt, samp = self._positions(k, ahead=1), 0, (*self.samp[k], self._counters(k))
                            if decoding:
                                tokens, xs[k], q, kk, v, fetched = eng._last(
                                    eng.dense[i], eng.glob, eng.dense[0], eng.slots, table, xs[k], attn, pos, samp,
                                    eng._chunk(calls), join)
                            else:  # no decode in flight in this micro-batch: the joining rows alone
                                tokens, xs[k], q, kk, v = eng._start(eng.glob, eng.dense[0], join[0], pos, *samp)
                        rows = np.flatnonzero(self.state[k] == ACTIVE)
                        futs[nxt, k] = self.cpu.submit(self._attend, nxt, k, rows, pos, q, kk, v, tokens,
                                                       any(self.logprobs[k][b] is not None for b in rows))
                        if decoding:  # the call carried chunk `calls` of the next layer's experts
                            eng._store(calls, fetched)
                            fetched = None  # the engine's reference alone: freed once the next layer installs it
                            calls += 1
                    if i == 0:
                        self._fill()
                    if not 0 < i == L - 1:  # after the decode calls, so that CPU attention starts first
                        calls = self._prefill_calls(i, table, calls)
                    if i == 0 and not futs and not self.prefills and not any((s == JOIN).any() for s in self.state):
                        eng.stats.decode_s += time.perf_counter() - t0  # the last, partial step
                        finished = True
                        return
                    eng._complete_fetch()
                # the first fill's prompts, through every layer, and their first tokens: one step, two with one
                # layer (its first tokens come at the next step's only layer)
                if step < (2 if L == 1 else 1):
                    for w, _ in self.writes:  # their k/v writes still queued on the CPU worker: the prefill's time
                        w.result()
                    now = time.perf_counter()
                    eng.stats.prefill_s += now - t0
                else:
                    now = time.perf_counter()
                    eng.stats.decode_s += now - t0
                    eng.stats.decode_steps += 1
                t0, step = now, step + 1
        finally:  # the worker's tasks hold this run's buffers: wait for them; stopped by an error (or Ctrl-C),
            # let that one through rather than a task's own error
            for f in [*futs.values(), *(w for w, _ in self.writes)]:
                f.result() if finished else f.exception()
