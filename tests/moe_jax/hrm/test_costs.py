"""Op counts of Mixtral 8x7B and Qwen3-30B-A3B against hand computation (bf16: 2 bytes/element)."""
import numpy as np
import pytest

from moe_jax.config import ModelConfig
from moe_jax.hrm.costs import (OPS, decode_ops, experts_touched, kv_bytes_per_token, lm_head_op, prefill_ops,
                               weight_bytes)
from moe_jax.params import layer_bytes, non_expert_bytes
from moe_jax.presets import preset_config

BF16 = "bfloat16"


def test_mixtral_decode_one_token(mixtral):
    # H=4096, q=32·128=4096, kv=8·128=1024, E=8, k=2, F=14336, V=32000; one sequence over 1000 cached tokens.
    ops = decode_ops(mixtral, BF16, 1, 1000)
    assert list(ops) == ["qkv_proj", "attention", "o_proj", "router", "experts"]

    # qkv: W [4096, 4096+1024+1024] + attn_norm [4096]; rows in/out of wq, wk, wv.
    assert ops["qkv_proj"].flops == 2 * 4096 * 6144 == 50_331_648
    assert ops["qkv_proj"].bytes == (4096 * 6144 + 4096) * 2 + ((4096 + 4096) + 2 * (4096 + 1024)) * 2 == 50_376_704
    # attention: QK and PV, 2·2 FLOPs per (pair, q dim); reads q, writes out, reads 1000 keys and values.
    assert ops["attention"].flops == 4 * 1000 * 4096 == 16_384_000
    assert ops["attention"].bytes == (2 * 4096 + 1000 * 2 * 1024) * 2 == 4_112_384
    assert ops["o_proj"].flops == 2 * 4096 * 4096 == 33_554_432
    assert ops["o_proj"].bytes == 4096 * 4096 * 2 + (4096 + 4096) * 2 == 33_570_816
    # router [4096, 8] + mlp_norm [4096].
    assert ops["router"].flops == 2 * 4096 * 8 == 65_536
    assert ops["router"].bytes == (4096 * 8 + 4096) * 2 + (4096 + 8) * 2 == 81_936
    # experts: 2 routed rows through gate, up [4096, 14336] and down [14336, 4096]; one token touches
    # exactly its 2 experts, each 3·4096·14336 weights.
    assert experts_touched(mixtral, 1) == pytest.approx(2)
    assert ops["experts"].flops == 2 * 2 * 3 * 4096 * 14336 == 704_643_072
    assert ops["experts"].bytes == pytest.approx(2 * 3 * 4096 * 14336 * 2 + 2 * 3 * (4096 + 14336) * 2)
    assert ops["experts"].bytes == pytest.approx(704_864_256)
    assert ops["experts"].rows_per_group == pytest.approx(1) and ops["qkv_proj"].rows_per_group is None

    head = lm_head_op(mixtral, BF16, 1)
    assert head.flops == 2 * 4096 * 32000 == 262_144_000
    assert head.bytes == (4096 + 4096 * 32000) * 2 + 4096 * 2 + 32000 * 4 == 262_288_384


def test_mixtral_weights_and_kv(mixtral):
    w = weight_bytes(mixtral, BF16)
    assert w["experts"] == 8 * 3 * 4096 * 14336 * 2 == 2_818_572_288 == layer_bytes(mixtral, BF16, expert=True)
    assert sum(w.values()) == layer_bytes(mixtral, BF16)
    assert kv_bytes_per_token(mixtral, BF16) == 2 * 1024 * 2 == 4096


def test_mixtral_prefill(mixtral):
    # 2 prompts of 10 tokens: 20 rows; attention as model.attention computes it: all 10·10 pairs per prompt,
    # their float32 scores and bf16 probabilities (32 heads) each written and read once.
    ops = prefill_ops(mixtral, BF16, 2, 10)
    assert ops["qkv_proj"].flops == 20 * 2 * 4096 * 6144
    assert ops["attention"].flops == 4 * (2 * 100) * 4096 == 3_276_800
    assert ops["attention"].bytes == (2 * 20 * 4096 + 20 * 2 * 1024) * 2 + 200 * 32 * 2 * (4 + 2) == 486_400
    touched = 8 * (1 - 0.75**20)  # P(an expert is missed by all 20 tokens) = (1 - 2/8)^20
    assert experts_touched(mixtral, 20) == pytest.approx(touched) == pytest.approx(7.97463, rel=1e-5)
    assert ops["experts"].bytes == pytest.approx(touched * 3 * 4096 * 14336 * 2 + 40 * 3 * (4096 + 14336) * 2)
    assert ops["experts"].rows_per_group == pytest.approx(40 / touched)  # routed rows per expert touched


def test_dense_layer_decode(qwen3):
    """A dense layer (mlp_only_layers): the attention ops of a MoE layer, and one SwiGLU of 6144 with its norm
    instead of the router and experts."""
    cfg = qwen3.replace(dense_layers=(0,), dense_ffn_size=6144)
    dense, moe = decode_ops(cfg, BF16, 4, 100, moe=False), decode_ops(cfg, BF16, 4, 100)
    assert set(dense) == {"qkv_proj", "attention", "o_proj", "dense_ffn"}
    for op in ("qkv_proj", "attention", "o_proj"):
        assert (dense[op].flops, dense[op].bytes) == (moe[op].flops, moe[op].bytes)
    assert dense["dense_ffn"].flops == 2 * 4 * 3 * 2048 * 6144 == 301_989_888
    assert dense["dense_ffn"].bytes == (3 * 2048 * 6144 + 2048) * 2 + 4 * 3 * (2048 + 6144) * 2 == 75_698_176


def test_qwen3_decode(qwen3):
    # H=2048, q=32·128=4096, kv=4·128=512, E=128, k=8, F=768, V=151936, per-head q/k norms [128].
    ops = decode_ops(qwen3, BF16, 4, 100)
    assert set(ops) == set(OPS) - {"shared_experts", "dense_ffn"}
    assert ops["qkv_proj"].flops == 2 * 4 * 2048 * 5120 == 83_886_080
    assert ops["qkv_proj"].bytes == (2048 * 5120 + 2048 + 128 + 128) * 2 + 4 * (6144 + 2 * 2560) * 2 == 21_066_240
    assert ops["attention"].flops == 4 * 400 * 4096 == 6_553_600
    assert ops["attention"].bytes == (2 * 4 * 4096 + 400 * 2 * 512) * 2 == 884_736
    assert ops["o_proj"].flops == 2 * 4 * 4096 * 2048 == 67_108_864
    assert ops["o_proj"].bytes == 4096 * 2048 * 2 + 4 * (4096 + 2048) * 2 == 16_826_368
    assert ops["router"].flops == 2 * 4 * 2048 * 128 == 2_097_152
    assert ops["router"].bytes == (2048 * 128 + 2048) * 2 + 4 * (2048 + 128) * 2 == 545_792
    # 4 tokens × top-8 = 32 rows; an expert is missed by one token with probability 1 - 8/128 = 15/16.
    touched = 128 * (1 - (15 / 16) ** 4)
    assert touched == 14911 / 512
    assert experts_touched(qwen3, 4) == pytest.approx(touched)
    assert ops["experts"].flops == 2 * 32 * 3 * 2048 * 768 == 301_989_888
    assert ops["experts"].bytes == pytest.approx(touched * 3 * 2048 * 768 * 2 + 32 * 3 * (2048 + 768) * 2)
    assert ops["experts"].bytes == pytest.approx(274_839_552 + 540_672)
    assert lm_head_op(qwen3, BF16, 4).flops == 2 * 4 * 2048 * 151936 == 2_489_319_424
    assert kv_bytes_per_token(qwen3, BF16) == 2 * 512 * 2 == 2048
    assert weight_bytes(qwen3, BF16)["experts"] == 128 * 3 * 2048 * 768 * 2 == 1_207_959_552


def test_shared_experts_and_arrays():
    cfg = ModelConfig.from_dict(dict(model_type="qwen2_moe", hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                                     max_position_embeddings=256, moe_intermediate_size=32, num_experts=4,
                                     num_experts_per_tok=2, shared_expert_intermediate_size=48))
    ops = decode_ops(cfg, "float32", 3, 10)
    # gate, up [64, 48], down [48, 64], sigmoid gate [64, 1]; 3 rows.
    assert ops["shared_experts"].flops == 2 * 3 * (3 * 64 * 48 + 64)
    assert ops["shared_experts"].bytes == (3 * 64 * 48 + 64) * 4 + 3 * (3 * (64 + 48) + 65) * 4
    batched = decode_ops(cfg, "float32", np.array([1.0, 3.0]), 10)
    assert batched["shared_experts"].flops[1] == ops["shared_experts"].flops


def test_latent_attention_caches_its_latent_once():
    """DeepSeek-V2-Lite's latent attention caches one 576-dim row (the 512-dim latent and the 64-dim
    RoPE key) per token and layer: the values are the latent's first 512 dims, not a second row."""
    lite = preset_config("deepseek-v2-lite")
    assert kv_bytes_per_token(lite, BF16) == (512 + 64) * 2 == 1152


def test_non_expert_bytes_hold_every_layers_attention_router_and_norms_and_the_embeddings(mixtral):
    """What the offload engine keeps on the GPU: 32 layers' q, k, v, o, router and two norms, plus
    the embedding, the LM head and the final norm (Mixtral 8x7B, bf16)."""
    per_layer = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 4096 * 8 + 2 * 4096
    assert non_expert_bytes(mixtral, BF16) == (32 * per_layer + 2 * 32000 * 4096 + 4096) * 2 == 3_211_272_192


def test_int8_kv_cache_bytes_by_hand(mixtral):
    """An int8 cache holds a byte per element and a float32 scale per head row: Mixtral's 8 KV heads of 128, k and
    v, 2 · 8 · (128 + 4) = 2112 bytes a token and layer against bf16's 4096; decode attention reads those bytes."""
    assert kv_bytes_per_token(mixtral, BF16) == 2 * 8 * 128 * 2 == 4096
    assert kv_bytes_per_token(mixtral, BF16, "int8") == 2 * 8 * (128 + 4) == 2112
    for kv, per_token in (("auto", 4096), ("int8", 2112)):
        attention = decode_ops(mixtral, BF16, 256, 1000, kv)["attention"]
        assert attention.bytes == 256 * 32 * (128 + 128) * 2 + 256 * 1000 * per_token, kv  # q and output, then KV
