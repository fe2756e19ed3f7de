"""Checkpoint loading: Hub names -> our parameters, and errors that name the tensor, shard or shape."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from moe_jax.checkpoint import Checkpoint, CheckpointError
from moe_jax.params import global_param_specs, layer_specs
from tests.conftest import FAMILIES


def test_experts_are_stacked_and_transposed(hf_checkpoints):
    path, model = hf_checkpoints["mixtral"]
    layer = Checkpoint(path).layer(1, np.float32)
    w1 = model.state_dict()["model.layers.1.mlp.experts.gate_up_proj"].numpy()  # [E, 2F, H] in transformers 5
    F = w1.shape[1] // 2
    np.testing.assert_array_equal(layer["w_gate"], w1[:, :F].transpose(0, 2, 1))
    np.testing.assert_array_equal(layer["w_up"], w1[:, F:].transpose(0, 2, 1))


def test_dbrx_fused_tensors_are_split(hf_checkpoints):
    path, model = hf_checkpoints["dbrx"]
    ck = Checkpoint(path)
    layer, sd = ck.layer(0, np.float32), model.state_dict()
    wqkv = sd["transformer.blocks.0.norm_attn_norm.attn.Wqkv.weight"].numpy()
    np.testing.assert_array_equal(np.concatenate([layer["wq"], layer["wk"], layer["wv"]], axis=1), wqkv.T)
    w2 = sd["transformer.blocks.0.ffn.experts.mlp.w2"].numpy()
    np.testing.assert_array_equal(layer["w_down"].reshape(w2.shape), w2)


@pytest.mark.parametrize("family", FAMILIES)
def test_shapes_follow_the_specs_in_any_dtype(family, hf_checkpoints):
    """Every layer (a DeepSeek checkpoint's first is dense) and the globals; no tensor left unread."""
    ck = Checkpoint(hf_checkpoints[family][0])
    assert ck.unused == []
    last = ck.cfg.num_layers - 1
    for got, specs in ((ck.layer(0, "bfloat16"), layer_specs(ck.cfg, 0)),
                       (ck.layer(last, "bfloat16"), layer_specs(ck.cfg, last)),
                       (ck.globals("bfloat16"), global_param_specs(ck.cfg))):
        want = {k: (s.shape, s.dtype("bfloat16")) for k, s in specs.items()}
        assert {k: (v.shape, v.dtype) for k, v in got.items()} == want


def test_errors_name_tensor_shard_and_shape(tmp_path, hf_checkpoints):
    src = hf_checkpoints["qwen2_moe"][0]
    d = tmp_path / "m"
    shutil.copytree(src, d)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.1.mlp.experts.3.up_proj.weight"]
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"tensor 'model.layers.1.mlp.experts.3.up_proj.weight' is missing"):
        Checkpoint(d).layer(1, np.float32)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(dict(cfg, moe_intermediate_size=41)))
    with pytest.raises(CheckpointError, match=r"tensor 'model.layers.0.mlp.experts.0.gate_proj.weight' has shape "
                                              r"\(40, 64\), expected \(41, 64\)"):
        Checkpoint(d).layer(0, np.float32)
    (d / "config.json").write_text(json.dumps(cfg))
    moved = "model.layers.0.self_attn.q_proj.weight"
    index["weight_map"][moved] = next(f for f in set(index["weight_map"].values()) if f != index["weight_map"][moved])
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"tensor '{moved}' is not in this shard, though .*index.json maps it"):
        Checkpoint(d).layer(0, np.float32)
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        (d / "model.safetensors.index.json").unlink()
        Checkpoint(d)


@pytest.mark.parametrize("kv_heads", [1, 4])
def test_a_fused_tensor_is_checked_whole(tmp_path, hf_checkpoints, kv_heads):
    """DBRX's Wqkv holds q, k and v: a config.json with other KV heads than the weights' (2) is refused, not cut
    at the wrong rows (fewer) or past the tensor's end (more)."""
    d = tmp_path / "m"
    shutil.copytree(hf_checkpoints["dbrx"][0], d)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["attn_config"]["kv_n_heads"] == 2
    cfg["attn_config"]["kv_n_heads"] = kv_heads
    (d / "config.json").write_text(json.dumps(cfg))
    q, kv = 64, 16 * kv_heads
    with pytest.raises(CheckpointError, match=rf"tensor 'transformer.blocks.0.norm_attn_norm.attn.Wqkv.weight' has "
                                              rf"shape \(128, 64\), expected \({q + 2 * kv}, 64\) \(rows 0:{q} of it"):
        Checkpoint(d).layer(0, np.float32)


def torch_tensors(src) -> dict:
    """Every tensor of the sharded checkpoint `src`, by name, as torch tensors."""
    from safetensors import safe_open

    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    tensors = {}
    for shard in sorted(set(index.values())):
        with safe_open(str(src / shard), framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors


def test_quantized_tensors_are_refused_by_name_and_dtype(tmp_path, hf_checkpoints):
    """An FP8 weight read as a plain float would drop its scale: wrong output, so an error instead."""
    import torch
    from safetensors.torch import save_file

    src = hf_checkpoints["mixtral"][0]
    tensors = torch_tensors(src)
    name = next(k for k in sorted(tensors) if ".layers.0." in k and ".experts.1." in k)
    tensors[name] = tensors[name].to(torch.float8_e4m3fn)
    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(src / "config.json", d / "config.json")
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=f"model.safetensors: tensor '{name}' is stored as F8_E4M3"):
        Checkpoint(d).layer(0, np.float32)


def test_generation_config_eos_ids_join_the_config_ones(tmp_path, hf_checkpoints):
    d = tmp_path / "m"
    shutil.copytree(hf_checkpoints["olmoe"][0], d)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7], "do_sample": False}))
    assert Checkpoint(d).cfg.eos_token_ids == (2, 7)
    for bad in ("x", True, [2, -1], {"id": 2}):  # true is no token id 1
        (d / "generation_config.json").write_text(json.dumps({"eos_token_id": bad}))
        with pytest.raises(CheckpointError, match="generation_config.json: field 'eos_token_id'"):
            Checkpoint(d)


def test_generation_configs_suggested_sampling_is_said_and_not_applied(tmp_path, hf_checkpoints, caplog):
    d = tmp_path / "m"
    shutil.copytree(hf_checkpoints["olmoe"][0], d)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, "do_sample": True, "temperature": 0.7,
                                                          "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}))
    with caplog.at_level("INFO", logger="moe_jax"):
        Checkpoint(d)
    assert ("suggests sampling with do_sample=True, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05; "
            "moe-jax samples only as a request asks") in caplog.text
    caplog.clear()
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, "do_sample": False}))
    with caplog.at_level("INFO", logger="moe_jax"):
        Checkpoint(d)
    assert "suggests sampling" not in caplog.text


def test_an_eos_id_past_the_vocabulary_is_warned_about(tmp_path, hf_checkpoints, caplog):
    """transformers accepts an EOS id the model cannot generate; so does the loader, but it says so."""
    d = tmp_path / "m"
    shutil.copytree(hf_checkpoints["olmoe"][0], d)
    vocab = json.loads((d / "config.json").read_text())["vocab_size"]
    with caplog.at_level("WARNING", logger="moe_jax"):
        Checkpoint(d)
    assert "EOS token id" not in caplog.text
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [vocab - 1, vocab + 3]}))
    with caplog.at_level("WARNING", logger="moe_jax"):
        assert vocab + 3 in Checkpoint(d).cfg.eos_token_ids
    assert f"EOS token id(s) [{vocab + 3}] (config.json / generation_config.json 'eos_token_id') are not below " \
           f"vocab_size {vocab}" in caplog.text


def test_tensors_no_parameter_reads_are_named_in_a_warning(tmp_path, hf_checkpoints, caplog):
    """A checkpoint of a larger model than config.json describes (here: config.json cut to one layer and
    fewer experts) loads what config.json asks for, as transformers does, and says what it left unread."""
    d = tmp_path / "m"
    shutil.copytree(hf_checkpoints["mixtral"][0], d)
    with caplog.at_level("WARNING", logger="moe_jax"):
        assert Checkpoint(d).unused == []
    assert "not read" not in caplog.text
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(dict(cfg, num_hidden_layers=1)))
    with caplog.at_level("WARNING", logger="moe_jax"):
        ck = Checkpoint(d)
    assert ck.unused and all(t.startswith(tuple(f"model.layers.{i}." for i in range(1, cfg["num_hidden_layers"])))
                             for t in ck.unused)
    assert f"{len(ck.unused)} tensor(s) in the checkpoint are not read for the model config.json describes (1 " \
           f"layers, {cfg['num_local_experts']} experts), e.g. model.layers.1." in caplog.text


def test_deepseek_v3_multi_token_prediction_layers_are_not_unused(tmp_path, hf_checkpoints):
    """A DeepSeek V3 checkpoint carries its multi-token-prediction layer after the decoder's: generation skips
    it, as transformers does, with no warning; another family's extra layers stay unread tensors."""
    d = tmp_path / "m"
    shutil.copytree(hf_checkpoints["deepseek_v3"][0], d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(dict(cfg, num_hidden_layers=2)))
    assert Checkpoint(d).unused == []
    (d / "config.json").write_text(json.dumps(dict(cfg, num_hidden_layers=2, model_type="deepseek_v2",
                                                   topk_method="greedy", norm_topk_prob=False)))
    assert "model.layers.2.input_layernorm.weight" in Checkpoint(d).unused


def test_a_tied_config_keeps_its_tie_where_the_stored_lm_head_cannot_be_its_head(tmp_path, hf_checkpoints, caplog):
    """A tied config whose checkpoint stores an lm_head.weight of another shape (a padded vocabulary): the tie
    stands and the stored head is said not to be read, where reading it to compare used to fail the load."""
    import torch
    from safetensors.torch import save_file

    src = hf_checkpoints["mixtral"][0]
    tensors = torch_tensors(src)
    tensors["lm_head.weight"] = torch.cat([tensors["lm_head.weight"], tensors["lm_head.weight"][:32]])
    d = tmp_path / "m"
    d.mkdir()
    config = json.loads((src / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    save_file(tensors, str(d / "model.safetensors"))
    with caplog.at_level("WARNING", logger="moe_jax"):
        ckpt = Checkpoint(d)
    assert ckpt.cfg.tie_embeddings and "lm_head" not in ckpt.globals(np.float32)
    assert "ties the embeddings; the checkpoint's lm_head.weight is not read" in caplog.text
