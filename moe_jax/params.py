"""The one description of every parameter: shape, logical axes, init, and whether it is an expert weight.

Everything else is derived from these specs: random init (`moe_jax.presets`), checkpoint loading and
shape checks (`moe_jax.checkpoint`), host/accelerator placement (engines) and byte counts (HRM).
Matrices are stored `[in, out]` so that the model computes `x @ w`.
"""
from __future__ import annotations

import dataclasses
import math

import ml_dtypes  # noqa: F401  (registers "bfloat16" as a NumPy dtype name)
import numpy as np

from moe_jax.config import ModelConfig

# The dtypes a model runs in, by the names the API takes.
DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float32": "float32", "fp32": "float32", "f32": "float32"}


def model_dtype(name) -> np.dtype:
    """The NumPy dtype of a `DTYPES` name; ValueError naming the choices for any other."""
    if not isinstance(name, str) or name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return np.dtype(DTYPES[name])


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """shape: per layer (layer params) or global; axes: logical axis names, one per dim;
    init: "normal" (std = init_std), "ones" or "zeros"; expert: a per-expert weight `[E, ...]`;
    float32: kept in float32 whatever the model's dtype (transformers' `_keep_in_fp32_modules`)."""

    shape: tuple[int, ...]
    axes: tuple[str, ...]
    init: str = "normal"
    expert: bool = False
    float32: bool = False

    def dtype(self, model_dtype) -> np.dtype:
        """The dtype this parameter is held in, in a model of `model_dtype`."""
        return np.dtype(np.float32 if self.float32 else model_dtype)

    def nbytes(self, dtype) -> int:
        """Bytes in a model of `dtype`."""
        return math.prod(self.shape) * self.dtype(dtype).itemsize


def layer_param_specs(cfg: ModelConfig, moe: bool) -> dict[str, ParamSpec]:
    """Parameters of one decoder layer: a MoE layer's (`moe`; router, experts and any shared expert), or a
    dense layer's (`ModelConfig.dense_layers`: one SwiGLU `ffn_*` of `dense_ffn_size`). The attention is
    the same in both."""
    H, E, F, D = cfg.hidden_size, cfg.num_experts, cfg.expert_ffn_size, cfg.head_dim
    s = {"attn_norm": ParamSpec((H,), ("embed",), "ones"), **_attention_specs(cfg),
         "mlp_norm": ParamSpec((H,), ("embed",), "ones")}
    if moe:
        s["router"] = ParamSpec((H, E), ("embed", "experts"), float32=cfg.router_float32)
        if cfg.router_bias:
            s["router_bias"] = ParamSpec((E,), ("experts",), "zeros", float32=True)
        s["w_gate"] = ParamSpec((E, H, F), ("experts", "embed", "ffn"), expert=True)
        s["w_up"] = ParamSpec((E, H, F), ("experts", "embed", "ffn"), expert=True)
        s["w_down"] = ParamSpec((E, F, H), ("experts", "ffn", "embed"), expert=True)
    else:
        Fd = cfg.dense_ffn_size
        s["ffn_gate"] = ParamSpec((H, Fd), ("embed", "ffn"))
        s["ffn_up"] = ParamSpec((H, Fd), ("embed", "ffn"))
        s["ffn_down"] = ParamSpec((Fd, H), ("ffn", "embed"))
    if cfg.qkv_bias:
        s["bq"] = ParamSpec((cfg.q_size,), ("q_heads",), "zeros")
        s["bk"] = ParamSpec((cfg.kv_size,), ("kv_heads",), "zeros")
        s["bv"] = ParamSpec((cfg.kv_size,), ("kv_heads",), "zeros")
    if cfg.qk_norm == "head":
        s["q_norm"] = ParamSpec((D,), ("head_dim",), "ones")
        s["k_norm"] = ParamSpec((D,), ("head_dim",), "ones")
    elif cfg.qk_norm == "full":
        s["q_norm"] = ParamSpec((cfg.q_size,), ("q_heads",), "ones")
        s["k_norm"] = ParamSpec((cfg.kv_size,), ("kv_heads",), "ones")
    if moe and cfg.shared_expert_ffn_size:
        Fs = cfg.shared_expert_ffn_size
        s["shared_gate"] = ParamSpec((H, Fs), ("embed", "ffn"))
        s["shared_up"] = ParamSpec((H, Fs), ("embed", "ffn"))
        s["shared_down"] = ParamSpec((Fs, H), ("ffn", "embed"))
        if cfg.shared_expert_gated:
            s["shared_expert_gate"] = ParamSpec((H, 1), ("embed", None))
    return s


def _attention_specs(cfg: ModelConfig) -> dict[str, ParamSpec]:
    """The attention projections: q, k, v and o (gqa), or latent attention's (mla, `ModelConfig`): the query
    (through the `wq_a` bottleneck and its norm when q_lora_rank is set), `wkv_a` to the latent and the
    shared RoPE key, the latent's norm, `wkv_b` from the latent to each head's key (no RoPE) and value
    dims, and o."""
    H = cfg.hidden_size
    if cfg.attention == "gqa":
        return {"wq": ParamSpec((H, cfg.q_size), ("embed", "q_heads")),
                "wk": ParamSpec((H, cfg.kv_size), ("embed", "kv_heads")),
                "wv": ParamSpec((H, cfg.kv_size), ("embed", "kv_heads")),
                "wo": ParamSpec((cfg.q_size, H), ("q_heads", "embed"))}
    Hq, r, q_head = cfg.num_heads, cfg.kv_lora_rank, cfg.qk_nope_dim + cfg.rotary_dim
    if cfg.q_lora_rank:
        s = {"wq_a": ParamSpec((H, cfg.q_lora_rank), ("embed", "q_lora")),
             "q_a_norm": ParamSpec((cfg.q_lora_rank,), ("q_lora",), "ones"),
             "wq_b": ParamSpec((cfg.q_lora_rank, Hq * q_head), ("q_lora", "q_heads"))}
    else:
        s = {"wq": ParamSpec((H, Hq * q_head), ("embed", "q_heads"))}
    return {**s, "wkv_a": ParamSpec((H, r + cfg.rotary_dim), ("embed", "kv_lora")),
            "kv_a_norm": ParamSpec((r,), ("kv_lora",), "ones"),
            "wkv_b": ParamSpec((r, Hq * (cfg.qk_nope_dim + cfg.v_head_dim)), ("kv_lora", "q_heads")),
            "wo": ParamSpec((Hq * cfg.v_head_dim, H), ("q_heads", "embed"))}


def global_param_specs(cfg: ModelConfig) -> dict[str, ParamSpec]:
    """Parameters outside the decoder layers."""
    s = {
        "embed": ParamSpec((cfg.vocab_size, cfg.hidden_size), ("vocab", "embed")),
        "final_norm": ParamSpec((cfg.hidden_size,), ("embed",), "ones"),
    }
    if not cfg.tie_embeddings:
        s["lm_head"] = ParamSpec((cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"))
    return s


def layer_specs(cfg: ModelConfig, layer: int) -> dict[str, ParamSpec]:
    """The parameters of decoder layer `layer`."""
    return layer_param_specs(cfg, cfg.is_moe_layer(layer))


def layer_bytes(cfg: ModelConfig, dtype, *, expert: bool | None = None, moe: bool = True) -> int:
    """Bytes of one MoE (`moe`) or dense layer's parameters; `expert` True/False counts only expert/non-expert
    weights."""
    return sum(s.nbytes(dtype) for s in layer_param_specs(cfg, moe).values()
               if expert is None or s.expert == expert)


def expert_bytes(cfg: ModelConfig, dtype) -> int:
    """Bytes of one expert of one layer (the unit the offload engine places and streams)."""
    return layer_bytes(cfg, dtype, expert=True) // cfg.num_experts


def global_bytes(cfg: ModelConfig, dtype) -> int:
    return sum(s.nbytes(dtype) for s in global_param_specs(cfg).values())


def _all_layers_bytes(cfg: ModelConfig, dtype, expert: bool | None) -> int:
    dense = len(cfg.dense_layers)
    return (cfg.num_moe_layers * layer_bytes(cfg, dtype, expert=expert)
            + dense * layer_bytes(cfg, dtype, expert=expert, moe=False))


def non_expert_bytes(cfg: ModelConfig, dtype) -> int:
    """Bytes of the weights the offload engine keeps on the GPU: every layer's non-expert ones (a dense
    layer's FFN included) and the global ones."""
    return _all_layers_bytes(cfg, dtype, expert=False) + global_bytes(cfg, dtype)


def model_bytes(cfg: ModelConfig, dtype) -> int:
    return _all_layers_bytes(cfg, dtype, expert=None) + global_bytes(cfg, dtype)


def gib(nbytes) -> str:
    """Bytes in GiB for a message, to 3 significant digits below 100 (a tiny model's needs do not read as 0.0)."""
    v = float(nbytes) / 2**30
    return f"{v:.0f}" if v >= 100 else f"{v:.3g}"
