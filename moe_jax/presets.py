"""Named models with random weights: tiny ones (one per family, the default of the CLI) and real-shape
ones for benchmarking. Configs are Hugging Face `config.json` dicts, parsed like any checkpoint's.

`RandomWeights` materialises parameters lazily, layer by layer, from a fixed seed: the same
(seed, layer, name) always gives the same tensor, whatever the order of materialisation.
"""
from __future__ import annotations

import concurrent.futures
import numbers
import os
import zlib

import numpy as np

from moe_jax.config import ModelConfig
from moe_jax.params import ParamSpec, global_param_specs, layer_specs
from moe_jax.tokenizer import BYTE_BOS, BYTE_EOS

_TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=258,
             max_position_embeddings=2048, bos_token_id=BYTE_BOS, eos_token_id=BYTE_EOS, rms_norm_eps=1e-5)

_CONFIGS: dict[str, dict] = {
    "tiny-mixtral": dict(_TINY, model_type="mixtral", intermediate_size=128, num_local_experts=4,
                         num_experts_per_tok=2, rope_theta=1e6),
    "tiny-qwen2-moe": dict(_TINY, model_type="qwen2_moe", moe_intermediate_size=64, num_experts=8,
                           num_experts_per_tok=2, shared_expert_intermediate_size=96, norm_topk_prob=False),
    "tiny-qwen3-moe": dict(_TINY, model_type="qwen3_moe", head_dim=24, moe_intermediate_size=64, num_experts=8,
                           num_experts_per_tok=2, norm_topk_prob=True),
    "tiny-olmoe": dict(_TINY, model_type="olmoe", intermediate_size=64, num_experts=8, num_experts_per_tok=2,
                       clip_qkv=4.0),
    "tiny-dbrx": dict(model_type="dbrx", d_model=64, n_heads=4, n_layers=2, max_seq_len=2048, vocab_size=258,
                      bos_token_id=BYTE_BOS, eos_token_id=BYTE_EOS,
                      attn_config=dict(kv_n_heads=2, clip_qkv=8.0, rope_theta=5e5),
                      rope_parameters=dict(rope_type="default", rope_theta=5e5),
                      ffn_config=dict(ffn_hidden_size=64, moe_num_experts=4, moe_top_k=2,
                                      moe_normalize_expert_weights=1.0)),
    "tiny-deepseek-v3": dict(_TINY, model_type="deepseek_v3", num_hidden_layers=3, num_key_value_heads=4,
                             first_k_dense_replace=1, intermediate_size=128, moe_intermediate_size=64,
                             n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
                             routed_scaling_factor=2.5, q_lora_rank=48, kv_lora_rank=32, qk_rope_head_dim=16,
                             qk_nope_head_dim=16, v_head_dim=16),
    "mixtral-8x7b": dict(model_type="mixtral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
                         vocab_size=32000, max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-5,
                         bos_token_id=1, eos_token_id=2),
    "mixtral-8x22b": dict(model_type="mixtral", hidden_size=6144, intermediate_size=16384, num_hidden_layers=56,
                          num_attention_heads=48, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
                          vocab_size=32768, max_position_embeddings=65536, rope_theta=1e6, rms_norm_eps=1e-5,
                          bos_token_id=1, eos_token_id=2),
    "dbrx": dict(model_type="dbrx", d_model=6144, n_heads=48, n_layers=40, max_seq_len=32768, vocab_size=100352,
                 attn_config=dict(kv_n_heads=8, clip_qkv=8.0, rope_theta=5e5),
                 rope_parameters=dict(rope_type="default", rope_theta=5e5),
                 ffn_config=dict(ffn_hidden_size=10752, moe_num_experts=16, moe_top_k=4,
                                 moe_normalize_expert_weights=1.0), eos_token_id=100257),
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", hidden_size=2048, num_hidden_layers=48, num_attention_heads=32,
                          num_key_value_heads=4, head_dim=128, moe_intermediate_size=768, num_experts=128,
                          num_experts_per_tok=8, norm_topk_prob=True, vocab_size=151936,
                          max_position_embeddings=40960, rope_theta=1e6, rms_norm_eps=1e-6, eos_token_id=151645),
    "deepseek-v2-lite": dict(model_type="deepseek_v2", hidden_size=2048, num_hidden_layers=27, num_attention_heads=16,
                             num_key_value_heads=16, first_k_dense_replace=1, intermediate_size=10944,
                             moe_intermediate_size=1408, n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6,
                             topk_method="greedy", norm_topk_prob=False, routed_scaling_factor=1.0, q_lora_rank=None,
                             kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
                             vocab_size=102400, max_position_embeddings=163840, rms_norm_eps=1e-6,
                             rope_scaling=dict(type="yarn", factor=40, original_max_position_embeddings=4096,
                                               mscale=0.707, mscale_all_dim=0.707, beta_fast=32, beta_slow=1),
                             rope_theta=10000, bos_token_id=100000, eos_token_id=100001),
    "olmoe-1b-7b": dict(model_type="olmoe", hidden_size=2048, num_hidden_layers=16, num_attention_heads=16,
                        num_key_value_heads=16, intermediate_size=1024, num_experts=64, num_experts_per_tok=8,
                        vocab_size=50304, max_position_embeddings=4096, rope_theta=1e4, rms_norm_eps=1e-5,
                        eos_token_id=50279),
}
PRESETS = tuple(_CONFIGS)
TINY_PRESETS = tuple(n for n in PRESETS if n.startswith("tiny-"))
DEFAULT_PRESET = "tiny-mixtral"


def preset_config(name: str) -> ModelConfig:
    if name not in _CONFIGS:
        raise ValueError(f"unknown preset {name!r} (presets: {', '.join(PRESETS)})")
    return ModelConfig.from_dict(_CONFIGS[name], source=f"preset {name}")


def preset_hf_config(name: str) -> dict:
    """The preset as a Hugging Face config.json dict (e.g. to build the same model with transformers)."""
    preset_config(name)
    return dict(_CONFIGS[name])


class RandomWeights:
    """Deterministic random parameters. Matrices ~ N(0, 1/fan_in) so activations keep unit scale and
    logits are far from uniform; the embedding ~ N(0, 1); norm scales 1 + N(0, 0.1); biases N(0, 0.1).

    Tensors of at least `POOL / 16` elements (real-shape presets) are cut from a shared pool of `POOL`
    normal draws at a random offset, wrapping around: a memory copy instead of fresh draws, so that a
    93 GB model materialises at copy speed, in pieces of `POOL` elements on every core (most of a copy into
    fresh memory is the OS mapping its pages: on the 2-core VM 0.47 GB/s on one thread, 0.85 on two).
    Small tensors are fresh draws.
    """

    POOL = 1 << 24

    def __init__(self, cfg: ModelConfig, seed: int = 0):
        if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.cfg, self.seed = cfg, seed
        self._pools: dict[tuple[float, str], np.ndarray] = {}

    def _pool(self, scale: float, dtype) -> np.ndarray:
        key = (scale, np.dtype(dtype).str)
        if key not in self._pools:
            rng = np.random.default_rng([self.seed, 0])
            self._pools[key] = (rng.standard_normal(self.POOL, dtype=np.float32) * scale).astype(dtype)
        return self._pools[key]

    def _tensor(self, layer: int, name: str, spec: ParamSpec, dtype) -> np.ndarray:
        dtype = spec.dtype(dtype)
        rng = np.random.default_rng([self.seed, layer + 1, zlib.crc32(name.encode())])
        n = int(np.prod(spec.shape))
        if spec.init == "normal" and n >= self.POOL // 16:
            pool = self._pool(1.0 if name == "embed" else spec.shape[-2] ** -0.5, dtype)
            out, start = np.empty(n, pool.dtype), int(rng.integers(self.POOL))

            def fill(pos: int) -> None:  # out[j] = pool[(start + j) % POOL] for j in [pos, pos + POOL)
                end, src = min(pos + self.POOL, n), (start + pos) % self.POOL
                while pos < end:
                    take = min(end - pos, self.POOL - src)
                    out[pos:pos + take] = pool[src:src + take]
                    pos, src = pos + take, 0

            with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as threads:
                list(threads.map(fill, range(0, n, self.POOL)))
            return out.reshape(spec.shape)
        x = rng.standard_normal(spec.shape, dtype=np.float32)
        if spec.init == "normal":
            x *= 1.0 if name == "embed" else spec.shape[-2] ** -0.5
        else:
            x *= 0.1
            x += 1.0 if spec.init == "ones" else 0.0
        return x.astype(dtype, copy=False)

    def layer(self, i: int, dtype) -> dict[str, np.ndarray]:
        return {k: self._tensor(i, k, s, dtype) for k, s in layer_specs(self.cfg, i).items()}

    def globals(self, dtype) -> dict[str, np.ndarray]:
        return {k: self._tensor(-1, k, s, dtype) for k, s in global_param_specs(self.cfg).items()}
