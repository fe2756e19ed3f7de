"""OpenAI batch files through the CLI (completions and chat, output shaped as OpenAI's), their bad lines,
chat templates and stop strings."""
from __future__ import annotations

import json
import os
import re

import pytest

from moe_jax import LLM, SamplingParams
from moe_jax.chat_template import ChatTemplate, ChatTemplateError, chat_messages
from moe_jax.generate import main
from moe_jax.presets import preset_hf_config
from moe_jax.requests import Completion
from moe_jax.stop_strings import cut_at_stop
from moe_jax.tokenizer import BYTE_BOS, Tokenizer
from tests.conftest import reference

TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}" \
           "{% if add_generation_prompt %}<|assistant|>{% endif %}"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]


def request(cid, url, **body) -> str:
    return json.dumps({"custom_id": cid, "method": "POST", "url": url, "body": body}) + "\n"


def completion(cid, **body) -> str:
    return request(cid, "/v1/completions", **body)


def chat(cid, **body) -> str:
    return request(cid, "/v1/chat/completions", **body)


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """tiny-mixtral's shape built with transformers, with the byte-level tokenizer and a chat template."""
    reference("torch", "transformers")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = preset_hf_config("tiny-mixtral")
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg), dtype=torch.float32)
    path = tmp_path_factory.mktemp("chat-model")
    model.save_pretrained(path)
    Tokenizer.byte_level().save(path / "tokenizer.json")
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                            "chat_template": TEMPLATE}))
    return path


def test_openai_round_trip_matches_llm_generate(tmp_path, chat_model, capsys):
    llm = LLM(str(chat_model), dtype="float32", policy="resident")
    rendered = "<|system|>Be brief.\n<|user|>Hi!\n<|assistant|>"
    params = [SamplingParams(max_new_tokens=6), SamplingParams(max_new_tokens=5), SamplingParams(max_new_tokens=6)]
    chat_ids = llm.tokenizer.encode(rendered, add_special_tokens=False)  # the template writes no BOS: none added
    expected = llm.generate(["Hello there", chat_ids, "Hello there"], params)
    text = expected[0].text
    stop = next(ch for ch in text[1:] if ch != "\ufffd")  # a string the completion holds
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    no_ops = dict(frequency_penalty=0, presence_penalty=0.0, logit_bias={}, stream=False, echo=None, best_of=1)
    inp.write_text(completion("comp", model="ignored", prompt="Hello there", max_tokens=6, **no_ops)
                   + chat("chat", messages=[MESSAGES[0], {"role": "user", "content": [{"type": "text", "text": "Hi!"}]}],
                          max_tokens=5)  # content as text parts, as OpenAI's SDK writes it
                   + completion("bad", prompt="x", n=0)
                   + completion("stop", prompt="Hello there", max_tokens=6, stop=["\n\n", stop]))
    assert main(["--model", str(chat_model), "--input", str(inp), "--output", str(out), "--dtype", "float32",
                 "--skip-invalid", "--temperature", "0"]) == 0, capsys.readouterr().err  # greedy, as `expected`
    lines = {r["custom_id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert sorted(lines) == ["chat", "comp", "stop"]
    for cid, exp in zip(("comp", "chat"), expected):
        r = lines[cid]
        assert set(r) == {"id", "custom_id", "response", "error"} and r["error"] is None
        assert r["id"].startswith("batch_req_") and r["response"]["status_code"] == 200 and r["response"]["request_id"]
        body = r["response"]["body"]
        assert set(body) == {"id", "object", "created", "model", "choices", "usage"}
        assert body["model"] == str(chat_model)
        assert body["usage"] == {"prompt_tokens": len(exp.prompt_token_ids), "completion_tokens": len(exp.token_ids),
                                 "total_tokens": len(exp.prompt_token_ids) + len(exp.token_ids)}
        (choice,) = body["choices"]
        assert choice["index"] == 0 and choice["finish_reason"] == exp.finish_reason and choice["logprobs"] is None
    comp, chat_body = lines["comp"]["response"]["body"], lines["chat"]["response"]["body"]
    assert comp["object"] == "text_completion" and comp["id"].startswith("cmpl-")
    assert comp["choices"][0]["text"] == text
    assert chat_body["object"] == "chat.completion" and chat_body["id"].startswith("chatcmpl-")
    assert chat_body["choices"][0]["message"] == {"role": "assistant", "content": expected[1].text}
    stopped = lines["stop"]["response"]["body"]
    assert stopped["choices"][0]["text"] == text[:text.find(stop)] and stopped["choices"][0]["finish_reason"] == "stop"
    needed = min(k for k in range(1, 7) if stop in llm.tokenizer.decode(expected[0].token_ids[:k]))
    assert stopped["usage"]["completion_tokens"] == needed
    (error,) = map(json.loads, (tmp_path / "out.errors.jsonl").read_text().splitlines())
    assert error["custom_id"] == "bad" and error["response"] is None
    assert error["error"] == {"code": "invalid_request", "message": "line 3: 'body.n' must be an integer in 1..64, "
                                                                    "got 0"}


@pytest.mark.parametrize("content, message", [
    (request("a", "/v1/embeddings", input="x"), "in.jsonl:1: 'url' must be \"/v1/completions\" or"),
    (json.dumps({"custom_id": "a", "method": "GET", "url": "/v1/completions", "body": {"prompt": "x"}}) + "\n",
     "in.jsonl:1: 'method' must be \"POST\", got 'GET'"),
    (json.dumps({"method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}}) + "\n",
     "in.jsonl:1: 'custom_id' must be a non-empty string, got None"),
    (json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/completions"}) + "\n",
     "in.jsonl:1: 'body' must be a JSON object"),
    (completion("a", prompt=["x", "y"]), "in.jsonl:1: 'body.prompt' must be a string or a list of token ids"),
    (completion("a", prompt=""), "in.jsonl:1: empty prompt"),
    (completion("a", prompt="x", max_tokens=0), "in.jsonl:1: 'body.max_tokens' must be a positive integer, got 0"),
    (completion("a", prompt="x", temperature=-1), "in.jsonl:1: 'body.temperature' must be a finite number >= 0"),
    (completion("a", prompt="x", temperature=float("inf")), "in.jsonl:1: 'body.temperature' must be a finite number >= 0, got inf"),
    (completion("a", prompt="x", top_p=0), "in.jsonl:1: 'body.top_p' must be a number in (0, 1]"),
    (completion("a", prompt="x", seed=1.5), "in.jsonl:1: 'body.seed' must be an integer"),
    (completion("a", prompt="x", stop=[1]), "in.jsonl:1: 'body.stop' must be a string or a list of strings"),
    (completion("a", prompt="x", stop=""), "in.jsonl:1: 'body.stop' strings must not be empty"),
    (completion("a", prompt="x", frequency_penalty=0.5),
     "in.jsonl:1: 'body.frequency_penalty' = 0.5 is not supported (only 0, which changes nothing, or null)"),
    (completion("a", prompt="x", logit_bias={"5": 100}), "in.jsonl:1: 'body.logit_bias' = {'5': 100} is not supported"),
    (chat("a", messages=MESSAGES, stream=True), "in.jsonl:1: 'body.stream' = True is not supported"),
    (completion("a", prompt="x", best_of=True), "in.jsonl:1: 'body.best_of' = True is not supported"),
    (completion("a", prompt="x", tools=[]), "in.jsonl:1: unknown field 'body.tools'"),
    (chat("a", messages=[]), "in.jsonl:1: 'body.messages' must be a non-empty list"),
    (chat("a", messages=[{"role": "user"}]),
     "in.jsonl:1: 'body.messages[0]' must be an object with string 'role' and 'content'"),
    (chat("a", messages=[{"role": "user", "content": "x", "tool_calls": [], "bogus": 1}]),
     "in.jsonl:1: unknown fields 'body.messages[0].bogus', 'body.messages[0].tool_calls' (known: content, name, role)"),
    (chat("a", messages=[{"role": "user", "content": "x", "name": 5}]),
     "in.jsonl:1: 'body.messages[0].name' must be a string, got 5"),
    (chat("a", messages=[{"role": "user", "content": None}]),
     "in.jsonl:1: 'body.messages[0].content' must be a string or a non-empty list of text parts, got None"),
    (chat("a", messages=[{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url"}]}]),
     "in.jsonl:1: 'body.messages[0].content[1]' must be a text part {\"type\": \"text\", \"text\": ...} (this model "
     "reads text only), got 'image_url'"),
    (chat("a", messages=MESSAGES), "in.jsonl:1: model tiny-mixtral has no chat template"),
    (completion("a", prompt="x") + completion("a", prompt="y"),
     "in.jsonl:2: duplicate custom_id 'a' (first on line 1)"),
    (completion("a", prompt="x") + '{"prompt": "y"}\n',
     "in.jsonl:2: mixes formats: this line is in plain format, line 1 in OpenAI batch format"),
])
def test_bad_openai_lines(tmp_path, capsys, content, message):
    inp = tmp_path / "in.jsonl"
    inp.write_text(content)
    rc = main(["--input", str(inp), "--output", str(tmp_path / "out.jsonl")])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "out.jsonl").exists()


def test_chat_template_rendering(tmp_path):
    tok = Tokenizer.byte_level()
    with_bos = ChatTemplate("{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}", "<s>", "</s>")
    assert with_bos.render([{"role": "user", "content": "hi"}]) == "<s>hi"
    named = ChatTemplate("{% for m in messages %}{{ m.get('name', '-') }}:{{ m.content }};{% endfor %}")
    assert named.render(chat_messages([{"role": "user", "content": "hi", "name": "alice"},
                                       {"role": "user", "content": "yo"}])) == "alice:hi;-:yo;"
    assert with_bos.token_ids([{"role": "user", "content": "hi"}], tok) == [BYTE_BOS, ord("h"), ord("i")]
    plain = ChatTemplate("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert plain.token_ids([{"role": "user", "content": "hi"}], tok) == [ord("h"), ord("i")]  # as transformers
    strict = ChatTemplate("{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}")
    with pytest.raises(ChatTemplateError, match="chat template: user first"):
        strict.render([{"role": "system", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="chat template: .*unsafe"):
        ChatTemplate("{{ messages.__class__.__mro__ }}").render([])
    with pytest.raises(ChatTemplateError, match="line 1"):
        ChatTemplate("{% for m in messages %}")
    assert ChatTemplate.from_model_dir("tiny-mixtral") is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": {"content": "<s>"}, "chat_template": [{"name": "tool_use", "template": "T"},
                                                             {"name": "default", "template": "{{ bos_token }}D"}]}))
    assert ChatTemplate.from_model_dir(tmp_path).render([]) == "<s>D"
    (tmp_path / "chat_template.jinja").write_text("J")
    assert ChatTemplate.from_model_dir(tmp_path).render([]) == "J"


def test_stop_strings_cut_the_text_and_the_tokens():
    tok = Tokenizer.byte_level()
    ids = tok.encode("abcXYdefXY")[1:]
    c = Completion(ids, "abcXYdefXY", "length")
    cut = cut_at_stop(c, ["def", "XY"], tok.decode)
    assert (cut.text, cut.token_ids, cut.finish_reason) == ("abc", ids[:5], "stop")
    assert cut_at_stop(c, ["zz"], tok.decode) is c


def test_logprobs_in_each_endpoints_shape(tmp_path, chat_model, capsys):
    """Completions' "logprobs": n and chat's "logprobs": true with "top_logprobs": n come back in OpenAI's
    shapes, with the values LLM.generate gives."""
    llm = LLM(str(chat_model), dtype="float32", policy="resident")
    chat_ids = llm.tokenizer.encode("<|system|>Be brief.\n<|user|>Hi!\n<|assistant|>", add_special_tokens=False)
    want = llm.generate(["Hello there", chat_ids], [SamplingParams(max_new_tokens=4, logprobs=2)] * 2)
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text(completion("comp", prompt="Hello there", max_tokens=4, logprobs=2)
                   + chat("chat", messages=MESSAGES, max_tokens=4, logprobs=True, top_logprobs=2)
                   + chat("none", messages=MESSAGES, max_tokens=4, logprobs=False))
    assert main(["--model", str(chat_model), "--input", str(inp), "--output", str(out), "--dtype", "float32",
                 "--temperature", "0"]) == 0, capsys.readouterr().err
    lines = {r["custom_id"]: r["response"]["body"]["choices"][0] for r in map(json.loads, out.read_text().splitlines())}
    decode = llm.tokenizer.decode

    def piece(ids, j, t):  # what token t adds after ids[:j], over the whole prefix
        before, after = decode(ids[:j]), decode([*ids[:j], t])
        return after[len(os.path.commonprefix([before, after])):]

    comp, ids = lines["comp"]["logprobs"], want[0].token_ids
    strings = [piece(ids, j, t) for j, t in enumerate(ids)]
    assert comp["tokens"] == strings and comp["text_offset"] == [sum(map(len, strings[:j])) for j in range(4)]
    assert comp["token_logprobs"] == pytest.approx(want[0].logprobs, rel=1e-6)
    assert comp["top_logprobs"] == [pytest.approx({**{piece(ids, j, i): lp for i, lp in reversed(top)},
                                                   **{strings[j]: want[0].logprobs[j]}}, rel=1e-6)
                                    for j, top in enumerate(want[0].top_logprobs)]  # greedy: the top one
    content, ids = lines["chat"]["logprobs"]["content"], want[1].token_ids
    assert [e["token"] for e in content] == [piece(ids, j, t) for j, t in enumerate(ids)]
    def byte(t):  # the byte-level tokenizer: token t < 256 is byte t; the specials (<s>, </s>) none
        return [t] if t < 256 else []

    assert [e["bytes"] for e in content] == [byte(t) for t in ids]
    assert [e["logprob"] for e in content] == pytest.approx(want[1].logprobs, rel=1e-6)
    assert [[(x["token"], x["bytes"], x["logprob"]) for x in e["top_logprobs"]] for e in content] == \
        [[(piece(ids, j, i), byte(i), pytest.approx(lp, rel=1e-6)) for i, lp in top]
         for j, top in enumerate(want[1].top_logprobs)]
    assert lines["none"]["logprobs"] is None


def test_token_strings_and_bytes_of_a_sentencepiece_tokenizer():
    """A SentencePiece word keeps its leading space after the first token, a byte-fallback token stands for
    its byte, and of two top tokens that read the same the likelier one's logprob is kept."""
    import tokenizers
    from tokenizers import decoders, models

    from moe_jax.openai_batch import _logprobs_record

    vocab = {"<unk>": 0, "\u2581Hello": 1, "\u2581world": 2, "world": 3, "<0xE2>": 4, "<0x82>": 5, "<0xAC>": 6}
    sp = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>"))
    sp.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    tok = Tokenizer(sp)
    c = Completion([1, 2, 4, 5, 6], "Hello world\u20ac", "length", [], [-1.0, -0.2, -0.3, -0.1, -0.1],
                   [[(1, -1.0)], [(2, -0.2), (3, -0.5)], [(4, -0.3)], [(5, -0.1)], [(6, -0.1)]])
    comp = _logprobs_record(c, False, tok.decode, tok.token_bytes)
    assert comp["tokens"][:2] == ["Hello", " world"] and comp["tokens"][4] == "\u20ac"
    assert comp["text_offset"][:3] == [0, 5, 11]
    assert comp["top_logprobs"][1] == {" world": -0.2, "world": -0.5}
    c.top_logprobs = None  # logprobs 0: the sampled token alone
    assert _logprobs_record(c, False, tok.decode, tok.token_bytes)["top_logprobs"][:2] == [{"Hello": -1.0},
                                                                                           {" world": -0.2}]
    chat = _logprobs_record(c, True, tok.decode, tok.token_bytes)["content"]
    assert [e["bytes"] for e in chat] == [list(b" Hello"), list(b" world"), [0xE2], [0x82], [0xAC]]
    c.prompt_token_ids = [1]  # after a prompt, the first token is read after it: its leading space kept
    assert _logprobs_record(c, False, tok.decode, tok.token_bytes)["tokens"][:2] == [" Hello", " world"]
    # a sampled token that reads as a likelier top token does (two partial characters): the likelier one's logprob
    odd = Completion([4], "", "length", [1, 2], [-0.9], [[(5, -0.05), (6, -0.1)]])
    assert _logprobs_record(odd, False, tok.decode, tok.token_bytes)["top_logprobs"] == [{"\ufffd": -0.05}]


@pytest.mark.parametrize("body, message", [
    (dict(logprobs=False, top_logprobs=2), "'body.top_logprobs' needs 'body.logprobs': true"),
    (dict(logprobs=3), "'body.logprobs' must be true or false, got 3"),
    (dict(logprobs=True, top_logprobs=21), "'body.top_logprobs' must be an integer in 0..20, got 21"),
])
def test_bad_chat_logprobs(body, message):
    from moe_jax.openai_batch import parse_request
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_request(1, json.loads(chat("a", messages=MESSAGES, **body)))


def test_a_body_that_asks_for_no_logprobs_gets_none_whatever_the_cli():
    """Absent: the CLI's --logprobs applies; false (chat) or null (completions): none."""
    from moe_jax.openai_batch import parse_request

    def sampling(line):
        return parse_request(1, json.loads(line)).sampling

    assert "logprobs" not in sampling(chat("a", messages=MESSAGES)) and "logprobs" not in sampling(completion("a", prompt="x"))
    assert sampling(chat("a", messages=MESSAGES, logprobs=False))["logprobs"] is None
    assert sampling(completion("a", prompt="x", logprobs=None))["logprobs"] is None
    assert sampling(chat("a", messages=MESSAGES, logprobs=True))["logprobs"] == 0
    assert sampling(completion("a", prompt="x", logprobs=3))["logprobs"] == 3
    assert sampling(completion("a", prompt="x", logprobs=0))["logprobs"] == 0  # 0 is not "none"


def test_n_completions_are_choices_sampled_with_their_own_seeds(tmp_path, chat_model, capsys):
    """"n": k gives k choices (index 0..k-1), each what LLM.generate gives with the request's seed (the first)
    or that seed mixed with the choice's number; usage counts the prompt once and every completion's tokens.
    A body without "temperature" samples at OpenAI's default, 1 ("one")."""
    from moe_jax.generate import sample_seed

    llm = LLM(str(chat_model), dtype="float32", policy="resident")
    params = [SamplingParams(max_new_tokens=5, temperature=1.0, seed=sample_seed(7, i)) for i in range(3)]
    want = llm.generate(["Hello there"] * 3, params)
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text(completion("c", prompt="Hello there", max_tokens=5, temperature=1.0, seed=7, n=3)
                   + completion("one", prompt="Hello there", max_tokens=5, seed=7))
    assert main(["--model", str(chat_model), "--input", str(inp), "--output", str(out), "--dtype", "float32"]) == 0, \
        capsys.readouterr().err
    bodies = {r["custom_id"]: r["response"]["body"] for r in map(json.loads, out.read_text().splitlines())}
    choices = bodies["c"]["choices"]
    assert [ch["index"] for ch in choices] == [0, 1, 2] and [ch["text"] for ch in choices] == [w.text for w in want]
    assert len({ch["text"] for ch in choices}) > 1  # sampled apart
    assert bodies["c"]["usage"]["completion_tokens"] == sum(len(w.token_ids) for w in want)
    assert bodies["c"]["usage"]["prompt_tokens"] == len(want[0].prompt_token_ids)
    assert [ch["text"] for ch in bodies["one"]["choices"]] == [want[0].text]  # n = 1: the first choice of n = 3


def test_bodies_without_max_tokens_take_max_new_tokens_and_are_counted_in_the_log(tmp_path, chat_model, caplog):
    """OpenAI's API generates up to the context where a body gives no max_tokens; a batch job takes --max-new-tokens
    for those bodies and says how many did so."""
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text(completion("free", prompt="Hello there", temperature=0) + completion("five", prompt="Hi", max_tokens=5))
    with caplog.at_level("INFO", logger="moe_jax"):
        assert main(["--model", str(chat_model), "--input", str(inp), "--output", str(out), "--dtype", "float32",
                     "--max-new-tokens", "3"]) == 0
    assert "1 of 2 requests give no 'max_tokens': each generates at most 3 tokens (--max-new-tokens)" in caplog.text
    usage = {r["custom_id"]: r["response"]["body"]["usage"] for r in map(json.loads, out.read_text().splitlines())}
    assert usage["free"]["completion_tokens"] <= 3 < usage["five"]["completion_tokens"] <= 5


def test_llm_chat_renders_each_conversation_with_the_models_template(chat_model):
    """`LLM.chat`, as vLLM's: conversations (or one) through the checkpoint's chat template, then `generate`."""
    llm = LLM(str(chat_model), dtype="float32", policy="resident")
    params = SamplingParams(max_new_tokens=5)
    hi = [MESSAGES[0], {"role": "user", "content": [{"type": "text", "text": "Hi!"}]}]
    ids = llm.tokenizer.encode("<|system|>Be brief.\n<|user|>Hi!\n<|assistant|>", add_special_tokens=False)
    (one,) = llm.chat(hi, params)  # one conversation alone
    assert one.prompt_token_ids == ids and one.token_ids == llm.generate([ids], params)[0].token_ids
    both = llm.chat([hi, MESSAGES], params)
    assert [c.token_ids for c in both] == [one.token_ids, llm.chat([MESSAGES], params)[0].token_ids]
    with pytest.raises(ValueError, match=r"'conversations\[1\]\[0\]' must be an object with string 'role' and 'content'"):
        llm.chat([hi, [{"role": "user"}]], params)
    with pytest.raises(ChatTemplateError, match="model tiny-mixtral has no chat template"):
        LLM("tiny-mixtral", policy="resident").chat(hi)
