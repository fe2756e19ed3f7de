"""The OpenAI batch file format: request lines in, response (and error) lines out, shaped as OpenAI
documents them.

Request: {"custom_id", "method": "POST", "url": "/v1/completions" | "/v1/chat/completions", "body": {...}}
with "prompt" (text or token ids) or "messages" ([{"role", "content"}, ...]) and optional "max_tokens"
(or "max_completion_tokens"), "temperature", "top_p", "seed", "stop" (a string or a list of them);
"model", "user", "metadata" and "store" are ignored, "n" must be 1, and any other body field (e.g.
"logprobs") makes the line invalid rather than be dropped. Fields a body leaves out take the CLI's values.
"""
from __future__ import annotations

import time
import uuid

from moe_jax.job_requests import BadLine, JobRequest, is_token_ids, refuse_unknown, sampling_fields, stop_strings
from moe_jax.requests import Completion

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
ID_KEY = "custom_id"  # what identifies a request in input and output lines

_SAMPLING = {"max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens", "temperature": "temperature",
             "top_p": "top_p", "seed": "seed"}  # body key -> SamplingParams field
_BODY_KEYS = ("model", "user", "metadata", "store", "n", "prompt", "messages", "stop", *_SAMPLING)


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
    refuse_unknown(body, _BODY_KEYS, "body.")
    if body.get("n") not in (None, 1):
        raise ValueError(f"'body.n' must be 1 (one completion per request), got {body['n']!r}")
    prompt, messages = (None, _messages(body)) if url == CHAT else (_prompt(body), None)
    return JobRequest(n, cid, prompt, messages, sampling_fields(body, _SAMPLING, "body."), stop_strings(body, "body."),
                      url)


def _prompt(body: dict) -> str | tuple[int, ...]:
    prompt = body.get("prompt")
    if not isinstance(prompt, str) and not is_token_ids(prompt):
        raise ValueError("'body.prompt' must be a string or a list of token ids (one prompt per request)")
    if not prompt:
        raise ValueError("empty prompt")
    return prompt if isinstance(prompt, str) else tuple(prompt)


def _messages(body: dict) -> tuple[dict, ...]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError("'body.messages' must be a non-empty list of {\"role\", \"content\"} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"'body.messages[{i}]' must be an object with string 'role' and 'content'")
    return tuple({"role": m["role"], "content": m["content"]} for m in messages)


def response_record(req: JobRequest, c: Completion, model: str) -> dict:
    """The output line of a finished request (HTTP 200, the body a completions or chat API response)."""
    chat = req.endpoint == CHAT
    choice = {"index": 0, "message": {"role": "assistant", "content": c.text}} if chat else {"index": 0, "text": c.text}
    usage = {"prompt_tokens": len(c.prompt_token_ids), "completion_tokens": len(c.token_ids),
             "total_tokens": len(c.prompt_token_ids) + len(c.token_ids)}
    body = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex,
            "object": "chat.completion" if chat else "text_completion", "created": int(time.time()), "model": model,
            "choices": [{**choice, "finish_reason": c.finish_reason, "logprobs": None}], "usage": usage}
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": req.id,
            "response": {"status_code": 200, "request_id": uuid.uuid4().hex, "body": body}, "error": None}


def error_record(bad: BadLine) -> dict:
    """The errors-file line of an input line that could not run."""
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": bad.id, "response": None,
            "error": {"code": "invalid_request", "message": f"line {bad.line}: {bad.reason}"}}
