"""Stop strings end generation in every engine on the token that completes them; the text is cut before them."""
from __future__ import annotations

import dataclasses

import pytest

import moe_jax
from moe_jax.model_source import open_model
from moe_jax.sampling import SamplingParams
from moe_jax.stop_strings import StopStrings

PROMPTS = ["The quick brown fox", "x", "hello world, again", "abc"]
OFFLOAD = moe_jax.Policy(batch_size=3, micro_batch_size=2, num_micro_batches=2, resident_expert_fraction=0.5)


@pytest.fixture(scope="module")
def source():
    return open_model("tiny-mixtral")


@pytest.fixture(scope="module")
def unstopped(source):
    """Greedy completions of PROMPTS without stop strings (24 tokens, EOS ignored)."""
    llm = moe_jax.LLM(source, dtype="float32", policy="resident")
    return llm.generate(PROMPTS, SamplingParams(max_new_tokens=24, ignore_eos=True))


def a_stop_string_inside(text: str) -> str:
    """Two characters from the middle of `text` (no replacement character)."""
    return next(text[i:i + 2] for i in range(len(text) // 3, len(text) - 1) if "\ufffd" not in text[i:i + 2])


@pytest.mark.parametrize("policy", ["resident", OFFLOAD], ids=["resident", "offload"])
def test_stop_strings_end_generation_early(source, unstopped, policy):
    tok = source.tokenizer
    stop = a_stop_string_inside(unstopped[0].text)
    params = [SamplingParams(max_new_tokens=24, ignore_eos=True, stop=("\x00never", stop), logprobs=1)] + \
             [SamplingParams(max_new_tokens=24, ignore_eos=True)] * (len(PROMPTS) - 1)
    got = moe_jax.LLM(source, dtype="float32", policy=policy).generate(PROMPTS, params)
    full = unstopped[0]
    needed = min(k for k in range(1, 25) if stop in tok.decode(full.token_ids[:k]))
    assert needed < 24
    assert got[0].token_ids == full.token_ids[:needed]  # generation stopped there, not only the text
    assert (got[0].text, got[0].finish_reason) == (full.text[:full.text.find(stop)], "stop")
    assert len(got[0].logprobs) == len(got[0].top_logprobs) == needed  # cut with the tokens
    assert [dataclasses.astuple(c) for c in got[1:]] == [dataclasses.astuple(c) for c in unstopped[1:]]


def test_matcher_sees_a_character_completed_by_its_last_byte(source):
    """A byte-level tokenizer splits "é" into two tokens: the match comes with the second."""
    tok = source.tokenizer
    ids = tok.encode("some text before é", add_special_tokens=False)
    match = StopStrings(["é", "zz"], tok.decode)
    assert len(tok.encode("é", add_special_tokens=False)) == 2
    assert not match(ids[:-1]) and match(ids)
    assert match.window == 4 * 2 + 2


def test_sampling_params_take_one_string_or_several():
    assert SamplingParams(stop="###").stop == ("###",)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    for bad in ("", ["ok", ""], [3], 5, None):
        with pytest.raises(ValueError, match="stop must be a non-empty string"):
            SamplingParams(stop=bad)


def test_stop_strings_need_a_tokenizer(source):
    bare = dataclasses.replace(source, tokenizer=None)
    llm = moe_jax.LLM(bare, dtype="float32", policy="resident")
    with pytest.raises(ValueError, match="prompt 1: stop strings .* need a tokenizer"):
        llm.generate([[5, 6], [7]], [SamplingParams(), SamplingParams(stop="x")])
