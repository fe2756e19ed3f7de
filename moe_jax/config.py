"""Model configuration: one frozen dataclass for every supported MoE family, built from `config.json`.

Each family's Hugging Face config is read by a small parser that names the field it rejects, so an
unsupported option is an error, never wrong output.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np

from moe_jax.json_files import read_json_object

log = logging.getLogger("moe_jax")


class ConfigError(ValueError):
    """A config.json field that moe-jax cannot honour; the message names the file and field."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling, as transformers' `rope_parameters` types "linear" and "yarn" compute it.

    linear: every frequency divided by `factor`. yarn (YaRN, arXiv 2309.00071): frequencies blended between
    the original (high ones, rotating more than `beta_fast` times over `original_max_positions`) and the
    interpolated (low ones, fewer than `beta_slow` turns) with a linear ramp, and cos/sin multiplied by
    `attention_factor`."""

    kind: str  # "linear" or "yarn"
    factor: float
    attention_factor: float = 1.0
    original_max_positions: int = 0  # yarn only
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    mscale_all_dim: float = 0.0  # DeepSeek's softmax correction (`softmax_factor`); 0: none

    def softmax_factor(self) -> float:
        """What DeepSeek multiplies its softmax scale by (transformers' `yarn_apply_mscale`):
        (0.1 · mscale_all_dim · ln(factor) + 1)², 1 where mscale_all_dim is 0 or factor <= 1."""
        if not self.mscale_all_dim or self.factor <= 1:
            return 1.0
        return (0.1 * self.mscale_all_dim * math.log(self.factor) + 1.0) ** 2

    def scale(self, inv_freq, theta: float, dim: int):
        """The scaled inverse frequencies [dim / 2] of a rotary embedding over `dim` dims from the unscaled
        `inv_freq` (a NumPy or JAX float32 array)."""
        if self.kind == "linear":
            return inv_freq / self.factor

        def correction_dim(rotations):  # the dim whose wavelength fits `rotations` times in the original context
            return dim * math.log(self.original_max_positions / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low, high = correction_dim(self.beta_fast), correction_dim(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / ((high - low) or 0.001), 0, 1)
        return inv_freq / self.factor * ramp + inv_freq * (1 - ramp)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only MoE transformer.

    Attention: `num_heads` query heads and `num_kv_heads` key/value heads of `head_dim`; RoPE over
    the first `rotary_dim` dims of each head. MoE: `num_experts` SwiGLU experts of width
    `expert_ffn_size`, `experts_per_token` chosen per token by a softmax router; the chosen
    weights are renormalised by their `router_norm_p`-norm (1 = divide by the sum) unless None.
    The layers in `dense_layers` have a dense SwiGLU FFN instead (no router, no experts).

    DeepSeek's variants. Multi-head latent attention (`attention="mla"`): per token one latent of
    `kv_lora_rank` dims (RMS-normed) and one shared RoPE key of `rotary_dim` dims are all that is cached,
    as a single KV "head" of head_dim = kv_lora_rank + rotary_dim whose first kv_lora_rank dims are also
    the values (`values_in_keys`); queries (through a `q_lora_rank` bottleneck when non-zero) have
    `qk_nope_dim` + rotary_dim dims per head and are absorbed into the latent space, and each head's
    output of `v_head_dim` dims is expanded from the latent one. RoPE pairs may be interleaved
    (`rope_interleaved`). Router: `router_scoring` softmax or sigmoid; with `router_groups` > 1 only the
    `router_topk_groups` best groups of experts (by their best score, softmax; by the sum of their best two
    scores plus `router_bias`, sigmoid) are eligible; a learnt per-expert `router_bias` steers the choice but
    not the weights; weights are multiplied by `routed_scaling`. Shared experts may be ungated.
    """

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rotary_dim: int
    rope_theta: float
    max_positions: int
    norm: str  # "rms" (RMSNorm) or "layer" (LayerNorm without bias)
    norm_eps: float
    qkv_bias: bool
    qk_norm: str | None  # None, "head" (RMSNorm over head_dim) or "full" (RMSNorm over all heads)
    clip_qkv: float | None
    num_experts: int
    experts_per_token: int
    expert_ffn_size: int
    router_norm_p: float | None
    shared_expert_ffn_size: int = 0  # 0: no shared expert; else a SwiGLU, with a sigmoid gate if gated
    tie_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    sliding_window: int | None = None  # config.json's sliding window where it caps max_positions, else None
    rope_scaling: RopeScaling | None = None
    dense_layers: tuple[int, ...] = ()  # layers whose FFN is one dense SwiGLU of dense_ffn_size, not experts
    dense_ffn_size: int = 0
    attention: str = "gqa"  # "gqa" or "mla"
    q_lora_rank: int = 0  # mla: 0 = a plain query projection
    kv_lora_rank: int = 0
    qk_nope_dim: int = 0
    v_head_dim: int = 0
    rope_interleaved: bool = False
    softmax_scale: float | None = None  # None: head_dim ** -0.5
    router_scoring: str = "softmax"  # or "sigmoid"
    router_groups: int = 1
    router_topk_groups: int = 1
    router_bias: bool = False
    router_float32: bool = False  # the router's weights held and applied in float32 (DeepSeek)
    routed_scaling: float = 1.0
    shared_expert_gated: bool = True

    def __post_init__(self):
        for name, allowed in (("family", tuple(_PARSERS)), ("norm", ("rms", "layer")),
                              ("qk_norm", (None, "head", "full")), ("attention", ("gqa", "mla")),
                              ("router_scoring", ("softmax", "sigmoid"))):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}={getattr(self, name)!r} is not one of {allowed}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_attention_heads={self.num_heads} is not a multiple of "
                              f"num_key_value_heads={self.num_kv_heads}")
        if not 0 < self.experts_per_token <= self.num_experts:
            raise ConfigError(f"experts per token ({self.experts_per_token}) must be in "
                              f"1..num_experts ({self.num_experts})")
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim:
            raise ConfigError(f"rotary dim {self.rotary_dim} must be even and <= head_dim {self.head_dim}")
        if list(self.dense_layers) != sorted(set(self.dense_layers)) or not set(self.dense_layers) <= set(
                range(self.num_layers)):
            raise ConfigError(f"dense layers {self.dense_layers} must be distinct increasing layer numbers "
                              f"below {self.num_layers}")
        if len(self.dense_layers) == self.num_layers:
            raise ConfigError(f"all {self.num_layers} layers are dense: not a mixture-of-experts model")
        if self.dense_layers and self.dense_ffn_size <= 0:
            raise ConfigError(f"dense layers {self.dense_layers} need a positive FFN size, got {self.dense_ffn_size}")
        if self.attention == "mla" and (self.num_kv_heads != 1 or self.head_dim != self.kv_lora_rank + self.rotary_dim
                                        or min(self.kv_lora_rank, self.qk_nope_dim, self.v_head_dim) <= 0):
            raise ConfigError(f"latent attention caches one head of kv_lora_rank + rope dims; got {self.num_kv_heads} "
                              f"KV heads of {self.head_dim}, kv_lora_rank {self.kv_lora_rank}, rope dims "
                              f"{self.rotary_dim}, qk_nope_dim {self.qk_nope_dim}, v_head_dim {self.v_head_dim}")
        if self.num_experts % self.router_groups or not 0 < self.router_topk_groups <= self.router_groups:
            raise ConfigError(f"{self.num_experts} experts in {self.router_groups} router groups, of which "
                              f"{self.router_topk_groups} are chosen: the groups must divide the experts and "
                              f"at least one be chosen")
        if self.router_groups > 1 and (self.router_topk_groups * self.num_experts // self.router_groups
                                       < self.experts_per_token):
            raise ConfigError(f"the {self.router_topk_groups} chosen router groups hold fewer than the "
                              f"{self.experts_per_token} experts per token")

    def is_moe_layer(self, layer: int) -> bool:
        """Whether `layer`'s FFN is the routed experts (else a dense SwiGLU)."""
        return layer not in self.dense_layers

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - len(self.dense_layers)

    @property
    def q_size(self) -> int:
        """Dims of all query heads as attention sees them (mla: absorbed into the latent space)."""
        return self.num_heads * self.head_dim

    @property
    def values_in_keys(self) -> bool:
        """Whether the values are the first `value_dim` dims of the cached keys (mla), not cached apart."""
        return self.attention == "mla"

    @property
    def value_dim(self) -> int:
        """Dims of a cached value row (mla: the latent) and of each head's attention output."""
        return self.kv_lora_rank if self.values_in_keys else self.head_dim

    @property
    def attention_scale(self) -> float:
        return self.head_dim ** -0.5 if self.softmax_scale is None else self.softmax_scale

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
        model_type = d.get("model_type")
        parser = _PARSERS.get(model_type)
        if parser is None:
            raise ConfigError(f"{source}: model_type={model_type!r} is not supported "
                              f"(supported: {', '.join(sorted(_PARSERS))})")
        f = _Fields(d, source)
        quant = f.get("quantization_config")
        if quant is not None:  # quantized weights read as plain floats would give wrong output, not an error
            method = quant.get("quant_method", "?") if isinstance(quant, dict) else quant
            raise f.error("quantization_config", f"quantized checkpoints (quant_method {method!r}) are not "
                          "supported; moe-jax reads float32, float16 and bfloat16 weights")
        try:
            return parser(f)
        except ConfigError as e:  # __post_init__'s checks of the parsed values do not know the file
            if str(e).startswith(source):
                raise
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        return cls.from_dict(read_json_object(path, ConfigError), str(path))


EOS_EXPECTED = "expected a token id (an integer >= 0) or a list of them"


def eos_token_ids(v: Any) -> tuple[int, ...] | None:
    """An `eos_token_id` field's value (config.json's or generation_config.json's) as token ids: an integer, a
    list of them, or none (None: absent or null); None where it is neither (a bool is no token id)."""
    ids = () if v is None else tuple(v) if isinstance(v, list) else (v,)
    return ids if all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids) else None


class _Fields:
    """Typed access to a config dict; every error names the source file and the field."""

    def __init__(self, d: dict[str, Any], source: str, prefix: str = ""):
        self.d, self.source, self.prefix = d, source, prefix

    def error(self, key: str, why: str) -> ConfigError:
        return ConfigError(f"{self.source}: field '{self.prefix}{key}' = {self.d.get(key)!r}: {why}")

    def get(self, key: str, default: Any = None, *aliases: str) -> Any:
        for k in (key, *aliases):
            if self.d.get(k) is not None:
                return self.d[k]
        return default

    def given(self, key: str, default: Any = None) -> Any:
        """The field's value where config.json has it, null included (transformers reads a null as given,
        unlike `get`), else `default`."""
        return self.d[key] if key in self.d else default

    def int(self, key: str, *aliases: str, default: int | None = None, minimum: int = 1) -> int:
        v = self.get(key, default, *aliases)
        if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
            raise self.error(key, "expected a positive integer" if minimum == 1 else f"expected an integer >= {minimum}")
        return v

    def number(self, key: str, default: float | None = None, *, optional: bool = False) -> float | None:
        """The field as a positive float (`default` where absent); None where absent and `optional`."""
        v = self.get(key, default)
        if v is None and optional:
            return None
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
            raise self.error(key, "expected a positive number")
        return float(v)

    def eos(self, key: str = "eos_token_id") -> tuple[int, ...]:
        """End-of-sequence token ids (`eos_token_ids`)."""
        ids = eos_token_ids(self.get(key))
        if ids is None:
            raise self.error(key, EOS_EXPECTED)
        return ids

    def sub(self, key: str) -> "_Fields":
        v = self.d.get(key) or {}
        if not isinstance(v, dict):
            raise self.error(key, "expected an object")
        return _Fields(v, self.source, f"{self.prefix}{key}.")

    def require(self, key: str, ok: Callable[[Any], bool], why: str, default: Any = None) -> None:
        if not ok(self.get(key, default)):
            raise self.error(key, why)


def _rope_params(f: _Fields) -> tuple[str, dict[str, Any], str]:
    """(the field holding them, RoPE parameters, rope_type): a non-empty older `rope_scaling` replaces
    `rope_parameters` whole, as transformers reads them."""
    key = "rope_scaling" if f.get("rope_scaling") else "rope_parameters"
    params = dict(f.get(key) or {})
    return key, params, params.get("rope_type", params.get("type", "default"))


def _rope(f: _Fields, head_dim: int, default_theta: float, max_positions: int) -> dict[str, Any]:
    """rope_theta, rotary_dim and rope_scaling from `rope_parameters` (transformers >= 5) or the older
    `rope_scaling` and top-level fields, with transformers' defaults."""
    key, params, rope_type = _rope_params(f)
    theta = (_Fields(params, f.source, f"{key}.").number("rope_theta") if "rope_theta" in params
             else f.number("rope_theta", default_theta))
    partial = params.get("partial_rotary_factor", f.get("partial_rotary_factor", 1.0))
    if partial != 1.0:  # transformers' RoPE for these families rotates every dim whatever the field says
        log.warning("%s: partial_rotary_factor=%r ignored, as transformers ignores it for model_type %r (every dim of "
                    "a head is rotated)", f.source, partial, f.d.get("model_type"))
    rotary = head_dim
    scaling = None
    if rope_type not in ("default", "linear", "yarn"):
        raise f.error(key, f"rope_type {rope_type!r} is not supported (supported: 'default', 'linear', 'yarn')")

    def number(name: str, default: float | None = None) -> float:
        v = params.get(name)
        if v is None and default is not None:
            return default
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
            raise f.error(key, f"{rope_type} RoPE needs a positive number {name!r}, got {v!r}")
        return float(v)

    mscale_all_dim = float(params.get("mscale_all_dim") or 0.0)
    if rope_type == "linear":
        scaling = RopeScaling("linear", number("factor"), mscale_all_dim=mscale_all_dim)
    elif rope_type == "yarn":
        original = int(f.get("original_max_position_embeddings") or number("original_max_position_embeddings",
                                                                           max_positions))
        factor = number("factor", max_positions / original)
        mscale = lambda m: 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0
        if params.get("attention_factor") is not None:
            attention = number("attention_factor")
        elif params.get("mscale") and params.get("mscale_all_dim"):
            attention = mscale(number("mscale")) / mscale(number("mscale_all_dim"))
        else:
            attention = mscale(1.0)
        scaling = RopeScaling("yarn", factor, attention, original, number("beta_fast", 32.0),
                              number("beta_slow", 1.0), bool(params.get("truncate", True)), mscale_all_dim)
    return {"rope_theta": theta, "rotary_dim": rotary, "rope_scaling": scaling}


def _context(f: _Fields, key: str = "max_position_embeddings", sliding: str | None = None) -> dict[str, int | None]:
    """Context limit: max_positions, and sliding_window where a window caps it. A sliding window at least as
    long as the context is never in effect; a shorter one would be, so it caps the context (attention over
    <= window tokens is then exact). `sliding`: when transformers applies a `sliding_window` for the family:
    "always" (Mixtral: whatever `use_sliding_window` says), "flag" (Qwen MoE: where `use_sliding_window` is true,
    default false), None (never: the field is ignored, as transformers ignores it, and said)."""
    n = f.int(key)
    window = f.get("sliding_window")
    if window is not None and sliding is None:
        log.warning("%s: sliding_window=%r ignored, as transformers ignores it for model_type %r (causal attention "
                    "over the whole context)", f.source, window, f.d.get("model_type"))
    if (sliding == "always" or (sliding == "flag" and f.get("use_sliding_window", False))) \
            and isinstance(window, int) and 0 < window < n:
        return {"max_positions": window, "sliding_window": window}
    return {"max_positions": n, "sliding_window": None}


def _check_silu(f: _Fields, key: str = "hidden_act") -> None:
    f.require(key, lambda v: v in ("silu", "swish"), "only SiLU (SwiGLU) experts are supported", "silu")


def _llama_like(f: _Fields, *, num_experts: int, expert_ffn: int, top_k: int, norm_p: float | None,
                qkv_bias: bool, qk_norm: str | None, clip_qkv: float | None = None, shared_ffn: int = 0,
                default_theta: float = 10000.0, default_eps: float = 1e-6, sliding: str | None = None,
                **fields: Any) -> ModelConfig:
    """Defaults of fields a config.json leaves out are transformers' defaults for the family; `fields`: more
    ModelConfig fields."""
    hidden = f.int("hidden_size")
    heads = f.int("num_attention_heads")
    head_dim = f.get("head_dim") or hidden // heads
    rope = _rope(f, head_dim, default_theta, f.int("max_position_embeddings"))
    _check_silu(f)
    return ModelConfig(
        family=f.d["model_type"], vocab_size=f.int("vocab_size"), hidden_size=hidden,
        num_layers=f.int("num_hidden_layers"), num_heads=heads,
        num_kv_heads=f.int("num_key_value_heads", default=heads), head_dim=head_dim,
        **rope, **_context(f, sliding=sliding), norm="rms",
        norm_eps=f.number("rms_norm_eps", default_eps), qkv_bias=qkv_bias, qk_norm=qk_norm,
        clip_qkv=clip_qkv, num_experts=num_experts, experts_per_token=top_k,
        expert_ffn_size=expert_ffn, router_norm_p=norm_p, shared_expert_ffn_size=shared_ffn,
        tie_embeddings=bool(f.get("tie_word_embeddings", False)),
        bos_token_id=f.get("bos_token_id"), eos_token_ids=f.eos(), **fields)


def _qwen_dense_layers(f: _Fields) -> dict[str, Any]:
    """Qwen MoE's dense layers, as transformers builds them: layer i has experts unless it is in
    `mlp_only_layers` or (i + 1) is not a multiple of `decoder_sparse_step`; the others an MLP of
    `intermediate_size`."""
    layers, step = f.int("num_hidden_layers"), f.int("decoder_sparse_step", default=1)
    only = f.get("mlp_only_layers", [])
    if not isinstance(only, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in only):
        raise f.error("mlp_only_layers", "expected a list of layer numbers")
    dense = tuple(i for i in range(layers) if i in only or (i + 1) % step)
    if len(dense) == layers:
        key = "mlp_only_layers" if set(range(layers)) <= set(only) else "decoder_sparse_step"
        raise f.error(key, f"leaves none of the {layers} layers with experts")
    return {"dense_layers": dense, "dense_ffn_size": f.int("intermediate_size") if dense else 0}


def _mixtral(f: _Fields) -> ModelConfig:
    return _llama_like(f, num_experts=f.int("num_local_experts"), expert_ffn=f.int("intermediate_size"),
                       top_k=f.int("num_experts_per_tok"), norm_p=1.0, qkv_bias=False, qk_norm=None,
                       default_theta=1e6, default_eps=1e-5, sliding="always")


def _no_attention_bias(f: _Fields) -> bool:
    """qwen3_moe / olmoe: `attention_bias` also puts a bias on o_proj, which the model does not carry."""
    f.require("attention_bias", lambda v: not v, "attention biases are not supported for this family", False)
    return False


def _qwen2_moe(f: _Fields) -> ModelConfig:
    return _llama_like(f, num_experts=f.int("num_experts", "num_local_experts"),
                       expert_ffn=f.int("moe_intermediate_size"), top_k=f.int("num_experts_per_tok"),
                       norm_p=1.0 if f.get("norm_topk_prob") else None,
                       qkv_bias=bool(f.get("qkv_bias", True)), qk_norm=None,
                       # transformers' default where absent (its block always has a shared expert; 0: none)
                       shared_ffn=f.int("shared_expert_intermediate_size", default=5632, minimum=0), sliding="flag",
                       **_qwen_dense_layers(f))


def _qwen3_moe(f: _Fields) -> ModelConfig:
    return _llama_like(f, num_experts=f.int("num_experts", "num_local_experts"),
                       expert_ffn=f.int("moe_intermediate_size"), top_k=f.int("num_experts_per_tok"),
                       norm_p=1.0 if f.get("norm_topk_prob") else None,
                       qkv_bias=_no_attention_bias(f), qk_norm="head", sliding="flag",
                       **_qwen_dense_layers(f))


def _olmoe(f: _Fields) -> ModelConfig:
    return _llama_like(f, num_experts=f.int("num_experts", "num_local_experts"),
                       expert_ffn=f.int("intermediate_size"), top_k=f.int("num_experts_per_tok"),
                       norm_p=1.0 if f.get("norm_topk_prob") else None,
                       qkv_bias=_no_attention_bias(f), qk_norm="full", clip_qkv=f.number("clip_qkv", optional=True),
                       default_eps=1e-5)


def _dbrx(f: _Fields) -> ModelConfig:
    attn, ffn = f.sub("attn_config"), f.sub("ffn_config")
    hidden, heads = f.int("d_model"), f.int("n_heads")
    head_dim = hidden // heads
    rope = _rope(f, head_dim, attn.number("rope_theta", 10000.0), f.int("max_seq_len"))
    act = ffn.get("ffn_act_fn") or {"name": "silu"}
    ffn.require("ffn_act_fn", lambda _: act.get("name", "silu") in ("silu", "swish"),
                "only SiLU (SwiGLU) experts are supported")
    norm_p = ffn.d.get("moe_normalize_expert_weights", 1.0)  # missing: transformers' 1.0; null: no renormalisation
    if f.get("tie_word_embeddings"):
        raise f.error("tie_word_embeddings", "DBRX does not tie embeddings")
    return ModelConfig(
        family="dbrx", vocab_size=f.int("vocab_size"), hidden_size=hidden, num_layers=f.int("n_layers"),
        num_heads=heads, num_kv_heads=attn.int("kv_n_heads", default=1), head_dim=head_dim,
        **rope, **_context(f, "max_seq_len"),
        norm="layer", norm_eps=1e-5, qkv_bias=False, qk_norm=None, clip_qkv=attn.number("clip_qkv", optional=True),
        num_experts=ffn.int("moe_num_experts"), experts_per_token=ffn.int("moe_top_k"),
        expert_ffn_size=ffn.int("ffn_hidden_size"),
        router_norm_p=None if norm_p is None else float(norm_p),
        bos_token_id=f.get("bos_token_id"), eos_token_ids=f.eos())


def _deepseek(f: _Fields, defaults: dict[str, Any], grouped: bool, **routing: Any) -> ModelConfig:
    """DeepSeek V2 / V3: latent attention, the first `first_k_dense_replace` layers dense, ungated shared
    experts, a float32 router, its experts in `n_group` groups of which `topk_group` are chosen if `grouped`;
    `defaults`: the version's transformers defaults of fields a config.json may leave out (a `q_lora_rank`
    of null: no query bottleneck); `routing`: the version's other router fields."""
    def count(key: str, minimum: int = 1) -> int:
        v = f.given(key, defaults.get(key))
        if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
            raise f.error(key, f"expected an integer >= {minimum}")
        return v

    f.require("attention_bias", lambda v: not v, "attention biases are not supported", False)
    f.require("mlp_bias", lambda v: not v, "MLP biases are not supported", False)
    f.require("moe_layer_freq", lambda v: v == 1, "only every-layer MoE (1) after the dense ones is supported", 1)
    heads = f.int("num_attention_heads")
    f.require("num_key_value_heads", lambda v: v == heads, f"latent attention expands keys and values for all "
              f"{heads} heads (num_attention_heads)", heads)
    layers, rope_dim, nope = f.int("num_hidden_layers"), f.int("qk_rope_head_dim"), f.int("qk_nope_head_dim")
    kv_rank, experts = f.int("kv_lora_rank"), f.int("n_routed_experts", "num_local_experts")
    first_dense = count("first_k_dense_replace", 0)
    if first_dense >= layers:
        raise f.error("first_k_dense_replace", f"expected a number of dense layers in 0..{layers - 1}")
    q_rank = None if f.given("q_lora_rank", defaults["q_lora_rank"]) is None else count("q_lora_rank")
    scaling = f.given("routed_scaling_factor", defaults["routed_scaling_factor"])
    if not isinstance(scaling, (int, float)) or isinstance(scaling, bool) or scaling <= 0:
        raise f.error("routed_scaling_factor", "expected a positive number")
    rope = _rope(f, rope_dim, 10000.0, f.int("max_position_embeddings"))
    softmax_factor = 1.0 if rope["rope_scaling"] is None else rope["rope_scaling"].softmax_factor()
    _check_silu(f)
    return ModelConfig(
        family=f.d["model_type"], vocab_size=f.int("vocab_size"), hidden_size=f.int("hidden_size"), num_layers=layers,
        num_heads=heads, num_kv_heads=1, head_dim=kv_rank + rope_dim, **rope,
        **_context(f), norm="rms", norm_eps=f.number("rms_norm_eps", 1e-6), qkv_bias=False, qk_norm=None,
        clip_qkv=None, num_experts=experts, experts_per_token=f.int("num_experts_per_tok"),
        expert_ffn_size=f.int("moe_intermediate_size"),
        shared_expert_ffn_size=f.int("moe_intermediate_size") * count("n_shared_experts", 0),
        shared_expert_gated=False, tie_embeddings=bool(f.get("tie_word_embeddings", False)),
        bos_token_id=f.get("bos_token_id"), eos_token_ids=f.eos(),
        dense_layers=tuple(range(first_dense)), dense_ffn_size=f.int("intermediate_size") if first_dense else 0,
        attention="mla", q_lora_rank=q_rank or 0, kv_lora_rank=kv_rank, qk_nope_dim=nope,
        v_head_dim=f.int("v_head_dim"), softmax_scale=(nope + rope_dim) ** -0.5 * softmax_factor,
        router_float32=True, routed_scaling=float(scaling), router_groups=count("n_group") if grouped else 1,
        router_topk_groups=count("topk_group") if grouped else 1, **routing)


_DEEPSEEK_DEFAULTS = {"first_k_dense_replace": 0, "n_shared_experts": 2, "q_lora_rank": 1536,
                      "routed_scaling_factor": 1.0}  # transformers' DeepseekV2Config


def _deepseek_v2(f: _Fields) -> ModelConfig:
    """Softmax router, top-k over all experts ("greedy") or over the best groups ("group_limited_greedy"),
    weights not renormalised (transformers' DeepseekV2 ignores norm_topk_prob: a true one is refused as
    ambiguous); RoPE pairs interleaved."""
    method = f.get("topk_method", "greedy")
    if method not in ("greedy", "group_limited_greedy"):
        raise f.error("topk_method", "supported: 'greedy', 'group_limited_greedy'")
    f.require("scoring_func", lambda v: v == "softmax", "DeepSeek V2 routes by softmax", "softmax")
    f.require("norm_topk_prob", lambda v: not v, "transformers' DeepSeek V2 does not renormalise the routing "
              "weights and the original code does: refused as ambiguous", False)
    return _deepseek(f, _DEEPSEEK_DEFAULTS, method == "group_limited_greedy", router_norm_p=None,
                     rope_interleaved=True)


def _deepseek_v3(f: _Fields) -> ModelConfig:
    """Sigmoid router with a per-expert bias for the choice, group-limited ("noaux_tc"), weights renormalised
    when norm_topk_prob; RoPE pairs interleaved unless rope_interleave is false."""
    f.require("topk_method", lambda v: v == "noaux_tc", "DeepSeek V3 routes by 'noaux_tc'", "noaux_tc")
    f.require("scoring_func", lambda v: v == "sigmoid", "DeepSeek V3 routes by sigmoid", "sigmoid")
    defaults = {**_DEEPSEEK_DEFAULTS, "first_k_dense_replace": 3, "n_shared_experts": 1, "routed_scaling_factor": 2.5,
                "n_group": 8, "topk_group": 4}  # transformers' DeepseekV3Config
    return _deepseek(f, defaults, True, router_norm_p=1.0 if f.given("norm_topk_prob", True) else None,
                     rope_interleaved=bool(f.given("rope_interleave", True)), router_scoring="sigmoid",
                     router_bias=True)


_PARSERS: dict[str, Callable[[_Fields], ModelConfig]] = {
    "mixtral": _mixtral, "qwen2_moe": _qwen2_moe, "qwen3_moe": _qwen3_moe, "olmoe": _olmoe, "dbrx": _dbrx,
    "deepseek_v2": _deepseek_v2, "deepseek_v3": _deepseek_v3,
}
