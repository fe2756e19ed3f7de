"""config.json parsing: each family's fields, and a clear error naming the field for what is unsupported."""
from __future__ import annotations

import pytest

from moe_jax.config import ConfigError, ModelConfig
from tests.conftest import HF_CONFIGS


def cfg(family, **changes):
    return ModelConfig.from_dict(dict(HF_CONFIGS[family], model_type=family, **changes))


def test_family_specific_fields():
    q2, q3, ol, db = cfg("qwen2_moe"), cfg("qwen3_moe"), cfg("olmoe"), cfg("dbrx")
    assert q2.shared_expert_ffn_size == 56 and q2.qkv_bias and q2.router_norm_p is None
    assert q3.head_dim == 24 and q3.q_size == 96 and q3.qk_norm == "head" and q3.router_norm_p == 1.0
    assert ol.qk_norm == "full" and ol.clip_qkv == 3.0
    assert (db.norm, db.clip_qkv, db.num_kv_heads, db.rope_theta, db.router_norm_p) == ("layer", 2.0, 2, 5e5, 1.0)
    assert cfg("mixtral").router_norm_p == 1.0 and cfg("mixtral").rope_theta == 1e6


@pytest.mark.parametrize("family, changes, field", [
    ("qwen2_moe", dict(mlp_only_layers=[1]), "mlp_only_layers"),
    ("qwen3_moe", dict(decoder_sparse_step=2), "decoder_sparse_step"),
    ("mixtral", dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_scaling"),
    ("mixtral", dict(hidden_act="gelu"), "hidden_act"),
    ("mixtral", dict(num_local_experts=0), "num_local_experts"),
    ("olmoe", dict(hidden_size="64"), "hidden_size"),
])
def test_unsupported_options_name_the_field(family, changes, field):
    with pytest.raises(ConfigError, match=f"field '{field}'"):
        cfg(family, **changes)


def test_unknown_model_type():
    with pytest.raises(ConfigError, match="model_type='llama' is not supported"):
        ModelConfig.from_dict({"model_type": "llama"})


def test_sliding_window_caps_the_context_instead_of_changing_attention():
    assert cfg("mixtral", sliding_window=128).max_positions == 128
    assert cfg("mixtral", sliding_window=4096).max_positions == 256  # longer than the context: not in effect
    assert cfg("qwen2_moe", sliding_window=64, use_sliding_window=False).max_positions == 256


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        ModelConfig.from_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text('{"model_type": "mixtral",\n oops}')
    with pytest.raises(ConfigError, match="invalid JSON at line 2"):
        ModelConfig.from_file(tmp_path / "config.json")
