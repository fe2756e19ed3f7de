"""The offload engine (CGOPipe) generates exactly what the resident engine generates (greedy, float32),
whatever the policy: micro-batches, resident expert fraction, more requests than rows, ragged prompts."""
from __future__ import annotations

import os
import time

import jax
import ml_dtypes
import numpy as np
import pytest

import moe_jax
from host_ops import HostKVCache
from moe_jax import offload_engine
from moe_jax.model_source import open_model
from moe_jax.offload_engine import OffloadEngine, OffloadMemoryError
from moe_jax.offload_policy import Policy
from moe_jax.presets import TINY_PRESETS
from moe_jax.requests import Request
from moe_jax.sampling import SamplingParams
from moe_jax.shape_buckets import bucket
from tests.conftest import FAMILIES, build_hf_model

PROMPTS = [tuple(range(3, 3 + n)) for n in (9, 1, 17, 4, 30, 2, 11)]  # 7 prompts on N = 4 rows: 3 wait
GREEDY = SamplingParams(max_new_tokens=7, ignore_eos=True)


def offload_tokens(source, policy, params=GREEDY, prompts=PROMPTS):
    eng = OffloadEngine(source.cfg, source.weights, np.float32, policy)
    per = params if isinstance(params, list) else [params] * len(prompts)
    out = {r.index: ids for r, ids, *_ in eng.generate([Request(i, p, sp) for i, (p, sp) in enumerate(zip(prompts, per))])}
    assert sorted(out) == list(range(len(prompts)))
    st = eng.stats
    assert st.decode_steps > 0 and (st.cpu >= st.cpu_fetch + st.cpu_kernel + st.cpu_write + st.cpu_handoff).all()
    assert st.cpu_kernel.sum() > 0 and st.cpu_write.sum() > 0 and st.cpu_handoff.sum() > 0 and st.prefill_write.sum() > 0
    assert st.cpu_fetch.sum() > 0
    assert eng.stats.prefill_calls >= source.cfg.num_layers
    return [out[i] for i in range(len(prompts))], eng


def resident_tokens(source, params=GREEDY, prompts=PROMPTS):
    return [c.token_ids for c in moe_jax.LLM(source, dtype="float32", policy="resident").generate(prompts, params)]


@pytest.mark.parametrize("name", TINY_PRESETS)
def test_presets_offload_equals_resident(name):
    source = open_model(name)
    want = resident_tokens(source)
    for r_w in (0.0, 0.5, 1.0):
        got, eng = offload_tokens(source, Policy(batch_size=4, micro_batch_size=2, num_micro_batches=2,
                                                 resident_expert_fraction=r_w))
        assert got == want, f"r_w={r_w}"
        assert (eng.stats.h2d_bytes > 0) == (r_w < 1.0)


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoints_offload_equals_resident(family, hf_checkpoints):
    source = open_model(hf_checkpoints[family][0])
    got, _ = offload_tokens(source, Policy(batch_size=5, micro_batch_size=2, num_micro_batches=3,
                                           resident_expert_fraction=0.3))
    assert got == resident_tokens(source)


@pytest.fixture(scope="module")
def dense_layers_source(tmp_path_factory):
    """A Qwen2-MoE checkpoint whose first and last layers are dense (mlp_only_layers): the step ends and
    starts on layers without experts."""
    path = tmp_path_factory.mktemp("dense_layers")
    build_hf_model("qwen2_moe", num_hidden_layers=4, mlp_only_layers=[0, 3]).save_pretrained(path)
    return open_model(path)


@pytest.mark.parametrize("r_w, prefetch", [(0.5, "split"), (1.0, "split"), (0.5, "whole")])  # r_w 0: tiny-deepseek-v3
def test_dense_layers_offload_equals_resident(dense_layers_source, r_w, prefetch):
    """Dense layers keep their FFN on the GPU with the other non-expert weights; their calls carry the next MoE
    layer's experts on."""
    source = dense_layers_source
    assert source.cfg.dense_layers == (0, 3)
    eng = OffloadEngine(source.cfg, source.weights, np.float32, Policy(4, 2, 2, r_w), prefetch=prefetch)
    assert [eng.pages.has_experts(i) for i in range(4)] == [False, True, True, False]
    assert eng.pages.num_resident == round(r_w * 2 * source.cfg.num_experts)
    got = {r.index: ids for r, ids, *_ in eng.generate([Request(i, p, GREEDY) for i, p in enumerate(PROMPTS)])}
    assert [got[i] for i in range(len(PROMPTS))] == resident_tokens(source)
    # every step (the prefill's, then each decode step's) streams the two MoE layers' experts once, and the
    # last step's layer 2 and 3 carry layer 1's for a step that does not come
    per_step = eng.pages.num_streamed * eng._expert_bytes()
    assert eng.pages.num_streamed == round((1 - r_w) * 2 * source.cfg.num_experts)
    assert eng.stats.h2d_bytes == (eng.stats.decode_steps + 1.5) * per_step


def test_sampling_and_stops_match_resident():
    source = open_model("tiny-qwen2-moe")
    params = [SamplingParams(max_new_tokens=n, temperature=0.8, top_p=0.9, seed=s) for n, s in zip(range(3, 10), range(7))]
    got, _ = offload_tokens(source, Policy(batch_size=7, micro_batch_size=3, num_micro_batches=3), params)
    assert got == resident_tokens(source, params)


def test_logprobs_match_resident():
    """The offload engine's logprobs and top tokens are the resident engine's (float32, CPU attention)."""
    prompts = ["The quick brown fox", "x", "hello world, again", "abc", "zz"]
    params = [SamplingParams(max_new_tokens=6, temperature=0.7 * (i % 2), seed=i, logprobs=(None, 0, 2)[i % 3])
              for i in range(len(prompts))]
    policy = Policy(batch_size=3, micro_batch_size=2, num_micro_batches=2, resident_expert_fraction=0.5)
    want = moe_jax.LLM("tiny-mixtral", dtype="float32", policy="resident").generate(prompts, params)
    got = moe_jax.LLM("tiny-mixtral", dtype="float32", policy=policy).generate(prompts, params)
    for w, g in zip(want, got):
        assert g.token_ids == w.token_ids and (g.logprobs is None) == (w.logprobs is None)
        if w.logprobs is not None:
            np.testing.assert_allclose(g.logprobs, w.logprobs, rtol=1e-4, atol=1e-5)
        assert (g.top_logprobs is None) == (w.top_logprobs is None)
        if w.top_logprobs is not None:
            assert [[i for i, _ in t] for t in g.top_logprobs] == [[i for i, _ in t] for t in w.top_logprobs]
            np.testing.assert_allclose([[lp for _, lp in t] for t in g.top_logprobs],
                                       [[lp for _, lp in t] for t in w.top_logprobs], rtol=1e-4, atol=1e-5)


def test_gpu_memory_cap_is_checked_before_loading():
    source = open_model("tiny-mixtral")
    with pytest.raises(OffloadMemoryError, match=r"needs .* GiB on the GPU .* gpu_memory_gb cap is 1e-06 GiB"):
        OffloadEngine(source.cfg, source.weights, np.float32,
                      Policy(batch_size=2, micro_batch_size=1, num_micro_batches=2, gpu_memory_gb=1e-6))


def test_llm_api_with_a_fixed_policy_and_with_hrm():
    prompts, params = ["abc", "hello world", "x", "a longer prompt than the others"], SamplingParams(max_new_tokens=4)
    want = [c.token_ids for c in moe_jax.LLM("tiny-olmoe", dtype="float32", policy="resident").generate(prompts, params)]
    fixed = moe_jax.LLM("tiny-olmoe", dtype="float32", policy=moe_jax.Policy(
        batch_size=3, micro_batch_size=2, num_micro_batches=2, resident_expert_fraction=0.5))
    assert [c.token_ids for c in fixed.generate(prompts, params)] == want
    assert fixed.stats.decode_steps > 0 and fixed.hrm_prediction is None
    with pytest.raises(moe_jax.llm.PolicyUnavailable, match="needs policy 'resident'"):
        fixed.logits([[1, 2, 3]])
    hrm = moe_jax.LLM("tiny-olmoe", dtype="float32", policy="offload", hardware="l4", gpu_memory_gb=1)
    assert [c.token_ids for c in hrm.generate(prompts, params)] == want
    assert hrm.hrm_prediction is not None and hrm.policy.batch_size <= len(prompts)
    assert hrm.policy.gpu_memory_gb == 1
    capped = moe_jax.LLM("tiny-olmoe", dtype="float32", policy="offload", hardware="l4", gpu_memory_gb=1,
                         max_batch_size=2)
    assert [c.token_ids for c in capped.generate(prompts, params)] == want
    assert capped.policy.batch_size == 2 < hrm.policy.batch_size
    one = moe_jax.LLM("tiny-olmoe", dtype="float32", policy="offload", max_batch_size=1)  # no HRM profile here
    assert [c.token_ids for c in one.generate(prompts, params)] == want
    assert (one.policy.batch_size, one.policy.num_micro_batches) == (1, 1)


def test_prepare_builds_the_engine_that_generate_then_runs():
    prompts, params = ["abc", "hello world", "x"], SamplingParams(max_new_tokens=3)
    want = [c.token_ids for c in moe_jax.LLM("tiny-olmoe", dtype="float32", policy="resident").generate(prompts, params)]
    llm = moe_jax.LLM("tiny-olmoe", dtype="float32", policy="offload", hardware="l4", gpu_memory_gb=1)
    assert llm.engine is None and llm.policy == "offload"
    llm.prepare(prompts, params)
    engine = llm.engine
    assert isinstance(llm.policy, Policy) and engine is not None and llm.hrm_prediction is not None
    assert [c.token_ids for c in llm.generate(prompts, params)] == want and llm.engine is engine
    fixed = moe_jax.LLM("tiny-olmoe", dtype="float32", policy=Policy(batch_size=2, micro_batch_size=1,
                                                                     num_micro_batches=2), gpu_memory_gb=0.002)
    with pytest.raises(OffloadMemoryError, match="for the prefill of prompts up to 1536 tokens"):
        fixed.prepare(["x" * 1500])  # the engine fits the cap; this prompt's prefill does not
    resident = moe_jax.LLM("tiny-olmoe", dtype="float32", policy="resident", gpu_memory_gb=0.002)
    with pytest.raises(MemoryError, match="for the KV cache of 1 sequences x 2048 positions"):
        resident.prepare(["x" * 1500], SamplingParams(max_new_tokens=1500))


def test_host_memory_is_checked_before_generation(monkeypatch, caplog):
    import moe_jax.offload_engine as oe
    from moe_jax.host_memory import MemInfo

    source = open_model("tiny-mixtral")
    eng = OffloadEngine(source.cfg, source.weights, np.float32, Policy(batch_size=2, micro_batch_size=1,
                                                                      num_micro_batches=2))
    monkeypatch.setattr(oe.host_memory, "meminfo", lambda: MemInfo(total=4000, available=1000))
    # each row's slot holds what its request can fill, prompt + budget = 3 + 7 and 5 + 7 positions (no padding)
    with pytest.raises(OffloadMemoryError, match=r"host memory for the KV cache \(2 sequences, 22 positions, "
                                                  r"float32\).*: lower batch_size, raise resident_expert_fraction "
                                                  r"or set kv_cache_dtype='int8' \(lossy"):
        list(eng.generate([Request(0, (1, 2, 3), GREEDY), Request(1, (1, 2, 3, 4, 5), GREEDY)]))
    resident = OffloadEngine(source.cfg, source.weights, np.float32, Policy(  # nothing streamed: r_w is no remedy
        batch_size=2, micro_batch_size=1, num_micro_batches=2, resident_expert_fraction=1.0))
    with pytest.raises(OffloadMemoryError, match=r"available: lower batch_size or set kv_cache_dtype='int8'"):
        list(resident.generate([Request(0, (1, 2, 3), GREEDY), Request(1, (1, 2, 3, 4, 5), GREEDY)]))
    with pytest.raises(OffloadMemoryError, match=r"streamed experts \(pinned\) but only .* available: raise resident_expert_fraction \("):
        OffloadEngine(source.cfg, source.weights, np.float32, Policy(batch_size=2, micro_batch_size=1,
                                                                     num_micro_batches=2))
    # planned with more host memory than MemTotal shows, which a balloon holds (a VM that grows with use)
    monkeypatch.setattr(oe.host_memory, "balloon_bytes", lambda: 2**40)
    grown = OffloadEngine(source.cfg, source.weights, np.float32, Policy(batch_size=2, micro_batch_size=1,
                                                                        num_micro_batches=2), host_memory_bytes=2**30)
    with caplog.at_level("WARNING", logger="moe_jax"):
        assert len(list(grown.generate([Request(0, (1, 2, 3), GREEDY), Request(1, (1, 2, 3, 4, 5), GREEDY)]))) == 2
    assert "counting 1.0 GiB beyond MemTotal 0.0 GiB as available" in caplog.text


@pytest.mark.parametrize("codec, views", [("none", True), ("exp4", True), ("exp4", False)])
def test_pinned_pool_running_out_while_loading_is_a_clear_error(monkeypatch, request, codec, views):
    """XLA's "Out of host memory" from the pinned-host pool (fragmentation past the cap) becomes an
    OffloadMemoryError naming the policy, the layer and the setting to raise: for chunks copied in, and for exp4
    chunks coded into pinned arrays through views (the pool's allocation then comes first)."""
    import jax

    put, refused = jax.device_put, []

    def device_put(x, device=None, **kw):
        coded = any(getattr(a, "dtype", None) == np.uint8 for a in jax.tree_util.tree_leaves(x))
        if getattr(device, "memory_kind", None) == "pinned_host" and (codec == "none" or coded):
            refused.append(x)
            raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of host memory while trying to allocate "
                                             "1048576 bytes.")
        return put(x, device, **kw)

    if not views:
        monkeypatch.setenv("MOE_JAX_HOST_VIEWS", "0")
    # the views check (cached per process) runs before the pool is made to fail, and is forgotten after: a failure
    # it cached under this patch would turn views off for every later engine of the session
    request.addfinalizer(offload_engine.host_views.check.cache_clear)
    dev = jax.devices()[0]
    assert offload_engine.host_views.check(*(jax.sharding.SingleDeviceSharding(dev, memory_kind=k)
                                             for k in ("pinned_host", "device"))) is None
    monkeypatch.setattr(jax, "device_put", device_put)
    source = open_model("tiny-mixtral")
    with pytest.raises(OffloadMemoryError, match=r"pinned-host pool .* ran out placing layer 0 of 2's streamed "
                                                 r"experts .* set XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB higher"):
        OffloadEngine(source.cfg, source.weights, ml_dtypes.bfloat16, Policy(batch_size=2, micro_batch_size=1,
                                                                             num_micro_batches=2, expert_codec=codec))
    assert isinstance(refused[-1], jax.Array) == (codec == "exp4" and views)  # the views' pinned zeros, or a copy


def test_streamed_experts_must_fit_the_fixed_pinned_pool(monkeypatch):
    from moe_jax import pinned_pool
    from moe_jax.host_memory import MemInfo

    source = open_model("tiny-mixtral")
    policy = Policy(batch_size=2, micro_batch_size=1, num_micro_batches=2)
    monkeypatch.setattr(pinned_pool, "fixed_cap_bytes", lambda: 1000)
    with pytest.raises(OffloadMemoryError, match=r"pinned-host pool is capped at 0.0 GiB \(XLA_PJRT_GPU_HOST_MEMORY"):
        OffloadEngine(source.cfg, source.weights, np.float32, policy)
    # on a GPU backend the host must hold what the pool reserves for them (its margin), not only the experts
    monkeypatch.setattr(pinned_pool, "fixed_cap_bytes", lambda: 64 * 2**30)
    streamed = pinned_pool.streamed_bytes(source.cfg, np.float32, policy)
    monkeypatch.setattr(offload_engine.host_memory, "meminfo", lambda: MemInfo(total=2**40, available=streamed + 2**20))
    with pytest.raises(OffloadMemoryError, match=r"needs 2.00 GiB of host memory for the streamed experts \(pinned, in "
                                                 r"XLA's pool with its margin\)"):
        OffloadEngine(source.cfg, source.weights, np.float32, policy)


def test_hrm_lengths_are_what_the_engine_allocates():
    """HRM's shape of a job: the longest prompt, gen_len the most decode steps, the prefill padded as the
    engine pads it, and the KV positions of a batch of n: the n largest prompt + budget."""
    from moe_jax.offload_engine import hrm_lengths

    assert hrm_lengths([77, 77], [64, 64], 4096)[:3] == (77, 64, 96)
    assert hrm_lengths([77, 10], [64, 200], 4096)[:3] == (77, 200, 96)  # the short prompt's long budget
    assert hrm_lengths([100, 10], [4, 60], 4096)[:3] == (100, 60, 128)  # 60 decode steps
    assert hrm_lengths([2043, 3], [5, 2045], 2048)[:3] == (2043, 5, 2048)  # within the model's context
    job = hrm_lengths([77, 10, 30], [64, 200, 4], 4096)  # admitted: 10 (need 210), 77 (141), 30 (34)
    np.testing.assert_array_equal(job.kv_positions, [0, 210, 351, 385])
    np.testing.assert_array_equal(job.prompt_positions, [0, 10, 87, 117])
    np.testing.assert_array_equal(job.prefill_positions, [0, 12, 12 + 96, 12 + 96 + 32])
    # budgets within the model's positions, as the engine's; in_order: a job of the first n as given
    np.testing.assert_array_equal(hrm_lengths([40, 10], [30, 30], 48).kv_positions, [0, 48, 88])
    in_order = hrm_lengths([10, 40], [30, 30], 48, in_order=True)
    np.testing.assert_array_equal(in_order.kv_positions, [0, 40, 88])
    np.testing.assert_array_equal(in_order.prompt_positions, [0, 10, 50])
    np.testing.assert_array_equal(in_order.prefill_positions, [0, 12, 12 + 48])


def test_kv_slots_hold_each_first_request_need():
    """Requests are admitted by KV need (prompt + budget), largest first, and each row's KV slot holds its
    first request's need, which every later request fits: with budgets that reorder the prompts, over
    several waves, the tokens are the resident engine's and the cache is what HRM counts for N rows."""
    from host_ops import HostKVCache
    from moe_jax.offload_engine import hrm_lengths

    source = open_model("tiny-mixtral")
    budgets = [7, 40, 3, 20, 2, 9, 5]  # needs 16, 41, 20, 24, 32, 11, 16: the 1-token prompt comes first
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in budgets]
    got, eng = offload_tokens(source, Policy(batch_size=3, micro_batch_size=2, num_micro_batches=2), params)
    assert got == resident_tokens(source, params)
    kv = hrm_lengths([len(p) for p in PROMPTS], budgets, source.cfg.max_positions).kv_positions
    assert kv[3] == 41 + 32 + 24
    cfg = source.cfg
    assert eng.stats.kv_bytes == HostKVCache.footprint(cfg.num_layers, 3, np.array([41, 32, 24]), cfg.num_kv_heads,
                                                       cfg.head_dim, "float32")
    assert eng.stats.refilled == 4


def test_prefill_calls_pad_to_their_own_longest_prompt(monkeypatch):
    """With two rows per prefill call, each call pads only to its own longest prompt's bucket (longest
    prompts first), and the tokens stay the resident engine's."""
    import moe_jax.offload_engine as oe

    shapes, call = [], oe._PrefillCall
    monkeypatch.setattr(oe, "prefill_call_rows", lambda cfg, T_call, T, mu, left: 2)
    monkeypatch.setattr(oe, "_PrefillCall", lambda k, rows, lens, positions, x: shapes.append(
        (positions.shape[1], int(lens.max()))) or call(k, rows, lens, positions, x))
    source = open_model("tiny-mixtral")
    got, _ = offload_tokens(source, Policy(batch_size=7, micro_batch_size=4, num_micro_batches=2))
    assert got == resident_tokens(source)
    assert len(shapes) == 4 and len({T for T, _ in shapes}) > 1
    assert all(T == bucket(longest) for T, longest in shapes)


# tiny-mixtral's working set per prompt row at buckets 32, 24, 12, 8: 188,928, 138,624, 67,008, 44,160 bytes
@pytest.mark.parametrize("limit, calls", [
    (2 * 188_928, [(2, 32), (4, 12), (2, 8)]),  # rows within a call at 32's working set, at 32, 24, 12, 8: 2, 2, 4, 8
    (200_000, [(1, 32), (1, 24), (2, 12), (3, 8)]),  # 1, 1, 2, 4: the last 3 rows in a call of 3
])
def test_prefill_calls_take_as_many_rows_as_their_bucket_allows(monkeypatch, limit, calls):
    """The prompts 30, 17, 11, 9, 4, 2, 1 (longest first) in one micro-batch: each call takes as many rows as fit
    a call at the longest prompt's bucket (32)'s working set while that many are left, then the largest bucket
    of the rows left, or for fewer rows than a call at 32 takes, that many (1 row of bucket 8 in a call of 2);
    the tokens stay the resident engine's."""
    import moe_jax.offload_engine as oe
    from moe_jax import offload_memory

    monkeypatch.setattr(offload_memory, "PREFILL_CALL_BYTES", limit)
    made, call = [], oe._PrefillCall
    monkeypatch.setattr(oe, "_PrefillCall", lambda k, rows, lens, positions, x: made.append(positions.shape)
                        or call(k, rows, lens, positions, x))
    source = open_model("tiny-mixtral")
    got, _ = offload_tokens(source, Policy(batch_size=7, micro_batch_size=7, num_micro_batches=1))
    assert got == resident_tokens(source)
    assert made == calls


@pytest.mark.parametrize("staged", [1, None])
def test_prefill_kv_staged_in_pinned_memory_is_bounded(monkeypatch, staged):
    """The prefill's k/v wait in the pinned pool until the CPU writes them: with STAGED_BYTES at 1 byte, the
    engine waits for each write before the next call's k/v are staged, even when the writes are slower than
    the GPU (here: 20 ms each); unbounded (the default, much larger than these k/v) they pile up."""
    import time

    import moe_jax.offload_engine as oe
    from moe_jax import pinned_pool

    if staged is not None:
        monkeypatch.setattr(pinned_pool, "STAGED_BYTES", staged)
    pending, writeback = [], oe._Run._prefill_writeback

    def slow_writeback(self, *args):
        pending.append(sum(not f.done() for f, _ in self.writes))
        time.sleep(0.02)
        return writeback(self, *args)

    monkeypatch.setattr(oe._Run, "_prefill_writeback", slow_writeback)
    source = open_model("tiny-mixtral")
    got, _ = offload_tokens(source, Policy(batch_size=4, micro_batch_size=2, num_micro_batches=2))
    assert got == resident_tokens(source)
    assert (max(pending) == 1) == (staged is not None) and max(pending) >= 1


def test_a_row_past_its_kv_slot_is_an_error(monkeypatch):
    """The invariant the slots rely on, broken on purpose (smallest needs admitted first): a row whose request
    outgrows its slot (its prompt's k/v, or a decoded token's) stops the run with the cache's error, never
    writes clamped positions."""
    import moe_jax.offload_engine as oe

    monkeypatch.setattr(oe, "admission_order", lambda lens, budgets: sorted(range(len(lens)),
                                                                             key=lambda i: lens[i] + budgets[i]))
    source = open_model("tiny-mixtral")
    with pytest.raises(ValueError, match=r"positions\[\d+\] reaches position \d+ of slot \d+, which holds"):
        offload_tokens(source, Policy(batch_size=2, micro_batch_size=1, num_micro_batches=2))


def test_decode_step_lowers_for_gpu_with_the_copy_inside():
    """The GPU path, lowered for CUDA on this CPU machine: the next layer's chunk and the CPU's attention
    output enter the decode step in pinned host memory and are placed on the device inside it (DESIGN.md
    §3); q, k, v leave it in pinned host memory for the CPU worker."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import SingleDeviceSharding

    from moe_jax.offload_engine import _jitted
    from moe_jax.params import layer_param_specs
    from moe_jax.presets import preset_config

    cfg = preset_config("tiny-mixtral")
    dev = jax.devices()[0]
    on_dev, on_host = (SingleDeviceSharding(dev, memory_kind=k) for k in ("device", "pinned_host"))
    mid = _jitted(cfg, "auto", on_dev, on_host)[0]
    sd = lambda shape, dt=jnp.bfloat16, sh=on_dev: jax.ShapeDtypeStruct(shape, dt, sharding=sh)
    specs = layer_param_specs(cfg, moe=True)
    p = {k: sd(s.shape) for k, s in specs.items() if not s.expert}
    slots = {k: sd((6, *s.shape[1:])) for k, s in specs.items() if s.expert}
    chunk = {k: sd((2, *s.shape[1:]), sh=on_host) for k, s in specs.items() if s.expert}
    mu = 4
    text = mid.trace(p, p, slots, sd((cfg.num_experts,), jnp.int32), sd((mu, 1, cfg.hidden_size)),
                     sd((mu, 1, cfg.num_heads, cfg.head_dim), sh=on_host), sd((mu, 1), jnp.int32), chunk
                     ).lower(lowering_platforms=("cuda",)).as_text()
    main = next(line for line in text.splitlines() if "func.func public @main" in line)
    assert main.count('mhlo.memory_kind = "pinned_host"') == 3 + 1 + 3  # chunk's 3 expert weights, attn; q, k, v
    assert text.count('_xla_buffer_placement = "device"') == 4 and text.count('_xla_buffer_placement = "pinned_host"') == 3


def test_whole_layer_prefetch_equals_split():
    source = open_model("tiny-qwen3-moe")
    policy = Policy(batch_size=4, micro_batch_size=2, num_micro_batches=2)
    eng = OffloadEngine(source.cfg, source.weights, np.float32, policy, prefetch="whole")
    # the pool holds the same chunks as under "split" (one per micro-batch); the first call carries them all
    assert all(len(eng.pages.chunks(i)) == 2 for i in range(source.cfg.num_layers))
    eng._fetch_for(1)
    assert (eng._carried(0), eng._carried(1)) == ([0, 1], [])
    eng._fetch_for(eng._next_moe_layer(-1))
    split = OffloadEngine(source.cfg, source.weights, np.float32, policy)
    apart = {}  # per engine, the chunks fetched by a call of their own (no GPU step carried them)
    for e in (eng, split):
        e._fetch = lambda chunk, e=e, fetch=e._fetch: (apart.__setitem__(e, apart.get(e, 0) + 1), fetch(chunk))[1]
    for _ in range(2):  # the second generate starts with the first layer's chunks fetched at the end of the first
        got = {r.index: ids for r, ids, *_ in eng.generate([Request(i, p, GREEDY) for i, p in enumerate(PROMPTS)])}
        assert [got[i] for i in range(len(PROMPTS))] == resident_tokens(source)
        list(split.generate([Request(i, p, GREEDY) for i, p in enumerate(PROMPTS)]))
        assert eng.stats.h2d_bytes == split.stats.h2d_bytes > 0
    assert apart[eng] == apart[split]  # "whole"'s first calls carried every chunk that "split"'s calls carried


@pytest.mark.parametrize("prefetch, policy, budgets", [("split", Policy(2, 2, 1, 0.5), [6, 6]),
                                                       ("whole", Policy(4, 2, 2, 0.5), [12, 1, 1, 12])])
def test_no_more_streamed_experts_are_on_the_gpu_than_planned(prefetch, policy, budgets):
    """The streamed experts held on the device outside the slots (fetched chunks) stay within the plan's
    `max_streamed` (`planned_gpu_bytes`) after every step, also where one micro-batch decodes alone (n_ub = 1, or
    the other's rows done): the chunks a call fetched were kept by the loop past their install, one layer more."""
    import gc

    source = open_model("tiny-mixtral")
    eng = OffloadEngine(source.cfg, source.weights, np.float32, policy, prefetch=prefetch)
    slots, shape = eng.pages.num_slots, eng.expert_shapes["w_down"]  # the weight of a shape of its own
    held = lambda: sum(a.shape[0] for a in jax.live_arrays()
                       if a.shape[1:] == shape and a.shape[0] < slots and a.sharding.memory_kind == "device")
    peak = []
    for name in ("_mid", "_last", "_prefill"):
        def spy(*args, step=getattr(eng, name)):
            out = jax.block_until_ready(step(*args))
            gc.collect()
            peak.append(held())
            return out
        setattr(eng, name, spy)
    requests = [Request(i, tuple(range(3, 8 + i)), SamplingParams(max_new_tokens=b, ignore_eos=True))
                for i, b in enumerate(budgets)]
    assert len(list(eng.generate(requests))) == len(budgets)
    assert peak and 0 < max(peak) <= eng.pages.max_streamed, (max(peak), eng.pages.max_streamed)


def test_prefill_memory_is_checked_before_generation():
    source = open_model("tiny-mixtral")
    policy = Policy(batch_size=2, micro_batch_size=1, num_micro_batches=2)
    eng = OffloadEngine(source.cfg, source.weights, np.float32, policy)
    eng.policy = Policy(**{**policy.__dict__, "gpu_memory_gb": (eng.gpu_bytes + 1000) / 2**30})
    with pytest.raises(OffloadMemoryError, match=r"GiB for the prefill of prompts up to 1536 tokens\) but the "
                                                 r"gpu_memory_gb cap"):
        list(eng.generate([Request(0, tuple(range(1, 1500)), GREEDY)]))


@pytest.mark.parametrize("why", ["views fail", "switched off"])
def test_copies_where_views_of_pinned_memory_fail_or_are_switched_off(monkeypatch, caplog, why):
    """A backend whose pinned arrays NumPy cannot view (`host_views.check` says why: a warning), or
    MOE_JAX_HOST_VIEWS=0 (said at INFO, nothing checked): the worker copies q/k/v out and its output in, and
    generates the same tokens."""
    source = open_model("tiny-mixtral")
    if why == "views fail":
        monkeypatch.setattr(offload_engine.host_views, "check", lambda *a: "no pointer here")
    else:
        monkeypatch.setenv("MOE_JAX_HOST_VIEWS", "0")
        monkeypatch.setattr(offload_engine.host_views, "check", lambda *a: pytest.fail("checked though off"))
    with caplog.at_level("INFO", logger="moe_jax"):
        got, eng = offload_tokens(source, Policy(batch_size=4, micro_batch_size=2, num_micro_batches=2))
    said = [r for r in caplog.records if "copies the GPU's q/k/v out of pinned memory and its output into it"
            in r.getMessage()]
    assert len(said) == 1
    if why == "views fail":
        assert said[0].levelname == "WARNING" and "no pointer here" in said[0].getMessage()
    else:
        assert said[0].levelname == "INFO" and "(MOE_JAX_HOST_VIEWS=0)" in said[0].getMessage()
    assert not eng.stats.host_views and "copies from and to pinned memory" in eng.stats.summary()
    assert got == resident_tokens(source)


def test_rows_and_micro_batches_that_finish_early(monkeypatch):
    """Per-request budgets that end some rows (and whole micro-batches) long before others, up to the
    exact end of the KV context: the finished rows stay inside the cache and skip their work. The decode
    attention's host arrays are each micro-batch's own, reused by every call whatever its rows (a new array
    a call costs page faults: 966 a call at μ=880 on the 2-core VM): each call attends over all of the
    micro-batch's rows, those not decoding given length 0. The kernel writes into views of pinned arrays,
    handed to the GPU as they are (`host_views`): nothing is copied into pinned memory."""
    source = open_model("tiny-mixtral")
    prompts = [tuple(range(3, 3 + n)) for n in (8, 4, 9, 1, 17, 2, 11)]
    params = [GREEDY.replace(max_new_tokens=n) for n in (8, 12, 3, 1, 2, 9, 4)]
    handed, attended, lengths = [], [], []  # every array the worker hands off / the kernel writes into, kept alive
    put, attend = offload_engine.jax.device_put, HostKVCache.attend

    def put_spy(x, *a, **k):
        if isinstance(x, np.ndarray) and x.shape[1:2] == (1,):  # an attention output [μ, 1, heads, dims]
            handed.append(x)
        return put(x, *a, **k)

    def attend_spy(self, *a, **k):
        if len(self.capacities) == 1:  # the kernels' warm-up (`_warm_host_kernels`), once a process
            return attend(self, *a, **k)
        attended.append(k.get("out"))
        lengths.append(np.array(a[3]) if len(a) > 3 else None)
        return attend(self, *a, **k)

    monkeypatch.setattr(offload_engine.jax, "device_put", put_spy)
    monkeypatch.setattr(HostKVCache, "attend", attend_spy)
    got, eng = offload_tokens(source, Policy(batch_size=4, micro_batch_size=2, num_micro_batches=2), params, prompts)
    assert got == resident_tokens(source, params, prompts)
    assert [len(t) for t in got] == [8, 12, 3, 1, 2, 9, 4]
    assert len(attended) > 20 and {len(a) for a in attended} == {2}  # every call over the micro-batch's 2 rows
    lengths = [n for n in lengths if n is not None]
    assert len(lengths) == len(attended) and any((n == 0).sum() == 1 for n in lengths)  # calls with a row idle
    assert all((n > 0).any() for n in lengths)
    assert eng.stats.host_views and len(handed) == 2  # each micro-batch's pinned buffer, put once at the start
    assert len({a.__array_interface__["data"][0] for a in attended}) == 2  # each micro-batch's buffer
    assert all(a.flags.writeable for a in attended)
    assert (eng.stats.cpu_faults >= 0).all()
    prompts, params = [tuple(range(3, 11)), tuple(range(3, 7))], [GREEDY.replace(max_new_tokens=n) for n in (8, 12)]
    got, eng = offload_tokens(source, Policy(batch_size=2, micro_batch_size=2, num_micro_batches=1), params, prompts)
    assert eng.stats.decode_steps > 0 and got == resident_tokens(source, params, prompts)  # 8 + 8 = the 16-slot context


@pytest.mark.parametrize("dtype, kv_cache_dtype", [("bfloat16", "auto"), ("bfloat16", "int8"), ("float32", "auto")])
def test_the_run_compiles_no_host_kernel_the_warm_up_did_not(dtype, kv_cache_dtype):
    """`_warm_host_kernels` compiles the CPU kernels with the argument types of the engine's own calls (q and
    the output in the engine's dtype, read-only k/v from the GPU picked by rows), so that no numba compile
    (seconds) lands in a run's first decode step."""
    from host_ops import _kernel

    source = open_model("tiny-mixtral")
    dtype = np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32)
    policy = Policy(batch_size=4, micro_batch_size=2, num_micro_batches=2, kv_cache_dtype=kv_cache_dtype)
    kernels = (_kernel._attention_kernel, _kernel._scatter_rows, _kernel._quantize_rows)
    offload_engine._warm_host_kernels(source.cfg, offload_engine.kv_storage_dtype(kv_cache_dtype, dtype), dtype)
    warmed = [set(k.signatures) for k in kernels]
    eng = OffloadEngine(source.cfg, source.weights, dtype, policy)
    out = list(eng.generate([Request(i, p, GREEDY) for i, p in enumerate(PROMPTS)]))
    assert len(out) == len(PROMPTS) and eng.stats.decode_steps > 0
    assert eng.stats.host_views or os.environ.get("MOE_JAX_HOST_VIEWS") == "0"  # the views' arrays, checked too
    assert [set(k.signatures) - w for k, w in zip(kernels, warmed)] == [set()] * 3


def test_the_host_kv_cache_is_kept_for_the_jobs_that_fit_it():
    """`prepare` allocates the host KV cache for its prompts and the engine keeps it: a `generate` whose job fits
    takes its storage (nothing allocated or faulted in), a larger job gives it back for a new one; the tokens
    are the resident engine's either way. A second generate (or prepare, or release) while one is under way is
    refused; `release_kv_cache` gives it back."""
    source = open_model("tiny-mixtral")
    llm = moe_jax.LLM(source, dtype="float32", policy=Policy(batch_size=4, micro_batch_size=2, num_micro_batches=2))
    short, long = GREEDY.replace(max_new_tokens=3), GREEDY.replace(max_new_tokens=9)
    llm.prepare(PROMPTS, GREEDY)
    kept = llm.engine.kv_cache
    assert kept is not None and kept.fault_in_s > 0
    assert [c.token_ids for c in llm.generate(PROMPTS, short)] == resident_tokens(source, short)
    assert np.shares_memory(llm.engine.kv_cache.k, kept.k) and llm.stats.kv_fault_in_s == 0
    assert llm.engine.kv_cache.nbytes < kept.nbytes == llm.stats.kv_bytes  # 3 new tokens a row in the kept 7's
    assert [c.token_ids for c in llm.generate(PROMPTS, long)] == resident_tokens(source, long)
    grown = llm.engine.kv_cache
    assert not np.shares_memory(grown.k, kept.k) and grown.nbytes > kept.nbytes and llm.stats.kv_fault_in_s > 0
    running = llm.generate_iter(PROMPTS, short)
    next(running)
    for call in (lambda: llm.generate(PROMPTS, short), lambda: llm.prepare(PROMPTS, long), llm.release_kv_cache):
        with pytest.raises(RuntimeError, match="a generate on this engine is still under way"):
            call()
    running.close()
    assert [c.token_ids for c in llm.generate(PROMPTS, short)] == resident_tokens(source, short)
    assert np.shares_memory(llm.engine.kv_cache.k, grown.k)
    llm.release_kv_cache()
    assert llm.engine.kv_cache is None
    assert [c.token_ids for c in llm.generate(PROMPTS, short)] == resident_tokens(source, short)
    assert llm.stats.kv_fault_in_s > 0 and not np.shares_memory(llm.engine.kv_cache.k, grown.k)


def test_rebatch_runs_another_batch_on_the_loaded_weights():
    """`LLM.rebatch` changes N and μ on the loaded engine (nothing reloaded; the tokens are the resident engine's
    at either batch); a policy that would place the weights otherwise is refused by name, one whose μ does not
    fit the cap is an OffloadMemoryError that leaves the policy as it was, and a generate under way refuses it."""
    source = open_model("tiny-mixtral")
    loaded = Policy(batch_size=4, micro_batch_size=2, num_micro_batches=2, resident_expert_fraction=0.5)
    llm = moe_jax.LLM(source, dtype="float32", policy=loaded)
    want = resident_tokens(source)
    assert [c.token_ids for c in llm.generate(PROMPTS, GREEDY)] == want
    engine, slots = llm.engine, llm.engine.slots
    wider = Policy(**{**loaded.__dict__, "batch_size": 6, "micro_batch_size": 3})
    llm.rebatch(wider)
    assert llm.policy == engine.policy == wider and llm.engine is engine and engine.slots is slots
    assert [c.token_ids for c in llm.generate(PROMPTS, GREEDY)] == want
    first = engine._plan([Request(i, q, GREEDY) for i, q in enumerate(PROMPTS)]).first  # 6 rows: 2 x 3
    assert [len(rows) for rows in first] == [3, 3]
    for field, value in (("num_micro_batches", 3), ("resident_expert_fraction", 0.25), ("expert_codec", "exp4"),
                         ("gpu_memory_gb", 1.0)):
        other = {**wider.__dict__, field: value, **({"batch_size": 7} if field == "num_micro_batches" else {})}
        with pytest.raises(ValueError, match=f"differs from the loaded .* in {field}, which place the weights"):
            llm.rebatch(Policy(**other))
    capped = moe_jax.LLM(source, dtype="float32", policy=Policy(**{**loaded.__dict__, "gpu_memory_gb": 1.0}))
    capped.prepare(PROMPTS, GREEDY)
    huge = Policy(**{**capped.policy.__dict__, "batch_size": 2**21, "micro_batch_size": 2**20})
    with pytest.raises(OffloadMemoryError, match="needs .* GiB on the GPU"):
        capped.rebatch(huge)
    assert capped.policy == capped.engine.policy and capped.policy.micro_batch_size == 2
    running = llm.generate_iter(PROMPTS, GREEDY)
    next(running)
    with pytest.raises(RuntimeError, match="OffloadEngine.rebatch: a generate on this engine is still under way"):
        llm.rebatch(loaded)
    running.close()
    with pytest.raises(moe_jax.llm.PolicyUnavailable, match="needs a built offload engine"):
        moe_jax.LLM(source, dtype="float32", policy="resident").rebatch(loaded)
    hrm = moe_jax.LLM(source, dtype="float32", policy="offload", hardware="l4", gpu_memory_gb=1, max_batch_size=6)
    hrm.prepare(PROMPTS, GREEDY)
    assert hrm.hrm_prediction is not None and hrm.policy.gpu_memory_gb == 1
    smaller = dict(hrm.policy.__dict__, gpu_memory_gb=None, batch_size=hrm.policy.num_micro_batches,
                   micro_batch_size=1)
    hrm.rebatch(Policy(**smaller))  # the LLM's cap filled in, HRM's prediction (for the policy before) dropped
    assert hrm.policy == Policy(**{**smaller, "gpu_memory_gb": 1}) and hrm.hrm_prediction is None
    p = hrm.policy  # the README's recipe: HRM's best batch for another job, on the loaded layout
    r = moe_jax.hrm.choose_policy(hrm.cfg, "l4", 100, 50, placements=(("cpu", "cpu"),), gpu_memory_gb=1,
                                  num_micro_batches=p.num_micro_batches, resident_expert_fraction=p.resident_expert_fraction,
                                  expert_codec=p.expert_codec, kv_cache_dtype=p.kv_cache_dtype, max_batch_size=6)
    hrm.rebatch(r.policy)
    assert hrm.policy == r.policy and hrm.engine.policy == r.policy
    assert [c.token_ids for c in hrm.generate(PROMPTS, GREEDY)] == want
    with pytest.raises(moe_jax.llm.PolicyUnavailable, match="batch_size=8 is above this LLM's max_batch_size=6"):
        hrm.rebatch(Policy(**{**smaller, "batch_size": 8, "micro_batch_size": -(-8 // smaller["num_micro_batches"])}))


@pytest.mark.parametrize("hardware", ["l4", None])
def test_a_warm_up_does_not_size_the_batch_of_later_jobs(hardware, caplog):
    """The batch chosen for a first job of one prompt (a warm-up) is chosen again, on the loaded weights, for a
    later job of more (HRM's search with the layout fixed, or the fallback's), and the tokens stay the resident
    engine's; a batch the caller set with `rebatch` is kept."""
    source = open_model("tiny-olmoe")
    prompts = [tuple(range(3, 3 + n)) for n in (5, 9, 2, 14, 7, 3, 11, 6)]
    llm = moe_jax.LLM(source, dtype="float32", policy="offload", hardware=hardware, gpu_memory_gb=1 if hardware else None)
    assert len(llm.generate(prompts[:1], GREEDY)) == 1
    warm, engine = llm.policy, llm.engine
    assert warm.batch_size == 1
    with caplog.at_level("INFO", logger="moe_jax"):
        got = [c.token_ids for c in llm.generate(prompts, GREEDY)]
    assert got == resident_tokens(source, prompts=prompts)
    assert llm.engine is engine and llm.policy.batch_size == len(prompts) and engine.policy == llm.policy
    assert (llm.policy.num_micro_batches, llm.policy.resident_expert_fraction) == (warm.num_micro_batches,
                                                                                 warm.resident_expert_fraction)
    assert f"the batch chosen for 1 requests, {warm}, is now {llm.policy} for these 8" in caplog.text
    llm.rebatch(warm)
    llm.generate(prompts + prompts, GREEDY)
    assert llm.policy == warm
    if hardware is None:  # the fallback's batch has no memory model: where the engine refuses it, the old one runs
        fallback = moe_jax.LLM(source, dtype="float32", policy="offload")
        fallback.generate(prompts[:1], GREEDY)

        def refuse(policy):
            raise OffloadMemoryError("needs 9 GiB on the GPU")
        fallback.engine.rebatch = refuse
        with caplog.at_level("WARNING", logger="moe_jax"):
            assert [c.token_ids for c in fallback.generate(prompts, GREEDY)] == got
        assert fallback.policy.batch_size == 1 and "keeping Policy(batch_size=1" in caplog.text


@pytest.mark.parametrize("n", [1, 9, 13])
def test_hrm_policy_fits_any_job_size(n):
    """HRM is asked for at most one wave of the job's size, so its policy is valid for any n."""
    llm = moe_jax.LLM("tiny-olmoe", dtype="float32", policy="offload", hardware="h100-80gb")
    outs = llm.generate([f"prompt {i}" for i in range(n)], SamplingParams(max_new_tokens=2))
    assert len(outs) == n and llm.policy.batch_size <= n and llm.hrm_prediction is not None


def test_hrm_policy_for_a_prompt_near_the_context_limit():
    llm = moe_jax.LLM("tiny-olmoe", dtype="float32", policy="offload", hardware="l4")
    out = llm.generate([[1 + i % 250 for i in range(1600)]], SamplingParams(max_new_tokens=4))[0]
    assert len(out.token_ids) == 4
    # beside a prompt near the end of the context, a short one whose budget runs to it: HRM's prompt_len +
    # gen_len stay within the context
    near = Request(0, tuple(1 + i % 250 for i in range(llm.cfg.max_positions - 5)), GREEDY.replace(max_new_tokens=5))
    short = Request(1, (1, 2, 3), GREEDY.replace(max_new_tokens=llm.cfg.max_positions - 3))
    assert llm._choose_offload_policy([near, short]).batch_size <= 2


def test_finished_rows_take_waiting_requests_mid_run():
    """Continuous batching: with ragged max_new_tokens, rows of finished requests are refilled while the
    others decode (sampled and greedy rows, per-request seeds); every request still gets exactly what the
    resident engine generates, in fewer steps than waves of N would take."""
    source = open_model("tiny-mixtral")
    prompts = PROMPTS + [(5, 6, 7), tuple(range(20, 33))]
    budgets = (2, 9, 3, 12, 1, 5, 7, 4, 10)
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True, temperature=0.7 * (i % 2), seed=i)
              for i, n in enumerate(budgets)]
    got, eng = offload_tokens(source, Policy(batch_size=3, micro_batch_size=2, num_micro_batches=2,
                                             resident_expert_fraction=0.5), params, prompts)
    assert got == resident_tokens(source, params, prompts)
    assert eng.stats.refilled == len(prompts) - 3
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # waves: longest prompts first
    wave_steps = sum(max(budgets[i] for i in order[w:w + 3]) for w in range(0, len(order), 3))
    assert eng.stats.decode_steps < wave_steps - 3, (eng.stats.decode_steps, wave_steps)


@pytest.mark.gpu
@pytest.mark.skipif(__import__("jax").default_backend() != "gpu", reason="needs a GPU")
def test_gpu_offload_streams_from_pinned_memory_and_equals_resident():
    """On a GPU: the experts stream from pinned host memory and q/k/v / attention cross through it, with
    rows refilled mid-run; the tokens (float32) equal the resident engine's."""
    import jax

    source = open_model("tiny-mixtral")
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (2, 9, 3, 12, 1, 5, 7)]
    got, eng = offload_tokens(source, Policy(batch_size=3, micro_batch_size=2, num_micro_batches=2,
                                             resident_expert_fraction=0.5), params)
    assert got == resident_tokens(source, params)
    kinds = {a.sharding.memory_kind for chunks in eng.host_chunks for a in jax.tree.leaves(chunks)}
    assert kinds == {"pinned_host"} and eng.stats.h2d_bytes > 0 and eng.stats.refilled == 4
    assert eng.stats.host_views or os.environ.get("MOE_JAX_HOST_VIEWS") == "0"  # gpu_suite's probe turns them off
    assert eng.stats.peak_gpu_bytes and eng.stats.peak_gpu_bytes > 0


def test_gpu_machines_host_checks_use_their_profiles_host_memory(monkeypatch):
    """On a GPU whose HRM profile is known, the engine's host checks take the profile's host memory as
    planned (a VM may show less until used); on the CPU backend a named profile is some other machine."""
    import jax
    from types import SimpleNamespace

    from moe_jax.hrm import hardware_profile

    llm = moe_jax.LLM("tiny-mixtral", policy="offload")
    assert llm._planned_host_bytes() is None
    llm = moe_jax.LLM("tiny-mixtral", policy="offload", hardware="l4")
    assert llm._planned_host_bytes() is None
    fake = SimpleNamespace(platform="gpu", device_kind="NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(jax, "devices", lambda *a: [fake])
    assert llm._planned_host_bytes() == hardware_profile("l4").host_memory
    llm.hardware = None
    assert llm._planned_host_bytes() == hardware_profile("h100-80gb").host_memory


@pytest.mark.parametrize("prefetch, views", [("split", True), ("whole", True), ("split", False)])
def test_exp4_coded_experts_generate_the_same_tokens(monkeypatch, prefetch, views):
    """Streamed experts coded with exp4 (12 bits on the link, decoded on the GPU) are bit-exact: bfloat16
    greedy tokens equal those of uncoded streaming; the link carries 3/4 of the bytes. The load codes them
    straight into pinned memory through views, or (views off) into NumPy arrays copied there."""
    if not views:
        monkeypatch.setenv("MOE_JAX_HOST_VIEWS", "0")
    assert_exp4_tokens_equal(prefetch)


def test_exp4_chunks_that_views_cannot_take_are_copied_and_said(monkeypatch, caplog):
    """Views that work for the worker's arrays but not for a coded chunk's (a layout the check did not meet): the
    load copies the coded experts into pinned memory, warns once, and the tokens stay exact."""
    view = offload_engine.host_views.host_view

    def no_uint8_views(x, writable=False):
        if x.dtype == np.uint8:
            raise ValueError("host_view: a row-major array, got layout major_to_minor=(0, 1, 2)")
        return view(x, writable)

    monkeypatch.setattr(offload_engine.host_views, "host_view", no_uint8_views)
    with caplog.at_level("WARNING", logger="moe_jax"):
        assert_exp4_tokens_equal("split")
    said = [r for r in caplog.records if "coded experts are copied into pinned memory" in r.getMessage()]
    assert len(said) == 1 and "got layout" in said[0].getMessage()


@pytest.mark.gpu
@pytest.mark.skipif(__import__("jax").default_backend() != "gpu", reason="needs a GPU")
def test_gpu_exp4_is_exact_and_installs_one_matrix_at_a_time():
    """On a GPU: coded experts give the uncoded tokens, and the GPU compiler's install of one coded expert
    of a Mixtral 8x7B matrix keeps at most two decoded matrices alive."""
    assert_exp4_tokens_equal("split")
    H, F, n = 4096, 14336, 65536
    assert coded_install_temp_bytes(4, H, F, n, slots=24) <= 2 * H * F * 2 + 16 * n


def test_exp4s_planned_overhead_holds_the_compiled_install_of_an_expert():
    """The GPU bytes exp4 adds to the plan (`decode_overhead_bytes`, which HRM and the engine count) hold what
    the compiler's install of one coded expert of each Mixtral 8x7B matrix keeps beside its escapes (XLA on the
    CPU here; the GPU test above bounds the GPU compiler's)."""
    from moe_jax.expert_codec import ESCAPE_BYTES, decode_overhead_bytes, expert_shapes

    cfg, n = moe_jax.presets.preset_config("mixtral-8x7b"), 65536
    planned = decode_overhead_bytes(cfg, ml_dtypes.bfloat16, "exp4", 0, escape_bytes=ESCAPE_BYTES * n)
    for a, b in expert_shapes(cfg).values():
        assert 0 < coded_install_temp_bytes(4, a, b, n, slots=24) <= planned, (a, b)


def coded_install_temp_bytes(c: int, H: int, F: int, n: int, slots: int) -> int:
    """Temporary bytes the compiled install of one expert of a coded chunk of c experts [H, F] needs."""
    import jax

    from moe_jax.offload_engine import _install_coded

    sd = jax.ShapeDtypeStruct
    args = (sd((slots, H, F), jax.numpy.bfloat16), sd((c, H, F), np.uint8), sd((c, H, F // 2), np.uint8),
            sd((c,), np.int32), sd((n,), np.int32), sd((n,), np.int32), sd((n,), np.uint16), 0, 4)
    return jax.jit(_install_coded, donate_argnums=0).lower(*args).compile().memory_analysis().temp_size_in_bytes


def assert_exp4_tokens_equal(prefetch: str):
    import jax

    source = open_model("tiny-qwen2-moe")
    requests = [Request(i, p, GREEDY) for i, p in enumerate(PROMPTS)]
    runs = {}
    for codec in ("none", "exp4"):
        eng = OffloadEngine(source.cfg, source.weights, ml_dtypes.bfloat16,
                            Policy(4, 2, 2, 0.25, expert_codec=codec), prefetch=prefetch)
        assert eng.host_views == (os.environ.get("MOE_JAX_HOST_VIEWS") != "0")  # the path this test means
        assert {a.sharding.memory_kind for a in jax.tree_util.tree_leaves(eng.host_chunks)} == {"pinned_host"}
        runs[codec] = sorted((r.index, ids) for r, ids, *_ in eng.generate(requests)), eng.stats
    assert runs["exp4"][0] == runs["none"][0]
    assert runs["exp4"][1].h2d_bytes == 0.75 * runs["none"][1].h2d_bytes > 0
    stats = runs["exp4"][1]
    assert stats.host_free_bytes is None or 0 < stats.host_free_bytes <= stats.host_total_bytes
    with pytest.raises(ValueError, match="codes bfloat16 weights"):
        OffloadEngine(source.cfg, source.weights, np.float32, Policy(4, 2, 2, expert_codec="exp4"))


def test_llm_expert_codec_reaches_hrm_and_is_checked():
    prompts, params = ["abc", "hello world", "x"], SamplingParams(max_new_tokens=3)
    plain = moe_jax.LLM("tiny-olmoe", policy="offload", hardware="l4", gpu_memory_gb=1)
    coded = moe_jax.LLM("tiny-olmoe", policy="offload", hardware="l4", gpu_memory_gb=1, expert_codec="exp4")
    assert [c.token_ids for c in coded.generate(prompts, params)] == [c.token_ids for c in plain.generate(prompts, params)]
    assert coded.policy.expert_codec == "exp4" and coded.hrm_prediction.policy.expert_codec == "exp4"
    with pytest.raises(ValueError, match="codes bfloat16 weights; the model runs in float32"):
        moe_jax.LLM("tiny-olmoe", dtype="float32", policy="offload", expert_codec="exp4")
    with pytest.raises(moe_jax.llm.PolicyUnavailable, match="differs from the given policy's"):
        moe_jax.LLM("tiny-olmoe", policy=Policy(2, 1, 2), expert_codec="exp4")


@pytest.mark.parametrize("name", ["tiny-mixtral", "tiny-qwen2-moe"])
def test_int8_kv_cache_is_what_attention_reads(name):
    """kv_cache_dtype='int8': the host cache holds int8 rows and their scales (the bytes HRM counts), and the
    tokens follow the resident engine's. int8 is lossy, so only the first token (prefill, attention on the
    GPU) must be equal; greedy decode over rows within 0.4% of their max agrees on most of the rest (a wrong
    scale would not: `tests/host_ops` checks the kernel's numbers)."""
    from moe_jax.hrm.costs import kv_bytes_per_token

    source = open_model(name)
    want = resident_tokens(source)
    got, eng = offload_tokens(source, Policy(4, 2, 2, 0.5, kv_cache_dtype="int8"))
    assert [g[0] for g in got] == [w[0] for w in want]
    agree = np.mean([a == b for g, w in zip(got, want) for a, b in zip(g, w)])
    assert agree >= 0.85, (got, want)
    cfg = source.cfg
    positions = eng.stats.kv_bytes / (cfg.num_layers * kv_bytes_per_token(cfg, np.float32, "int8"))
    assert eng.stats.kv_dtype == "int8" and positions == int(positions) > 0
    assert kv_bytes_per_token(cfg, np.float32, "int8") == 2 * cfg.num_kv_heads * (cfg.head_dim + 4)


def test_llm_kv_cache_dtype_reaches_hrm_and_is_checked():
    llm = moe_jax.LLM("tiny-olmoe", policy="offload", hardware="l4", gpu_memory_gb=1, kv_cache_dtype="int8")
    assert len(llm.generate(["abc", "hello world", "x"], SamplingParams(max_new_tokens=3))) == 3
    assert llm.policy.kv_cache_dtype == "int8" and llm.hrm_prediction.policy.kv_cache_dtype == "int8"
    assert llm.stats.kv_dtype == "int8"
    with pytest.raises(moe_jax.llm.PolicyUnavailable, match="kv_cache_dtype='int8' sets how the offload engine's "
                                                            "host KV cache stores K and V; policy 'resident'"):
        moe_jax.LLM("tiny-olmoe", policy="resident", kv_cache_dtype="int8")
    with pytest.raises(moe_jax.llm.PolicyUnavailable, match="kv_cache_dtype='int8' differs from the given policy's"):
        moe_jax.LLM("tiny-olmoe", policy=Policy(2, 1, 2), kv_cache_dtype="int8")
    with pytest.raises(ValueError, match=r"kv_cache_dtype must be one of \('auto', 'int8'\), got 'fp8'"):
        moe_jax.LLM("tiny-olmoe", policy="offload", kv_cache_dtype="fp8")


def test_exp4_escapes_are_checked_once_loaded_and_decoding_holds_two_matrices(monkeypatch):
    """The codec's escapes, known only once the experts are coded, are checked against the GPU cap before
    the engine is returned (not at the first generate); and installing a coded expert keeps at most two
    decoded matrices alive (XLA:CPU's memory analysis), however many experts its chunk holds."""
    from moe_jax import expert_codec
    from moe_jax.expert_pages import ExpertPages
    from moe_jax.offload_engine import planned_gpu_bytes

    source = open_model("tiny-mixtral")
    policy = Policy(2, 1, 2, 0.0, expert_codec="exp4")
    monkeypatch.setattr(expert_codec, "ESCAPE_ALLOWANCE", 0.0)  # the plan before loading counts no escapes
    pages = ExpertPages.plan(source.cfg.num_layers, source.cfg.num_experts, 0.0, 2)
    cap = planned_gpu_bytes(source.cfg, ml_dtypes.bfloat16, 1, pages, "exp4") / 2**30
    with pytest.raises(OffloadMemoryError, match="needs .* GiB on the GPU"):
        OffloadEngine(source.cfg, source.weights, ml_dtypes.bfloat16, Policy(**{**policy.__dict__, "gpu_memory_gb": cap}))

    H, F, n = 256, 896, 64
    for c in (1, 4):
        temp = coded_install_temp_bytes(c, H, F, n, slots=8)
        assert temp <= 2 * H * F * 2 + 16 * n, (c, temp)  # two matrices and the escapes


@pytest.mark.parametrize("impl,marker", [("pallas_mgpu", "mosaic_gpu"), ("pallas_triton", "xla.gpu.triton")])
@pytest.mark.parametrize("model", ["mixtral-8x7b", "qwen3-30b-a3b", "deepseek-v2-lite"])
def test_engine_steps_lower_for_cuda_with_the_gpu_kernels_at_real_shapes(monkeypatch, lowering_for_h100, model, impl,
                                                                         marker):
    """What an H100 compiles: the decode and prefill steps with each GPU expert kernel, at the model's
    shapes and row counts the policy makes (odd micro-batches, prompts, one row), as if on a GPU. Kernel
    shape limits show up in this lowering (e.g. the Mosaic TMA's 8-row tiling), never in interpret mode."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import SingleDeviceSharding

    from moe_jax.offload_engine import _jitted
    from moe_jax.params import layer_param_specs
    from moe_jax.presets import preset_config
    from pallas_kernels import mgpu

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(mgpu, "unavailable_reason", lambda *a, **k: None)
    cfg = preset_config(model)
    dev = jax.devices()[0]
    on_dev, on_host = (SingleDeviceSharding(dev, memory_kind=k) for k in ("device", "pinned_host"))
    mid, _, prefill = _jitted(cfg, impl, on_dev, on_host)[:3]
    sd = lambda shape, dt=jnp.bfloat16, sh=on_dev: jax.ShapeDtypeStruct(shape, dt, sharding=sh)
    specs = layer_param_specs(cfg, moe=True)
    p = {k: sd(s.shape) for k, s in specs.items() if not s.expert}
    slots = {k: sd((cfg.num_experts + 11, *s.shape[1:])) for k, s in specs.items() if s.expert}
    chunk = {k: sd((2, *s.shape[1:]), sh=on_host) for k, s in specs.items() if s.expert}
    table = sd((cfg.num_experts,), jnp.int32)
    with lowering_for_h100:
        for mu in (663, 1):
            text = mid.trace(p, p, slots, table, sd((mu, 1, cfg.hidden_size)),
                             sd((mu, 1, cfg.num_heads, cfg.value_dim), sh=on_host), sd((mu, 1), jnp.int32), chunk
                             ).lower(lowering_platforms=("cuda",)).as_text()
            assert marker in text
        text = prefill.trace(p, slots, table, sd((3, 77, cfg.hidden_size)), sd((3, 77), jnp.int32), chunk
                             ).lower(lowering_platforms=("cuda",)).as_text()
        assert marker in text


def test_host_kernels_are_warmed_once_per_process():
    """The one-slot warm-up of the CPU kernels is cached per (model, cache dtype, dtype), not redone per call."""
    from moe_jax import offload_engine

    before = offload_engine._warm_host_kernels.cache_info().hits
    offload_tokens(open_model("tiny-olmoe"), Policy(2, 1, 2), prompts=PROMPTS[:2])
    offload_tokens(open_model("tiny-olmoe"), Policy(2, 1, 2), prompts=PROMPTS[:2])
    assert offload_engine._warm_host_kernels.cache_info().hits > before


def test_stats_count_the_xla_compiles_of_each_generate():
    """`OffloadStats.compiles` counts the XLA compiles inside a generate call (new shapes of its steps): the first
    call's, none when the same job runs again, and a new prefill shape's when a longer prompt comes. Last in the
    module: it clears JAX's caches, which the tests after it would compile again."""
    source = open_model("tiny-mixtral")
    eng = OffloadEngine(source.cfg, source.weights, np.float32,
                        Policy(batch_size=4, micro_batch_size=2, num_micro_batches=2))
    jax.clear_caches()
    job = lambda prompts: list(eng.generate([Request(i, p, GREEDY) for i, p in enumerate(prompts)]))
    job(PROMPTS)
    first = eng.stats.compiles
    assert first.compiles > 0 and first.seconds > 0 and "XLA compiles" in eng.stats.summary()
    job(PROMPTS)
    assert eng.stats.compiles.compiles == 0
    job([*PROMPTS[:-1], tuple(range(3, 40))])  # a prompt of a longer bucket: its prefill call's shape is new
    assert 0 < eng.stats.compiles.compiles < first.compiles


@pytest.mark.parametrize("layers", [1, 2])
def test_the_prefills_time_holds_its_kv_writes_and_decode_counts_its_steps(monkeypatch, layers):
    """The prefill's time ends once its prompts' k/v writes (queued on the CPU worker) are done, not when its GPU
    calls were dispatched (the rest was charged to the first decode step); a job of gen_len tokens runs gen_len - 1
    decode steps, with one layer too (whose first tokens come at the step after its prompts' layer)."""
    from moe_jax.model_source import ModelSource
    from moe_jax.presets import RandomWeights, preset_config

    cfg = preset_config("tiny-mixtral").replace(num_layers=layers)
    source = ModelSource("tiny-mixtral", cfg, RandomWeights(cfg, 0), None)
    slow = 0.2
    real = offload_engine._Run._prefill_writeback

    def slow_writeback(self, *a):
        time.sleep(slow)
        return real(self, *a)

    eng = OffloadEngine(cfg, source.weights, np.float32, Policy(batch_size=4, micro_batch_size=2, num_micro_batches=2,
                                                               resident_expert_fraction=0.0))
    requests = [Request(i, p, GREEDY) for i, p in enumerate(PROMPTS[:4])]
    monkeypatch.setattr(offload_engine._Run, "_prefill_writeback", slow_writeback)
    list(eng.generate(requests))  # compiles every shape
    got = [ids for _, ids, *_ in eng.generate(requests)]
    assert [len(g) for g in got] == [GREEDY.max_new_tokens] * 4 and eng.stats.decode_steps == GREEDY.max_new_tokens - 1
    writes = eng.stats.prefill_calls  # one write per prefill call, each at least `slow` s
    assert eng.stats.prefill_s >= writes * slow > 0
    if layers > 1:  # with one layer the second job's prefill calls took two new shapes (compiled in its prefill)
        assert eng.stats.compiles.compiles == 0
    assert eng.stats.decode_s < slow, (eng.stats.decode_s, eng.stats.prefill_s)


def test_a_refill_whose_rows_are_not_in_length_order_writes_each_prompts_kv_to_its_own_slot():
    """Two rows free at once and the next requests grow longer, so the refill's prefill call (sorted longest
    first) takes its rows in the order [1, 0]: each prompt's k/v must still go to its own row's slot."""
    source = open_model("tiny-mixtral")
    rng = np.random.default_rng(0)
    prompts = [tuple(rng.integers(3, 250, n).tolist()) for n in (5, 5, 2, 9)]
    params = [SamplingParams(max_new_tokens=b, ignore_eos=True) for b in (20, 20, 10, 2)]
    eng = OffloadEngine(source.cfg, source.weights, np.float32, Policy(2, 2, 1))
    got = {r.index: ids for r, ids, *_ in eng.generate([Request(i, p, sp) for i, (p, sp) in enumerate(zip(prompts, params))])}
    assert eng.stats.refilled == 2
    assert [got[i] for i in range(4)] == resident_tokens(source, params, list(prompts))


def test_long_random_prompts_offload_equals_resident():
    """Contexts past the CPU kernel's 64-position blocks and prefill buckets past 32, random tokens (no prompt a
    prefix of another): the offload engine's tokens are the resident engine's."""
    source = open_model("tiny-qwen3-moe")
    rng = np.random.default_rng(1)
    prompts = [tuple(rng.integers(3, source.cfg.vocab_size, n).tolist()) for n in (150, 290, 70, 201)]
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    got, _ = offload_tokens(source, Policy(batch_size=3, micro_batch_size=2, num_micro_batches=2,
                                           resident_expert_fraction=0.25), params, prompts)
    assert got == resident_tokens(source, params, prompts)


def test_a_request_ends_at_the_context_as_the_resident_engines():
    """max_new_tokens past the model's context: the offload engine ends the request at the last position
    ("length", 3 tokens for a prompt 3 short of it), with the resident engine's tokens, beside one that runs
    to its max_new_tokens."""
    llm = moe_jax.LLM("tiny-mixtral", dtype="float32", policy=Policy(batch_size=2, micro_batch_size=1,
                                                                       num_micro_batches=2))
    n = llm.cfg.max_positions
    prompts = [[1 + i % 200 for i in range(n - 3)], [1, 2, 3]]
    params = SamplingParams(max_new_tokens=5, ignore_eos=True)
    got = llm.generate(prompts, params)
    assert [len(c.token_ids) for c in got] == [3, 5] and [c.finish_reason for c in got] == ["length"] * 2
    want = moe_jax.LLM("tiny-mixtral", dtype="float32", policy="resident").generate(prompts, params)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]


def test_a_kept_kv_cache_too_small_for_the_next_job_counts_as_free_host_memory(monkeypatch):
    """A job that outgrows the kept host KV cache gives it back before its own is allocated: it needs its cache's
    bytes less the kept one's free, not all of them (refused only where even that is short)."""
    import moe_jax.offload_engine as oe
    from moe_jax.host_memory import MemInfo

    source = open_model("tiny-mixtral")
    eng = OffloadEngine(source.cfg, source.weights, np.float32, Policy(batch_size=2, micro_batch_size=1,
                                                                      num_micro_batches=2))
    small = [Request(0, (1, 2, 3), GREEDY), Request(1, (1, 2, 3, 4, 5), GREEDY)]
    assert len(list(eng.generate(small))) == 2
    kept = eng.kv_cache.storage_bytes
    large = [Request(r.index, r.prompt, GREEDY.replace(max_new_tokens=40)) for r in small]
    need = HostKVCache.footprint(*eng._kv_args(eng._plan(large)))
    assert need > kept
    monkeypatch.setattr(oe.host_memory, "meminfo", lambda: MemInfo(total=2**40, available=need - kept // 2))
    assert [len(c[1]) for c in eng.generate(large)] == [40, 40]
    eng.release_kv_cache()  # nothing kept: all of it is needed
    with pytest.raises(OffloadMemoryError, match="host memory for the KV cache"):
        list(eng.generate(large))
