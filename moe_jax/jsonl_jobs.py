"""JSONL batch jobs: reading and validating an input file, and writing completions line by line.

Input line: {"prompt": TEXT} or {"prompt_token_ids": [INT, ...]}, optional "id" (string or int, unique;
default: the line number) and "max_new_tokens". Output line: {"id", "token_ids", "text", "finish_reason"}.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Sequence


class JobInputError(ValueError):
    """Every problem found in an input file, one per line of the message."""


@dataclasses.dataclass(frozen=True)
class JobLine:
    line: int  # 1-based line number in the input file
    id: str | int
    prompt: str | tuple[int, ...]
    max_new_tokens: int | None


def _parse_line(n: int, text: str) -> JobLine:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    has_text, has_ids = "prompt" in obj, "prompt_token_ids" in obj
    if has_text == has_ids:
        raise ValueError("needs exactly one of 'prompt' (text) or 'prompt_token_ids' (list of ints)")
    if has_text:
        prompt: Any = obj["prompt"]
        if not isinstance(prompt, str):
            raise ValueError(f"'prompt' must be a string, got {type(prompt).__name__}")
    else:
        prompt = obj["prompt_token_ids"]
        if not isinstance(prompt, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise ValueError("'prompt_token_ids' must be a list of integers")
        prompt = tuple(prompt)
    if not prompt:
        raise ValueError("empty prompt")
    rid = obj.get("id", n)
    if not isinstance(rid, (str, int)) or isinstance(rid, bool):
        raise ValueError(f"'id' must be a string or an integer, got {type(rid).__name__}")
    m = obj.get("max_new_tokens")
    if m is not None and (not isinstance(m, int) or isinstance(m, bool) or m < 1):
        raise ValueError(f"'max_new_tokens' must be a positive integer, got {m!r}")
    return JobLine(n, rid, prompt, m)


def read_job(path: str | Path) -> list[JobLine]:
    """All lines of a JSONL input, validated; every error is reported at once (JobInputError)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise JobInputError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise JobInputError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    jobs, errors, seen = [], [], {}
    for n, text in enumerate(lines, 1):
        if not text.strip():
            continue
        try:
            job = _parse_line(n, text)
        except ValueError as e:
            errors.append(f"{path}:{n}: {e}")
            continue
        if job.id in seen:
            errors.append(f"{path}:{n}: duplicate id {job.id!r} (first on line {seen[job.id]})")
            continue
        seen[job.id] = n
        jobs.append(job)
    if errors:
        raise JobInputError("\n".join(errors))
    if not jobs:
        raise JobInputError(f"{path}: no requests (the file is empty)")
    return jobs


class CompletionWriter:
    """Appends one complete JSON line per finished request; `flush()` makes them durable (fsync)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._f.write(json.dumps(record, ensure_ascii=False) + "\n")

    def flush(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self.flush()
        self._f.close()


def output_record(job_id: Any, token_ids: Sequence[int], text: str | None, finish_reason: str) -> dict:
    return {"id": job_id, "token_ids": list(token_ids), "text": text, "finish_reason": finish_reason}
