"""Stop strings (`SamplingParams.stop`): the engines end a request on the token that completes one
(`StopStrings`, checked after every token), and its completion is then cut before it (`cut_at_stop`):
vLLM's semantics with `include_stop_str_in_output=False`."""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

from moe_jax.requests import Completion
from moe_jax.tokenizer import CONTEXT, continuation


class StopStrings:
    """`matcher(token_ids) -> bool`: does the decoded text hold one of `stops`?

    Decodes only the last tokens: a stop string of c characters is at most 4c bytes, so at most 4c
    tokens of a byte-level or byte-fallback tokenizer; 4c + 2 tokens hold it and the token it starts
    in. Called after each new token, a match means that token completed the stop string."""

    def __init__(self, stops: Sequence[str], decode: Callable[[Sequence[int]], str], prompt: Sequence[int] = ()):
        self.stops, self.decode = tuple(stops), decode
        self.prompt = tuple(prompt)[-CONTEXT:]  # all of it `continuation` reads
        self.window = 4 * max(len(s) for s in self.stops) + 2

    def __call__(self, token_ids: Sequence[int]) -> bool:
        """token_ids: the generated ones so far, read after the prompt (`continuation`); called at every token,
        it copies no more of them than the window and its context."""
        ids = (*self.prompt, *token_ids[-(self.window + CONTEXT):])
        n = min(self.window, len(token_ids))
        return _first_stop(continuation(self.decode, ids[:len(ids) - n], ids[len(ids) - n:]), self.stops) is not None


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the earliest stop string starts in `text`, or None."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def cut_at_stop(c: Completion, stops: Sequence[str], decode: Callable[[Sequence[int]], str]) -> Completion:
    """`c` ended at the first stop string of its text: the text before it, the tokens (and their logprobs) up
    to the one that completed it, finish_reason "stop". Unchanged when no stop string occurs."""
    cut = _first_stop(c.text or "", stops)
    if cut is None:
        return c
    lo, hi = 1, len(c.token_ids)  # the fewest tokens whose text holds a stop string (binary search)
    while lo < hi:
        mid = (lo + hi) // 2
        if _first_stop(continuation(decode, c.prompt_token_ids, c.token_ids[:mid]), stops) is None:
            lo = mid + 1
        else:
            hi = mid
    return dataclasses.replace(c, token_ids=c.token_ids[:lo], text=c.text[:cut], finish_reason="stop",
                               logprobs=c.logprobs and c.logprobs[:lo], top_logprobs=c.top_logprobs and c.top_logprobs[:lo])
