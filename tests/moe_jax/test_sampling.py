"""Sampling: seeded, batch-independent, and the filters do what they say."""
from __future__ import annotations

import jax
import numpy as np
import pytest

import moe_jax
from moe_jax.sampling import MAX_TOP_LOGPROBS, SamplingParams, row_keys, sample


@pytest.fixture(scope="module")
def llm():
    return moe_jax.LLM("tiny-qwen3-moe", dtype="float32", policy="resident")


def test_seeded_sampling_is_reproducible_and_batch_independent(llm):
    p = SamplingParams(max_new_tokens=10, temperature=1.0, seed=11)
    alone = llm.generate(["The quick brown fox"], p)[0].token_ids
    batched = llm.generate(["The quick brown fox", "another prompt entirely", "x"], p)[0].token_ids
    assert alone == batched
    other = llm.generate(["The quick brown fox"], p.replace(seed=12))[0].token_ids
    assert other != alone
    greedy = llm.generate(["The quick brown fox"], p.replace(temperature=0.0))[0].token_ids
    assert llm.generate(["The quick brown fox"], p.replace(top_k=1))[0].token_ids == greedy
    # a top_k past the int32 the sampler takes keeps every token, as top_k 0 does
    assert llm.generate(["The quick brown fox"], p.replace(top_k=3_000_000_000))[0].token_ids == alone
    assert p.replace(top_k=-1).top_k == 0  # vLLM's "none" too


def test_prompts_sampled_under_one_seed_are_independent(llm):
    """The default seed for every prompt: each prompt's key mixes in its tokens, so different prompts do not draw
    the same noise (with one key per seed, all of them took the same rank of their sorted distribution)."""
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, llm.cfg.vocab_size, 5).tolist() for _ in range(32)]
    outs = llm.generate(prompts, SamplingParams(max_new_tokens=1, temperature=1.0))
    logits = llm.logits(prompts)
    ranks = [int((lg[-1] > lg[-1][o.token_ids[0]]).sum()) for lg, o in zip(logits, outs)]
    assert len(set(ranks)) >= 8, ranks
    assert llm.generate(prompts[:1], SamplingParams(max_new_tokens=1, temperature=1.0))[0].token_ids == outs[0].token_ids


def test_filters_on_random_logits():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 50)).astype(np.float32) * 3
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    ones = np.ones(4, np.float32)
    top3 = np.argsort(-logits, axis=1)[:, :3]
    for s in range(20):
        ks = jax.random.split(jax.random.PRNGKey(s), 4)
        got = np.asarray(sample(logits, ones, ones, np.full(4, 3, np.int32), ks).tokens)
        assert all(got[b] in top3[b] for b in range(4))
        tiny_p = np.asarray(sample(logits, ones, np.full(4, 1e-6, np.float32), np.zeros(4, np.int32), ks).tokens)
        np.testing.assert_array_equal(tiny_p, logits.argmax(1))
    greedy = np.asarray(sample(logits, np.zeros(4, np.float32), ones, np.zeros(4, np.int32), keys).tokens)
    np.testing.assert_array_equal(greedy, logits.argmax(1))


def test_stop_tokens_and_lengths(llm):
    first = llm.generate(["abc"], SamplingParams(max_new_tokens=6))[0]
    stop_at = first.token_ids[2]
    out = llm.generate(["abc"], SamplingParams(max_new_tokens=6, stop_token_ids=(stop_at,)))[0]
    assert out.finish_reason == "stop" and out.token_ids == first.token_ids[:first.token_ids.index(stop_at) + 1]
    # the text leaves out the stop token's own, as vLLM's does (the token stays in token_ids)
    assert len(out.token_ids) > 1 and llm.tokenizer.decode([stop_at]) != ""
    before = llm.generate(["abc"], SamplingParams(max_new_tokens=len(out.token_ids) - 1))[0]
    assert out.text == before.text != first.text and before.token_ids == out.token_ids[:-1]
    outs = llm.generate(["a", "bb", "ccc"], [SamplingParams(max_new_tokens=n) for n in (1, 4, 9)])
    assert [len(o.token_ids) for o in outs] == [1, 4, 9] and all(o.finish_reason == "length" for o in outs)


@pytest.mark.parametrize("bad, message", [
    (dict(max_new_tokens=0), "max_new_tokens must be a positive integer"),
    (dict(max_new_tokens=True), "max_new_tokens must be a positive integer, got True"),
    (dict(temperature=-1.0), "temperature must be a finite number >= 0"), (dict(temperature="1"), "temperature must be a number"),
    (dict(temperature=float("inf")), "temperature must be a finite number >= 0, got inf"),
    (dict(temperature=float("nan")), "temperature must be a finite number >= 0, got nan"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"), (dict(top_k=-2), "top_k must be an integer >= 0"),
    (dict(seed="x"), r"seed must be an integer in 0\.\.2\*\*32 - 1, got 'x'"),
    (dict(seed=1.5), r"seed must be an integer in 0\.\.2\*\*32 - 1, got 1\.5"),
    (dict(seed=-1), r"seed must be .*, got -1"),  # not 2**32 - 1 in disguise
    (dict(seed=2**32), r"seed must be .*, got 4294967296"),
    (dict(ignore_eos="no"), "ignore_eos must be True or False, got 'no'"),
    (dict(stop_token_ids=[3, -1]), r"stop_token_ids must be >= 0, got \[3, -1\]"),
    (dict(logprobs=-1), r"logprobs must be None or an integer in 0\.\.20, got -1"),
    (dict(logprobs=21), "logprobs must be None or an integer in 0..20, got 21"),
    (dict(logprobs=1.0), "got 1.0"), (dict(logprobs=True), "got True"),
])
def test_invalid_sampling_params(bad, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**bad)


def test_numpy_integers_are_integers():
    p = SamplingParams(max_new_tokens=np.int64(3), top_k=np.int32(2), seed=np.uint32(5))
    assert (p.max_new_tokens, p.top_k, p.seed) == (3, 2, 5) and type(p.seed) is int


def test_token_ids_must_be_integers(llm):
    """A float or bool token id was truncated or taken as 0/1 without a word."""
    assert SamplingParams(stop_token_ids=[np.int64(3), 4]).stop_token_ids == (3, 4)
    for bad, shown in ((2.0, "2.0"), (True, "True")):
        with pytest.raises(ValueError, match=f"stop_token_ids: token ids must be integers, got {shown} at position 1"):
            SamplingParams(stop_token_ids=[5, bad])
    with pytest.raises(moe_jax.prompts.PromptError, match="prompt 1: token ids must be integers, got 1.5 at position 0"):
        llm.generate([[1, 2], [1.5, 2]])
    assert len(llm.generate([np.arange(1, 4)], SamplingParams(max_new_tokens=2))[0].token_ids) == 2


def test_top_p_applies_to_the_top_k_survivors():
    """probs [.3, .2, .2, .15, .15], top_k=2, top_p=0.5: after top-k the survivors are [.6, .4], and
    top-p 0.5 keeps only the first (transformers and vLLM agree); top-p on the full softmax would keep both."""
    logits = np.log(np.array([[0.3, 0.2, 0.2, 0.15, 0.15]], np.float32))
    one = np.ones(1, np.float32)
    draws = {int(sample(logits, one, np.full(1, 0.5, np.float32), np.full(1, 2, np.int32),
                        jax.random.PRNGKey(s)[None]).tokens[0]) for s in range(40)}
    assert draws == {0}


def test_logprobs_are_the_models_distribution_whatever_the_filters():
    """Each row's token log-probability and top tokens come from log-softmax of the raw logits (float64
    reference), for greedy rows and for rows sampled with temperature, top-k and top-p alike."""
    rng = np.random.default_rng(1)
    logits = (rng.normal(size=(5, 60)) * 4).astype(np.float32)
    temperature = np.array([0, 0.7, 1.3, 1, 0.5], np.float32)
    top_p = np.array([1, 1, 0.8, 1, 0.9], np.float32)
    top_k = np.array([0, 0, 0, 3, 5], np.int32)
    s = sample(logits, temperature, top_p, top_k, jax.random.split(jax.random.PRNGKey(3), 5))
    x = logits.astype(np.float64)
    ref = x - x.max(1, keepdims=True) - np.log(np.exp(x - x.max(1, keepdims=True)).sum(1, keepdims=True))
    tokens = np.asarray(s.tokens)
    np.testing.assert_allclose(np.asarray(s.logprob), ref[np.arange(5), tokens], rtol=1e-5)
    order = np.argsort(-x, axis=1)[:, :MAX_TOP_LOGPROBS]
    np.testing.assert_array_equal(np.asarray(s.top_ids), order)
    np.testing.assert_allclose(np.asarray(s.top_logprobs), np.take_along_axis(ref, order, 1), rtol=1e-5)
    assert tokens[0] == order[0, 0] and tokens[3] in order[3, :3]


def test_generated_logprobs_equal_the_logits_of_the_sequence(llm):
    """Completion.logprobs[j] is log-softmax of LLM.logits at the position that predicted token j (greedy and
    sampled); top_logprobs holds the `logprobs` most likely tokens, descending; None asks for nothing, 0 for
    the tokens' own only."""
    prompts = ["The quick brown fox", "x", "hello world"]
    params = [SamplingParams(max_new_tokens=6, logprobs=3), SamplingParams(max_new_tokens=5, temperature=1.0,
              seed=4, logprobs=0), SamplingParams(max_new_tokens=4)]
    outs = llm.generate(prompts, params)
    assert outs[2].logprobs is None and outs[2].top_logprobs is None and outs[1].top_logprobs is None
    for c in outs[:2]:
        n = len(c.prompt_token_ids)
        x = llm.logits([c.prompt_token_ids + c.token_ids])[0][n - 1:-1].astype(np.float64)
        ref = x - x.max(1, keepdims=True) - np.log(np.exp(x - x.max(1, keepdims=True)).sum(1, keepdims=True))
        assert len(c.logprobs) == len(c.token_ids)
        np.testing.assert_allclose(c.logprobs, ref[np.arange(len(c.token_ids)), c.token_ids], rtol=1e-4, atol=1e-5)
    top = outs[0].top_logprobs
    assert [len(t) for t in top] == [3] * len(outs[0].token_ids)
    assert [t[0][0] for t in top] == outs[0].token_ids  # greedy: the token is the most likely one
    assert all(a[1] >= b[1] for t in top for a, b in zip(t, t[1:]))


def test_rows_sampled_in_chunks_equal_rows_sampled_at_once(monkeypatch):
    """Many rows go through the sort in equal chunks (the last overlapping the one before): every row's
    token and log-probabilities as when all rows are sampled at once."""
    import jax.numpy as jnp
    from moe_jax import sampling

    B, V = 77, 300
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(B, V)) * 3).astype(np.float32)
    args = (logits, rng.choice([0.0, 0.7, 1.0], B).astype(np.float32), rng.choice([1.0, 0.9, 0.5], B).astype(np.float32),
            rng.choice([0, 5, 50], B).astype(np.int32), jax.random.split(jax.random.PRNGKey(1), B))
    whole = sampling._sample(*args)
    monkeypatch.setattr(sampling, "SAMPLE_TEMP_BYTES", sampling.TEMP_BUFFERS * 4 * V * 16)
    assert sampling.sample_rows(V) == 16  # 5 chunks of 16 rows, the last starting at row 61
    chunked = sample(*args)
    for a, b in zip(whole, chunked):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert len(set(np.asarray(chunked.tokens).tolist())) > 10
    bf16 = sample(logits.astype(jnp.bfloat16), *args[1:])  # chunks keep the logits' dtype, as one call does
    assert bf16.logprob.dtype == sampling._sample(logits.astype(jnp.bfloat16), *args[1:]).logprob.dtype


@pytest.mark.parametrize("rows, V", [(64, 32768), (1000, 32768), (1000, 151936), (8, 21)])
def test_the_sampling_plan_bounds_xlas_temporaries(rows, V):
    """`sample_bytes` (the offload engine's and HRM's plan of the sampling) is at least what XLA compiles the
    sampling to use beside its logits: in one chunk (64 of 32768 logits), in two (1000 of 32768), in 16
    (1000 of Qwen3's 151936) and at a tiny vocabulary."""
    import jax.numpy as jnp
    from moe_jax.sampling import sample_bytes
    shapes = [((rows, V), jnp.float32), ((rows,), jnp.float32), ((rows,), jnp.float32), ((rows,), jnp.int32),
              ((rows, 2), jnp.uint32)]
    compiled = jax.jit(sample).lower(*(jax.ShapeDtypeStruct(s, d) for s, d in shapes)).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert 0 < temp <= sample_bytes(V, rows)


def test_vllms_max_tokens_sets_max_new_tokens():
    assert SamplingParams(max_tokens=8).max_new_tokens == 8 == SamplingParams(max_tokens=8, max_new_tokens=8).max_new_tokens
    assert SamplingParams(max_tokens=8).replace(temperature=1.0).max_new_tokens == 8
    with pytest.raises(ValueError, match=r"give one of max_new_tokens \(9\) or max_tokens \(8\)"):
        SamplingParams(max_tokens=8, max_new_tokens=9)
    with pytest.raises(ValueError, match=r"give one of max_new_tokens \(16\) or max_tokens \(8\)"):
        SamplingParams(max_new_tokens=16, max_tokens=8)  # the default's value, given: still two answers
    assert SamplingParams().max_new_tokens == 16 == SamplingParams(max_new_tokens=None).max_new_tokens


def draws(logits, temperature, top_p, top_k, n=2000):
    """n samples of one row of logits (each its own key)."""
    x = np.repeat(np.asarray(logits, np.float32)[None], n, 0)
    keys = jax.random.split(jax.random.PRNGKey(0), n)
    return np.asarray(sample(x, np.full(n, temperature, np.float32), np.full(n, top_p, np.float32),
                             np.full(n, top_k, np.int32), keys).tokens)


def test_temperature_sets_the_distribution():
    logits = np.array([1.0, 0.5, 0.0, -0.5], np.float32)
    for t in (0.5, 2.0):
        p = np.exp(logits / t) / np.exp(logits / t).sum()
        np.testing.assert_allclose(np.bincount(draws(logits, t, 1.0, 0), minlength=4) / 2000, p, atol=0.04)


def test_top_p_keeps_the_token_that_crosses_it_and_top_k_keeps_k():
    logits = np.log(np.array([0.5, 0.3, 0.2], np.float32))
    assert set(draws(logits, 1.0, 0.6, 0, 300).tolist()) == {0, 1}
    assert set(draws(np.array([3.0, 2.0, 1.0, 0.0, -1.0], np.float32), 1.0, 1.0, 3, 500).tolist()) == {0, 1, 2}


def test_each_step_of_a_request_has_its_own_key():
    keys = np.asarray(row_keys(np.full(10, 7, np.uint32), np.arange(10, dtype=np.int32)))
    assert len({tuple(k) for k in keys}) == 10


def test_ignore_eos_generates_past_an_eos_token(llm, monkeypatch):
    """With the model's EOS made the token greedy decoding generates third, a request stops there ("stop")
    unless ignore_eos, which runs to max_new_tokens ("length") through the same tokens."""
    free = llm.generate(["abc"], SamplingParams(max_new_tokens=6))[0]
    eos = free.token_ids[2]
    cfg = llm.cfg.replace(eos_token_ids=(eos,))
    monkeypatch.setattr(llm, "cfg", cfg)
    monkeypatch.setattr(llm.engine, "cfg", cfg)
    stopped = llm.generate(["abc"], SamplingParams(max_new_tokens=6))[0]
    assert stopped.finish_reason == "stop" and stopped.token_ids == free.token_ids[:free.token_ids.index(eos) + 1]
    ignored = llm.generate(["abc"], SamplingParams(max_new_tokens=6, ignore_eos=True))[0]
    assert ignored.finish_reason == "length" and ignored.token_ids == free.token_ids
