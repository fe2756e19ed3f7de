"""The resident engine's continuous batching: a request's tokens do not depend on what shares its batch,
and rows of finished requests take waiting ones."""
from __future__ import annotations

import importlib
import logging

import jax
import numpy as np
import pytest

import moe_jax
from moe_jax.model_source import ModelSource, open_model
from moe_jax.presets import RandomWeights, preset_config
from moe_jax.prompts import PromptError
from moe_jax.requests import Request
from moe_jax.resident_engine import ResidentEngine
from moe_jax.sampling import SamplingParams

PROMPTS = [tuple(range(3, 3 + n)) for n in (9, 1, 17, 4, 30, 2, 11)]
BUDGETS = (2, 9, 3, 12, 1, 5, 7)


def run(engine, prompts, params):
    out = {r.index: ids for r, ids, *_ in engine.generate([Request(i, p, sp) for i, (p, sp) in enumerate(zip(prompts, params))])}
    assert sorted(out) == list(range(len(prompts)))
    return [out[i] for i in range(len(prompts))]


def test_rows_of_finished_requests_take_waiting_ones():
    source = open_model("tiny-olmoe")
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True, temperature=0.8 * (i % 2), seed=i)
              for i, n in enumerate(BUDGETS)]
    engine = ResidentEngine(source.cfg, source.weights, np.float32, max_batch_size=2)
    got = run(engine, PROMPTS, params)
    alone = ResidentEngine(source.cfg, source.weights, np.float32, max_batch_size=1)
    assert got == [run(alone, [p], [sp])[0] for p, sp in zip(PROMPTS, params)]
    assert [len(g) for g in got] == list(BUDGETS)
    order = sorted(range(len(PROMPTS)), key=lambda i: -len(PROMPTS[i]))  # waves of 2, longest prompts first
    wave_steps = sum(max(BUDGETS[i] for i in order[w:w + 2]) - 1 for w in range(0, len(order), 2))
    assert engine.decode_steps < wave_steps, (engine.decode_steps, wave_steps)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
@pytest.mark.parametrize("impl", ["pallas", "auto"])
def test_gpu_expert_kernels_agree_inside_the_model(caplog, monkeypatch, impl):
    """One OLMoE-1B-7B layer (H=2048, F=1024, 64 experts, top-8; random bf16 weights) on the GPU: the model
    run with the Pallas kernel `pallas` picks there (Mosaic on Hopper), or with `auto` (Triton for these
    calls' few rows per expert), gives the XLA kernel's logits and greedy tokens."""
    cfg = preset_config("olmoe-1b-7b").replace(num_layers=1)
    source = ModelSource("olmoe-1b-7b (1 layer)", cfg, RandomWeights(cfg, 0), None)
    tokens = [list(range(5, 5 + n)) for n in (37, 200, 3)]
    monkeypatch.setattr(importlib.import_module("pallas_kernels.moe_ffn"), "_logged", set())  # logged once a process
    with caplog.at_level(logging.INFO, logger="pallas_kernels"):
        pallas = moe_jax.LLM(source, dtype="bfloat16", policy="resident", moe_impl=impl).logits(tokens)
    assert "runs as pallas_mgpu" in caplog.text or "runs as pallas_triton" in caplog.text
    assert impl != "auto" or "impl='auto' runs as pallas_triton" in caplog.text  # at most ~75 rows per expert
    xla = moe_jax.LLM(source, dtype="bfloat16", policy="resident", moe_impl="xla").logits(tokens)
    for a, b in zip(pallas, xla):
        assert np.abs(a - b).max() < 0.05 * np.abs(b).max()
        assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.9


@pytest.mark.parametrize("policy", ["resident", "offload"])
@pytest.mark.parametrize("kwargs,message", [
    (dict(moe_impl="cuda"), r"moe_impl must be one of auto, pallas, .*got 'cuda'"),
    (dict(prefetch="half"), r"prefetch must be one of split, whole, got 'half'"),
    (dict(max_batch_size=0), r"max_batch_size must be a positive integer or None, got 0"),
    (dict(max_batch_size=True), r"max_batch_size must be a positive integer or None, got True"),
    (dict(gpu_memory_gb=0), r"gpu_memory_gb must be a positive number of GiB or None, got 0"),
    (dict(gpu_memory_gb=-1.5), r"gpu_memory_gb must be a positive number of GiB or None, got -1.5"),
    (dict(seed=-1), r"seed must be a non-negative integer, got -1"),
], ids=lambda v: next(iter(v)) if isinstance(v, dict) else None)
def test_bad_arguments_are_refused_at_construction(policy, kwargs, message):
    """Each names the argument and its value before any engine is built (offload: before the first generate,
    which used to be where some of these failed, or went unnoticed: a batch of 0 or a cap of 0 meant none)."""
    with pytest.raises(ValueError, match=message):
        moe_jax.LLM("tiny-mixtral", policy=policy, **kwargs)


def test_numpy_integers_are_arguments_too():
    llm = moe_jax.LLM("tiny-mixtral", policy="resident", max_batch_size=np.int64(4), seed=np.int64(3))
    assert len(llm.generate([[1, 2, 3]], SamplingParams(max_new_tokens=2))[0].token_ids) == 2


def test_a_single_prompt_must_be_wrapped_in_a_list():
    """A bare string is a sequence of characters and a bare list of ints a sequence of ints: both used to run as
    one prompt per character or token."""
    llm = moe_jax.LLM("tiny-mixtral", policy="resident")
    for one in ("The capital", [1, 2, 3]):
        with pytest.raises(TypeError, match="prompts must be a list of prompts .* wrap it in a list"):
            llm.generate(one, SamplingParams(max_new_tokens=1))
    with pytest.raises(TypeError, match="token_ids must be a list of sequences .* wrap it in a list"):
        llm.logits([1, 2, 3])
    for none in (None, 5):  # no list at all
        with pytest.raises(TypeError, match=f"prompts must be a list of prompts .*; got {type(none).__name__} {none}"):
            llm.generate(none, SamplingParams(max_new_tokens=1))
        with pytest.raises(TypeError, match=f"token_ids must be a list of sequences .*; got {type(none).__name__}"):
            llm.logits(none)
    with pytest.raises(PromptError, match="prompt 0: token ids must be a sequence of integers, got None"):
        llm.generate([None], SamplingParams(max_new_tokens=1))
    assert len(llm.generate(["The capital"], SamplingParams(max_new_tokens=1))) == 1


def test_arguments_of_other_kinds_are_named_errors_and_checked_before_the_iterator():
    """bytes are neither text nor token ids; params of another kind (a generator, an item not a SamplingParams)
    are named; generate_iter checks it all when called, not at its first item."""
    llm = moe_jax.LLM("tiny-mixtral", policy="resident")
    for raw in (b"hi", bytearray(b"hi")):
        with pytest.raises(PromptError, match=f"prompt 0: got {type(raw).__name__}; give text .* or a list of token ids"):
            llm.generate([raw])
    with pytest.raises(TypeError, match="params must be a SamplingParams or a list of them .*, got generator"):
        llm.generate(["a"], (SamplingParams() for _ in range(1)))
    with pytest.raises(TypeError, match=r"params\[1\] must be a SamplingParams, got dict"):
        llm.generate(["a", "b"], [SamplingParams(), {"max_new_tokens": 2}])
    with pytest.raises(PromptError, match="token id 999 is outside the vocabulary"):
        llm.generate_iter([[999]])  # no next() needed


def test_the_scores_and_logits_of_long_sequences_are_counted_against_the_cap():
    """`logits` holds [B, T, vocab] float32 logits and a layer's [B, heads, T, T] scores, a prefill the scores over
    its cache: counted with the KV cache against the cap (a MemoryError naming them), not left to XLA."""
    llm = moe_jax.LLM("tiny-mixtral", dtype="float32", policy="resident", gpu_memory_gb=0.002)
    assert llm.logits([[1, 2, 3]])[0].shape == (3, llm.cfg.vocab_size)
    with pytest.raises(MemoryError, match=r"KV cache of 8 sequences x 1024 positions \(and the float32 attention "
                                          r"scores and logits of 1024 tokens each\) but the gpu_memory_gb cap"):
        llm.logits([[1] * 1000] * 8)


def test_a_prefill_whose_scores_do_not_fit_runs_in_calls_of_fewer_rows_then_fewer_tokens(caplog):
    """A prefill call's float32 attention scores [rows, heads, tokens, positions] that do not fit beside the KV
    cache under the cap: the call takes fewer rows, then one prompt in chunks of fewer tokens (said), with the
    same tokens and log-probabilities as one call of all; a MemoryError where not even 16 tokens' scores fit.
    Sizes (float32 tiny-mixtral): weights ~1.0 MB; 4 prompts -> cache 4 x 384 positions, 0.79 MB; scores of one
    row x 16 tokens 0.10 MB, of all 4 rows' whole prompts (bucket 384) 9.4 MB. Two prompts' last tokens open a
    chunk of 32 (positions 32 and 288), where their first tokens are sampled."""
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 250, n).tolist() for n in (300, 180, 33, 289)]
    params = [SamplingParams(max_new_tokens=4, ignore_eos=True, logprobs=2, temperature=0.7 * (i % 2), seed=i)
              for i in range(len(prompts))]
    whole = moe_jax.LLM("tiny-mixtral", dtype="float32", policy="resident").generate(prompts, params)
    for cap, said in ((0.007, "calls of at most 2 rows x 384 tokens"), (0.004, "calls of at most 1 rows x 256 tokens"),
                      (0.0021, "calls of at most 1 rows x 32 tokens")):  # 256: the last chunk overlaps the one before
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="moe_jax"):
            capped = moe_jax.LLM("tiny-mixtral", dtype="float32", policy="resident", gpu_memory_gb=cap).generate(
                prompts, params)
        assert said in caplog.text
        for a, b in zip(capped, whole):
            assert a.token_ids == b.token_ids and len(a.token_ids) == 4
            np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)
            assert [i for i, _ in a.top_logprobs[0]] == [i for i, _ in b.top_logprobs[0]]
    llm = moe_jax.LLM("tiny-mixtral", dtype="float32", policy="resident", gpu_memory_gb=0.0019)
    with pytest.raises(MemoryError, match=r"4 sequences x 384 positions \(and the float32 attention scores of 1 "
                                          r"sequences x 16 tokens\) but the gpu_memory_gb cap"):
        llm.generate(prompts, params)


def test_repeated_samples_and_an_unused_seed_are_said(caplog, hf_checkpoints):
    """The same prompt sampled with the same seed gives the same tokens (a request's samples depend on its prompt
    and seed): said, as is a weights seed given for a model directory, which holds its own weights."""
    llm = moe_jax.LLM("tiny-mixtral", policy="resident")
    hot = SamplingParams(max_new_tokens=3, temperature=1.0)
    with caplog.at_level("WARNING", logger="moe_jax"):
        outs = llm.generate(["Hi", "Hi", "Hi", "other"], hot)
        assert "2 request(s) sample a prompt with the same seed as an earlier one" in caplog.text
        assert outs[0].token_ids == outs[1].token_ids == outs[2].token_ids
        caplog.clear()
        llm.generate(["Hi", "Hi"], [hot, hot.replace(seed=1)])
        llm.generate(["Hi", "Hi"], SamplingParams(max_new_tokens=2))  # greedy: the same by design
        assert "same seed" not in caplog.text
        moe_jax.LLM(str(hf_checkpoints["mixtral"][0]), policy="resident", seed=3)
    assert "seed=3 unused: it draws a preset's random weights" in caplog.text


def test_a_cap_too_small_for_a_tiny_model_reads_in_its_own_digits():
    with pytest.raises(MemoryError, match=r"needs 0\.000475 GiB for the weights alone but the gpu_memory_gb cap is "
                                          r"1e-05 GiB \(90% of it usable\)"):
        moe_jax.LLM("tiny-mixtral", policy="resident", gpu_memory_gb=1e-5)


def test_a_device_too_small_names_jax_allocator_share(monkeypatch):
    """Where JAX's own limit (75% of a GPU by default) is what the weights pass, the error says how to raise it."""
    monkeypatch.setattr(moe_jax.resident_engine, "device_memory_limit", lambda: 2 * 2**10)
    with pytest.raises(MemoryError, match=r"but the accelerator's \(JAX's allocator limit: XLA_PYTHON_CLIENT_MEM_FRACTION "
                                          r"of the card, 0.75 unless set .*\) is 1.91e-06 GiB"):
        moe_jax.LLM("tiny-mixtral", policy="resident")


def test_an_expert_codec_is_refused_under_the_resident_policy():
    with pytest.raises(moe_jax.llm.PolicyUnavailable, match="policy 'resident' streams none"):
        moe_jax.LLM("tiny-mixtral", policy="resident", expert_codec="exp4")


def test_max_new_tokens_past_the_context_is_said_not_silently_cut(caplog):
    llm = moe_jax.LLM("tiny-mixtral", policy="resident")
    n = llm.cfg.max_positions
    prompts = [[1 + i % 200 for i in range(n - 3)], [1, 2, 3]]  # the first has 3 positions left
    with caplog.at_level(logging.WARNING, logger="moe_jax"):
        out = llm.generate(prompts, SamplingParams(max_new_tokens=5, ignore_eos=True))
    assert [len(c.token_ids) for c in out] == [3, 5] and out[0].finish_reason == "length"
    assert (f"1 request(s) end at the model's context of {n} positions before max_new_tokens (finish_reason "
            f"'length'), e.g. prompt 0: {n - 3} tokens + max_new_tokens 5") in caplog.text


def test_logits_score_a_sequence_as_long_as_the_context():
    """Scoring generates nothing, so a sequence may fill every position; one more is refused."""
    llm = moe_jax.LLM("tiny-mixtral", dtype="float32", policy="resident")
    n = llm.cfg.max_positions
    full = [1 + i % 200 for i in range(n)]
    logits = llm.logits([full, full[:7]])
    assert logits[0].shape == (n, llm.cfg.vocab_size) and np.isfinite(logits[0]).all()
    np.testing.assert_allclose(logits[0][:7], logits[1], rtol=1e-4, atol=1e-4)  # causal: a prefix scores alike
    with pytest.raises(moe_jax.prompts.PromptError, match=f"sequence 0 has {n + 1} tokens; the model allows at "
                                                          fr"most {n} \(max positions {n}\)"):
        llm.logits([full + [1]])
    with pytest.raises(moe_jax.prompts.PromptError, match="one left to generate"):
        llm.generate([full])
