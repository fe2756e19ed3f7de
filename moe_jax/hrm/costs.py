"""FLOPs and bytes of every op of a decoder layer, derived from the parameter specs of `moe_jax.params`.

Counts are for one layer and `tokens` query tokens. Arguments may be NumPy arrays: they broadcast, so the
policy search prices a whole grid of micro-batch sizes at once.

FLOPs: matmuls only, 2 per multiply-add (norms, RoPE, softmax and SiLU add under 1% at real sizes).
Bytes: what the op reads and writes at the memory holding its data, assuming each kernel streams its
operands once: the weights it touches, the input and output rows of every matmul, and for attention
q, the output and the cached keys and values (FlashAttention-style; scores stay on chip).
"""
from __future__ import annotations

import dataclasses
import math

import ml_dtypes  # noqa: F401  (registers "bfloat16" as a NumPy dtype name)
import numpy as np

from host_ops.host_kv_cache import row_bytes
from moe_jax.config import ModelConfig
from moe_jax.offload_policy import kv_storage_dtype
from moe_jax.params import ParamSpec, global_param_specs, layer_param_specs

OPS = ("qkv_proj", "attention", "o_proj", "router", "experts", "shared_experts", "dense_ffn")
_OP_OF_PARAM = {
    **dict.fromkeys(("attn_norm", "wq", "wk", "wv", "bq", "bk", "bv", "q_norm", "k_norm", "wq_a", "q_a_norm", "wq_b",
                     "wkv_a", "kv_a_norm", "wkv_b"), "qkv_proj"),  # wkv_b: latent attention's query and output maps
    "wo": "o_proj",
    **dict.fromkeys(("mlp_norm", "router", "router_bias"), "router"),
    **dict.fromkeys(("w_gate", "w_up", "w_down"), "experts"),
    **dict.fromkeys(("shared_gate", "shared_up", "shared_down", "shared_expert_gate"), "shared_experts"),
    **dict.fromkeys(("ffn_gate", "ffn_up", "ffn_down"), "dense_ffn"),
}


@dataclasses.dataclass(frozen=True)
class Op:
    """One op: `flops` FLOPs moving `bytes` bytes (scalars or arrays of one shape); for the grouped expert
    matmuls, `rows_per_group`: the routed rows each expert it touches receives (the GPU's efficiency
    depends on it, `Hardware.gpu_seconds`), None for the others; for attention, `head_rows`: its query rows
    times query heads (each a task's fixed work on the CPU, `Hardware.cpu_seconds`), None for the others."""

    name: str
    flops: np.ndarray | float
    bytes: np.ndarray | float
    rows_per_group: np.ndarray | float | None = None
    head_rows: np.ndarray | float | None = None

    @property
    def intensity(self):
        """Operational intensity, FLOPs per byte."""
        return self.flops / self.bytes


def itemsize(dtype) -> int:
    return np.dtype(dtype).itemsize


def _specs_by_op(cfg: ModelConfig, moe: bool) -> dict[str, dict[str, ParamSpec]]:
    """A MoE (`moe`) or dense layer's parameters by op; a dense layer's FFN norm counts with its FFN."""
    out: dict[str, dict[str, ParamSpec]] = {}
    for name, spec in layer_param_specs(cfg, moe).items():
        op = "dense_ffn" if name == "mlp_norm" and not moe else _OP_OF_PARAM[name]
        out.setdefault(op, {})[name] = spec
    return out


def _matmul_op(name: str, specs: dict[str, ParamSpec], rows, weights, dtype) -> Op:
    """`rows` rows through every matrix of `specs` (the last two dims `[in, out]` of each), reading
    `weights` bytes of them."""
    mats = [s.shape[-2:] for s in specs.values() if len(s.shape) >= 2]
    flops = sum(2 * rows * math.prod(m) for m in mats)
    act = sum(rows * sum(m) for m in mats) * itemsize(dtype)
    return Op(name, flops, weights + act)


def weight_bytes(cfg: ModelConfig, dtype, moe: bool = True) -> dict[str, int]:
    """Bytes of one MoE (`moe`) or dense layer's weights per op (all experts for "experts")."""
    return {op: sum(s.nbytes(dtype) for s in specs.values()) for op, specs in _specs_by_op(cfg, moe).items()}


def kv_bytes_per_token(cfg: ModelConfig, dtype, kv_cache_dtype: str = "auto") -> int:
    """Bytes of one token's keys and values in one layer, in a KV cache of `kv_cache_dtype` (`moe_jax.Policy`:
    "auto", the model's `dtype`; "int8", a byte per element and a float32 scale per head); only the keys
    where they hold the values (latent attention)."""
    copies = 1 if cfg.values_in_keys else 2
    return copies * cfg.num_kv_heads * row_bytes(cfg.head_dim, kv_storage_dtype(kv_cache_dtype, dtype))


def experts_touched(cfg: ModelConfig, tokens):
    """Expected number of distinct experts `tokens` tokens route to (uniform top-k routing):
    each expert is missed by one token with probability 1 − k/E."""
    return cfg.num_experts * (1.0 - (1.0 - cfg.experts_per_token / cfg.num_experts) ** tokens)


def layer_ops(cfg: ModelConfig, dtype, tokens, attn_pairs, kv_tokens, kv_cache_dtype: str = "auto",
              moe: bool = True, score_bytes=0) -> dict[str, Op]:
    """The ops of one MoE (`moe`) or dense layer over `tokens` query tokens whose attention scores
    `attn_pairs` (query, key) pairs and reads `kv_tokens` cached keys and values (stored as `kv_cache_dtype`
    says), plus `score_bytes` of memory traffic for scores an attention writes out (0: kept on chip, as the
    CPU kernel's online softmax). Experts read only the experts they touch."""
    it, weights = itemsize(dtype), weight_bytes(cfg, dtype, moe)
    qo = cfg.num_heads * (cfg.head_dim + cfg.value_dim)  # a query's and its output's dims (scores, weighted sum)
    ops = {"attention": Op("attention", 2 * attn_pairs * qo,
                           tokens * qo * it + kv_tokens * kv_bytes_per_token(cfg, dtype, kv_cache_dtype) + score_bytes,
                           head_rows=tokens * cfg.num_heads)}
    for op, specs in _specs_by_op(cfg, moe).items():
        rows, w, per_group = tokens, weights[op], None
        if op == "experts":
            touched = experts_touched(cfg, tokens)
            rows, w = tokens * cfg.experts_per_token, w * touched / cfg.num_experts
            per_group = np.divide(rows, touched, out=np.zeros(np.broadcast_shapes(np.shape(rows), np.shape(touched))),
                                  where=np.asarray(touched) > 0)
        ops[op] = dataclasses.replace(_matmul_op(op, specs, rows, w, dtype), rows_per_group=per_group)
    return {name: ops[name] for name in OPS if name in ops}


def decode_ops(cfg: ModelConfig, dtype, batch, context, kv_cache_dtype: str = "auto", moe: bool = True
               ) -> dict[str, Op]:
    """One MoE (`moe`) or dense layer of a decode step of `batch` sequences, each attending over `context`
    cached tokens of a KV cache of `kv_cache_dtype`."""
    return layer_ops(cfg, dtype, batch, batch * context, batch * context, kv_cache_dtype, moe)


def prefill_ops(cfg: ModelConfig, dtype, batch, prompt_len, moe: bool = True) -> dict[str, Op]:
    """Prefill of `batch` prompts of `prompt_len` tokens through one MoE (`moe`) or dense layer, attention as
    `model.attention` runs it on the GPU: every (query, key) pair of a prompt scored, P² (the causal mask only
    hides the later keys), the scores written out in float32 and read by the softmax, its probabilities written
    in the model's dtype and read by the weighted sum, per query head."""
    pairs = batch * prompt_len * prompt_len
    return layer_ops(cfg, dtype, batch * prompt_len, pairs, batch * prompt_len, moe=moe,
                     score_bytes=pairs * cfg.num_heads * 2 * (4 + itemsize(dtype)))


def lm_head_op(cfg: ModelConfig, dtype, rows) -> Op:
    """Final norm and vocabulary projection of `rows` positions, float32 logits."""
    specs = global_param_specs(cfg)
    w = specs["final_norm"].nbytes(dtype) + specs["embed" if cfg.tie_embeddings else "lm_head"].nbytes(dtype)
    H, V = cfg.hidden_size, cfg.vocab_size
    return Op("lm_head", 2 * rows * H * V, w + rows * (H * itemsize(dtype) + V * 4))
