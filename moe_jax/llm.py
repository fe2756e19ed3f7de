"""The Python API: `LLM(model, dtype=..., policy=...)` with `.logits` and `.generate`."""
from __future__ import annotations

import logging
from typing import Iterator, Sequence

import ml_dtypes  # noqa: F401  (registers "bfloat16" as a NumPy dtype name)
import numpy as np

from moe_jax.model_source import ModelSource, open_model
from moe_jax.prompts import encode_prompt
from moe_jax.requests import Completion, Request
from moe_jax.resident_engine import ResidentEngine
from moe_jax.sampling import SamplingParams

log = logging.getLogger("moe_jax")

POLICIES = ("auto", "resident", "offload")
DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float32": "float32", "fp32": "float32", "f32": "float32"}


class PolicyUnavailable(ValueError):
    pass


class LLM:
    """An MoE model ready to run.

    model: a directory with config.json + *.safetensors [+ tokenizer.json], or a preset name.
    policy: "resident" (everything on the accelerator), "offload" (CGOPipe), "auto" (HRM decides).
    """

    def __init__(self, model: str | ModelSource, *, dtype: str = "bfloat16", policy="auto",
                 max_batch_size: int = 64, moe_impl: str = "auto", seed: int = 0):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if policy == "offload" or not isinstance(policy, str):
            raise PolicyUnavailable(f"policy {policy!r} is not available yet: the offload engine (CGOPipe) is "
                                    "not implemented; use policy='resident'")
        if policy not in POLICIES:
            raise PolicyUnavailable(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        source = model if isinstance(model, ModelSource) else open_model(model, seed=seed)
        self.name, self.cfg, self.tokenizer = source.name, source.cfg, source.tokenizer
        if policy == "auto":
            log.info("policy auto -> resident (the offload engine and HRM are not implemented yet)")
        self.policy = "resident"
        self.dtype = np.dtype(DTYPES[dtype])
        self.engine = ResidentEngine(self.cfg, source.weights, self.dtype, max_batch_size=max_batch_size,
                                     moe_impl=moe_impl)

    def encode(self, prompt: str | Sequence[int], where: str = "prompt") -> tuple[int, ...]:
        """A prompt as validated token ids (see `moe_jax.prompts.encode_prompt`)."""
        return encode_prompt(self.cfg, self.tokenizer, prompt, where)

    def logits(self, token_ids: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """float32 [len_i, vocab] logits for every position of every sequence."""
        prompts = [self.encode(t, f"sequence {i}") for i, t in enumerate(token_ids)]
        return self.engine.logits(prompts)

    def generate_iter(self, prompts: Sequence[str | Sequence[int]],
                      params: SamplingParams | Sequence[SamplingParams] | None = None
                      ) -> Iterator[tuple[int, Completion]]:
        """Yields (prompt index, Completion) in the order requests finish. All prompts are validated
        before any work starts."""
        params = params if params is not None else SamplingParams()
        per = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(per) != len(prompts):
            raise ValueError(f"got {len(per)} SamplingParams for {len(prompts)} prompts")
        requests = [Request(i, self.encode(p, f"prompt {i}"), sp) for i, (p, sp) in enumerate(zip(prompts, per))]
        for req, ids, reason in self.engine.generate(requests):
            text = self.tokenizer.decode(ids) if self.tokenizer is not None else None
            yield req.index, Completion(list(ids), text, reason, list(req.prompt))

    def generate(self, prompts: Sequence[str | Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[Completion]:
        """One Completion per prompt, in prompt order."""
        out: list[Completion | None] = [None] * len(prompts)
        for i, c in self.generate_iter(prompts, params):
            out[i] = c
        return out
