"""What a caller submits and gets back."""
from __future__ import annotations

import dataclasses

from moe_jax.sampling import SamplingParams


@dataclasses.dataclass(frozen=True)
class Request:
    """One prompt (token ids, non-empty) with its sampling parameters; `index` is its position in the job."""

    index: int
    prompt: tuple[int, ...]
    params: SamplingParams


@dataclasses.dataclass
class Completion:
    """token_ids: generated tokens only (a stop token that ended generation included); text: their
    decoding (None without a tokenizer); finish_reason: "stop" (EOS or a stop token) or "length"."""

    token_ids: list[int]
    text: str | None
    finish_reason: str
    prompt_token_ids: list[int] = dataclasses.field(default_factory=list)
