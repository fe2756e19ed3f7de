"""Policy search: the paper's example, both memory limits, infeasible workloads."""
import dataclasses
import time

import numpy as np
import pytest

from moe_jax.hrm import PROFILES, InfeasibleError, choose_policy, predict
from moe_jax.hrm import search
from moe_jax.hrm.costs import kv_bytes_per_token, lm_head_op
from moe_jax import pinned_pool
from moe_jax.hrm.search import GPU_USABLE, HOST_USABLE, TIE_TOLERANCE, _most_resident
from moe_jax.offload_policy import Policy
from moe_jax.expert_pages import ExpertPages
from moe_jax.params import layer_bytes, non_expert_bytes
from moe_jax.presets import preset_config

GiB = 2**30
BF16 = "bfloat16"


def test_paper_example_neighbourhood(mixtral):
    """MoE-Lightning on l4, Mixtral 8x7B, prompt 77, gen 32: μ=324, n_ub=14 (N=4536), r_w=0.056, per-layer
    T_h2d=0.155 s, 944.7 tok/s decode (see moe_jax.hrm.search for the differences)."""
    t0 = time.perf_counter()
    r = choose_policy(mixtral, "l4", 77, 32)
    assert time.perf_counter() - t0 < 5
    p = r.policy
    assert 0.5 * 944.7 <= r.decode_tokens_per_s <= 2 * 944.7
    assert 4536 / 2 <= p.batch_size <= 4536 * 2
    # large micro-batches (prefill memory does not bound μ here, see moe_jax.hrm.search), at least two so
    # that CPU attention overlaps the GPU
    assert p.micro_batch_size >= 150 and 2 <= p.num_micro_batches <= 28
    assert p.batch_size == p.micro_batch_size * p.num_micro_batches
    assert p.resident_expert_fraction <= 0.15
    assert (p.attention_device, p.kv_device) == ("cpu", "cpu")
    # the link binds near the original's 0.155 s; the GPU and CPU attention below it
    t = r.per_layer_seconds
    assert 0.155 / 2 <= t["h2d"] <= 0.155 * 2 and r.bottleneck == "h2d"
    assert t["cpu"] < t["h2d"] / 3 and t["gpu"] < t["h2d"]
    assert r.tokens_per_s < r.decode_tokens_per_s


def _assert_fits(cfg, r, prompt_len, gen_len, gpu_cap, host_cap):
    """Independent lower bounds on what the policy holds, from params.py and the engine's expert pages,
    within the usable caps."""
    p, L, E = r.policy, cfg.num_layers, cfg.num_experts
    resident = p.resident_expert_fraction * cfg.num_moe_layers * E
    assert resident == pytest.approx(round(resident))  # whole experts of whole layers
    pages = ExpertPages.for_model(cfg, p.resident_expert_fraction, p.num_micro_batches)
    w = layer_bytes(cfg, BF16, expert=True) / E
    kv = p.batch_size * (prompt_len + gen_len) * L * kv_bytes_per_token(cfg, BF16)
    gpu = (non_expert_bytes(cfg, BF16) + (pages.num_slots + pages.max_streamed) * w
           + p.batch_size * prompt_len * cfg.hidden_size * 2 + (kv if p.kv_device == "gpu" else 0))
    host = pinned_pool.cap_bytes(sum(map(len, pages.streamed)) * w) + (kv if p.kv_device == "cpu" else 0)
    assert gpu <= r.gpu_memory_bytes * (1 + 1e-12) and r.gpu_memory_bytes <= GPU_USABLE * gpu_cap
    assert host <= r.host_memory_bytes * (1 + 1e-12) and r.host_memory_bytes <= HOST_USABLE * host_cap


@pytest.mark.parametrize("hardware, gpu_gb, host_gb", [
    ("l4", None, None), ("l4", 16, 150), ("t4", None, 120), ("h100-80gb", 16, None), ("h100-80gb", None, 110),
    ("a100-40gb", 30, 160),
])
def test_memory_limits_respected(mixtral, hardware, gpu_gb, host_gb):
    hw = PROFILES[hardware]
    r = choose_policy(mixtral, hw, 77, 64, gpu_memory_gb=gpu_gb, host_memory_gb=host_gb)
    _assert_fits(mixtral, r, 77, 64, gpu_gb * GiB if gpu_gb else hw.gpu_memory,
                 host_gb * GiB if host_gb else hw.host_memory)
    assert r.policy.gpu_memory_gb == gpu_gb


def test_dense_layers_stream_nothing_and_hold_their_ffn(mixtral):
    """Two dense layers (as DeepSeek's first ones): the GPU holds their FFN with the non-expert weights, the
    resident fraction and the pinned pool count the 30 MoE layers, and those two layers' link term is their
    q/k/v and attention traffic alone (that of a layer with every expert resident)."""
    dense = mixtral.replace(dense_layers=(0, 1), dense_ffn_size=14336)
    r = choose_policy(dense, "l4", 77, 64, gpu_memory_gb=16)
    _assert_fits(dense, r, 77, 64, 16 * GiB, PROFILES["l4"].host_memory)
    policy = Policy(1024, 256, 4, 0.25)  # 60 resident experts in 30 MoE layers, 64 in 32: 6 streamed per layer
    moe_only, with_dense = predict(mixtral, "l4", policy, 77, 64), predict(dense, "l4", policy, 77, 64)
    no_stream = predict(mixtral, "l4", dataclasses.replace(policy, resident_expert_fraction=1.0), 77, 64)
    assert with_dense.per_layer_seconds["h2d"] * 32 == pytest.approx(
        30 * moe_only.per_layer_seconds["h2d"] + 2 * no_stream.per_layer_seconds["h2d"])
    assert with_dense.pinned_pool_bytes < moe_only.pinned_pool_bytes
    assert with_dense.step_seconds < moe_only.step_seconds  # link-bound: two layers stream nothing
    assert with_dense.per_layer_seconds["cpu"] == moe_only.per_layer_seconds["cpu"]


def test_tighter_memory_gives_smaller_batch(qwen3):
    roomy = choose_policy(qwen3, "l4", 256, 128)
    tight_host = choose_policy(qwen3, "l4", 256, 128, host_memory_gb=80)
    tight_gpu = choose_policy(qwen3, "l4", 256, 128, gpu_memory_gb=12)
    _assert_fits(qwen3, tight_host, 256, 128, PROFILES["l4"].gpu_memory, 80 * GiB)
    _assert_fits(qwen3, tight_gpu, 256, 128, 12 * GiB, PROFILES["l4"].host_memory)
    assert tight_host.policy.batch_size < roomy.policy.batch_size
    assert tight_gpu.tokens_per_s < roomy.tokens_per_s


def test_max_batch_size(mixtral):
    r = choose_policy(mixtral, "l4", 77, 32, max_batch_size=64)
    assert r.policy.batch_size <= 64


def test_everything_resident_when_it_fits(qwen3):
    r = choose_policy(qwen3, "h100-80gb", 128, 64, max_batch_size=32)
    assert r.policy.resident_expert_fraction > 0.9


def test_placements(qwen3):
    assert choose_policy(qwen3, "h100-80gb", 128, 64).policy.attention_device == "gpu"
    r = choose_policy(qwen3, "h100-80gb", 128, 64, placements=[("cpu", "cpu")])
    assert (r.policy.attention_device, r.policy.kv_device) == ("cpu", "cpu")
    with pytest.raises(ValueError, match="placements must be"):
        choose_policy(qwen3, "h100-80gb", 128, 64, placements=[("cpu", "gpu")])


@pytest.mark.parametrize("kwargs, message", [
    (dict(host_memory_gb=60), "host memory too small"),
    (dict(gpu_memory_gb=4), "GPU memory too small"),
])
def test_impossible_workload(mixtral, kwargs, message):
    with pytest.raises(InfeasibleError, match=message):
        choose_policy(mixtral, "l4", 77, 32, **kwargs)


@pytest.mark.parametrize("args, kwargs, message", [
    ((77, 40000), {}, "exceeds the model's context"),
    ((0, 32), {}, "prompt_len must be a positive integer"),
    ((77, 32), dict(gpu_memory_gb=25), r"gpu_memory_gb must be in \(0, 24.0\]"),
    ((77, 32), dict(max_batch_size=0), "max_batch_size"),
    ((77, 32), dict(prefill_len=64), "prefill_len must be an integer >= prompt_len"),
    ((77, 32), dict(kv_positions=[0, 100, 100]), "kv_positions must be totals over batches of 0..R"),
    ((77, 32), dict(kv_positions=[100, 200]), "kv_positions must be totals over batches of 0..R"),
    ((77, 32), dict(prompt_positions=[0, 5, 5]), "prompt_positions must be totals over batches of 0..R"),
    ((77, 32), dict(kv_positions=[0, 100, 200], prefill_positions=[0, 96]), "must have one length"),
])
def test_bad_arguments(mixtral, args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        choose_policy(mixtral, "l4", *args, **kwargs)


def test_h100_capped(mixtral):
    r = choose_policy(mixtral, "h100-80gb", 77, 64, gpu_memory_gb=16)
    assert r.policy.gpu_memory_gb == 16
    assert r.policy.attention_device == "cpu"
    # the 125 GiB host holds the pinned experts (84 GiB × 1.2) and little KV: N stays in the hundreds
    assert 200 <= r.policy.batch_size <= 3000
    assert 100 < r.decode_tokens_per_s < 5000
    d = r.to_dict()
    assert d["per_layer_seconds"] == r.per_layer_seconds and d["predicted_tokens_per_s"] == r.tokens_per_s


def test_kv_positions_per_sequence(mixtral):
    """An engine that gives each sequence the KV it needs: host memory counts kv_positions[N], so prompts of
    77 tokens on average (20..134) hold as many sequences as prompts of 77, more than prompts of 134; N is at
    most the job's requests."""
    rng = np.random.default_rng(0)
    needs = rng.integers(20, 135, 8192) + 64
    kv = np.concatenate([[0], np.cumsum(needs)])
    longest = choose_policy(mixtral, "h100-80gb", 134, 64, gpu_memory_gb=16)
    ragged = choose_policy(mixtral, "h100-80gb", 134, 64, gpu_memory_gb=16, kv_positions=kv)
    mean = choose_policy(mixtral, "h100-80gb", 77, 64, gpu_memory_gb=16)
    assert ragged.policy.batch_size > 1.25 * longest.policy.batch_size
    assert ragged.policy.batch_size == pytest.approx(mean.policy.batch_size, rel=0.1)
    kvt = kv_bytes_per_token(mixtral, BF16) * mixtral.num_layers
    assert ragged.host_memory_bytes - ragged.pinned_pool_bytes == pytest.approx(kv[ragged.policy.batch_size] * kvt)
    assert predict(mixtral, "h100-80gb", ragged.policy, 134, 64, kv_positions=kv).host_memory_bytes == ragged.host_memory_bytes
    few = choose_policy(mixtral, "h100-80gb", 134, 64, gpu_memory_gb=16, kv_positions=kv[:11])
    assert few.policy.batch_size == 10


def test_ragged_prompts_are_priced_at_their_mean_and_own_padding(mixtral):
    """A job of prompts 20..134 tokens (MTBench-like) as `hrm_lengths` describes it: the decode's CPU
    attention is priced at the mean prompt, the prefill's compute at each prompt's own bucket, both below
    pricing every prompt at the longest (134, padded to 192); for one policy, the decode terms equal those
    of a job of prompts of the mean length."""
    from moe_jax.offload_engine import hrm_lengths

    prompts = np.random.default_rng(0).integers(20, 135, 2048)
    job = hrm_lengths(prompts, [64] * len(prompts), mixtral.max_positions)
    assert (job.prompt_len, job.prefill_len) == (134, 192)
    r = choose_policy(mixtral, "h100-80gb", **job._asdict(), gpu_memory_gb=16, placements=[("cpu", "cpu")])
    N = r.policy.batch_size
    longest = predict(mixtral, "h100-80gb", r.policy, **job._replace(prompt_positions=None, prefill_positions=None,
                                                                      prefill_peak_positions=None)._asdict())
    mean = predict(mixtral, "h100-80gb", r.policy, job.prompt_positions[N] / N, 64, prefill_len=192,
                   kv_positions=job.kv_positions)
    assert r.per_layer_seconds["cpu"] == pytest.approx(mean.per_layer_seconds["cpu"], rel=1e-9)
    # the N admitted first are the longest prompts (largest need first): their mean context is ~0.8 of the longest's
    assert r.per_layer_seconds["cpu"] < 0.85 * longest.per_layer_seconds["cpu"]
    assert r.prefill_seconds < 0.75 * longest.prefill_seconds
    # the prefill's hidden states planned at the N largest prompts' own buckets (here mostly 128 and 192), not all at 192
    assert r.gpu_memory_bytes < longest.gpu_memory_bytes
    assert r.tokens_per_s > longest.tokens_per_s
    # micro-batches of one prefill call each: the engine pads that call to (about) the longest prompt
    small = Policy(batch_size=8, micro_batch_size=4, num_micro_batches=2, resident_expert_fraction=0.0)
    one_call = predict(mixtral, "h100-80gb", small, **job._replace(prompt_positions=None)._asdict())
    padded = predict(mixtral, "h100-80gb", small, **job._replace(prompt_positions=None, prefill_positions=None)._asdict())
    assert one_call.prefill_seconds == pytest.approx(padded.prefill_seconds, rel=1e-12)


@pytest.mark.parametrize("f", [2.0, 1.75])
@pytest.mark.parametrize("L, E", [(1, 8), (2, 8), (3, 4), (32, 8), (48, 128)])
def test_most_resident_is_the_largest_that_fits(L, E, f):
    """The closed form against a scan of every R: the most resident experts whose memory (R slots, M streamed
    slots and M in flight at f − 1 of an expert each: the engine's page table; f = 1.75 under the exp4
    codec) fits c + f·E experts."""
    pages = [ExpertPages.plan(L, E, R / (L * E), 1) for R in range(L * E + 1)]
    used = np.array([p.num_resident + f * p.max_streamed for p in pages]) - f * E
    for c in np.arange(-E - 2.0, E * L + 3.0, 0.25):
        fits = np.flatnonzero(used <= c)
        assert _most_resident(c, L, E, f) == (fits.max() if fits.size else -1), c


def test_resident_experts_counted_per_layer(mixtral):
    """An H100 capped at 16 GiB has room for a few experts beyond the double buffer, fewer than one per
    layer: HRM keeps them resident (not a whole expert per layer, which does not fit): less to send, and a
    smaller pinned pool leaves room for the batch's KV."""
    r = choose_policy(mixtral, "h100-80gb", 77, 64, gpu_memory_gb=16, placements=[("cpu", "cpu")])
    L, E = mixtral.num_layers, mixtral.num_experts
    resident = round(r.policy.resident_expert_fraction * L * E)
    assert 0 < resident < L
    _assert_fits(mixtral, r, 77, 64, 16 * GiB, PROFILES["h100-80gb"].host_memory)
    same = predict(mixtral, "h100-80gb", r.policy, 77, 64)
    assert same.tokens_per_s == pytest.approx(r.tokens_per_s, rel=1e-12)
    assert same.per_layer_seconds == pytest.approx(r.per_layer_seconds, rel=1e-12)
    none = predict(mixtral, "h100-80gb", dataclasses.replace(r.policy, resident_expert_fraction=0.0), 77, 64)
    assert none.per_layer_seconds["h2d"] > r.per_layer_seconds["h2d"]
    # streaming every expert, this batch's KV would not fit beside the larger pinned-host pool
    assert none.host_memory_bytes > HOST_USABLE * PROFILES["h100-80gb"].host_memory >= r.host_memory_bytes


def _engine_cases():
    """HRM's choices over presets, profiles, caps and lengths (prompts padded to a bucket as the LLM pads them)."""
    rng = np.random.default_rng(0)
    presets = {"mixtral-8x7b": ["h100-80gb", "l4", "a100-80gb"], "qwen3-30b-a3b": ["t4", "h100-80gb", "l4"],
               "olmoe-1b-7b": ["t4", "l4"], "deepseek-v2-lite": ["l4", "h100-80gb"]}  # the last: a dense layer
    for preset, profiles in presets.items():
        for hardware in profiles:
            for _ in range(4):
                P, G = int(rng.integers(8, 1500)), int(rng.integers(1, 500))
                yield preset, hardware, round(float(rng.uniform(4, PROFILES[hardware].gpu_memory / GiB)), 2), P, G


def engine_gpu_plan(cfg, policy, prefill_len: int) -> int:
    """The offload engine's own GPU plan for `policy`: its expert slots and decode working set (`planned_gpu_bytes`
    of `ExpertPages.for_model`) and its prefill's (`prefill_bytes`, prompts padded to `prefill_len`)."""
    from moe_jax.offload_engine import planned_gpu_bytes
    from moe_jax.offload_memory import prefill_bytes

    pages = ExpertPages.for_model(cfg, policy.resident_expert_fraction, policy.num_micro_batches)
    return (planned_gpu_bytes(cfg, BF16, policy.micro_batch_size, pages, policy.expert_codec)
            + prefill_bytes(cfg, BF16, policy.batch_size, policy.micro_batch_size, prefill_len))


@pytest.mark.parametrize("preset, hardware, cap, P, G", list(_engine_cases()))
def test_offload_engine_accepts_the_chosen_policy(preset, hardware, cap, P, G):
    """The engine's own GPU plan for HRM's policy (expert slots, decode and prefill working sets,
    `moe_jax.offload_memory`) fits the cap it is given: a policy HRM returns is never refused before
    generation."""
    from moe_jax.shape_buckets import bucket

    cfg = preset_config(preset)
    try:
        r = choose_policy(cfg, hardware, P, G, prefill_len=bucket(P), gpu_memory_gb=cap, placements=[("cpu", "cpu")])
    except InfeasibleError:
        return
    assert engine_gpu_plan(cfg, r.policy, bucket(P)) <= cap * GiB


@pytest.mark.parametrize("r_w, n_ub", [(0.25, 4), (0.1, 2), (0.6, 8)])
def test_gpu_memory_is_the_engines_plan_for_a_model_with_dense_layers(r_w, n_ub):
    """DeepSeek-V2-Lite (layer 0 dense, 26 MoE layers): HRM's GPU memory for a CPU-attention policy is the
    engine's plan (`planned_gpu_bytes` of `ExpertPages.for_model`, and `prefill_bytes`), so its streamed slots
    count E - R // (MoE layers), not E - R // (all layers)."""
    cfg, mu, P = preset_config("deepseek-v2-lite"), 64, 128
    policy = Policy(mu * n_ub, mu, n_ub, r_w)
    assert predict(cfg, "l4", policy, P, 32).gpu_memory_bytes == pytest.approx(engine_gpu_plan(cfg, policy, P), rel=1e-12)


def test_pinned_pool_fixed_before_the_choice(mixtral):
    """When JAX started before HRM chose (its pinned-host pool's cap fixed), the pool counts at that cap,
    the streamed experts must fit in it with the pool's margin, and a cap too small is a clear error."""
    free = choose_policy(mixtral, "h100-80gb", 77, 64, gpu_memory_gb=16, placements=[("cpu", "cpu")])
    fixed = choose_policy(mixtral, "h100-80gb", 77, 64, gpu_memory_gb=16, placements=[("cpu", "cpu")],
                          pinned_pool_gb=90)
    assert fixed.pinned_pool_bytes == 90 * GiB > free.pinned_pool_bytes
    assert fixed.policy.batch_size < free.policy.batch_size  # less host memory left for KV
    streamed = (1 - fixed.policy.resident_expert_fraction) * mixtral.num_layers * layer_bytes(mixtral, BF16, expert=True)
    assert pinned_pool.cap_bytes(streamed) <= 90 * GiB  # with the pool's margin
    assert fixed.host_memory_bytes <= HOST_USABLE * PROFILES["h100-80gb"].host_memory
    with pytest.raises(InfeasibleError, match=r"pinned host pool too small: its cap of 64 GiB \(XLA_PJRT"):
        choose_policy(mixtral, "h100-80gb", 77, 64, gpu_memory_gb=16, pinned_pool_gb=64)
    with pytest.raises(ValueError, match="pinned_pool_gb must be a positive number"):
        choose_policy(mixtral, "h100-80gb", 77, 64, pinned_pool_gb=0)


def test_one_micro_batch_overlaps_nothing(mixtral):
    """With one micro-batch its CPU attention waits for its GPU call and the next call for it: a layer
    costs max(GPU, H2D) + CPU; with several, the three terms overlap."""
    one = predict(mixtral, "h100-80gb", Policy(256, 256, 1), 77, 64)
    t, L = one.per_layer_seconds, mixtral.num_layers
    assert t["cpu"] > 0.001 and one.step_seconds >= L * (max(t["gpu"], t["h2d"]) + t["cpu"])
    four = predict(mixtral, "h100-80gb", Policy(256, 64, 4), 77, 64)
    t4 = four.per_layer_seconds
    assert L * max(t4.values()) <= four.step_seconds < one.step_seconds


def test_calls_without_a_chunk_overlap_no_copy(mixtral):
    """The next layer's 8 streamed experts travel in 8 chunks, one per GPU call: of 64 micro-batches, 56
    calls carry none, and their compute adds to the link's time instead of hiding under it."""
    many = predict(mixtral, "h100-80gb", Policy(1024, 16, 64), 77, 64)
    t, L = many.per_layer_seconds, mixtral.num_layers
    assert t["gpu"] > 0.01 and many.step_seconds >= L * (0.95 * t["h2d"] + 56 / 64 * t["gpu"])
    few = predict(mixtral, "h100-80gb", Policy(1024, 128, 8), 77, 64)
    assert few.step_seconds < many.step_seconds


def test_exp4_codec_plans_fewer_link_and_pool_bytes_within_both_limits(mixtral):
    """With the experts coded (3/4 of the bytes on the link and in the pinned pool, full slots on the GPU
    plus the codec's escapes and one decoded expert), the policy still fits both limits and, the link and
    the host binding at a 16 GiB cap, batches more and streams faster than uncoded."""
    kw = dict(gpu_memory_gb=16, placements=[("cpu", "cpu")])
    plain = choose_policy(mixtral, "h100-80gb", 77, 64, **kw)
    coded = choose_policy(mixtral, "h100-80gb", 77, 64, expert_codec="exp4", **kw)
    assert coded.policy.expert_codec == "exp4" and plain.policy.expert_codec == "none"
    assert coded.gpu_memory_bytes <= GPU_USABLE * 16 * GiB
    assert coded.host_memory_bytes <= HOST_USABLE * PROFILES["h100-80gb"].host_memory
    streamed = pinned_pool.streamed_bytes(mixtral, BF16, coded.policy)
    assert streamed == 0.75 * pinned_pool.streamed_bytes(mixtral, BF16, Policy(**{**coded.policy.__dict__,
                                                                                  "expert_codec": "none"}))
    assert coded.pinned_pool_bytes == pinned_pool.cap_bytes(streamed)
    assert coded.policy.batch_size > plain.policy.batch_size
    assert coded.per_layer_seconds["h2d"] < plain.per_layer_seconds["h2d"]
    again = predict(mixtral, "h100-80gb", coded.policy, 77, 64)
    assert again.per_layer_seconds == pytest.approx(coded.per_layer_seconds)
    with pytest.raises(ValueError, match="codes bfloat16"):
        choose_policy(mixtral, "h100-80gb", 77, 64, expert_codec="exp4", dtype="float32", **kw)


def test_int8_kv_cache_doubles_the_batch_where_host_kv_binds(mixtral):
    """MoE-Gen's workload (prompt 512, gen 256) at a 24 GiB cap: the host KV cache binds N. An int8 cache (a
    byte per element + a float32 scale per head row: 132 / 256 of bfloat16's bytes) fits about twice the
    sequences in the same host memory, and CPU attention reads fewer bytes per sequence; both limits hold, and
    only CPU attention over a host cache is planned. The host here streams int8 bytes as fast as bf16's (a
    memory-bound kernel; the built-in h100-80gb profile takes the slower int8 rate measured on the H200 host)."""
    kw = dict(gpu_memory_gb=24, expert_codec="exp4")
    hw = dataclasses.replace(PROFILES["h100-80gb"], int8_attention_bandwidth=None)
    plain = choose_policy(mixtral, hw, 512, 256, **kw)
    small = choose_policy(mixtral, hw, 512, 256, kv_cache_dtype="int8", **kw)
    assert small.policy.kv_cache_dtype == "int8" and plain.policy.kv_cache_dtype == "auto"
    assert (small.policy.attention_device, small.policy.kv_device) == ("cpu", "cpu")
    assert kv_bytes_per_token(mixtral, BF16, "int8") == 2 * 8 * (128 + 4) == kv_bytes_per_token(mixtral, BF16) * 132 / 256
    host = HOST_USABLE * PROFILES["h100-80gb"].host_memory
    for r in (plain, small):
        kv = r.policy.batch_size * 768 * mixtral.num_layers * kv_bytes_per_token(mixtral, BF16, r.policy.kv_cache_dtype)
        assert r.host_memory_bytes == pytest.approx(kv + r.pinned_pool_bytes)
        assert r.host_memory_bytes <= host and r.gpu_memory_bytes <= GPU_USABLE * 24 * GiB
    assert plain.host_memory_bytes > 0.97 * host  # the host binds
    assert 1.6 < small.policy.batch_size / plain.policy.batch_size < 2.1
    assert (small.per_layer_seconds["cpu"] / small.policy.batch_size
            < 0.6 * plain.per_layer_seconds["cpu"] / plain.policy.batch_size)
    assert small.decode_tokens_per_s > 1.6 * plain.decode_tokens_per_s
    again = predict(mixtral, hw, small.policy, 512, 256)
    assert again.per_layer_seconds == pytest.approx(small.per_layer_seconds)
    # a host where the kernel is compute-bound (int8 no faster per element, as on 2 cores): the CPU term per
    # sequence is bf16's, so the same policy predicts a larger CPU term
    slow = dataclasses.replace(hw, int8_attention_bandwidth=43e9 * 132 / 256)
    per_seq = lambda r: r.per_layer_seconds["cpu"] / r.policy.batch_size
    assert per_seq(predict(mixtral, slow, small.policy, 512, 256)) == pytest.approx(per_seq(plain), rel=0.02)
    with pytest.raises(ValueError, match="kv_cache_dtype='int8' needs CPU attention over a host KV cache"):
        choose_policy(mixtral, "h100-80gb", 512, 256, kv_cache_dtype="int8", placements=[("gpu", "gpu")])
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        choose_policy(mixtral, "h100-80gb", 512, 256, kv_cache_dtype="int4")


def test_a_loaded_layout_is_searched_for_its_best_batch(mixtral):
    """With the micro-batch count and resident experts fixed (an engine's loaded layout, `OffloadEngine.rebatch`),
    the search keeps them and picks the best N and μ among those: the unconstrained optimum where it lies within
    the layout, otherwise no better than it, as `predict` prices it, and better than the neighbouring μ."""
    cpu = [("cpu", "cpu")]
    g64 = choose_policy(mixtral, "h100-80gb", 77, 64, gpu_memory_gb=16, placements=cpu).policy
    layout = dict(num_micro_batches=g64.num_micro_batches, resident_expert_fraction=g64.resident_expert_fraction)
    assert choose_policy(mixtral, "h100-80gb", 77, 64, gpu_memory_gb=16, placements=cpu, **layout).policy == g64
    free = choose_policy(mixtral, "h100-80gb", 77, 128, gpu_memory_gb=16, placements=cpu)
    kept = choose_policy(mixtral, "h100-80gb", 77, 128, gpu_memory_gb=16, placements=cpu, **layout)
    p = kept.policy
    assert (p.num_micro_batches, p.resident_expert_fraction) == (g64.num_micro_batches, g64.resident_expert_fraction)
    assert (free.policy.num_micro_batches, free.policy.resident_expert_fraction) != tuple(layout.values())
    assert 0 < kept.tokens_per_s <= free.tokens_per_s
    assert predict(mixtral, "h100-80gb", p, 77, 128).tokens_per_s == pytest.approx(kept.tokens_per_s, rel=1e-9)
    for mu in (p.micro_batch_size - 8, p.micro_batch_size + 8):
        other = dataclasses.replace(p, micro_batch_size=mu, batch_size=mu * p.num_micro_batches)
        r = predict(mixtral, "h100-80gb", other, 77, 128)
        assert r.tokens_per_s < kept.tokens_per_s or r.gpu_memory_bytes > GPU_USABLE * 16 * GiB \
            or r.host_memory_bytes > HOST_USABLE * PROFILES["h100-80gb"].host_memory
    with pytest.raises(InfeasibleError, match="GPU memory too small for the given resident experts: .* with 0.301 of"):
        choose_policy(mixtral, "h100-80gb", 77, 128, gpu_memory_gb=16, num_micro_batches=2, resident_expert_fraction=0.3)
    for bad in (dict(num_micro_batches=0), dict(num_micro_batches=2.0), dict(resident_expert_fraction=1.5)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            choose_policy(mixtral, "h100-80gb", 77, 128, gpu_memory_gb=16, **bad)
    # a layout of more micro-batches than the job has sequences: said so, not "host memory too small"
    with pytest.raises(InfeasibleError, match=r"num_micro_batches=4 needs a batch of at least that many sequences .* "
                                              r"at most 3 are allowed"):
        choose_policy(mixtral, "h100-80gb", 77, 32, num_micro_batches=4, resident_expert_fraction=0.5, max_batch_size=3)


def test_a_fully_resident_layer_sends_q_and_the_new_k_v_down_in_the_models_dtype(mixtral):
    """Nothing streamed: CPU attention's traffic is all the link carries, q and the new k, v
    GPU->host (bf16, also into an int8 cache, which quantises on the host) against the attention output
    host->GPU; the larger direction binds."""
    hw = PROFILES["h100-80gb"]
    down = 1024 * (4096 + 2 * 1024) * 2  # q, k, v of 1024 tokens; up: 1024 outputs of 4096
    for kv in ("auto", "int8"):
        r = predict(mixtral, hw, Policy(1024, 256, 4, 1.0, kv_cache_dtype=kv), 77, 64)
        assert r.per_layer_seconds["h2d"] == pytest.approx(down / hw.link_bandwidth, rel=1e-12), kv


@pytest.mark.parametrize("codec", ["none", "exp4"])
def test_the_chosen_policy_holds_as_many_resident_experts_as_fit(mixtral, codec):
    """R is the most resident experts the GPU holds at the chosen point: one more does not fit
    (under exp4 the in-flight experts are coded, 3/4 of an expert each, which leaves room for more)."""
    r = choose_policy(mixtral, "h100-80gb", 77, 64, gpu_memory_gb=16, placements=[("cpu", "cpu")], expert_codec=codec)
    R = round(r.policy.resident_expert_fraction * 256)
    assert 0 < R < 31
    more = predict(mixtral, "h100-80gb", dataclasses.replace(r.policy, resident_expert_fraction=(R + 1) / 256), 77, 64)
    assert r.gpu_memory_bytes <= GPU_USABLE * 16 * GiB < more.gpu_memory_bytes


def test_gpu_memory_under_exp4_is_the_engines_plan(mixtral):
    """Under exp4, HRM's GPU memory is the engine's plan (`planned_gpu_bytes` with the codec: the
    escapes of every streamed expert of every layer and one decoded expert) and the prefill's working set."""
    for r_w in (0.0, 6 / 256):
        policy = Policy(1024, 256, 4, r_w, expert_codec="exp4")
        engine = engine_gpu_plan(mixtral, policy, 77)
        hrm = predict(mixtral, "h100-80gb", policy, 77, 64).gpu_memory_bytes
        assert hrm == pytest.approx(engine, rel=1e-9) if r_w == 0 else hrm >= engine


def test_a_decode_step_is_its_layers_and_an_lm_head_per_micro_batch(mixtral):
    """Every expert resident (nothing to install or carry), four micro-batches: a layer costs its
    largest term and the step adds each micro-batch's LM head. One micro-batch streaming all 8 experts: each layer
    first installs them (read and written in GPU memory, one call), then its call overlaps the link, then its CPU
    attention runs."""
    hw, L = PROFILES["h100-80gb"], mixtral.num_layers
    head = lambda mu: float(hw.gpu_seconds(lm_head_op(mixtral, BF16, mu)))
    four = predict(mixtral, hw, Policy(1024, 256, 4, 1.0), 77, 64)
    assert four.step_seconds == pytest.approx(L * max(four.per_layer_seconds.values()) + 4 * head(256), rel=1e-9)
    one = predict(mixtral, hw, Policy(256, 256, 1, 0.0), 77, 64)
    t, w = one.per_layer_seconds, layer_bytes(mixtral, BF16, expert=True) / 8
    install = 8 * 2 * w / hw.gpu_bandwidth + hw.launch_seconds
    assert one.step_seconds == pytest.approx(L * (install + max(t["gpu"], t["h2d"]) + t["cpu"]) + head(256), rel=1e-9)


def test_end_to_end_is_the_prefill_and_g_minus_1_decode_steps(mixtral):
    """The first token comes from the prefill: a run is the prefill and G - 1 decode steps."""
    r = choose_policy(mixtral, "h100-80gb", 77, 64, gpu_memory_gb=16, placements=[("cpu", "cpu")])
    N = r.policy.batch_size
    assert r.decode_seconds == pytest.approx(63 * r.step_seconds, rel=1e-12)
    assert r.decode_tokens_per_s == pytest.approx(N / r.step_seconds, rel=1e-12)
    assert r.tokens_per_s == pytest.approx(N * 64 / (r.prefill_seconds + 63 * r.step_seconds), rel=1e-12)


def test_prefill_overlaps_the_link_and_the_gpu_in_each_layer(mixtral):
    """Prefill, per layer: install the fetched experts, then the GPU's calls overlap the link's
    next experts and the N prompts' KV going to the host cache. Over a slow link the link's time is all of it."""
    hw = dataclasses.replace(PROFILES["h100-80gb"], link_bandwidth=0.2e9)
    L, w, kvt = mixtral.num_layers, layer_bytes(mixtral, BF16, expert=True) / 8, kv_bytes_per_token(mixtral, BF16)
    head = lambda mu: float(hw.gpu_seconds(lm_head_op(mixtral, BF16, mu)))
    streamed = predict(mixtral, hw, Policy(128, 64, 2, 0.0), 77, 64)
    install = 8 * 2 * w / hw.gpu_bandwidth + hw.launch_seconds
    assert streamed.prefill_seconds == pytest.approx(L * (install + 8 * w / hw.link_bandwidth) + 2 * head(64), rel=1e-9)
    resident = predict(mixtral, hw, Policy(4096, 1024, 4, 1.0), 77, 64)  # the KV of all 4096 prompts on the link
    assert resident.prefill_seconds == pytest.approx(L * 4096 * 77 * kvt / hw.link_bandwidth + 4 * head(1024), rel=1e-9)


def test_fewest_micro_batches_win_among_near_ties(mixtral, monkeypatch):
    """Among the points within TIE_TOLERANCE of the best, the fewest micro-batches win: the choice
    is within it, and no count of micro-batches below the chosen one reaches it (each searched without a tolerance,
    i.e. at its best)."""
    kw = dict(gpu_memory_gb=16, placements=[("cpu", "cpu")])
    r = choose_policy(mixtral, "h100-80gb", 77, 64, **kw)
    monkeypatch.setattr(search, "TIE_TOLERANCE", 0.0)
    best = choose_policy(mixtral, "h100-80gb", 77, 64, **kw).tokens_per_s
    assert best * (1 - TIE_TOLERANCE) <= r.tokens_per_s <= best
    for n in range(1, r.policy.num_micro_batches):
        assert choose_policy(mixtral, "h100-80gb", 77, 64, num_micro_batches=n, **kw).tokens_per_s < best * (1 - TIE_TOLERANCE)


def test_the_kv_cache_holds_every_layer_dense_ones_too():
    """DeepSeek-V2-Lite (27 layers, layer 0 dense): the host KV cache holds all 27 layers' KV,
    for a job of given lengths (kv_positions) as for uniform ones."""
    lite = preset_config("deepseek-v2-lite")
    kvt = kv_bytes_per_token(lite, BF16)
    job = predict(lite, "l4", Policy(3, 3, 1, 0.0), 128, 64, kv_positions=np.array([0, 300, 500, 650]))
    assert job.host_memory_bytes == pytest.approx(650 * 27 * kvt + job.pinned_pool_bytes, rel=1e-12)
    uniform = predict(lite, "l4", Policy(3, 3, 1, 0.0), 128, 64)
    assert uniform.host_memory_bytes == pytest.approx(3 * 192 * 27 * kvt + uniform.pinned_pool_bytes, rel=1e-12)


@pytest.mark.parametrize("kv", ["auto", "int8"])
def test_the_cpu_term_is_each_micro_batchs_attention_at_the_mean_context(mixtral, kv):
    """Per layer, CPU attention reads each of the n_ub micro-batches' KV at the mean context, prompt + G/2, at the
    kernel's measured bandwidth for the cache's dtype (not the host's read bandwidth), plus its query rows' fixed
    time; a hand count at μ = 512, 3 micro-batches, prompts of 77, gen 64."""
    hw = dataclasses.replace(PROFILES["h200"], attention_bandwidth=52e9, int8_attention_bandwidth=34.6e9,
                             attention_row_seconds=2e-8)
    r = predict(mixtral, hw, Policy(1536, 512, 3, 0.0, kv_cache_dtype=kv), 77, 64)
    per_token, bandwidth = {"auto": (4096, 52e9), "int8": (2112, 34.6e9)}[kv]
    ctx = 77 + 64 / 2
    read = 512 * 32 * (128 + 128) * 2 + 512 * ctx * per_token  # q and output in bf16, then the KV
    flops = 2 * 512 * ctx * 32 * (128 + 128)
    rows = 512 * 32 * 2e-8  # a query row per head
    assert r.per_layer_seconds["cpu"] == pytest.approx(3 * (max(flops / hw.cpu_flops, read / bandwidth) + rows), rel=1e-9)
