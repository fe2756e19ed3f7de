"""The JSON-object files of a model directory: each way a file can be wrong is an error naming the file."""
from __future__ import annotations

import pytest

from moe_jax.chat_template import ChatTemplate, ChatTemplateError
from moe_jax.checkpoint import Checkpoint, CheckpointError
from moe_jax.json_files import read_json_object


class Bad(ValueError):
    pass


@pytest.mark.parametrize("data, message", [
    (b'{"a": 1,\n "b": }', "invalid JSON at line 2"),
    (b'["a"]', "expected a JSON object, got list"),
    (b'{"a": "\xe9"}', r"not UTF-8 text \(invalid continuation byte at byte 7\)"),
    (b"[" * 100_000, "JSON nested too deeply"),
])
def test_each_fault_names_the_file(tmp_path, data, message):
    (tmp_path / "f.json").write_bytes(data)
    with pytest.raises(Bad, match=f"^profile {tmp_path / 'f.json'}: {message}"):
        read_json_object(tmp_path / "f.json", Bad, "profile ")


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(Bad, match="f.json: no such file"):
        read_json_object(tmp_path / "f.json", Bad)
    (tmp_path / "f.json").mkdir()
    with pytest.raises(Bad, match="f.json: cannot read it"):
        read_json_object(tmp_path / "f.json", Bad)
    (tmp_path / "g.json").write_text('{"x": [1, "\u00e9"]}', encoding="utf-8")
    assert read_json_object(tmp_path / "g.json", Bad) == {"x": [1, "\u00e9"]}


def test_a_model_directorys_files_use_it(tmp_path, hf_checkpoints):
    (tmp_path / "tokenizer_config.json").write_text('{"chat_template": 3,}')
    with pytest.raises(ChatTemplateError, match="tokenizer_config.json: invalid JSON at line 1"):
        ChatTemplate.from_model_dir(tmp_path)
    src = hf_checkpoints["mixtral"][0]
    d = tmp_path / "m"
    d.mkdir()
    for f in src.iterdir():
        (d / f.name).symlink_to(f)
    (d / "generation_config.json").unlink(missing_ok=True)
    (d / "generation_config.json").write_text('"eos"')
    with pytest.raises(CheckpointError, match="generation_config.json: expected a JSON object, got str"):
        Checkpoint(d)
