"""Stop strings, applied to a finished completion (the engines stop on token ids only, so a request
with stop strings still generates up to its max_new_tokens; the result is then cut)."""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

from moe_jax.requests import Completion


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the earliest stop string starts in `text`, or None."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def cut_at_stop(c: Completion, stops: Sequence[str], decode: Callable[[Sequence[int]], str]) -> Completion:
    """`c` ended at the first stop string of its text: the text before it, the tokens up to the one that
    completed it, finish_reason "stop". Unchanged when no stop string occurs."""
    cut = _first_stop(c.text or "", stops)
    if cut is None:
        return c
    lo, hi = 1, len(c.token_ids)  # the fewest tokens whose text holds a stop string (binary search)
    while lo < hi:
        mid = (lo + hi) // 2
        if _first_stop(decode(c.token_ids[:mid]), stops) is None:
            lo = mid + 1
        else:
            hi = mid
    return dataclasses.replace(c, token_ids=c.token_ids[:lo], text=c.text[:cut], finish_reason="stop")
