"""The Python API: `LLM(model, dtype=..., policy=...)` with `.logits`, `.generate` and `.prepare`."""
from __future__ import annotations

import dataclasses
import logging
import numbers
from typing import Iterator, Sequence

import jax
import ml_dtypes  # noqa: F401  (registers "bfloat16" as a NumPy dtype name)
import numpy as np

import pallas_kernels
from moe_jax import expert_codec as codec, pinned_pool
from moe_jax.chat_template import ChatTemplate, ChatTemplateError, chat_messages, missing_template
from moe_jax.integers import is_integer
from moe_jax.model_source import ModelSource, open_model
from moe_jax.offload_policy import PREFETCH, Policy, kv_storage_dtype
from moe_jax.params import model_bytes, model_dtype
from moe_jax.prompts import encode_prompt
from moe_jax.requests import Completion, Request, token_budget
from moe_jax.resident_engine import DEFAULT_MAX_BATCH, ResidentEngine, device_memory_limit
from moe_jax.sampling import SamplingParams
from moe_jax.stop_strings import StopStrings, cut_at_stop

log = logging.getLogger("moe_jax")

POLICIES = ("auto", "resident", "offload")
# The Policy fields LLM also takes, for the offload policies HRM picks: (default, what the field does, why
# policy "resident" has no use for any other value).
_OFFLOAD_OPTIONS = {
    "expert_codec": ("none", "codes the experts the offload engine streams", "streams none"),
    "kv_cache_dtype": ("auto", "sets how the offload engine's host KV cache stores K and V",
                       "keeps its KV cache on the accelerator in the model's dtype"),
}
_GPU_PROFILES = (("H100", "h100-80gb"), ("H200", "h200"), ("A100", None), ("L4", "l4"), ("T4", "t4"))


def _require_batch(items, name: str, each: str) -> None:
    """TypeError when `items`, meant as a list of sequences, is a single string or list of token ids (which
    would otherwise run as one sequence per character or token), or is no list at all."""
    if not hasattr(items, "__len__") or not hasattr(items, "__getitem__"):
        raise TypeError(f"{name} must be a list of {each}; got {type(items).__name__} {items!r:.80}")
    if isinstance(items, str) or (len(items) and isinstance(items[0], (int, np.integer))):
        raise TypeError(f"{name} must be a list of {each}; got one "
                        f"{'string' if isinstance(items, str) else 'list of token ids'}: wrap it in a list")


def _warn_repeated_samples(ids: list[tuple[int, ...]], params: list[SamplingParams]) -> None:
    """Requests that sample (temperature > 0) the same prompt with the same seed sample the same tokens (a
    request's samples depend on its prompt and seed only): said, since repeating a prompt for several samples
    is how vLLM's API is often used."""
    seen, repeats = set(), 0
    for prompt, sp in zip(ids, params):
        if sp.temperature > 0:
            repeats += (prompt, sp.seed) in seen
            seen.add((prompt, sp.seed))
    if repeats:
        log.warning("%d request(s) sample a prompt with the same seed as an earlier one: they get the same tokens "
                    "(give each its own SamplingParams(seed=...) for independent samples)", repeats)


class PolicyUnavailable(ValueError):
    pass


def detect_hardware() -> str | None:
    """The HRM profile name of this machine's accelerator, or None when there is none that HRM knows."""
    dev = jax.devices()[0]
    if dev.platform != "gpu":
        return None
    for marker, name in _GPU_PROFILES:
        if marker in dev.device_kind:
            if name is None:  # A100: 40 or 80 GB
                name = "a100-80gb" if (device_memory_limit() or 0) > 48 * 2**30 else "a100-40gb"
            return name
    return None


class LLM:
    """An MoE model ready to run.

    model: a directory with config.json + *.safetensors [+ tokenizer.json], a preset name, or a ModelSource.
    policy: "resident" (everything on the accelerator), "offload" (CGOPipe with the policy HRM picks
      for the workload of the first `generate` or `prepare` call), "auto" (resident when the model fits the accelerator,
      else offload), or a `moe_jax.Policy` (offload with exactly that policy).
    max_batch_size: the most sequences decoding at once (default: 64 on the resident engine, HRM's choice
      when it picks the offload policy, which it then caps).
    gpu_memory_gb: the GPU memory the engine may use (GiB); hardware: HRM profile name or JSON file
      (default: detected from the device); prefetch: "split" or "whole" (see OffloadEngine).
    expert_codec: how the offload policies HRM picks hold and stream the experts: "none" or "exp4" (coded
      losslessly in 12 bits, bfloat16 only: `moe_jax.expert_codec`); kv_cache_dtype: how their host KV
      cache stores K and V: "auto" (the model's dtype) or "int8" (lossy, about half the bytes: twice the
      sequences in the same host memory; `moe_jax.Policy`). A `moe_jax.Policy` carries its own of both.
    seed: a preset's random weights (unused for a model directory; sampling seeds are SamplingParams.seed).
    The engine (and the weights' placement) is built when first needed: at construction for
    "resident" or a Policy, at the first `generate` (or `prepare`) for "offload" and "auto" when they choose
    offload.
    """

    def __init__(self, model: str | ModelSource, *, dtype: str = "bfloat16", policy="auto",
                 max_batch_size: int | None = None, gpu_memory_gb: float | None = None, hardware: str | None = None,
                 moe_impl: str = "auto", prefetch: str = "split", expert_codec: str = "none",
                 kv_cache_dtype: str = "auto", seed: int = 0):
        self.dtype = model_dtype(dtype)  # a bad name fails here, before the model opens
        if not isinstance(policy, Policy) and policy not in POLICIES:
            raise PolicyUnavailable(f"policy must be one of {', '.join(POLICIES)} or a moe_jax.Policy, got {policy!r}")
        if moe_impl not in pallas_kernels.IMPLS:  # the name only: whether it runs here needs the backend
            raise ValueError(f"moe_impl must be one of {', '.join(pallas_kernels.IMPLS)}, got {moe_impl!r}")
        if prefetch not in PREFETCH:
            raise ValueError(f"prefetch must be one of {', '.join(PREFETCH)}, got {prefetch!r}")
        if max_batch_size is not None and (not is_integer(max_batch_size) or max_batch_size < 1):
            raise ValueError(f"max_batch_size must be a positive integer or None, got {max_batch_size!r}")
        if gpu_memory_gb is not None and (not isinstance(gpu_memory_gb, numbers.Real) or isinstance(gpu_memory_gb, bool)
                                          or not 0 < gpu_memory_gb < float("inf")):
            raise ValueError(f"gpu_memory_gb must be a positive number of GiB or None, got {gpu_memory_gb!r}")
        self.source = model if isinstance(model, ModelSource) else open_model(model, seed=seed)
        self.name, self.cfg, self.tokenizer = self.source.name, self.source.cfg, self.source.tokenizer
        self._chat_template: ChatTemplate | None = None  # read at the first `chat`
        codec.check(expert_codec, self.dtype)
        kv_storage_dtype(kv_cache_dtype, self.dtype)
        self.offload_options = {"expert_codec": expert_codec, "kv_cache_dtype": kv_cache_dtype}
        unused = {k: v for k, v in self.offload_options.items() if v != _OFFLOAD_OPTIONS[k][0]}
        for name, value in unused.items():
            if isinstance(policy, Policy) and value != getattr(policy, name):
                raise PolicyUnavailable(f"{name}={value!r} differs from the given policy's "
                                        f"{name}={getattr(policy, name)!r}: set it in the Policy")
            if policy == "resident":
                _, does, ignored = _OFFLOAD_OPTIONS[name]
                raise PolicyUnavailable(f"{name}={value!r} {does}; policy 'resident' {ignored}")
        if hardware is not None and policy == "resident":
            raise PolicyUnavailable(f"hardware={hardware!r} is the profile HRM sizes an offload policy for; policy "
                                    f"'resident' uses none")
        if isinstance(policy, Policy):
            if gpu_memory_gb is not None and policy.gpu_memory_gb not in (None, gpu_memory_gb):
                raise PolicyUnavailable(f"gpu_memory_gb={gpu_memory_gb!r} differs from the given policy's "
                                        f"gpu_memory_gb={policy.gpu_memory_gb!r}: give one")
            if max_batch_size is not None and max_batch_size < policy.batch_size:
                raise PolicyUnavailable(f"max_batch_size={max_batch_size!r} is below the given policy's batch_size="
                                        f"{policy.batch_size}: the Policy sets the batch")
        self.max_batch_size, self.gpu_memory_gb, self.hardware, self.moe_impl, self.prefetch = (
            max_batch_size, gpu_memory_gb, hardware, moe_impl, prefetch)
        if hardware is not None:
            from moe_jax.hrm import hardware_profile

            self.hardware = hardware_profile(hardware)  # a bad name or file fails here, not mid-job
        self.engine = None
        self.hrm_prediction = None  # the HRM SearchResult behind an offload policy it chose
        self._batch_chosen_for = None  # the requests of the largest job this LLM chose its offload batch for
        if policy == "auto" or (policy == "offload" and (self.hardware is None or gpu_memory_gb is None)):
            # JAX starts before HRM chooses (to detect the device or read its memory): a pool for every expert
            pinned_pool.reserve(pinned_pool.streamed_bytes(self.cfg, self.dtype, codec=expert_codec))
        if policy == "auto":
            policy = "resident" if self._fits_on_device() else "offload"
            log.info("policy auto -> %s", policy)
            for k, v in unused.items() if policy == "resident" else ():
                log.warning("%s=%r unused: policy auto chose resident (the model fits the accelerator), which %s",
                            k, v, _OFFLOAD_OPTIONS[k][2])
            if policy == "resident" and hardware is not None:
                log.warning("hardware=%r unused: policy auto chose resident (the model fits the accelerator), which "
                            "needs no HRM profile", hardware)
        self.policy = policy
        if policy == "resident":
            self.engine = ResidentEngine(self.cfg, self.source.weights, self.dtype, max_batch_size=max_batch_size,
                                         moe_impl=moe_impl, gpu_memory_bytes=self._cap_bytes())
        elif isinstance(policy, Policy):
            self._build_offload(policy)

    def _cap_bytes(self) -> int | None:
        return int(self.gpu_memory_gb * 2**30) if self.gpu_memory_gb else None

    def _fits_on_device(self) -> bool:
        limit = device_memory_limit()
        cap = min(x for x in (limit, self._cap_bytes(), float("inf")) if x)
        return model_bytes(self.cfg, self.dtype) < 0.85 * cap

    def _build_offload(self, policy: Policy) -> None:
        from moe_jax.offload_engine import OffloadEngine

        if self.gpu_memory_gb is not None and policy.gpu_memory_gb is None:
            policy = Policy(**{**policy.__dict__, "gpu_memory_gb": self.gpu_memory_gb})
        self.policy = policy
        pinned_pool.reserve(pinned_pool.streamed_bytes(self.cfg, self.dtype, policy))
        self.engine = OffloadEngine(self.cfg, self.source.weights, self.dtype, policy, moe_impl=self.moe_impl,
                                    prefetch=self.prefetch, host_memory_bytes=self._planned_host_bytes())

    def _hardware(self):
        """The HRM profile of this machine: the one given, else the detected one's name, else None."""
        return self.hardware or detect_hardware()

    def _planned_host_bytes(self) -> float | None:
        """The host memory of this GPU machine's HRM profile (what its policies are planned with); None on
        another backend (a profile named there describes some other machine) or without a profile."""
        from moe_jax.hrm import hardware_profile

        hardware = self._hardware() if jax.devices()[0].platform == "gpu" else None
        return hardware_profile(hardware).host_memory if hardware is not None else None

    def _choose_offload_policy(self, requests: Sequence[Request], loaded: Policy | None = None) -> Policy:
        """HRM's policy for this workload (lengths as the engine runs them, `hrm_lengths`), N at most the requests
        and max_batch_size; with `loaded` (the built engine's policy), the best N and μ on its layout (its
        micro-batches and resident experts, its cap)."""
        from moe_jax import hrm

        hardware = self._hardware()
        n = len(requests)
        if hardware is None:
            batch = min(n, self.max_batch_size or DEFAULT_MAX_BATCH)
            n_ub = min(2 if loaded is None else loaded.num_micro_batches, batch)
            policy = Policy(**{**(self.offload_options if loaded is None else loaded.__dict__), "batch_size": batch,
                               "micro_batch_size": -(-batch // n_ub), "num_micro_batches": n_ub})
            if loaded is not None:
                return policy
            log.warning("policy offload: no HRM hardware profile for device %s (pass hardware=...); using %s",
                        jax.devices()[0].device_kind, policy)
            return policy
        from moe_jax.offload_engine import hrm_lengths

        budgets = [token_budget(r, self.cfg.max_positions) for r in requests]  # as the engine
        job = hrm_lengths([len(r.prompt) for r in requests], budgets, self.cfg.max_positions)
        caps = [self.gpu_memory_gb] if self.gpu_memory_gb else []
        if not caps or pinned_pool.fixed_cap_bytes() is not None:  # JAX's own cap, below the card's (starts JAX)
            limit = device_memory_limit()
            caps += [limit / 2**30] if limit else []
        pool = pinned_pool.fixed_cap_bytes()  # None: no GPU backend yet; HRM sizes the pool, set before it starts
        layout = {} if loaded is None else {"num_micro_batches": loaded.num_micro_batches,
                                            "resident_expert_fraction": loaded.resident_expert_fraction}
        result = hrm.choose_policy(self.cfg, hardware, **job._asdict(), gpu_memory_gb=min(caps) if caps else None,
                                   pinned_pool_gb=pool / 2**30 if pool else None,
                                   max_batch_size=min(n, self.max_batch_size or n),
                                   placements=[("cpu", "cpu")], dtype=str(self.dtype), **self.offload_options, **layout)
        if loaded is not None:  # its cap, as the engine holds it (the search's may count the device's limit too)
            result = dataclasses.replace(result, policy=Policy(**{**result.policy.__dict__, "gpu_memory_gb": loaded.gpu_memory_gb}))
        self.hrm_prediction = result
        log.info("HRM (%s, prompt %d, gen %d) chose %s%s; predicted %.1f tok/s, bottleneck %s",
                 hardware, job.prompt_len, job.gen_len, result.policy, "" if loaded is None else " on the loaded weights",
                 result.tokens_per_s, result.bottleneck)
        return result.policy

    @property
    def stats(self):
        """The offload engine's OffloadStats (per-layer CPU/GPU wait times, bytes streamed), or None."""
        return getattr(self.engine, "stats", None)

    def encode(self, prompt: str | Sequence[int], where: str = "prompt") -> tuple[int, ...]:
        """A prompt as validated token ids (see `moe_jax.prompts.encode_prompt`)."""
        return encode_prompt(self.cfg, self.tokenizer, prompt, where)

    def logits(self, token_ids: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """float32 [len_i, vocab] logits for every position of every sequence (resident policy only)."""
        if not isinstance(self.engine, ResidentEngine):
            raise PolicyUnavailable(f"LLM.logits needs policy 'resident'; this LLM runs {self.policy}")
        _require_batch(token_ids, "token_ids", "sequences of token ids")
        prompts = [encode_prompt(self.cfg, self.tokenizer, t, f"sequence {i}", room=0) for i, t in enumerate(token_ids)]
        return self.engine.logits(prompts)

    def prepare(self, prompts: Sequence[str | Sequence[int]],
                params: SamplingParams | Sequence[SamplingParams] | None = None) -> None:
        """Validate the prompts, build the engine for them and check its memory for them, as `generate` does
        first: with policy "offload" or "auto" (where the model does not fit the accelerator), HRM chooses the
        policy for these prompts (without a hardware profile: a fallback policy, logged) and the weights are
        placed; an infeasible policy or a memory error (the
        engine's own, its KV cache's, its prefill's) comes here, before any work. Later `generate` calls run
        on this engine (the weights stay where they are; a later job of more requests than these gets its batch
        chosen again on them, `_start`). The offload engine also allocates its host KV
        cache for these prompts here, and keeps it for every later `generate` whose prompts fit it (the first
        touch of tens of GB of host memory takes seconds to minutes on some VMs: paid once)."""
        requests = self._requests(prompts, params)
        if requests:
            self._start(requests)
            self.engine.prepare(requests)

    def rebatch(self, policy: Policy) -> None:
        """Run later `generate` calls at `policy`'s batch_size and micro_batch_size on the weights as this LLM's
        offload engine placed them (no reload): every other field must be this LLM's policy's (ValueError naming
        them otherwise; `hrm.choose_policy(num_micro_batches=..., resident_expert_fraction=...)` picks the best
        batch within them; a policy without gpu_memory_gb takes this LLM's). The GPU memory is checked for it
        (OffloadMemoryError; the policy stays as it was)."""
        from moe_jax.offload_engine import OffloadEngine

        if not isinstance(self.engine, OffloadEngine):
            raise PolicyUnavailable(f"LLM.rebatch needs a built offload engine; this LLM runs {self.policy}"
                                    + ("" if self.engine is not None else " (none built yet: prepare or generate first)"))
        if self.max_batch_size is not None and policy.batch_size > self.max_batch_size:
            raise PolicyUnavailable(f"LLM.rebatch: batch_size={policy.batch_size} is above this LLM's max_batch_size="
                                    f"{self.max_batch_size}")
        if self.gpu_memory_gb is not None and policy.gpu_memory_gb is None:
            policy = Policy(**{**policy.__dict__, "gpu_memory_gb": self.gpu_memory_gb})
        self.engine.rebatch(policy)
        self.policy, self.hrm_prediction = policy, None  # HRM's prediction, if any, was for the policy before
        self._batch_chosen_for = None  # the caller's batch from now on

    def release_kv_cache(self) -> None:
        """Give the offload engine's kept host KV cache back to the OS (tens of GB for a large batch); the next
        `prepare` or `generate` allocates one again. Nothing to do for the resident engine, whose cache lives in
        a `generate` call."""
        release = getattr(self.engine, "release_kv_cache", None)
        if release is not None:
            release()

    def _requests(self, prompts, params) -> list[Request]:
        """The prompts and their SamplingParams as validated Requests (`generate`'s arguments)."""
        _require_batch(prompts, "prompts", "prompts (each a string or a list of token ids)")
        params = params if params is not None else SamplingParams()
        if not isinstance(params, (SamplingParams, list, tuple)):
            raise TypeError(f"params must be a SamplingParams or a list of them (one per prompt), got "
                            f"{type(params).__name__}")
        per = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(per) != len(prompts):
            raise ValueError(f"got {len(per)} SamplingParams for {len(prompts)} prompts")
        bad = next((i for i, sp in enumerate(per) if not isinstance(sp, SamplingParams)), None)
        if bad is not None:
            raise TypeError(f"params[{bad}] must be a SamplingParams, got {type(per[bad]).__name__}")
        if self.tokenizer is None and (i := next((i for i, sp in enumerate(per) if sp.stop), None)) is not None:
            raise ValueError(f"prompt {i}: stop strings {per[i].stop!r} need a tokenizer; {self.name} has none "
                             f"(use stop_token_ids)")
        ids = [self.encode(p, f"prompt {i}") for i, p in enumerate(prompts)]
        _warn_repeated_samples(ids, per)
        return [Request(i, ids[i], sp, StopStrings(sp.stop, self.tokenizer.decode, ids[i]) if sp.stop else None)
                for i, sp in enumerate(per)]

    def _start(self, requests: list[Request]) -> None:
        """Build the offload engine for `requests` (not empty) if none is built. Where this LLM chose the built
        engine's batch (HRM, or the fallback without a profile) for a job of fewer requests than these (a warm-up),
        the batch is chosen again for these on the loaded weights (`rebatch`, logged): a later, larger job does
        not run at the warm-up's batch."""
        if self.engine is None:
            self._build_offload(self._choose_offload_policy(requests))
            self._batch_chosen_for = len(requests)
        elif (self._batch_chosen_for is not None and len(requests) > self._batch_chosen_for
              and not self.engine.running):  # (a generate under way: the engine refuses this one, saying why)
            from moe_jax.hrm import InfeasibleError
            from moe_jax.offload_engine import OffloadMemoryError

            was, chosen_for = self.policy, self._batch_chosen_for
            try:
                policy = self._choose_offload_policy(requests, loaded=was)
            except InfeasibleError as e:  # the engine's own checks say whether the batch it has fits these
                log.warning("offload policy: no batch for these %d requests on the loaded weights (%s); running "
                            "them at %s", len(requests), e, was)
                policy = was
            if (policy.batch_size, policy.micro_batch_size) != (was.batch_size, was.micro_batch_size):
                try:
                    self.engine.rebatch(policy)
                    log.info("offload policy: the batch chosen for %d requests, %s, is now %s for these %d",
                             chosen_for, was, policy, len(requests))
                    self.policy = policy
                except OffloadMemoryError as e:  # (the fallback's batch has no memory model behind it)
                    log.warning("offload policy: keeping %s for these %d requests: %s", was, len(requests), e)
            self._batch_chosen_for = len(requests)

    def generate_iter(self, prompts: Sequence[str | Sequence[int]],
                      params: SamplingParams | Sequence[SamplingParams] | None = None
                      ) -> Iterator[tuple[int, Completion]]:
        """An iterator of (prompt index, Completion) in the order requests finish. All prompts are validated
        here, before it is returned and any work starts."""
        return self._completions(self._requests(prompts, params))

    def _completions(self, requests: list[Request]) -> Iterator[tuple[int, Completion]]:
        if not requests:
            return
        capped = [r for r in requests if token_budget(r, self.cfg.max_positions) < r.params.max_new_tokens]
        if capped:
            r = capped[0]
            log.warning("%d request(s) end at the model's context of %d positions before max_new_tokens "
                        "(finish_reason 'length'), e.g. prompt %d: %d tokens + max_new_tokens %d",
                        len(capped), self.cfg.max_positions, r.index, len(r.prompt), r.params.max_new_tokens)
        self._start(requests)
        decode = self.tokenizer.decode if self.tokenizer is not None else None
        for req, ids, reason, logprobs in self.engine.generate(requests):
            c = Completion.of(req, ids, reason, logprobs, decode, self.cfg.eos_token_ids)
            yield req.index, cut_at_stop(c, req.params.stop, self.tokenizer.decode) if req.params.stop else c

    def generate(self, prompts: Sequence[str | Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[Completion]:
        """One Completion per prompt, in prompt order."""
        out = dict(self.generate_iter(prompts, params))  # every prompt's, once each
        return [out[i] for i in range(len(out))]

    def chat(self, conversations: Sequence[Sequence[dict]] | Sequence[dict],
             params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[Completion]:
        """One Completion per conversation (OpenAI's messages: [{"role", "content"[, "name"]}, ...]; one
        conversation alone is a list of one, as vLLM's `LLM.chat` takes it), each rendered with the model's chat
        template (tokenizer_config.json's `chat_template` or chat_template.jinja) and generated as `generate`."""
        if isinstance(conversations, (list, tuple)) and conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        _require_batch(conversations, "conversations", "lists of messages")
        if self.tokenizer is None:
            raise ChatTemplateError(f"model {self.name} has no tokenizer.json, so it cannot render chats")
        if self._chat_template is None:
            self._chat_template = ChatTemplate.from_model_dir(self.name)
            if self._chat_template is None:
                raise missing_template(self.name)
        prompts = [self._chat_template.token_ids(chat_messages(c, f"conversations[{i}]"), self.tokenizer)
                   for i, c in enumerate(conversations)]
        return self.generate(prompts, params)
