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


def test_the_engine_stops_on_the_token_that_completes_the_string(source, unstopped, monkeypatch):
    """The engine's own stop, apart from the cut that `LLM` applies to a finished completion (which would trim a
    completion that ran on)."""
    monkeypatch.setattr(moe_jax.llm, "cut_at_stop", lambda c, stop, decode: c)
    stop = a_stop_string_inside(unstopped[0].text)
    got = moe_jax.LLM(source, dtype="float32", policy="resident").generate(
        PROMPTS[:1], SamplingParams(max_new_tokens=24, ignore_eos=True, stop=stop))[0]
    needed = min(k for k in range(1, 25) if stop in source.tokenizer.decode(unstopped[0].token_ids[:k]))
    assert got.token_ids == unstopped[0].token_ids[:needed] and got.finish_reason == "stop"


def test_a_string_over_several_tokens_matches_on_its_last(source):
    tok = source.tokenizer
    ids = tok.encode("hello world", add_special_tokens=False)
    match = StopStrings(["lo wo"], tok.decode, ids[:2])
    hits = [match(ids[2:k]) for k in range(3, len(ids) + 1)]
    assert hits.index(True) == len(tok.encode("hello wo", add_special_tokens=False)) - 3 and hits.count(False) >= 4


def test_a_stop_string_at_the_end_of_the_prompt_does_not_stop_the_completion(source):
    """Only the generated tokens may complete a stop string: the prompt is context, not text to match."""
    tok = source.tokenizer
    match = StopStrings(["STOP"], tok.decode, tok.encode("the prompt ends with STOP"))
    ids = tok.encode(" and more", add_special_tokens=False)
    assert not any(match(ids[:k]) for k in range(1, len(ids) + 1))
    assert match([*ids, *tok.encode(" STOP", add_special_tokens=False)])


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
    assert SamplingParams(stop=None).stop == ()  # none, as vLLM's None
    for bad in ("", ["ok", ""], [3], 5):
        with pytest.raises(ValueError, match="stop must be a non-empty string"):
            SamplingParams(stop=bad)


def test_stop_strings_need_a_tokenizer(source):
    bare = dataclasses.replace(source, tokenizer=None)
    llm = moe_jax.LLM(bare, dtype="float32", policy="resident")
    with pytest.raises(ValueError, match="prompt 1: stop strings .* need a tokenizer"):
        llm.generate([[5, 6], [7]], [SamplingParams(), SamplingParams(stop="x")])


def test_a_completion_is_read_after_its_prompt_as_vllm_reads_it():
    """A SentencePiece tokenizer (Mixtral's kind) drops a word's leading space at the start of a decode: the
    completion's text keeps it, a stop string that starts with it stops on the first token, and the text is cut
    before it (vLLM: text '' on token 1, where decoding the completion alone read 'Pa' and stopped a token late)."""
    import tokenizers
    from tokenizers import decoders, models

    from moe_jax.requests import Completion, Request
    from moe_jax.stop_strings import cut_at_stop
    from moe_jax.tokenizer import Tokenizer, continuation

    vocab = {"<unk>": 0, "\u2581The": 1, "\u2581is": 2, "\u2581Pa": 3, "ris": 4, "<0xE2>": 5, "<0x82>": 6, "<0xAC>": 7}
    sp = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>"))
    sp.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    decode = Tokenizer(sp).decode
    prompt = (1, 2)  # "The is"
    assert decode([3, 3]) == "Pa Pa" and continuation(decode, prompt, [3, 3]) == " Pa Pa"
    assert continuation(decode, (*prompt, 5), [6, 7]) == "\u20ac"  # a character split across the boundary: here
    params = SamplingParams(max_new_tokens=4, stop=" Pa")
    assert Completion.of(Request(0, prompt, params), [3, 4, 3], "length", None, decode).text == " Paris Pa"
    check = StopStrings(params.stop, decode, prompt)
    assert check([3]) and not StopStrings(params.stop, decode)([3])  # read alone, "Pa" holds no " Pa"
    cut = cut_at_stop(Completion.of(Request(0, prompt, params), [3, 4], "length", None, decode), params.stop, decode)
    assert (cut.token_ids, cut.text, cut.finish_reason) == ([3], "", "stop")
