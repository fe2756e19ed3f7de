"""Real-shape configs from their Hugging Face config.json fields."""
import pytest

from moe_jax.config import ModelConfig

MIXTRAL_8X7B = dict(model_type="mixtral", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=8, intermediate_size=14336, num_local_experts=8, num_experts_per_tok=2,
                    vocab_size=32000, max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-5)
QWEN3_30B_A3B = dict(model_type="qwen3_moe", hidden_size=2048, num_hidden_layers=48, num_attention_heads=32,
                     num_key_value_heads=4, head_dim=128, moe_intermediate_size=768, num_experts=128,
                     num_experts_per_tok=8, vocab_size=151936, norm_topk_prob=True, max_position_embeddings=40960)


@pytest.fixture(scope="session")
def mixtral():
    return ModelConfig.from_dict(MIXTRAL_8X7B)


@pytest.fixture(scope="session")
def qwen3():
    return ModelConfig.from_dict(QWEN3_30B_A3B)
