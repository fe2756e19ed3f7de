"""One request of a JSONL batch job, as parsed from its input line (any format), and field checks."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from typing import Any, Callable

from moe_jax.sampling import MAX_TOP_LOGPROBS


@dataclasses.dataclass(frozen=True)
class JobRequest:
    """prompt: text or token ids (None for a chat request, which has `messages`); sampling:
    SamplingParams fields this line overrides; stop: strings that end the completion (text cut before
    them), None where the line says nothing of them (the job's --stop then); endpoint: the OpenAI batch url, None for a plain line; n: completions to sample for the prompt."""

    line: int  # 1-based line number in the input file
    id: str | int
    prompt: str | tuple[int, ...] | None
    messages: tuple[dict, ...] | None = None
    sampling: dict = dataclasses.field(default_factory=dict)
    stop: tuple[str, ...] | None = None
    endpoint: str | None = None
    n: int = 1

    def fingerprint(self) -> str:
        """A digest of what the request asks for (all but its line and id), so that a resumed job can tell that
        the input line of an id it finished has changed since."""
        asked = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("line", "id")}
        asked["sampling"] = {k: float(v) if k in FLOAT_FIELDS else v for k, v in self.sampling.items()}  # 1 as 1.0
        # no "stop" and an empty one alike, as jobs recorded them before an empty one meant none whatever --stop
        # says: their finished lines resume (a line switched between the two under a --stop is not told apart)
        asked["stop"] = list(self.stop or ())
        return hashlib.sha256(json.dumps(asked, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class BadLine:
    """An input line that cannot run; id is None when the line has no usable one."""

    line: int
    id: str | int | None
    reason: str


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def is_positive_int(v: Any) -> bool:
    return is_int(v) and v >= 1


def is_token_ids(v: Any) -> bool:
    return isinstance(v, list) and all(is_int(t) for t in v)


def optional(obj: dict, key: str, valid: Callable[[Any], bool], expected: str, where: str = ""):
    """obj[key], or None when absent or null; ValueError naming `where + key` when not valid."""
    v = obj.get(key)
    if v is not None and not valid(v):
        raise ValueError(f"'{where}{key}' must be {expected}, got {v!r}")
    return v


FLOAT_FIELDS = ("temperature", "top_p")  # sampling fields a line may write as an integer (1) or not (1.0)
SAMPLING_CHECKS = {  # the SamplingParams fields a request line may set: (check, what the value must be)
    "max_new_tokens": (is_positive_int, "a positive integer"),
    "temperature": (lambda v: is_number(v) and math.isfinite(v) and v >= 0, "a finite number >= 0"),
    "top_p": (lambda v: is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "top_k": (lambda v: is_int(v) and v >= -1, "an integer >= 0 (or -1: none, as 0)"),
    "seed": (lambda v: is_int(v) and 0 <= v < 2**32, "an integer in 0..2**32 - 1"),
    "logprobs": (lambda v: is_int(v) and 0 <= v <= MAX_TOP_LOGPROBS, f"an integer in 0..{MAX_TOP_LOGPROBS}"),
}


def sampling_fields(obj: dict, keys: dict[str, str], where: str = "") -> dict:
    """The SamplingParams fields a line sets; keys maps the line's key to its field (a key of SAMPLING_CHECKS)."""
    out = {}
    for key, field in keys.items():
        v = optional(obj, key, *SAMPLING_CHECKS[field], where)
        if v is not None:
            out[field] = v
    return out


def refuse_unknown(obj: dict, known, where: str = "") -> None:
    """ValueError naming the keys of obj outside `known`: a field this line cannot honour is never dropped
    silently (a misspelt or unsupported sampling field would change what the user gets)."""
    unknown = sorted(set(obj) - set(known))
    if unknown:
        raise ValueError(f"unknown field{'s' * (len(unknown) > 1)} {', '.join(repr(where + k) for k in unknown)} "
                         f"(known: {', '.join(sorted(known))})")


MAX_N = 64  # completions one request may ask for


def completions_wanted(obj: dict, where: str = "") -> int:
    """obj["n"], the completions to sample for the prompt (absent or null: 1); ValueError naming it."""
    return optional(obj, "n", lambda v: is_int(v) and 1 <= v <= MAX_N, f"an integer in 1..{MAX_N}", where) or 1


def stop_strings(obj: dict, where: str = "") -> tuple[str, ...] | None:
    """obj["stop"]: a string or a list of non-empty strings, () for null or [] (none, whatever the job's
    --stop), None where absent; ValueError naming it."""
    if "stop" not in obj:
        return None
    stop = optional(obj, "stop", lambda v: isinstance(v, str) or (isinstance(v, list) and all(
        isinstance(s, str) for s in v)), "a string or a list of strings", where)
    stop = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if "" in stop:
        raise ValueError(f"'{where}stop' strings must not be empty")
    return stop
