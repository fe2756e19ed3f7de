"""The CLI: a JSONL job end to end, and one clear error line + exit code 2 for each kind of bad input."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from moe_jax.generate import main

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


def run_cli(capsys, *args):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_jsonl_job_writes_every_request(tmp_path, capsys):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text('{"id": "a", "prompt": "Hello there"}\n\n{"prompt_token_ids": [256, 5, 9], "max_new_tokens": 3}\n'
                   '{"id": 7, "prompt": "x"}\n')
    rc, _, err = run_cli(capsys, "--input", inp, "--output", out, "--max-new-tokens", "5", "--dtype", "float32")
    assert rc == 0, err
    lines = [json.loads(l) for l in out.read_text().splitlines()]
    assert sorted(map(str, (r["id"] for r in lines))) == ["3", "7", "a"]  # line 3's id defaults to its line number
    by_id = {r["id"]: r for r in lines}
    assert len(by_id[3]["token_ids"]) == 3 and len(by_id["a"]["token_ids"]) == 5
    assert all(set(r) == {"id", "token_ids", "text", "finish_reason"} and isinstance(r["text"], str) for r in lines)
    assert "done: 3 prompts" in err and "tok/s" in err


def test_resume_skips_finished_ids_and_repairs_a_torn_line(tmp_path, capsys):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps({"id": f"r{i}", "prompt": f"prompt number {i}"}) + "\n" for i in range(4)))
    assert run_cli(capsys, "--input", inp, "--output", out, "--max-new-tokens", "4", "--dtype", "float32")[0] == 0
    full = {json.loads(l)["id"]: l for l in out.read_text().splitlines()}
    kept = [full["r0"], full["r2"]]
    out.write_text("\n".join(kept) + "\n" + full["r1"][:10])  # two whole lines and a torn one
    assert run_cli(capsys, "--input", inp, "--output", out, "--max-new-tokens", "4", "--dtype", "float32", "--resume")[0] == 0
    lines = out.read_text().splitlines()
    assert sorted(json.loads(l)["id"] for l in lines) == ["r0", "r1", "r2", "r3"]
    assert {json.loads(l)["id"]: l for l in lines} == full  # greedy: the resumed outputs are identical


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "ok"}\n{"prompt": "unterminated\n', "in.jsonl:2: malformed JSON"),
    ('{"prompt": ""}\n', "in.jsonl:1: empty prompt"),
    ('{"prompt_token_ids": []}\n', "in.jsonl:1: empty prompt"),
    ('{"prompt": 5}\n', "in.jsonl:1: 'prompt' must be a string"),
    ('{"text": "x"}\n', "in.jsonl:1: needs exactly one of 'prompt'"),
    ('{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}\n', "in.jsonl:2: duplicate id 'a'"),
    ('{"prompt": "x", "max_new_tokens": 0}\n', "in.jsonl:1: 'max_new_tokens' must be a positive integer"),
    ('{"prompt_token_ids": [1, 99999]}\n', "in.jsonl:1: prompt: token id 99999 is outside the vocabulary"),
    ('{"prompt": "' + "x" * 3000 + '"}\n', "in.jsonl:1: prompt has 3001 tokens; the model allows at most 2047"),
])
def test_bad_jsonl_lines(tmp_path, capsys, content, message):
    inp = tmp_path / "in.jsonl"
    inp.write_text(content)
    rc, _, err = run_cli(capsys, "--input", inp, "--output", tmp_path / "out.jsonl")
    assert rc == 2
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out.jsonl").exists()


def test_every_bad_line_is_reported_together(tmp_path, capsys):
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"prompt": "fine"}\nnot json\n{"prompt": ""}\n')
    rc, _, err = run_cli(capsys, "--input", inp)
    assert rc == 2 and "in.jsonl:2:" in err and "in.jsonl:3:" in err


def test_bad_model_arguments(tmp_path, capsys, hf_checkpoints):
    rc, _, err = run_cli(capsys, "--model", "no-such-preset", "--prompt", "x")
    assert rc == 2 and "neither a directory nor a preset" in err
    rc, _, err = run_cli(capsys, "--model", tmp_path / "missing", "--prompt", "x")
    assert rc == 2 and "does not exist" in err
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text('{"model_type": "llama"}')
    rc, _, err = run_cli(capsys, "--model", llama, "--prompt", "x")
    assert rc == 2 and "model_type='llama' is not supported" in err
    broken = tmp_path / "broken"
    shutil.copytree(hf_checkpoints["mixtral"][0], broken)
    shard = sorted(broken.glob("model-*.safetensors"))[-1]
    shard.unlink()
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"prompt_token_ids": [1, 2, 3]}\n')
    rc, _, err = run_cli(capsys, "--model", broken, "--input", inp)
    assert rc == 2 and f"shard {shard} is missing" in err
    rc, _, err = run_cli(capsys, "--prompt", "x", "--hardware", "no-such-gpu")
    assert rc == 2 and "no-such-gpu" in err
    rc, _, err = run_cli(capsys, "--prompt", "")
    assert rc == 2 and "--prompt is empty" in err


def test_module_entry_point_prints_a_completion():
    r = subprocess.run([sys.executable, "-m", "moe_jax.generate", "--prompt", "Hi", "--max-new-tokens", "3"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "done: 1 prompts, 3 generated tokens" in r.stderr


def test_offload_policy_from_the_cli_matches_resident(tmp_path, capsys):
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "prompt": "x" * (3 + 4 * i)}) + "\n" for i in range(5)))
    outs = {}
    for policy in ("resident", "offload"):
        out = tmp_path / f"{policy}.jsonl"
        rc, _, err = run_cli(capsys, "--input", inp, "--output", out, "--policy", policy, "--dtype", "float32",
                             "--max-new-tokens", "4")
        assert rc == 0, err
        outs[policy] = {json.loads(l)["id"]: json.loads(l)["token_ids"] for l in out.read_text().splitlines()}
    assert outs["offload"] == outs["resident"] and len(outs["offload"]) == 5
    assert "bottleneck:" in err  # the offload run ends with its per-layer summary
