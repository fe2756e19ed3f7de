"""JSONL batch jobs: reading and validating an input file, in one of two formats, and each format's
output and error lines.

Plain input line: {"prompt": TEXT} or {"prompt_token_ids": [INT, ...]}, optional "id" (string or int,
unique; default: the line number), "stop" (a string or a list of them) and the sampling fields
"max_new_tokens" (or vLLM's "max_tokens"), "temperature", "top_p", "top_k", "seed", "logprobs", and "n" (completions to sample, 1..64);
any other field makes the line invalid. Output line: {"id", "token_ids", "text", "finish_reason"}, plus,
where the request asked for logprobs, "logprobs" (one per token) and, for logprobs >= 1, "top_logprobs"
(per token, [[token id, logprob], ...] most likely first); for n > 1, {"id", "choices": [those fields, one
object per completion]}; error line: {"line", "id", "error"}. OpenAI batch lines: see
`moe_jax.openai_batch`.
A file holds one format; every bad line is found, none stops the reading.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from moe_jax import openai_batch
from moe_jax.job_requests import (SAMPLING_CHECKS, BadLine, JobRequest, completions_wanted, is_int, is_token_ids,
                                  refuse_unknown, sampling_fields, stop_strings)
from moe_jax.requests import Completion

if TYPE_CHECKING:
    from moe_jax.llm import LLM


class JobInputError(ValueError):
    """An input file that cannot run, one problem per line of the message."""


@dataclasses.dataclass(frozen=True)
class JobFormat:
    name: str
    id_key: str  # the field that identifies a request in input and output lines
    parse: Callable[[int, dict], JobRequest]
    completion_record: Callable[[JobRequest, list[Completion], LLM], dict]  # (request, its n completions, the model)
    error_record: Callable[[BadLine], dict]
    default_temperature: float  # where neither a line nor --temperature sets one: plain greedy, OpenAI's 1


_PLAIN_KEYS = ("prompt", "prompt_token_ids", "id", "stop", "n", "max_tokens", *SAMPLING_CHECKS)  # max_tokens: vLLM's name


def _parse_plain(n: int, obj: dict) -> JobRequest:
    has_text, has_ids = "prompt" in obj, "prompt_token_ids" in obj
    if has_text == has_ids:
        raise ValueError("needs exactly one of 'prompt' (text) or 'prompt_token_ids' (list of ints)")
    refuse_unknown(obj, _PLAIN_KEYS)
    if has_text:
        prompt = obj["prompt"]
        if not isinstance(prompt, str):
            raise ValueError(f"'prompt' must be a string, got {type(prompt).__name__}")
    else:
        prompt = obj["prompt_token_ids"]
        if not is_token_ids(prompt):
            raise ValueError("'prompt_token_ids' must be a list of integers")
        prompt = tuple(prompt)
    if not prompt:
        raise ValueError("empty prompt")
    rid = obj.get("id", n)
    if not isinstance(rid, str) and not is_int(rid):
        raise ValueError(f"'id' must be a string or an integer, got {type(rid).__name__}")
    if obj.get("max_tokens") is not None and obj.get("max_new_tokens") is not None:
        raise ValueError("give one of 'max_new_tokens' or 'max_tokens' (the same field)")
    sampling = sampling_fields(obj, {"max_tokens": "max_new_tokens", **{f: f for f in SAMPLING_CHECKS}})
    return JobRequest(n, rid, prompt, sampling=sampling, stop=stop_strings(obj), n=completions_wanted(obj))


def _plain_choice(c: Completion) -> dict:
    choice = {"token_ids": list(c.token_ids), "text": c.text, "finish_reason": c.finish_reason}
    if c.logprobs is not None:
        choice["logprobs"] = c.logprobs
    if c.top_logprobs is not None:
        choice["top_logprobs"] = [[list(pair) for pair in top] for top in c.top_logprobs]
    return choice


def _plain_record(req: JobRequest, completions: list[Completion], llm: LLM) -> dict:
    if req.n == 1:
        return {"id": req.id, **_plain_choice(completions[0])}
    return {"id": req.id, "choices": [_plain_choice(c) for c in completions]}


def _plain_error(bad: BadLine) -> dict:
    return {"line": bad.line, "id": bad.id, "error": bad.reason}


PLAIN = JobFormat("plain", "id", _parse_plain, _plain_record, _plain_error, 0.0)
OPENAI = JobFormat("OpenAI batch", openai_batch.ID_KEY, openai_batch.parse_request,
                   openai_batch.response_record, openai_batch.error_record, 1.0)


@dataclasses.dataclass
class Job:
    path: Path
    format: JobFormat
    requests: list[JobRequest]
    bad: list[BadLine]


def _format_of(obj: dict) -> JobFormat:
    return OPENAI if openai_batch.is_request(obj) else PLAIN


def _id_of(obj: dict, n: int):
    """The line's request id where it has a usable one (for reporting a bad line), else None."""
    rid = obj.get(OPENAI.id_key) if _format_of(obj) is OPENAI else obj.get("id", n)
    return rid if isinstance(rid, str) or is_int(rid) else None


def _json_object(text: str) -> dict:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"malformed JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise ValueError("JSON nested too deeply to read") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("a string holds an unpaired surrogate escape (\\ud800-\\udfff)") from None
    return obj


def _read_lines(path: Path) -> list[str]:
    """The file's lines, split at "\\n" only (JSON strings may hold other line separators raw)."""
    try:
        return path.read_bytes().decode("utf-8-sig").split("\n")
    except FileNotFoundError:
        raise JobInputError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise JobInputError(f"{path}: is a directory") from None
    except UnicodeDecodeError as e:
        raise JobInputError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:  # permission denied, a file in the path, ...
        raise JobInputError(f"{path}: cannot read it ({e.strerror or e})") from None


def read_job(path: str | Path) -> Job:
    """Every request of a JSONL input, and every bad line with its reason (malformed JSON, missing or
    mistyped fields, duplicate ids, a line in the other format than the first)."""
    path = Path(path)
    fmt, first, requests, bad, seen = None, 0, [], [], {}
    for n, text in enumerate(_read_lines(path), 1):
        if not text.strip():
            continue
        obj = None
        try:
            obj = _json_object(text)
            if fmt is None:
                fmt, first = _format_of(obj), n
            elif _format_of(obj) is not fmt:
                raise ValueError(f"mixes formats: this line is in {_format_of(obj).name} format, "
                                 f"line {first} in {fmt.name} format")
            req = fmt.parse(n, obj)
        except ValueError as e:
            bad.append(BadLine(n, _id_of(obj, n) if obj is not None else None, str(e)))
            continue
        if req.id in seen:
            bad.append(BadLine(n, req.id, f"duplicate {fmt.id_key} {req.id!r} (first on line {seen[req.id]})"))
            continue
        seen[req.id] = n
        requests.append(req)
    if not requests and not bad:
        raise JobInputError(f"{path}: no requests (the file is empty)")
    return Job(path, fmt or PLAIN, requests, bad)
