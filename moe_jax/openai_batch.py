"""The OpenAI batch file format: request lines in, response (and error) lines out, shaped as OpenAI
documents them.

Request: {"custom_id", "method": "POST", "url": "/v1/completions" | "/v1/chat/completions", "body": {...}}
with "prompt" (text or token ids) or "messages" ([{"role", "content"[, "name"]}, ...]) and optional "max_tokens"
(or "max_completion_tokens"), "temperature", "top_p", "seed", "stop" (a string or a list of them), and
log-probabilities as each endpoint asks for them: "logprobs" (0..20 most likely tokens) for completions,
"logprobs" (true) with "top_logprobs" (0..20) for chat, and "n" (completions to sample, 1..64, one
choice each); "model", "user", "metadata" and "store" are ignored, the fields of `_NO_OP` are accepted at
the value that changes nothing (or null), and any other body field or value makes the line invalid rather
than be dropped. A message's "content" is a string or a list of text parts
({"type": "text", "text"}, joined by newlines). Fields a body leaves out take the CLI's values, "temperature"
OpenAI's default of 1 where --temperature is not given ("logprobs": null or false asks for none, whatever the
CLI says). The
response's "logprobs" follow each endpoint's shape: a token's string is what it adds to the text after the
tokens before it (a SentencePiece word keeps its leading space; a character split over several tokens goes to
the one that completes it, the others read U+FFFD or ""; a special token, skipped in the text, reads ""),
its "bytes" the bytes it stands for (none for a special token).
"""
from __future__ import annotations

import itertools
import time
import uuid
from typing import TYPE_CHECKING, Callable, Sequence

from moe_jax.chat_template import chat_messages
from moe_jax.job_requests import (SAMPLING_CHECKS, BadLine, JobRequest, completions_wanted, is_token_ids, optional,
                                  refuse_unknown, sampling_fields, stop_strings)
from moe_jax.requests import Completion
from moe_jax.tokenizer import CONTEXT, continuation

if TYPE_CHECKING:
    from moe_jax.llm import LLM

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
ID_KEY = "custom_id"  # what identifies a request in input and output lines

_SAMPLING = {"max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens", "temperature": "temperature",
             "top_p": "top_p", "seed": "seed"}  # body key -> SamplingParams field
# Body fields moe-jax does not implement, at the value that changes nothing (SDKs write them out): accepted at
# that value or null, refused at any other
_NO_OP = {"frequency_penalty": 0, "presence_penalty": 0, "logit_bias": {}, "stream": False, "echo": False, "best_of": 1}
_BODY_KEYS = ("model", "user", "metadata", "store", "n", "stop", "logprobs", *_SAMPLING, *_NO_OP)
_ENDPOINT_KEYS = {COMPLETIONS: ("prompt",), CHAT: ("messages", "top_logprobs")}


def is_request(obj: dict) -> bool:
    """Whether a JSON object is meant as an OpenAI batch request (rather than a plain line)."""
    return any(k in obj for k in ("custom_id", "method", "url", "body"))


def parse_request(n: int, obj: dict) -> JobRequest:
    cid = obj.get("custom_id")
    if not isinstance(cid, str) or not cid:
        raise ValueError(f"'custom_id' must be a non-empty string, got {cid!r}")
    if obj.get("method") != "POST":
        raise ValueError(f"'method' must be \"POST\", got {obj.get('method')!r}")
    url = obj.get("url")
    if url not in (COMPLETIONS, CHAT):
        raise ValueError(f"'url' must be \"{COMPLETIONS}\" or \"{CHAT}\", got {url!r}")
    body = obj.get("body")
    if not isinstance(body, dict):
        raise ValueError("'body' must be a JSON object")
    refuse_unknown(body, (*_BODY_KEYS, *_ENDPOINT_KEYS[url]), "body.")
    for key, none in _NO_OP.items():
        v = body.get(key)
        if v is not None and not (v == none and isinstance(v, bool) == isinstance(none, bool)):
            raise ValueError(f"'body.{key}' = {v!r} is not supported (only {none!r}, which changes nothing, or null)")
    prompt, messages = (None, chat_messages(body.get("messages"), "body.messages")) if url == CHAT else (_prompt(body), None)
    sampling = {**sampling_fields(body, _SAMPLING, "body."), **_logprobs(body, url == CHAT)}
    return JobRequest(n, cid, prompt, messages, sampling, stop_strings(body, "body."), url,
                      completions_wanted(body, "body."))


def _logprobs(body: dict, chat: bool) -> dict:
    """The SamplingParams.logprobs a body asks for ({} for none): completions' "logprobs" (the number of most
    likely tokens), or chat's "logprobs" (true/false) with "top_logprobs" (that number)."""
    if "logprobs" in body and (body["logprobs"] is None or body["logprobs"] is False) and not (
            chat and body.get("top_logprobs")):
        return {"logprobs": None}  # asked for none: the CLI's --logprobs does not apply
    if not chat:
        return sampling_fields(body, {"logprobs": "logprobs"}, "body.")
    want = optional(body, "logprobs", lambda v: isinstance(v, bool), "true or false", "body.")
    top = optional(body, "top_logprobs", *SAMPLING_CHECKS["logprobs"], "body.")
    if top is not None and not want:
        raise ValueError("'body.top_logprobs' needs 'body.logprobs': true")
    return {"logprobs": top or 0} if want else {}


def _prompt(body: dict) -> str | tuple[int, ...]:
    prompt = body.get("prompt")
    if not isinstance(prompt, str) and not is_token_ids(prompt):
        raise ValueError("'body.prompt' must be a string or a list of token ids (one prompt per request)")
    if not prompt:
        raise ValueError("empty prompt")
    return prompt if isinstance(prompt, str) else tuple(prompt)


def _logprobs_record(c: Completion, chat: bool, decode: Callable[[Sequence[int]], str],
                     token_bytes: Callable[[int], bytes]) -> dict | None:
    """A choice's "logprobs" in the endpoint's shape (None where the request asked for none)."""
    if c.logprobs is None:
        return None
    ids, tops = c.token_ids, c.top_logprobs or [[] for _ in c.token_ids]
    read, p = [*c.prompt_token_ids, *ids], len(c.prompt_token_ids)  # each token is read after those before it
    strings, alternatives = [], []  # per position: the token's string; (string, id, logprob) of each top token
    for j, (t, top) in enumerate(zip(ids, tops)):
        before = read[max(0, p + j - CONTEXT):p + j]  # as much of them as `continuation` reads
        pieces = [continuation(decode, before, [i]) for i in (t, *(i for i, _ in top))]
        strings.append(pieces[0])
        alternatives.append([(s, i, x) for s, (i, x) in zip(pieces[1:], top)])
    if chat:
        def entry(s, t, lp):
            return {"token": s, "logprob": lp, "bytes": list(token_bytes(t))}
        return {"content": [{**entry(s, t, lp), "top_logprobs": [entry(*a) for a in alts]}
                            for s, t, lp, alts in zip(strings, ids, c.logprobs, alternatives)], "refusal": None}
    # As OpenAI's: the n likeliest and the sampled token (n + 1 at most), keyed by string (of two tokens that
    # read the same, the likelier one's logprob).
    top_logprobs = []
    for s, lp, alts in zip(strings, c.logprobs, alternatives):
        top = {a: x for a, _, x in reversed(alts)}
        top.setdefault(s, lp)
        top_logprobs.append(top)
    return {"tokens": strings, "token_logprobs": c.logprobs, "top_logprobs": top_logprobs,
            "text_offset": list(itertools.accumulate(map(len, strings[:-1]), initial=0)) if strings else []}


def response_record(req: JobRequest, completions: list[Completion], llm: LLM) -> dict:
    """The output line of a finished request (HTTP 200, the body a completions or chat API response with one
    choice per completion)."""
    chat, tok = req.endpoint == CHAT, llm.tokenizer
    choices = [{"index": i, **({"message": {"role": "assistant", "content": c.text}} if chat else {"text": c.text}),
                "finish_reason": c.finish_reason, "logprobs": _logprobs_record(c, chat, tok.decode, tok.token_bytes)}
               for i, c in enumerate(completions)]
    prompt_tokens, completion_tokens = len(completions[0].prompt_token_ids), sum(len(c.token_ids) for c in completions)
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
             "total_tokens": prompt_tokens + completion_tokens}
    body = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex,
            "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": llm.name, "choices": choices, "usage": usage}
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": req.id,
            "response": {"status_code": 200, "request_id": uuid.uuid4().hex, "body": body}, "error": None}


def error_record(bad: BadLine) -> dict:
    """The errors-file line of an input line that could not run."""
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": bad.id, "response": None,
            "error": {"code": "invalid_request", "message": f"line {bad.line}: {bad.reason}"}}
