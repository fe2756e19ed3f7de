"""HRM policy search: the offload policy with the highest predicted end-to-end throughput.

Time, per layer (MoE-Lightning §3-4, DESIGN.md §1). A decode step of N = μ·n_ub sequences costs about
`T = max(T_h2d, T_cpu, T_gpu)` per layer, the three overlapped by CGOPipe, with two refinements
(`decode_layer`): the next layer's experts travel in min(n_ub, streamed experts) chunks, one per GPU call,
so calls without a chunk overlap no copy; each micro-batch's GPU call and CPU attention run in
sequence within the layer (with one micro-batch nothing overlaps: T = max(T_gpu, T_h2d) + T_cpu); and
the layer starts by installing its fetched experts into their slots (GPU memory time, the link idle):
  T_h2d: link seconds, max(host→GPU, GPU→host bytes) / link_bandwidth: the layer's streamed experts
         (all but its resident ones), plus q, k, v down and the attention output up (CPU attention), or the host KV
         cache up and the new k, v down (GPU attention over a host cache).
  T_cpu: CPU attention of the N sequences over the mean decode context P̄ + G/2 (roofline on the CPU; P̄
         the mean prompt of the N sequences).
  T_gpu: n_ub × (the GPU roofline time of one micro-batch of μ + a fixed launch time): every
         micro-batch re-reads the weights it touches from GPU memory, so larger μ amortises them; the
         grouped expert matmuls run at the fraction of the dense rate measured for their rows per expert
         (`hardware.grouped_matmul_efficiency`: 0.55 up to 256 rows, 0.83 from 4096), so larger μ also
         computes faster.
Dense layers (`ModelConfig.dense_layers`, e.g. DeepSeek's first ones) stream nothing and compute their FFN on
the GPU: their term is the same with no experts to install or carry and the dense FFN's GPU time; the
resident fraction, the experts' slots and the pinned pool count the MoE layers only.
Prefill runs every op on the GPU, each micro-batch in calls of at most 1 GiB of working set
(`moe_jax.offload_memory.prefill_calls`, each re-reading the layer's weights; the engine sorts a micro-batch's
prompts by length and pads each call to its longest, with as many rows as that padding allows; priced as a
first call at the longest prompt's padding and the others at the mean of the prompts' own),
streaming the next layer's experts and writing KV to the host: `T = max(T_h2d, T_gpu)` per layer. A run is the prefill (first token) and G − 1
decode steps; each adds the LM head of the N sequences.

Memory. GPU (at most `GPU_USABLE` of the cap): non-expert weights, the expert slots of the engine's page
table (`moe_jax.expert_pages`: R resident (layer, expert) pairs, M = E − ⌊R/L⌋ streamed slots and M
experts in flight, these coded under the exp4 codec, which adds its escapes and one decoded expert),
the working sets of a decode micro-batch and of the prefill (`moe_jax.offload_memory`, the formula the
engine checks: hidden states of the batch's prompts, at most the N largest of their own paddings plus the
calls' padding where the job's lengths are given, else all at the longest one's padding: upper bounds),
one prefill call's activations and attention scores materialised in f32 as `model.attention` does), GPU
attention's scores and a GPU KV cache. Host (at most `HOST_USABLE`): the host KV cache (NumPy, outside the
pinned pool) and XLA's pinned-host pool, which reserves about its cap (`moe_jax.pinned_pool`): the cap the
engine sets for the streamed experts (5% + 2 GiB above them), or the cap already in force when JAX started
before the policy was chosen (then it must be at least that).

Search. A NumPy grid over μ (1..8192, 3% steps), n_ub (1..128) and the three (attention, KV)
placements. For each point R is the most resident experts that fit the GPU, counted in single experts of
single layers (r_w = R / (L·E)): the engine spreads them evenly, so R mod L layers stream one expert fewer
than the others, and each resident expert both shortens T_h2d and leaves the pinned pool, making room
for KV on the host. The best point maximises end-to-end tok/s; among the points within `TIE_TOLERANCE`
of it the fewest micro-batches win (each costs the engine a GPU call and a CPU task that the model's
launch time hardly sees), then the smallest N. `predict` prices one given policy with the same formulas.

Against the original (Mixtral 8x7B on l4, prompt 77, gen 32). The original's LP
(fastmoe/backend/optimizer.py in the MoE-Lightning artifact) chose μ=324, n_ub=14 (N=4536), r_w=0.056;
its per-layer terms were T_h2d=0.155 s, T_gpu=0.13 s, T_cpu=0.02 s, and it reports
N·G / ((G−1)·L·T) = 944.7 tok/s. This model picks μ=1344, n_ub=5 (N=6720), r_w=0.086 (22 experts),
with T_h2d=0.164 s, T_gpu=0.083 s, T_cpu=0.035 s: 1147 tok/s decode (1.21×), 572 tok/s end to end
(its prefill's expert matmuls, ~500 rows per expert per call, priced at 0.65 of the dense rate). Why:
- bandwidths here are GB/s = 1e9 B/s, the original's GiB/s: the same "16 GB/s" link is 7% slower
  (T_h2d = 0.176 s at r_w=0, plus 2.5 ms of q and attention-output traffic);
- decode tok/s here is N / T_step, without the original's G/(G−1) credit for the prefill's token;
- GPU memory: the original prefills a whole micro-batch of μ prompts per call, so the prefill working
  set grows with μ and bounds μ·n_ub; the engine here prefills in calls of at most 1 GiB of working set
  (`moe_jax.offload_memory`), so μ costs the GPU little memory: what is left holds more experts (22
  here) and the batch's hidden states, and N grows until the link binds. Once it binds, how N splits
  into micro-batches barely changes the prediction and the fewest win (see Search): each micro-batch
  re-reads all 8 experts from GPU memory (~10 ms on l4), so 5 large ones leave T_gpu far below the
  original's 14 × ~10 ms. The reserve is 10%
  (original 14%); every parameter of `moe_jax.params` counts (the original omits embeddings, LM head,
  router and norms);
- the CPU term uses the mean decode context P + G/2 (the original: P + G) at 76 GB/s (original 100);
- each layer first installs its fetched experts into their GPU slots (a read and a write of them in GPU
  memory, 17 ms on l4's 300 GB/s), during which the link waits; the original does not count it.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from moe_jax.config import ModelConfig
from moe_jax.hrm.costs import decode_ops, itemsize, kv_bytes_per_token, lm_head_op, prefill_ops
from moe_jax.hrm.hardware import GiB, Hardware, hardware_profile
from moe_jax import pinned_pool
from moe_jax.offload_memory import decode_bytes, prefill_bytes, prefill_calls
from moe_jax.offload_policy import Policy, kv_storage_dtype
from moe_jax.expert_codec import check as check_codec, decode_overhead_bytes, expert_shapes, streamed_expert_bytes
from moe_jax.params import expert_bytes, gib, non_expert_bytes

GPU_USABLE = 0.9  # of the GPU memory cap: XLA workspace and fragmentation
HOST_USABLE = 0.9  # of host memory: OS, Python, the JAX runtime
TIE_TOLERANCE = 0.005  # throughputs this close count as equal; fewer micro-batches, then the smaller batch, win
MICRO_BATCH_SIZES = np.unique(np.round(np.geomspace(1, 8192, 320)))
NUM_MICRO_BATCHES = np.arange(1, 129)
PLACEMENTS = (("cpu", "cpu"), ("gpu", "cpu"), ("gpu", "gpu"))  # (attention_device, kv_device)


class InfeasibleError(ValueError):
    """No policy fits the workload in the memory limits; the message says which limit and by how much."""


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """The chosen policy and its prediction. per_layer_seconds: the decode terms {"h2d", "cpu", "gpu"} of
    one layer at the mean context; bottleneck: the largest of them. Memory in bytes, time in seconds;
    pinned_pool_bytes (part of host memory) is what to reserve for the pinned-host pool
    (XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB)."""

    policy: Policy
    per_layer_seconds: dict[str, float]
    bottleneck: str
    prefill_seconds: float
    step_seconds: float
    decode_seconds: float
    decode_tokens_per_s: float
    tokens_per_s: float
    gpu_memory_bytes: float
    host_memory_bytes: float
    pinned_pool_bytes: float

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self.policy), "per_layer_seconds": dict(self.per_layer_seconds),
                "bottleneck": self.bottleneck, "predicted_decode_tokens_per_s": self.decode_tokens_per_s,
                "predicted_tokens_per_s": self.tokens_per_s, "prefill_seconds": self.prefill_seconds,
                "step_seconds": self.step_seconds, "decode_seconds": self.decode_seconds, "gpu_memory_gib": self.gpu_memory_bytes / GiB,
                "host_memory_gib": self.host_memory_bytes / GiB, "pinned_pool_gib": self.pinned_pool_bytes / GiB}


def _most_resident(c, L: int, E: int, f: float = 2.0):
    """The largest R in [0, L·E] with R − f·⌊R/L⌋ ≤ c, elementwise; −1 where none is.

    R − f⌊R/L⌋ is the GPU's expert memory beyond the f·E of a double buffer with nothing resident, in
    experts: R resident slots and M = E − ⌊R/L⌋ streamed ones plus M in flight, each of those f − 1 of an
    expert (f = 2 uncoded; 1.75 under the exp4 codec, `moe_jax.expert_pages`). Writing R = k·L + j
    (0 ≤ j < L) it is k·(L − f) + j: it rises within each k and falls where j wraps."""
    c = np.asarray(c, float)
    if L <= f:  # every R's memory is at least that of R = L·E
        return np.where(c >= E * (L - f), L * E, -1)
    k = np.clip(np.floor(c / (L - f)), 0, E)
    R = np.minimum(k * L + np.minimum(L - 1, np.floor(c - k * (L - f))), L * E)
    return np.where(c < 0, -1, R).astype(int)


def _evaluate(cfg: ModelConfig, hw: Hardware, dtype, P, G, mu, n_ub, attn_gpu, kv_gpu, *, resident=None,
              batch=None, gpu_budget=np.inf, host_budget=np.inf, prefill_len=None, pinned_pool_bytes=None,
              kv_positions=None, prompt_positions=None, prefill_positions=None, prefill_peak_positions=None,
              codec="none", kv_cache_dtype="auto") -> dict:
    """Times (seconds) and memory (bytes) of policies, as broadcast arrays over the arguments.

    mu, n_ub: micro-batch size and count; attn_gpu, kv_gpu: booleans of the placement; resident: R, the
    (layer, expert) pairs resident on the GPU (None: the most the GPU budget holds); batch: N sequences
    (default μ·n_ub, the last micro-batch full); pinned_pool_bytes: the pinned-host pool's cap if fixed
    already (None: sized for the streamed experts). The engine spreads
    R over the layers (`ExpertPages.plan`): R mod L layers hold ⌊R/L⌋ + 1, the others ⌊R/L⌋, and each
    layer streams the rest of its experts; decode contexts average P̄ + G/2, P̄ the mean prompt of the N
    sequences (prompt_positions[N] / N, default P); the KV cache holds kv_positions[min(N, R)] positions for
    N sequences (kv_positions [R + 1], a job's `JobShape`; default P + G per sequence); the prefill runs calls
    sized for prompts of `prefill_len` tokens (default P; the padding its GPU memory is planned for), each
    micro-batch's first call padded to prefill_len and the others to the mean of the prompts' own paddings
    (prefill_positions[N] / N; default prefill_len), with as many rows as those paddings allow: an
    approximation of the engine's calls, each padded to its longest prompt; the prefill's hidden states
    on the GPU bounded by the N largest of prefill_peak_positions (`offload_memory.prefill_bytes`; default
    every prompt at prefill_len); `codec`: how the
    streamed experts are held and sent (`moe_jax.expert_codec`: fewer bytes on the link and in the pool,
    decoded into full slots on the GPU); `kv_cache_dtype`: how the host KV cache stores K and V (`Policy`;
    its bytes per token in host memory and for CPU attention to read; the new k, v cross the link in
    `dtype` and are quantised on the host)."""
    L, Lm, E, it = cfg.num_layers, cfg.num_moe_layers, cfg.num_experts, itemsize(dtype)  # all, MoE layers
    Ld = L - Lm  # dense layers: no experts, their FFN among the non-expert weights
    kvt, q_bytes = kv_bytes_per_token(cfg, dtype), cfg.q_size * it  # on the link: a token's k, v and q
    out_bytes = cfg.num_heads * cfg.value_dim * it  # and its attention output
    kv_stored = kv_bytes_per_token(cfg, dtype, kv_cache_dtype)  # in the cache
    w = expert_bytes(cfg, dtype)  # one expert of one layer, in a GPU slot
    w_link = streamed_expert_bytes(cfg, dtype, codec)  # the same in the pinned pool, on the link, in flight
    N = mu * n_ub if batch is None else batch
    T = prefill_len or P
    P_mean, T_mean = _mean_of_first(prompt_positions, N, P), _mean_of_first(prefill_positions, N, T)
    ctx, ctx_max = P_mean + G / 2, P + G

    dec = decode_ops(cfg, dtype, mu, ctx, kv_cache_dtype)
    attn_gpu_s = np.where(attn_gpu, hw.gpu_seconds(dec["attention"]), 0.0)

    def gpu_decode(moe: bool):  # n_ub micro-batches through a MoE or dense layer's GPU ops
        ops = dec if moe else decode_ops(cfg, dtype, mu, ctx, kv_cache_dtype, moe=False)
        return n_ub * (sum(hw.gpu_seconds(op) for name, op in ops.items() if name != "attention")
                       + hw.launch_seconds + attn_gpu_s)

    t_gpu, t_gpu_dense = gpu_decode(True), gpu_decode(False) if Ld else 0.0
    t_cpu = np.where(attn_gpu, 0.0, n_ub * hw.cpu_seconds(dec["attention"], kv_cache_dtype))
    up = np.where(attn_gpu, np.where(kv_gpu, 0.0, N * ctx * kvt), N * out_bytes)
    down = np.where(attn_gpu, np.where(kv_gpu, 0.0, N * kvt), N * (q_bytes + kvt))
    # The engine pads each call to its longest prompt: a micro-batch's first call to about the job's longest
    # (the partition gives each micro-batch one of the longest), the others to about their own prompts' buckets,
    # each as many rows as its bucket allows; each call re-reads the layer's weights.
    first, rest, calls, tail_calls, tail_rows = prefill_calls(cfg, mu, T, T_mean)
    call_s = lambda moe, rows, T_call: (sum(hw.gpu_seconds(op) for op in prefill_ops(cfg, dtype, rows, T_call, moe).values())
                                        + hw.launch_seconds)
    tail_s = lambda moe: np.where(tail_calls > 0, tail_calls * call_s(moe, tail_rows / np.maximum(tail_calls, 1), T_mean), 0.0)
    gpu_prefill = lambda moe: n_ub * (call_s(moe, first, T) + calls * call_s(moe, rest, T_mean) + tail_s(moe))
    t_gpu_pre, t_gpu_pre_dense = gpu_prefill(True), gpu_prefill(False) if Ld else 0.0
    t_head = n_ub * hw.gpu_seconds(lm_head_op(cfg, dtype, mu))

    # GPU attention's scores, and the copy of a host KV cache it reads
    attn_dec = np.where(attn_gpu, 4 * mu * cfg.num_heads * ctx_max + np.where(kv_gpu, 0.0, 2 * mu * ctx_max * kvt), 0.0)
    if kv_positions is None:
        kv_cache = N * ctx_max * L * kv_stored
    else:
        kv_positions = np.asarray(kv_positions)
        kv_cache = kv_positions[np.minimum(N, kv_positions.size - 1).astype(int)] * L * kv_stored
    gpu_fixed = (non_expert_bytes(cfg, dtype) + decode_bytes(cfg, mu) + attn_dec
                 + prefill_bytes(cfg, dtype, N, mu, T, prefill_peak_positions) + np.where(kv_gpu, kv_cache, 0.0)
                 + decode_overhead_bytes(cfg, dtype, codec, Lm * E))
    host_fixed = np.where(kv_gpu, 0.0, kv_cache)
    f = 1 + w_link / w  # a streamed expert's slot and its copy in flight, in experts
    if resident is None:
        resident = _most_resident((gpu_budget - gpu_fixed) / w - f * E, Lm, E, f)
    R = np.asarray(resident)
    gpu_memory = gpu_fixed + w * R + (w + w_link) * (E - R // Lm)
    streamed = w_link * (Lm * E - R)
    pool = pinned_pool.cap_bytes(streamed) if pinned_pool_bytes is None else pinned_pool_bytes
    host_memory = host_fixed + pool
    feasible = ((R >= 0) & (gpu_memory <= gpu_budget) & (host_memory <= host_budget)
                & (pinned_pool.cap_bytes(streamed) <= pool))

    more, q = R % Lm, R // Lm  # `more` MoE layers hold q + 1 resident experts, the other Lm − more hold q

    def layers(moe_seconds, dense_seconds):  # Σ over the MoE layers of moe_seconds(experts it streams), + dense
        return (Lm - more) * moe_seconds(E - q) + more * moe_seconds(E - q - 1) + Ld * dense_seconds

    h2d = lambda s: np.maximum(s * w_link + up, down) / hw.link_bandwidth
    h2d_pre = lambda s: np.maximum(s * w_link, np.where(kv_gpu, 0.0, N * P_mean * kvt)) / hw.link_bandwidth

    def install(s):
        """The GPU writing a layer's s fetched experts into their slots before its first call (reading them as
        they came, coded or not, and writing them whole; one call, or one per coded expert and weight), while
        the link waits for that call."""
        calls = s * len(expert_shapes(cfg)) if codec != "none" else np.minimum(s, 1)
        return s * (w_link + w) / hw.gpu_bandwidth + calls * hw.launch_seconds

    def decode_layer(s, t_gpu=t_gpu):
        """A decode layer streaming s experts: its install, then its n_ub GPU calls, the first min(n_ub, s)
        each carrying a chunk of the next layer's experts (`ExpertPages.chunks`) and every one 1/n_ub of the
        rest of the link traffic, a call lasting as long as its compute or its copies; the CPU attention
        overlapped with them, and each micro-batch's own call and attention in sequence within the layer."""
        c = np.minimum(n_ub, s)
        experts = s * w_link / hw.link_bandwidth
        rest = h2d(s) - experts
        g = t_gpu / n_ub
        carrying = np.maximum(g, experts / np.maximum(c, 1) + rest / n_ub)
        plain = np.maximum(g, rest / n_ub)
        calls = c * carrying + (n_ub - c) * plain
        return install(s) + np.maximum(np.maximum(calls, t_cpu), np.where(c > 0, carrying, plain) + t_cpu / n_ub)

    step = layers(decode_layer, decode_layer(0, t_gpu_dense)) + t_head
    prefill = layers(lambda s: install(s) + np.maximum(h2d_pre(s), t_gpu_pre),
                     np.maximum(h2d_pre(0), t_gpu_pre_dense)) + t_head
    out = dict(N=N, mu=mu, n_ub=n_ub, r=R / (Lm * E), feasible=feasible,
               h2d=layers(h2d, h2d(0)) / L, cpu=t_cpu, gpu=(Lm * t_gpu + Ld * t_gpu_dense) / L,
               prefill=prefill, step=step, decode=(G - 1) * step, decode_tps=N / step,
               tps=np.where(feasible, N * G / (prefill + (G - 1) * step), 0.0),
               gpu_memory=gpu_memory, host_memory=host_memory, pinned_pool=pool, streamed=streamed,
               gpu_min=gpu_fixed + min((w + w_link) * E, w * Lm * E))
    return dict(zip(out, np.broadcast_arrays(*out.values())))


def _mean_of_first(totals, N, default):
    """The mean per sequence of the first N of a job's sequences, from totals [R + 1] of its first 0..R (N > R:
    of all R); None: `default` each."""
    if totals is None:
        return default
    n = np.clip(N, 1, len(totals) - 1).astype(int)
    return np.asarray(totals)[n] / n


def _check_totals(**arrays) -> int | None:
    """Arrays as `JobShape` gives them (kv_positions, prompt_positions, prefill_positions): [R + 1] totals over
    the first 0..R sequences of a job, increasing from 0, all of one length. Returns R (None: no arrays)."""
    sizes = set()
    for name, totals in arrays.items():
        if totals is None:
            continue
        totals = np.asarray(totals)
        if totals.ndim != 1 or totals.size < 2 or totals[0] != 0 or (np.diff(totals) < 1).any():
            raise ValueError(f"{name} must be totals over batches of 0..R sequences: increasing from 0, "
                             f"got {totals!r}")
        sizes.add(totals.size)
    if len(sizes) > 1:
        raise ValueError(f"{', '.join(arrays)} must have one length (R + 1), got {sorted(sizes)}")
    return sizes.pop() - 1 if sizes else None


def _infeasible(g: dict, placement: int, gpu_budget: float, host_budget: float, gpu_cap: float,
                host_cap: float, resident_fixed: bool = False) -> str:
    """Why even one sequence (μ = 1, the fewest micro-batches searched) fits nowhere with PLACEMENTS[placement]
    (`resident_fixed`: with the resident experts given, not the most the GPU holds)."""
    i = (placement, 0, 0)
    usable = f"{gib(gpu_budget)} GiB are usable ({GPU_USABLE:.0%} of {gib(gpu_cap)} GiB)"
    if g["gpu_min"][i] > gpu_budget:
        return (f"GPU memory too small: one sequence needs {gib(g['gpu_min'][i])} GiB on the GPU (non-expert "
                f"weights, a double buffer of one layer's experts, activations) but {usable}")
    if resident_fixed and g["gpu_memory"][i] > gpu_budget:
        return (f"GPU memory too small for the given resident experts: one sequence needs {gib(g['gpu_memory'][i])} "
                f"GiB on the GPU with {g['r'][i]:.3g} of the experts resident but {usable}")
    if pinned_pool.cap_bytes(g["streamed"][i]) > g["pinned_pool"][i]:
        return (f"pinned host pool too small: its cap of {gib(g['pinned_pool'][i])} GiB ({pinned_pool.LIMIT_VAR}, "
                f"fixed when JAX started) cannot hold the {gib(g['streamed'][i])} GiB of experts the GPU does "
                f"not hold (with its margin: {pinned_pool.cap_bytes(g['streamed'][i]) / GiB:.0f} GiB); set "
                f"{pinned_pool.LIMIT_VAR} before JAX starts")
    g_r = float(g["r"][i])
    return (f"host memory too small: one sequence needs {gib(g['host_memory'][i])} GiB on the host (the "
            f"pinned pool for the streamed expert weights, the KV cache) with "
            f"{f'{g_r:.3g} of the experts' if resident_fixed else 'all the experts the GPU can hold'} resident, but {gib(host_budget)} GiB are usable ({HOST_USABLE:.0%} of {gib(host_cap)} GiB)")


def _memory_cap(name: str, gb: float | None, available: float) -> float:
    if gb is None:
        return available
    if not gb > 0 or gb * GiB > available * (1 + 1e-9):
        raise ValueError(f"{name} must be in (0, {available / GiB:.1f}] GiB (the hardware's), got {gb}")
    return gb * GiB


def choose_policy(cfg: ModelConfig, hardware: Hardware | str, prompt_len: int, gen_len: int, *,
                  prefill_len: int | None = None, kv_positions=None, prompt_positions=None,
                  prefill_positions=None, prefill_peak_positions=None, gpu_memory_gb: float | None = None,
                  host_memory_gb: float | None = None, pinned_pool_gb: float | None = None,
                  max_batch_size: int | None = None, placements=PLACEMENTS, dtype="bfloat16",
                  expert_codec: str = "none", kv_cache_dtype: str = "auto", num_micro_batches: int | None = None,
                  resident_expert_fraction: float | None = None) -> SearchResult:
    """The policy maximising predicted end-to-end tok/s for prompts of `prompt_len` tokens and `gen_len`
    generated tokens each, within GPU and host memory (GiB caps, default the hardware's), at most
    `max_batch_size` sequences and one of `placements` ((attention_device, kv_device) pairs, e.g. only
    ("cpu", "cpu") for an engine without GPU attention). Lengths are taken as given: an engine that pads
    prompts for the prefill passes the padded length as `prefill_len` (default prompt_len). A job of
    different lengths passes, for a batch of its first n sequences (n = 0..R, N at most R;
    `moe_jax.offload_engine.hrm_lengths`), arrays [R + 1] of their totals: `kv_positions`, the KV positions
    the engine allocates (default prompt_len + gen_len per sequence); `prompt_positions`, their prompt
    tokens (decode contexts; default prompt_len each); `prefill_positions`, their prompt tokens each padded
    to its own bucket (the prefill's compute beyond each micro-batch's first call, which is padded to
    prefill_len; default prefill_len each); `prefill_peak_positions`, totals whose entry n bounds the own buckets
    of any n of the job's prompts prefilling at once (`JobShape`: the n largest, or for a job of the first n, theirs;
    the prefill's hidden states on the GPU, `offload_memory.prefill_bytes`; default every prompt at prefill_len).
    `pinned_pool_gb`: the pinned-host pool's cap when it is fixed already (JAX started before the policy
    was chosen; `moe_jax.pinned_pool.fixed_cap_bytes`); None: the engine sizes it for the chosen policy.
    `expert_codec`: how the engine will hold and send the streamed experts (`moe_jax.expert_codec`);
    `kv_cache_dtype`: how its host KV cache stores K and V ("int8": CPU attention only); the policy carries both.
    `num_micro_batches`, `resident_expert_fraction`: fixed where an engine has placed its weights for them
    (`OffloadEngine.rebatch`: a policy that keeps them, its codec and its cap runs on the loaded weights), so
    that the search picks only N and μ; None: searched.
    Raises InfeasibleError if no policy fits, ValueError on bad arguments."""
    hw = hardware_profile(hardware)
    check_codec(expert_codec, dtype)
    kv_storage_dtype(kv_cache_dtype, dtype)
    if not placements or any(p not in PLACEMENTS for p in placements):
        raise ValueError(f"placements must be a non-empty subset of {PLACEMENTS}, got {placements!r}")
    if kv_cache_dtype == "int8":
        if ("cpu", "cpu") not in placements:
            raise ValueError(f"kv_cache_dtype='int8' needs CPU attention over a host KV cache, which placements "
                             f"{placements!r} leave out")
        placements = [("cpu", "cpu")]
    for name, v in (("prompt_len", prompt_len), ("gen_len", gen_len)):
        if not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if prefill_len is not None and (not isinstance(prefill_len, (int, np.integer)) or prefill_len < prompt_len):
        raise ValueError(f"prefill_len must be an integer >= prompt_len ({prompt_len}), got {prefill_len!r}")
    if prompt_len + gen_len > cfg.max_positions:
        raise ValueError(f"prompt_len + gen_len = {prompt_len + gen_len} exceeds the model's context of "
                         f"{cfg.max_positions} positions")
    if pinned_pool_gb is not None and not pinned_pool_gb > 0:
        raise ValueError(f"pinned_pool_gb must be a positive number of GiB or None, got {pinned_pool_gb!r}")
    if max_batch_size is not None and max_batch_size < 1:
        raise ValueError(f"max_batch_size must be a positive integer, got {max_batch_size!r}")
    if num_micro_batches is not None and not (isinstance(num_micro_batches, (int, np.integer))
                                              and 1 <= num_micro_batches <= NUM_MICRO_BATCHES[-1]):
        raise ValueError(f"num_micro_batches must be an integer in [1, {NUM_MICRO_BATCHES[-1]}] or None, "
                         f"got {num_micro_batches!r}")
    if resident_expert_fraction is not None and not (isinstance(resident_expert_fraction, (int, float, np.floating))
                                                     and 0 <= resident_expert_fraction <= 1):
        raise ValueError(f"resident_expert_fraction must be a number in [0, 1] or None, got {resident_expert_fraction!r}")
    R = _check_totals(kv_positions=kv_positions, prompt_positions=prompt_positions,
                      prefill_positions=prefill_positions, prefill_peak_positions=prefill_peak_positions)
    if R is not None:
        max_batch_size = min(max_batch_size or np.inf, R)
    if num_micro_batches is not None and max_batch_size is not None and num_micro_batches > max_batch_size:
        raise InfeasibleError(f"num_micro_batches={num_micro_batches} needs a batch of at least that many sequences "
                              f"(one a micro-batch), but at most {max_batch_size} are allowed (max_batch_size, or "
                              f"the job's sequences)")
    gpu_cap = _memory_cap("gpu_memory_gb", gpu_memory_gb, hw.gpu_memory)
    host_cap = _memory_cap("host_memory_gb", host_memory_gb, hw.host_memory)
    gpu_budget, host_budget = GPU_USABLE * gpu_cap, HOST_USABLE * host_cap

    attn_gpu = np.array([a == "gpu" for a, _ in PLACEMENTS])[:, None, None]
    kv_gpu = np.array([k == "gpu" for _, k in PLACEMENTS])[:, None, None]
    n_ubs = NUM_MICRO_BATCHES if num_micro_batches is None else np.array([num_micro_batches])
    resident = None if resident_expert_fraction is None else _resident_experts(cfg, resident_expert_fraction)
    g = _evaluate(cfg, hw, dtype, prompt_len, gen_len, MICRO_BATCH_SIZES[None, :, None],
                  n_ubs[None, None, :], attn_gpu, kv_gpu, resident=resident, gpu_budget=gpu_budget, host_budget=host_budget,
                  prefill_len=prefill_len, pinned_pool_bytes=pinned_pool_gb * GiB if pinned_pool_gb else None,
                  kv_positions=kv_positions, prompt_positions=prompt_positions,
                  prefill_positions=prefill_positions, prefill_peak_positions=prefill_peak_positions,
                  codec=expert_codec, kv_cache_dtype=kv_cache_dtype)
    allowed = np.array([p in placements for p in PLACEMENTS])[:, None, None]
    tps = np.where(allowed & (g["N"] <= (max_batch_size or np.inf)), g["tps"], 0.0)
    if not tps.max() > 0:
        raise InfeasibleError(_infeasible(g, PLACEMENTS.index(tuple(placements[0])), gpu_budget, host_budget,
                                          gpu_cap, host_cap, resident is not None))
    near = np.flatnonzero(tps >= tps.max() * (1 - TIE_TOLERANCE))
    near = near[g["n_ub"].flat[near] == g["n_ub"].flat[near].min()]
    near = near[g["N"].flat[near] == g["N"].flat[near].min()]
    i = np.unravel_index(near[np.argmax(tps.flat[near])], tps.shape)
    attention, kv = PLACEMENTS[i[0]]
    r = float(g["r"][i]) if resident_expert_fraction is None else float(resident_expert_fraction)
    policy = Policy(int(g["N"][i]), int(g["mu"][i]), int(g["n_ub"][i]), r, attention, kv, gpu_memory_gb,
                    expert_codec, kv_cache_dtype)
    return _result(policy, {k: float(v[i]) for k, v in g.items()})


def predict(cfg: ModelConfig, hardware: Hardware | str, policy: Policy, prompt_len: float, gen_len: int, *,
            dtype="bfloat16", prefill_len: int | None = None, kv_positions=None, prompt_positions=None,
            prefill_positions=None, prefill_peak_positions=None, pinned_pool_gb: float | None = None) -> SearchResult:
    """HRM's prediction for a given `policy` (no memory limit applied): decode over contexts averaging
    prompt_len + gen_len / 2 (prompt_len may be a mean), prefill of prompts padded to `prefill_len`
    (default prompt_len), the lengths of a job of different lengths from the arrays of `choose_policy`,
    the policy's resident experts spread over layers as the engine spreads them, the KV cache and the
    pinned pool as in `choose_policy`."""
    hw = hardware_profile(hardware)
    _check_totals(kv_positions=kv_positions, prompt_positions=prompt_positions, prefill_positions=prefill_positions,
                  prefill_peak_positions=prefill_peak_positions)
    resident = _resident_experts(cfg, policy.resident_expert_fraction)
    g = _evaluate(cfg, hw, dtype, prompt_len, gen_len, policy.micro_batch_size, policy.num_micro_batches,
                  policy.attention_device == "gpu", policy.kv_device == "gpu", resident=resident,
                  batch=policy.batch_size, prefill_len=prefill_len, kv_positions=kv_positions,
                  prompt_positions=prompt_positions, prefill_positions=prefill_positions,
                  prefill_peak_positions=prefill_peak_positions,
                  pinned_pool_bytes=pinned_pool_gb * GiB if pinned_pool_gb else None, codec=policy.expert_codec,
                  kv_cache_dtype=policy.kv_cache_dtype)
    return _result(policy, {k: float(v) for k, v in g.items()})


def _resident_experts(cfg: ModelConfig, fraction: float) -> int:
    """The (layer, expert) pairs an engine keeps on the GPU for `resident_expert_fraction` (as ExpertPages.plan)."""
    return round(fraction * cfg.num_moe_layers * cfg.num_experts)


def _result(policy: Policy, g: dict[str, float]) -> SearchResult:
    terms = {k: g[k] for k in ("h2d", "cpu", "gpu")}
    return SearchResult(policy, terms, max(terms, key=terms.get), g["prefill"], g["step"], g["decode"],
                        g["decode_tps"], g["tps"], g["gpu_memory"], g["host_memory"], g["pinned_pool"])
