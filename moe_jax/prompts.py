"""Turning a prompt (text or token ids) into validated token ids for a model."""
from __future__ import annotations

from typing import Sequence

from moe_jax.config import ModelConfig
from moe_jax.integers import integer_ids
from moe_jax.tokenizer import Tokenizer


class PromptError(ValueError):
    """A prompt that cannot be run; the message names the prompt (index, id or line)."""


def encode_prompt(cfg: ModelConfig, tokenizer: Tokenizer | None, prompt: str | Sequence[int],
                  where: str = "prompt", room: int = 1) -> tuple[int, ...]:
    """Token ids of `prompt`: non-empty, inside the vocabulary, leaving `room` of the model's positions free
    (1: a token to generate; 0: a sequence only scored, `LLM.logits`)."""
    if isinstance(prompt, (bytes, bytearray)):  # not a sequence of token ids, whatever its items are
        raise PromptError(f"{where}: got {type(prompt).__name__}; give text (str) or a list of token ids")
    if isinstance(prompt, str):
        if tokenizer is None:
            raise PromptError(f"{where}: this model has no tokenizer.json; give token ids, not text")
        if not prompt:
            raise PromptError(f"{where} is empty")
        ids = tuple(tokenizer.encode(prompt))
    else:
        ids = integer_ids(prompt, where, PromptError)
    if not ids:
        raise PromptError(f"{where} is empty")
    bad = [t for t in ids if not 0 <= t < cfg.vocab_size]
    if bad:
        raise PromptError(f"{where}: token id {bad[0]} is outside the vocabulary (0..{cfg.vocab_size - 1})")
    if len(ids) > cfg.max_positions - room:
        left = ", one left to generate" if room else ""
        window = " (config.json's sliding_window, which caps the context)" if cfg.sliding_window else ""
        raise PromptError(f"{where} has {len(ids)} tokens; the model allows at most {cfg.max_positions - room} "
                          f"(max positions {cfg.max_positions}{window}{left})")
    return ids
