"""config.json parsing: each family's fields, and a clear error naming the field for what is unsupported."""
from __future__ import annotations

import json
import re

import numpy as np

import pytest

from moe_jax.config import ConfigError, ModelConfig
from moe_jax.model_source import ModelNotFound, open_model
from moe_jax.presets import preset_hf_config
from tests.conftest import HF_CONFIGS, reference


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
    ("qwen2_moe", dict(mlp_only_layers=[0, 1]), "mlp_only_layers"),
    ("qwen2_moe", dict(mlp_only_layers="0"), "mlp_only_layers"),
    ("qwen3_moe", dict(decoder_sparse_step=3), "decoder_sparse_step"),
    ("mixtral", dict(rope_scaling={"rope_type": "dynamic", "factor": 4.0}), "rope_scaling"),
    ("qwen3_moe", dict(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4}), "rope_parameters"),
    ("mixtral", dict(rope_scaling={"type": "linear"}), "rope_scaling"),
    ("olmoe", dict(rope_scaling={"rope_type": "yarn", "factor": -2}), "rope_scaling"),
    ("mixtral", dict(hidden_act="gelu"), "hidden_act"),
    ("mixtral", dict(num_local_experts=0), "num_local_experts"),
    ("olmoe", dict(hidden_size="64"), "hidden_size"),
    ("mixtral", dict(quantization_config={"quant_method": "fp8", "weight_block_size": None}), "quantization_config"),
    ("dbrx", dict(quantization_config={"quant_method": "gptq", "bits": 4}), "quantization_config"),
    ("deepseek_v2", dict(topk_method="noaux_tc"), "topk_method"),
    ("deepseek_v2", dict(n_group=None), "n_group"),
    ("deepseek_v2", dict(routed_scaling_factor=None), "routed_scaling_factor"),
    ("deepseek_v2", dict(norm_topk_prob=True), "norm_topk_prob"),
    ("deepseek_v2", dict(num_key_value_heads=2), "num_key_value_heads"),
    ("deepseek_v3", dict(scoring_func="softmax"), "scoring_func"),
    ("deepseek_v3", dict(first_k_dense_replace=3), "first_k_dense_replace"),
    ("deepseek_v3", dict(moe_layer_freq=2), "moe_layer_freq"),
    ("deepseek_v3", dict(attention_bias=True), "attention_bias"),
    ("mixtral", dict(rms_norm_eps="abc"), "rms_norm_eps"),  # malformed values: named, not a bare ValueError
    ("qwen3_moe", dict(rope_theta="x"), "rope_theta"),
    ("olmoe", dict(clip_qkv="3"), "clip_qkv"),
    ("dbrx", dict(attn_config=dict(kv_n_heads=2, clip_qkv="2")), "attn_config.clip_qkv"),
    ("mixtral", dict(eos_token_id=[2, "x"]), "eos_token_id"),
    ("qwen2_moe", dict(eos_token_id=True), "eos_token_id"),
])
def test_unsupported_options_name_the_field(family, changes, field):
    with pytest.raises(ConfigError, match=f"field '{field}'"):
        cfg(family, **changes)


def test_dense_layers_as_transformers_builds_them():
    """Qwen MoE: layer i is dense if listed in mlp_only_layers or (i + 1) % decoder_sparse_step != 0."""
    four = dict(num_hidden_layers=4)
    assert cfg("qwen2_moe", **four, mlp_only_layers=[0]).dense_layers == (0,)
    step2 = cfg("qwen3_moe", **four, decoder_sparse_step=2, mlp_only_layers=[3])
    assert (step2.dense_layers, step2.dense_ffn_size, step2.num_moe_layers) == ((0, 2, 3), 80, 1)
    assert [step2.is_moe_layer(i) for i in range(4)] == [False, True, False, False]
    assert cfg("qwen2_moe").dense_layers == () and cfg("qwen2_moe").dense_ffn_size == 0
    with pytest.raises(ConfigError, match="dense layers .* must be distinct increasing layer numbers below 2"):
        cfg("mixtral").replace(dense_layers=(1, 2), dense_ffn_size=8)


def test_deepseek_fields():
    """Latent attention's cache head (kv_lora_rank + rope dims, values its first kv_lora_rank), the softmax
    scale of the query/key head dims times YaRN's mscale_all_dim correction squared, the routers."""
    v2, v3 = cfg("deepseek_v2"), cfg("deepseek_v3")
    assert (v2.attention, v2.num_kv_heads, v2.head_dim, v2.value_dim, v2.values_in_keys) == ("mla", 1, 24, 16, True)
    assert (v2.qk_nope_dim, v2.rotary_dim, v2.v_head_dim, v2.q_lora_rank, v3.q_lora_rank) == (12, 8, 10, 0, 24)
    m = 0.1 * 0.707 * np.log(4.0) + 1
    assert v2.attention_scale == pytest.approx(20 ** -0.5 * m * m) and v3.attention_scale == pytest.approx(20 ** -0.5)
    assert (v2.router_scoring, v2.router_groups, v2.router_topk_groups, v2.router_bias, v2.router_norm_p,
            v2.routed_scaling) == ("softmax", 3, 2, False, None, 1.5)
    assert (v3.router_scoring, v3.router_groups, v3.router_topk_groups, v3.router_bias, v3.router_norm_p,
            v3.routed_scaling) == ("sigmoid", 4, 2, True, 1.0, 2.5)
    assert v2.dense_layers == (0,) and v2.shared_expert_ffn_size == 48 and not v2.shared_expert_gated
    assert v2.rope_interleaved and not cfg("deepseek_v3", rope_interleave=False).rope_interleaved
    nulls = cfg("deepseek_v3", rope_interleave=None, norm_topk_prob=None)  # false to transformers, not its default
    assert not nulls.rope_interleaved and nulls.router_norm_p is None
    assert cfg("deepseek_v2", topk_method="greedy").router_groups == 1
    with pytest.raises(ConfigError, match="chosen router groups hold fewer than the 3 experts per token"):
        cfg("deepseek_v3", topk_group=1)
    exact = cfg("deepseek_v3", topk_group=1, num_experts_per_tok=2)  # 8 experts in 4 groups: one group holds 2
    assert (exact.router_topk_groups, exact.experts_per_token) == (1, 2)


def test_deepseek_fields_left_out_take_transformers_defaults():
    """DeepseekV3Config's defaults (groups 8 of which 4, scaling 2.5, 3 dense layers, one shared expert, a query
    bottleneck of 1536) and DeepseekV2Config's (ungrouped, 1.0, none dense, two shared, 1536); a q_lora_rank of
    null is no bottleneck."""
    d = dict(HF_CONFIGS["deepseek_v3"], model_type="deepseek_v3", num_hidden_layers=4, n_routed_experts=16)
    for key in ("n_group", "topk_group", "routed_scaling_factor", "first_k_dense_replace", "n_shared_experts",
                "q_lora_rank"):
        del d[key]
    v3 = ModelConfig.from_dict(d)
    assert (v3.router_groups, v3.router_topk_groups, v3.routed_scaling, v3.dense_layers, v3.q_lora_rank) == (
        8, 4, 2.5, (0, 1, 2), 1536)
    assert v3.shared_expert_ffn_size == 24 and ModelConfig.from_dict(dict(d, q_lora_rank=None)).q_lora_rank == 0
    d = dict(HF_CONFIGS["deepseek_v2"], model_type="deepseek_v2", topk_method="greedy")
    for key in ("routed_scaling_factor", "first_k_dense_replace", "n_shared_experts", "q_lora_rank"):
        d.pop(key)
    v2 = ModelConfig.from_dict(d)
    assert (v2.routed_scaling, v2.dense_layers, v2.shared_expert_ffn_size, v2.q_lora_rank) == (1.0, (), 48, 1536)


def test_deepseek_router_is_held_in_float32():
    """As transformers keeps DeepSeek's gate (and V3's routing bias) in float32 and routes in float32."""
    from moe_jax.params import layer_param_specs, layer_bytes

    v3 = cfg("deepseek_v3")
    specs = layer_param_specs(v3, moe=True)
    assert specs["router"].dtype("bfloat16") == np.float32 and specs["router_bias"].dtype("bfloat16") == np.float32
    assert specs["wo"].dtype("bfloat16") == np.dtype("bfloat16")
    assert layer_param_specs(cfg("qwen3_moe"), moe=True)["router"].dtype("bfloat16") == np.dtype("bfloat16")
    assert layer_bytes(v3, "bfloat16") - layer_bytes(v3.replace(router_float32=False), "bfloat16") == 64 * 8 * 2


def test_rope_scaling_fields_and_transformers_defaults():
    linear = cfg("mixtral", rope_scaling={"type": "linear", "factor": 2}).rope_scaling
    assert (linear.kind, linear.factor, linear.attention_factor) == ("linear", 2.0, 1.0)
    # yarn without a factor: max_position_embeddings / original; attention factor 0.1 ln(factor) + 1
    yarn = cfg("qwen3_moe", rope_parameters={"rope_type": "yarn", "rope_theta": 1e4,
                                             "original_max_position_embeddings": 64}).rope_scaling
    assert (yarn.factor, yarn.original_max_positions, yarn.beta_fast, yarn.truncate) == (4.0, 64, 32.0, True)
    assert yarn.attention_factor == pytest.approx(0.1 * np.log(4.0) + 1)
    # DeepSeek-style mscale pair; the top-level original_max_position_embeddings wins, as in transformers
    ds = cfg("olmoe", original_max_position_embeddings=32, rope_scaling={
        "type": "yarn", "factor": 8, "mscale": 1.0, "mscale_all_dim": 0.5, "original_max_position_embeddings": 128}
    ).rope_scaling
    assert ds.original_max_positions == 32
    assert ds.attention_factor == pytest.approx((0.1 * np.log(8) + 1) / (0.05 * np.log(8) + 1))
    assert cfg("mixtral").rope_scaling is None
    # an older rope_scaling replaces rope_parameters whole (transformers: `rope_scaling or rope_parameters`)
    both = cfg("qwen3_moe", rope_theta=5e3, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
               rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64})
    assert both.rope_scaling.kind == "yarn" and both.rope_theta == 5e3


def test_unknown_model_type():
    with pytest.raises(ConfigError, match="model_type='llama' is not supported"):
        ModelConfig.from_dict({"model_type": "llama"})


def test_sliding_window_caps_the_context_instead_of_changing_attention(caplog):
    """Where transformers slides the window for the family: Mixtral whenever it is set (its attention reads no
    use_sliding_window), Qwen MoE where use_sliding_window is true (default false); OLMoE, DBRX and DeepSeek never
    (their attention is causal over the whole context): the field ignored there, and said."""
    assert cfg("mixtral", sliding_window=128).max_positions == 128
    assert cfg("mixtral", sliding_window=128, use_sliding_window=False).max_positions == 128
    assert cfg("mixtral", sliding_window=4096).max_positions == 256  # longer than the context: not in effect
    assert (cfg("mixtral", sliding_window=256).max_positions, cfg("mixtral", sliding_window=256).sliding_window) == (
        256, None)  # as long as the context: not in effect either
    assert cfg("qwen2_moe", sliding_window=64, use_sliding_window=False).max_positions == 256
    for qwen in ("qwen2_moe", "qwen3_moe"):  # transformers' use_sliding_window defaults to False for them
        assert cfg(qwen, sliding_window=64).max_positions == 256
        assert cfg(qwen, sliding_window=64, use_sliding_window=True).max_positions == 64
    with caplog.at_level("WARNING", logger="moe_jax"):
        for family in ("olmoe", "dbrx", "deepseek_v2", "deepseek_v3"):
            c = cfg(family, sliding_window=4, use_sliding_window=True)
            assert c.max_positions > 4 and c.sliding_window is None, family
    assert "sliding_window=4 ignored, as transformers ignores it for model_type 'dbrx'" in caplog.text


def test_partial_rotary_factor_is_ignored_as_transformers_ignores_it(caplog):
    """transformers' RoPE for these families rotates every dim of a head, whatever partial_rotary_factor says
    (2026-11-27, transformers 5.24: inv_freq has head_dim / 2 entries with the field at 0.5); said once."""
    with caplog.at_level("WARNING", logger="moe_jax"):
        for family in ("mixtral", "qwen3_moe", "olmoe"):
            c = cfg(family, partial_rotary_factor=0.5)
            assert c.rotary_dim == c.head_dim
    assert "partial_rotary_factor=0.5 ignored, as transformers ignores it for model_type 'mixtral'" in caplog.text
    assert cfg("mixtral", sliding_window=128).sliding_window == 128
    assert cfg("mixtral", sliding_window=4096).sliding_window is None


def test_a_prompt_past_a_capping_sliding_window_names_it():
    from moe_jax.prompts import PromptError, encode_prompt

    with pytest.raises(PromptError, match=r"prompt has 128 tokens; the model allows at most 127 \(max positions 128 "
                                          r"\(config.json's sliding_window, which caps the context\), one left"):
        encode_prompt(cfg("mixtral", sliding_window=128), None, [1] * 128)
    with pytest.raises(PromptError, match=r"\(max positions 256, one left to generate\)"):
        encode_prompt(cfg("mixtral"), None, [1] * 256)


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        ModelConfig.from_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text('{"model_type": "mixtral",\n oops}')
    with pytest.raises(ConfigError, match="invalid JSON at line 2"):
        ModelConfig.from_file(tmp_path / "config.json")
    for data, message in ((b"[1, 2]", "expected a JSON object, got list"),
                          (b'{"model_type": "mixtral\xff"}', r"not UTF-8 text \(invalid start byte at byte 23\)")):
        (tmp_path / "config.json").write_bytes(data)
        with pytest.raises(ConfigError, match=f"config.json: {message}"):
            ModelConfig.from_file(tmp_path / "config.json")


def test_defaults_of_missing_fields_are_transformers_defaults():
    reference("transformers")
    from transformers import AutoConfig

    base = dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, vocab_size=100, max_position_embeddings=512)
    families = {"mixtral": dict(base, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2),
                "olmoe": dict(base, intermediate_size=32, num_experts=4, num_experts_per_tok=2, eos_token_id=2)}
    for family, fields in families.items():
        ours, hf = ModelConfig.from_dict(dict(fields, model_type=family)), AutoConfig.for_model(family, **fields)
        assert (ours.rope_theta, ours.norm_eps) == (hf.rope_parameters["rope_theta"], hf.rms_norm_eps), family
    dbrx = dict(d_model=64, n_heads=4, n_layers=2, vocab_size=100, max_seq_len=512,
                ffn_config=dict(ffn_hidden_size=32, moe_num_experts=4, moe_top_k=2))
    ours, hf = ModelConfig.from_dict(dict(dbrx, model_type="dbrx")), AutoConfig.for_model("dbrx", **dbrx)
    assert (ours.num_kv_heads, ours.router_norm_p) == (hf.attn_config.kv_n_heads, hf.ffn_config.moe_normalize_expert_weights)
    qwen = {k: v for k, v in HF_CONFIGS["qwen2_moe"].items() if k != "shared_expert_intermediate_size"}
    ours, hf = ModelConfig.from_dict(dict(qwen, model_type="qwen2_moe")), AutoConfig.for_model("qwen2_moe", **qwen)
    assert ours.shared_expert_ffn_size == hf.shared_expert_intermediate_size == 5632  # its block always has one
    for family in ("qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3"):  # the tests' fields, less these four
        fields = {k: v for k, v in HF_CONFIGS[family].items()
                  if k not in ("rms_norm_eps", "rope_theta", "rope_parameters", "norm_topk_prob")}
        ours, hf = ModelConfig.from_dict(dict(fields, model_type=family)), AutoConfig.for_model(family, **fields)
        assert (ours.rope_theta, ours.norm_eps) == (hf.rope_parameters["rope_theta"], hf.rms_norm_eps), family
        assert (ours.router_norm_p == 1.0) == bool(hf.norm_topk_prob), family
    assert cfg("qwen2_moe", shared_expert_intermediate_size=0).shared_expert_ffn_size == 0
    with pytest.raises(ConfigError, match=r"field 'shared_expert_intermediate_size' = -1: expected an integer >= 0"):
        cfg("qwen2_moe", shared_expert_intermediate_size=-1)


def test_dbrx_layer_norm_eps_is_transformers():
    """DBRX's norms are nn.LayerNorm at its default eps, which no config field sets."""
    from tests.conftest import build_hf_model

    model = build_hf_model("dbrx")
    assert cfg("dbrx").norm_eps == model.transformer.blocks[0].norm_attn_norm.norm_1.eps


def test_yarn_frequencies_match_transformers_where_the_ramp_reaches_past_half_the_dims():
    """YaRN's correction range clamps at dim - 1 (transformers' `find_correction_range`), which matters where the
    original context is long against 2 pi theta: theta 100, 4096 positions, 16 dims."""
    reference("torch", "transformers")
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = dict(rope_type="yarn", rope_theta=100.0, factor=4.0, original_max_position_embeddings=4096)
    changes = dict(head_dim=16, max_position_embeddings=16384, rope_parameters=rope)
    ours, hf = cfg("qwen3_moe", **changes), AutoConfig.for_model("qwen3_moe", **dict(HF_CONFIGS["qwen3_moe"], **changes))
    want, attention = ROPE_INIT_FUNCTIONS["yarn"](hf)
    base = 1.0 / (100.0 ** (np.arange(0, 16, 2, dtype=np.float32) / 16))
    np.testing.assert_allclose(ours.rope_scaling.scale(base, ours.rope_theta, ours.rotary_dim), want.numpy(), rtol=1e-6)
    assert ours.rope_scaling.attention_factor == pytest.approx(attention)


def test_attention_bias_is_refused_where_it_would_need_an_output_bias():
    with pytest.raises(ConfigError, match="field 'attention_bias'"):
        cfg("olmoe", attention_bias=True)


@pytest.mark.parametrize("changes,message", [
    (dict(num_attention_heads=5), "num_attention_heads=5 is not a multiple of num_key_value_heads=2"),
    (dict(num_experts_per_tok=9), r"experts per token \(9\) must be in 1..num_experts \(4\)"),
])
def test_inconsistent_values_name_the_file(tmp_path, changes, message):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**preset_hf_config("tiny-mixtral"), **changes}))
    with pytest.raises(ConfigError, match=f"^{re.escape(str(path))}: {message}"):
        ModelConfig.from_file(path)


def test_a_file_given_as_the_model_says_so(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelNotFound, match="is a file: give the directory that holds config.json"):
        open_model(tmp_path / "config.json")
