"""A model saved by moe-jax (orbax, one item per layer) is served by both engines exactly as the decoder
that saved it computes; broken directories give errors that name what is wrong."""
from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest

import moe_jax
from moe_jax import generate
from moe_jax.flax_model import MoEDecoder
from moe_jax.saved_model import SavedModelError, SavedWeights

TOKENS = [[5, 9, 33, 100, 7, 12, 40], [3, 4]]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """tiny-qwen2-moe with one layer's router and an expert changed (as fine-tuning would), saved."""
    decoder = MoEDecoder.from_pretrained("tiny-qwen2-moe")
    layer = decoder.layers[1]
    layer["router"][...] = -layer["router"][...]
    layer["w_up"][...] = layer["w_up"][...] * 1.5
    path = tmp_path_factory.mktemp("tuned") / "model"
    decoder.save(path)
    return decoder, path


def test_llm_serves_the_saved_parameters(tuned):
    decoder, path = tuned
    llm = moe_jax.LLM(str(path), dtype="float32", policy="resident")
    for ids, got in zip(TOKENS, llm.logits(TOKENS)):
        want = np.asarray(decoder(jax.numpy.asarray([ids])))[0]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    original = moe_jax.LLM("tiny-qwen2-moe", dtype="float32", policy="resident").logits(TOKENS[:1])[0]
    assert np.abs(original - llm.logits(TOKENS[:1])[0]).max() > 0.1  # the change was saved, not the preset
    assert llm.tokenizer is not None and llm.tokenizer.decode(llm.tokenizer.encode("héllo", False)) == "héllo"


def test_saved_weights_come_back_in_the_dtype_asked_for(tuned):
    """Whatever dtype the model was saved in, as a Hugging Face checkpoint's weights do (a bfloat16 LLM of a
    float32 save holds bfloat16 weights: the memory its plan counted)."""
    from moe_jax.params import global_param_specs, layer_specs

    _, path = tuned
    w = SavedWeights(path)
    for dtype in (jax.numpy.bfloat16, np.float32):
        for got, specs in ((w.globals(dtype), global_param_specs(w.cfg)), (w.layer(1, dtype), layer_specs(w.cfg, 1))):
            assert {k: v.dtype for k, v in got.items()} == {k: s.dtype(dtype) for k, s in specs.items()}


def test_offload_engine_streams_it_layer_by_layer(tuned):
    _, path = tuned
    params = moe_jax.SamplingParams(max_new_tokens=6, ignore_eos=True)
    prompts = ["abc", "a longer prompt", "x"]
    want = [c.token_ids for c in moe_jax.LLM(str(path), dtype="float32", policy="resident").generate(prompts, params)]
    offload = moe_jax.LLM(str(path), dtype="float32", policy=moe_jax.Policy(
        batch_size=2, micro_batch_size=1, num_micro_batches=2, resident_expert_fraction=0.5))
    assert [c.token_ids for c in offload.generate(prompts, params)] == want


def test_saving_over_a_saved_model_needs_overwrite(tuned, tmp_path):
    decoder, path = tuned
    with pytest.raises(SavedModelError, match="already holds a saved model"):
        decoder.save(path)
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    other = MoEDecoder.from_pretrained("tiny-qwen2-moe")
    other.tokenizer = None
    other.save(copy, overwrite=True)
    llm = moe_jax.LLM(str(copy), dtype="float32", policy="resident")
    assert llm.tokenizer is None  # the old tokenizer.json went with the old model
    np.testing.assert_allclose(llm.logits(TOKENS[:1])[0], np.asarray(other(jax.numpy.asarray(TOKENS[:1])))[0],
                               rtol=1e-4, atol=1e-4)


def test_broken_directories_name_what_is_missing(tuned, tmp_path, capsys):
    _, path = tuned
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    shutil.rmtree(broken / "layer_001")
    with pytest.raises(SavedModelError, match="missing layer_001"):
        moe_jax.LLM(str(broken))
    assert generate.main(["--model", broken, "--prompt", "x"]) == 2
    assert "error: " in (err := capsys.readouterr().err) and "missing layer_001" in err
    (broken / "moe_jax_config.json").write_text('{"family": "mixtral"}')
    with pytest.raises(moe_jax.config.ConfigError, match="moe_jax_config.json: not a moe-jax model config"):
        moe_jax.LLM(str(broken))
    good = json.loads((path / "moe_jax_config.json").read_text())
    for field, value in (("family", "llama"), ("norm", "batch")):
        (broken / "moe_jax_config.json").write_text(json.dumps({**good, field: value}))
        with pytest.raises(moe_jax.config.ConfigError, match=f"moe_jax_config.json: not a moe-jax model config "
                                                             f"\\({field}='{value}' is not one of"):
            moe_jax.LLM(str(broken))
    (broken / "moe_jax_config.json").write_text(json.dumps(good))
    shutil.copytree(path / "layer_001", broken / "layer_001")
    (broken / "layer_001" / "_METADATA").write_text("{not json")  # orbax then finds no metadata
    with pytest.raises(SavedModelError, match=r"layer_001: no orbax metadata \(an incomplete or damaged save\)"):
        SavedWeights(broken).layer(1, np.float32)
    (broken / "moe_jax_config.json").unlink()  # as a save interrupted before its last file
    with pytest.raises(SavedModelError, match=r"holds a moe-jax save's items but not its moe_jax_config.json, which "
                                              r"a save writes last: the save was interrupted"):
        moe_jax.LLM(str(broken))


def test_the_source_models_chat_template_is_saved_with_it(tmp_path, hf_checkpoints):
    from moe_jax.chat_template import ChatTemplate

    src = tmp_path / "src"
    shutil.copytree(hf_checkpoints["mixtral"][0], src)
    (src / "tokenizer_config.json").write_text('{"chat_template": "{{ messages[0].content }}!", "eos_token": "</s>"}')
    MoEDecoder.from_pretrained(str(src)).save(tmp_path / "saved")
    chat = ChatTemplate.from_model_dir(tmp_path / "saved")
    assert chat is not None and chat.render([{"role": "user", "content": "hi"}]) == "hi!"
    saved = MoEDecoder.from_pretrained(str(tmp_path / "saved"))
    saved.save(tmp_path / "saved", overwrite=True)  # over itself: its own chat template is kept, not lost
    assert ChatTemplate.from_model_dir(tmp_path / "saved").render([{"role": "user", "content": "hi"}]) == "hi!"
    MoEDecoder.from_pretrained("tiny-mixtral").save(tmp_path / "saved", overwrite=True)  # a preset: none
    assert ChatTemplate.from_model_dir(tmp_path / "saved") is None
    before = sorted(p.name for p in src.iterdir())
    with pytest.raises(SavedModelError, match="holds a Hugging Face checkpoint .*config.json.*: save to another"):
        MoEDecoder.from_pretrained(str(src)).save(src, overwrite=True)  # into the checkpoint it came from
    assert sorted(p.name for p in src.iterdir()) == before


def test_parameters_are_checked_when_saved_not_only_when_loaded(tmp_path):
    from moe_jax.saved_model import save_model

    decoder = MoEDecoder.from_pretrained("tiny-mixtral")
    glob = {k: p[...] for k, p in decoder.globals.items()}
    layers = [{k: p[...] for k, p in layer.items()} for layer in decoder.layers]
    bad = [dict(layers[0]), *layers[1:]]
    del bad[0]["attn_norm"]
    with pytest.raises(SavedModelError, match=r"layer 0: holds .* the config needs .*'attn_norm'"):
        save_model(tmp_path / "a", decoder.cfg, glob, bad)
    with pytest.raises(SavedModelError, match=r"globals: embed has shape \(3, 4\), the config needs"):
        save_model(tmp_path / "b", decoder.cfg, {**glob, "embed": np.zeros((3, 4))}, layers)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(SavedModelError, match="is a file: give a directory"):
        save_model(tmp_path / "file", decoder.cfg, glob, layers)


def test_from_pretrained_takes_the_dtype_names_llm_takes():
    assert MoEDecoder.from_pretrained("tiny-mixtral", dtype="bf16").globals["embed"][...].dtype == jax.numpy.bfloat16
    with pytest.raises(ValueError, match="dtype must be one of bfloat16, bf16, float32, fp32, f32, got 'int8'"):
        MoEDecoder.from_pretrained("tiny-mixtral", dtype="int8")


def test_scaled_rope_and_dense_layers_survive_saving(tmp_path):
    """A config with YaRN RoPE and dense layers round-trips, and the saved model serves what the decoder
    computes (the decoder's own forward handles dense layers too)."""
    from moe_jax.saved_model import read_config
    from tests.conftest import build_hf_model

    build_hf_model("qwen3_moe", num_hidden_layers=4, decoder_sparse_step=2, rope_parameters=dict(
        rope_type="yarn", factor=4.0, original_max_position_embeddings=32, rope_theta=1e4)).save_pretrained(tmp_path / "hf")
    decoder = MoEDecoder.from_pretrained(str(tmp_path / "hf"))
    decoder.save(tmp_path / "saved")
    cfg = read_config(tmp_path / "saved")
    assert cfg == decoder.cfg and cfg.rope_scaling.kind == "yarn" and cfg.dense_layers == (0, 2)
    llm = moe_jax.LLM(str(tmp_path / "saved"), dtype="float32", policy="resident")
    for ids, got in zip(TOKENS, llm.logits([[t % 96 for t in ids] for ids in TOKENS])):
        want = np.asarray(decoder(jax.numpy.asarray([[t % 96 for t in ids]])))[0]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
