"""Resolving a model directory: the EOS a model stops at when its configs name none."""
from __future__ import annotations

import json
import logging

from moe_jax.model_source import _eos_of_the_tokenizer
from moe_jax.presets import preset_config
from moe_jax.tokenizer import Tokenizer


def test_without_an_eos_in_the_configs_the_tokenizers_is_taken_and_said(tmp_path, caplog):
    cfg, tok = preset_config("tiny-mixtral"), Tokenizer.byte_level()
    assert cfg.eos_token_ids == (257,)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "</s>", "special": True}}))
    with caplog.at_level(logging.WARNING, logger="moe_jax"):
        assert _eos_of_the_tokenizer(tmp_path, cfg.replace(eos_token_ids=()), tok).eos_token_ids == (257,)
    assert "stopping at the tokenizer's eos_token '</s>' (id 257), as vLLM does" in caplog.text
    assert _eos_of_the_tokenizer(tmp_path, cfg.replace(eos_token_ids=(5,)), tok).eos_token_ids == (5,)  # configs win
    caplog.clear()
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<none of its tokens>"}))
    with caplog.at_level(logging.WARNING, logger="moe_jax"):
        assert _eos_of_the_tokenizer(tmp_path, cfg.replace(eos_token_ids=()), tok).eos_token_ids == ()
    assert "no EOS token id" in caplog.text and "generation stops only at its token budget" in caplog.text
