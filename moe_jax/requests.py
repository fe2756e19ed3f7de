"""What a caller submits and gets back, and when a request is finished."""
from __future__ import annotations

import dataclasses
from typing import Callable, Collection, Sequence

from moe_jax.sampling import SamplingParams
from moe_jax.tokenizer import continuation


@dataclasses.dataclass(frozen=True)
class Request:
    """One prompt (token ids, non-empty) with its sampling parameters; `index` is its position in the job.
    stop_check: called with the generated ids after each token, True when they complete a stop string
    (built from `params.stop` by the LLM, which holds the tokenizer)."""

    index: int
    prompt: tuple[int, ...]
    params: SamplingParams
    stop_check: Callable[[Sequence[int]], bool] | None = None


def token_budget(request: Request, max_positions: int) -> int:
    """New tokens `request` may generate: its max_new_tokens, within the model's positions."""
    return min(request.params.max_new_tokens, max_positions - len(request.prompt))


def finish_reason(request: Request, generated: Sequence[int], budget: int, eos_ids: Collection[int]) -> str | None:
    """After a new token: "stop" (a stop token, EOS unless ignore_eos, a stop string), "length" (`budget`
    tokens generated), or None (go on). The one finishing rule of every engine."""
    p, t = request.params, generated[-1]
    if t in p.stop_token_ids or (not p.ignore_eos and t in eos_ids):
        return "stop"
    if request.stop_check is not None and request.stop_check(generated):
        return "stop"
    return "length" if len(generated) >= budget else None


@dataclasses.dataclass
class Completion:
    """token_ids: generated tokens only (a stop token that ended generation included; a stop string's
    tokens up to the one completing it); text: their decoding (None without a tokenizer), cut before a stop
    string, and without the text of a stop token (or EOS) that ended generation, as vLLM's; finish_reason: "stop" (EOS, a stop token or a stop string) or "length".
    Where the request's SamplingParams.logprobs is set (else None): logprobs, each token's log-probability
    under the model's distribution; top_logprobs (logprobs >= 1), each position's `logprobs` most likely
    (token id, log-probability), most likely first."""

    token_ids: list[int]
    text: str | None
    finish_reason: str
    prompt_token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None

    @classmethod
    def of(cls, request: Request, token_ids: list[int], finish_reason: str, logprobs: list | None,
           decode: Callable[[Sequence[int]], str] | None, eos_ids: Collection[int] = ()) -> "Completion":
        """What an engine yields for `request` (logprobs: its `sampling.logprob_entry` per token, or None),
        with the text where `decode` (a tokenizer's) is given; eos_ids: the model's (`finish_reason`)."""
        p, top = request.params, request.params.logprobs
        last = token_ids[-1] if token_ids else None
        by_token = finish_reason == "stop" and (last in p.stop_token_ids or (not p.ignore_eos and last in eos_ids))
        texted = token_ids[:-1] if by_token else token_ids
        return cls(list(token_ids), None if decode is None else continuation(decode, request.prompt, texted),
                   finish_reason,
                   list(request.prompt), None if logprobs is None else [lp for lp, _ in logprobs],
                   [t for _, t in logprobs] if logprobs is not None and top else None)
