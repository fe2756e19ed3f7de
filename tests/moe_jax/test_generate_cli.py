"""The CLI: a JSONL job end to end, one clear error line + exit code 2 for each kind of bad input,
--skip-invalid, and resuming after an interruption (SIGKILL, SIGINT, SIGTERM) or refusing to."""
from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import moe_jax
from moe_jax.generate import main, request_seed
from moe_jax.progress import Progress
from moe_jax.sampling import SamplingParams

ROOT = Path(__file__).resolve().parents[2]
# Long enough (300 requests of 32 tokens on 2 rows, a few seconds) to be interrupted after its first lines.
LONG_ARGS = ("--max-batch-size", "2", "--max-new-tokens", "32", "--dtype", "float32", "--policy", "resident")
LONG_N = 300


def run_cli(capsys, *args):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def records(path: Path) -> dict:
    """{id: record} of an output file, which must hold whole lines only, each id once."""
    data = path.read_text(encoding="utf-8")
    assert data.endswith("\n")
    lines = [json.loads(line) for line in data.split("\n")[:-1]]
    by_id = {r["id"]: r for r in lines}
    assert len(by_id) == len(lines)
    return by_id


def float32_job(tmp_path: Path, capsys, lines: str, max_new_tokens: int) -> dict:
    """{id: record} of a job of these input lines on the default model in float32."""
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text(lines)
    rc, _, err = run_cli(capsys, "--input", inp, "--output", out, "--max-new-tokens", max_new_tokens, "--dtype", "float32")
    assert rc == 0, err
    return records(out)


@pytest.fixture(scope="module")
def reference():
    """The default model in float32 through the Python API, for what the CLI's lines must hold."""
    return moe_jax.LLM("tiny-mixtral", dtype="float32", policy="resident")


def whole_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


@pytest.fixture(scope="module")
def long_job(tmp_path_factory):
    """(input file, {id: record} of its uninterrupted greedy run)."""
    d = tmp_path_factory.mktemp("long")
    inp, out = d / "in.jsonl", d / "out.jsonl"
    inp.write_text("".join(json.dumps({"id": f"r{i:03d}", "prompt": f"request {i:03d}"}) + "\n" for i in range(LONG_N)))
    assert main(["--input", str(inp), "--output", str(out), *LONG_ARGS]) == 0
    return inp, records(out)


def start_job(inp: Path, out: Path, err: Path, *extra) -> tuple[subprocess.Popen, list[str]]:
    """The long job in a subprocess, returned once its first line is in `out`."""
    args = ["--input", str(inp), "--output", str(out), *LONG_ARGS, *extra]
    proc = subprocess.Popen([sys.executable, "-m", "moe_jax.generate", *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=open(err, "w"))
    deadline = time.monotonic() + 240
    while whole_lines(out) < 1 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, err.read_text()
    return proc, args


def test_jsonl_job_writes_every_request(tmp_path, capsys):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text('{"id": "a", "prompt": "Hello there"}\n\n{"prompt_token_ids": [256, 5, 9], "max_new_tokens": 3}\n'
                   '{"id": 7, "prompt": "x", "max_tokens": 2}\n'  # max_tokens: vLLM's name
                   '{"id": 0, "prompt": "y", "max_tokens": 1}\n')
    rc, _, err = run_cli(capsys, "--input", inp, "--output", out, "--max-new-tokens", "5", "--dtype", "float32")
    assert rc == 0, err
    lines = [json.loads(l) for l in out.read_text().splitlines()]
    # line 3's id defaults to its line number; an id of 0 is line 5's own
    assert sorted(map(str, (r["id"] for r in lines))) == ["0", "3", "7", "a"]
    by_id = {r["id"]: r for r in lines}
    assert len(by_id[3]["token_ids"]) == 3 and len(by_id["a"]["token_ids"]) == 5 and len(by_id[7]["token_ids"]) == 2
    want = moe_jax.LLM("tiny-mixtral", dtype="float32").generate([[256, 5, 9]], SamplingParams(max_new_tokens=3))[0]
    assert by_id[3]["token_ids"] == want.token_ids and by_id[3]["text"] == want.text  # what the API generates
    assert all(set(r) == {"id", "token_ids", "text", "finish_reason"} and isinstance(r["text"], str) for r in lines)
    assert "done: 4 prompts" in err and "tok/s" in err


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
    ('{"prompt": "x", "max_tokens": 2, "temprature": 1}\n', "in.jsonl:1: unknown field 'temprature' "
     "(known: id, logprobs, max_new_tokens, max_tokens, n, prompt, prompt_token_ids, seed, stop, temperature, top_k, top_p)"),
    ('{"prompt": "x", "max_tokens": 2, "max_new_tokens": 2}\n',
     "in.jsonl:1: give one of 'max_new_tokens' or 'max_tokens' (the same field)"),
    ('{"prompt": "x", "max_tokens": 0}\n', "in.jsonl:1: 'max_tokens' must be a positive integer"),
    ('{"prompt": "x", "logprobs": 21}\n', "in.jsonl:1: 'logprobs' must be an integer in 0..20, got 21"),
    ('{"prompt": "x", "top_p": 0}\n', "in.jsonl:1: 'top_p' must be a number in (0, 1]"),
    ('{"prompt": "x", "seed": -1}\n', "in.jsonl:1: 'seed' must be an integer in 0..2**32 - 1, got -1"),
    ('{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {"prompt": "y", "logprobs": true}}\n',
     "in.jsonl:1: 'body.logprobs' must be an integer in 0..20, got True"),
    ('{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {"prompt": "y", "top_logprobs": 2}}\n',
     "in.jsonl:1: unknown field 'body.top_logprobs' (known: "),
    ('{"prompt_token_ids": [1, 99999]}\n', "in.jsonl:1: prompt: token id 99999 is outside the vocabulary"),
    ('{"prompt": "' + "x" * 3000 + '"}\n', "in.jsonl:1: prompt has 3001 tokens; the model allows at most 2047"),
    ('{"prompt_token_ids": [1, "2"]}\n', "in.jsonl:1: 'prompt_token_ids' must be a list of integers"),
    ('{"id": [1], "prompt": "x"}\n', "in.jsonl:1: 'id' must be a string or an integer"),
    ('[1, 2]\n', "in.jsonl:1: expected a JSON object, got list"),
    ('{"prompt": "x"}\n{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {"prompt": "y"}}\n',
     "in.jsonl:2: mixes formats: this line is in OpenAI batch format, line 1 in plain format"),
    ('', "in.jsonl: no requests (the file is empty)"),
    ('{"prompt": "a\\ud800"}\n', "in.jsonl:1: a string holds an unpaired surrogate escape"),
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
    rc, _, err = run_cli(capsys, "--prompt", "x", "--hardware", "t4", "--policy", "resident")
    assert rc == 2 and "hardware='t4' is the profile HRM sizes an offload policy for; policy 'resident' uses none" in err
    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(hf_checkpoints["mixtral"][0], no_tokenizer)
    (no_tokenizer / "tokenizer.json").unlink(missing_ok=True)
    rc, _, err = run_cli(capsys, "--model", no_tokenizer, "--prompt", "x")
    assert rc == 2 and "has no tokenizer.json: give token ids in an --input file instead" in err
    rc, _, err = run_cli(capsys, "--prompt", "")
    assert rc == 2 and "--prompt is empty" in err
    rc, _, err = run_cli(capsys, "--prompt", "x", "--temperature", "-1")
    assert rc == 2 and "bad sampling flag: --temperature must be a finite number >= 0" in err
    rc, _, err = run_cli(capsys, "--prompt", "x", "--max-new-tokens", "0")
    assert rc == 2 and "bad sampling flag: --max-new-tokens must be a positive integer, got 0" in err


def test_a_tokenizer_larger_than_the_vocabulary_is_said_at_load(tmp_path, hf_checkpoints, caplog):
    from moe_jax.tokenizer import Tokenizer

    model = tmp_path / "model"
    shutil.copytree(hf_checkpoints["mixtral"][0], model)
    Tokenizer.byte_level().save(model / "tokenizer.json")  # 258 tokens for a vocabulary of 96
    with caplog.at_level("WARNING", logger="moe_jax"):
        moe_jax.model_source.open_model(model)
    assert "tokenizer.json has 258 tokens but the model's vocabulary 96" in caplog.text


def test_a_broken_tokenizer_is_an_error_line_not_a_traceback(tmp_path, capsys, hf_checkpoints):
    model = tmp_path / "model"
    shutil.copytree(hf_checkpoints["mixtral"][0], model)
    (model / "tokenizer.json").write_text("{}")
    rc, _, err = run_cli(capsys, "--model", model, "--prompt", "hi")
    assert rc == 2 and "tokenizer.json: cannot load tokenizer" in err and "Traceback" not in err


@pytest.mark.parametrize("args, message", [
    (["--input", "in.jsonl", "--resume"], "--resume needs --input and --output"),
    (["--prompt", "x", "--output", "o.jsonl", "--skip-invalid"], "--skip-invalid needs --input and --output"),
    (["--input", "in.jsonl", "--output", "no/such/dir/o.jsonl"], "directory"),
    (["--input", "in.jsonl", "--output", "in.jsonl"], "--output must not be the --input file"),
    (["--input", "in.jsonl", "--output", "."], "--output . is a directory (or another non-file): give a file path"),
    (["--input", "in.jsonl", "--output", "res.lock"], "--output res.lock is the name of its own .lock sidecar file"),
    (["--prompt", "x", "--output", "o.jsonl"], "--output takes the completions of an --input file; --prompt's"),
    (["--prompt", "x", "--max-new", "3"], "unrecognized arguments: --max-new"),  # flags whole, as printed back
    (["--input", "in.jsonl", "--output", "o.jsonl", "--resume", "--overwrite"], "give one"),
    (["--prompt", "x", "--max-batch-size", "0"], "--max-batch-size must be a positive integer, got 0"),
    (["--prompt", "x", "--gpu-memory-gb", "-1"], "--gpu-memory-gb must be a positive number of GiB, got -1.0"),
    (["--prompt", "x", "--gpu-memory-gb", "inf"], "--gpu-memory-gb must be a positive number of GiB, got inf"),
    (["--prompt", "x", "--expert-codec", "exp4", "--dtype", "float32"],
     "--expert-codec: expert codec 'exp4' codes bfloat16 weights; the model runs in float32"),
])
def test_bad_flag_combinations(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2 and message in capsys.readouterr().err


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
    rc, _, err = run_cli(capsys, "--prompt", "xyz", "--policy", "offload", "--expert-codec", "exp4",
                         "--max-new-tokens", "2")
    assert rc == 0 and "expert_codec='exp4'" in err, err
    rc, _, err = run_cli(capsys, "--prompt", "xyz", "--policy", "offload", "--kv-cache-dtype", "int8",
                         "--max-new-tokens", "2")
    assert rc == 0 and "kv_cache_dtype='int8'" in err and re.search(r"host KV cache [0-9.]+ GiB int8", err), err
    before = out.read_text()
    rc, _, err = run_cli(capsys, "--input", inp, "--output", out, "--overwrite", "--policy", "resident",
                         "--kv-cache-dtype", "int8")
    assert rc == 2 and "error: kv_cache_dtype='int8' sets how the offload engine's host KV cache" in err, err
    assert out.read_text() == before  # refused before the old output was replaced: nothing lost
    # the offload engine is built (HRM's policy placed) before the old output is replaced too
    rc, _, err = run_cli(capsys, "--input", inp, "--output", out, "--overwrite", "--policy", "offload",
                         "--gpu-memory-gb", "0.0001")
    assert rc == 2 and "error: policy Policy(" in err and "gpu_memory_gb cap is 0.0001 GiB" in err, err
    assert out.read_text() == before
    long = tmp_path / "long.jsonl"  # the engine fits, the prefill of these prompts does not: checked first too
    long.write_text("".join(json.dumps({"id": i, "prompt": "x" * 1500}) + "\n" for i in range(4)))
    rc, _, err = run_cli(capsys, "--input", long, "--output", out, "--overwrite", "--policy", "offload",
                         "--gpu-memory-gb", "0.01", "--dtype", "float32", "--max-new-tokens", "2")
    assert rc == 2 and "for the prefill of prompts up to 1536 tokens" in err, err
    assert out.read_text() == before


def test_many_bad_lines_are_listed_up_to_a_limit(tmp_path, capsys):
    inp = tmp_path / "in.jsonl"
    inp.write_text("not json\n" * 60)
    rc, _, err = run_cli(capsys, "--input", inp)
    assert rc == 2 and "in.jsonl:50:" in err and "in.jsonl:51:" not in err and "... and 10 more bad lines" in err


def test_skip_invalid_writes_the_bad_lines_aside_and_runs_the_rest(tmp_path, capsys, caplog):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text('{"id": "a", "prompt": "fine"}\n{"id": "b", "prompt": ""}\nnot json\n'
                   '{"id": "c", "prompt": "' + "x" * 3000 + '"}\n{"id": "d", "prompt": "also fine"}\n')
    rc, _, err = run_cli(capsys, "--input", inp, "--output", out, "--skip-invalid", "--max-new-tokens", "2")
    assert rc == 0, err
    assert sorted(records(out)) == ["a", "d"]
    errors = [json.loads(l) for l in (tmp_path / "out.errors.jsonl").read_text().splitlines()]
    assert [(e["line"], e["id"]) for e in errors] == [(2, "b"), (3, None), (4, "c")]
    assert errors[0]["error"] == "empty prompt" and "malformed JSON" in errors[1]["error"]
    assert "prompt has 3001 tokens" in errors[2]["error"]
    assert "skipping 3 invalid input lines" in caplog.text
    inp.write_text('{"id": "a", "prompt": "fine"}\n{"id": "b", "prompt": "now fine"}\n{"id": "d", "prompt": "also fine"}\n')
    rc, _, err = run_cli(capsys, "--input", inp, "--output", out, "--resume", "--max-new-tokens", "2")
    assert rc == 0 and sorted(records(out)) == ["a", "b", "d"], err
    assert not (tmp_path / "out.errors.jsonl").exists()  # its list of skipped lines no longer holds: removed
    inp.write_text("not json\n")
    rc, _, err = run_cli(capsys, "--input", inp, "--output", out, "--skip-invalid", "--overwrite")
    assert rc == 2 and "no valid requests (1 invalid lines, listed in" in err


def test_resume_is_refused_for_other_settings_or_foreign_output(tmp_path, capsys, caplog):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text('{"id": "a", "prompt": "x"}\n')
    job = ("--input", inp, "--output", out, "--max-new-tokens", "2", "--dtype", "float32")
    assert run_cli(capsys, *job)[0] == 0
    meta = json.loads((tmp_path / "out.meta.json").read_text())
    assert meta["model"] == "tiny-mixtral" and meta["dtype"] == "float32" and meta["max_new_tokens"] == 2
    rc, _, err = run_cli(capsys, *job, "--resume", "--temperature", "0.5", "--model", "tiny-olmoe", "--stop", "q")
    assert rc == 2 and "it was started with stop None, this run has ['q']" in err, err
    assert f"cannot resume {out}: it was started with model 'tiny-mixtral', this run has 'tiny-olmoe'" in err
    assert "it was started with temperature 0.0, this run has 0.5" in err
    rc, _, err = run_cli(capsys, *job, "--resume", "--logprobs", "1")  # lines with and without logprobs: not mixed
    assert rc == 2 and "it was started with logprobs None, this run has 1" in err
    assert meta["kv_cache_dtype"] == "auto"
    inp.write_text('{"id": "a", "prompt": "x"}\n{"id": "z", "prompt": "y"}\n')  # one left to run
    rc, _, err = run_cli(capsys, *job, "--resume", "--policy", "offload", "--kv-cache-dtype", "int8")
    assert rc == 2 and "it was started with kv_cache_dtype 'auto', this run has 'int8'" in err, err  # not mixed
    rc, _, err = run_cli(capsys, *job, "--resume", "--kv-cache-dtype", "int8")  # auto picks resident: exact
    assert rc == 0, err
    (tmp_path / "out.meta.json").write_text(json.dumps({**meta, "kv_cache_dtype": "int8"}))
    inp.write_text('{"id": "a", "prompt": "x"}\n{"id": "z", "prompt": "y"}\n{"id": "w", "prompt": "w"}\n')
    rc, _, err = run_cli(capsys, *job, "--resume")
    assert rc == 2 and "it was started with kv_cache_dtype 'int8', this run has 'auto'" in err, err
    legacy = {k: v for k, v in meta.items() if k != "kv_cache_dtype"}  # written before the setting was recorded
    (tmp_path / "out.meta.json").write_text(json.dumps(legacy))
    rc, _, err = run_cli(capsys, *job, "--resume")
    assert rc == 0, err
    inp.write_text('{"id": "a", "prompt": "x"}\n')
    out.write_text(next(line for line in out.read_text().splitlines(keepends=True) if '"a"' in line))
    (tmp_path / "out.meta.json").write_text(json.dumps(meta))
    rc, _, err = run_cli(capsys, *job, "--resume")
    assert rc == 0 and "nothing to do: all 1 requests are in" in caplog.text and "done:" not in err  # no model load
    inp.write_text('{"id": "b", "prompt": "x"}\n')
    rc, _, err = run_cli(capsys, *job, "--resume")
    assert rc == 2 and "it holds ids that are not valid requests of" in err and "'a'" in err
    (tmp_path / "out.meta.json").unlink()
    rc, _, err = run_cli(capsys, *job, "--resume")
    assert rc == 2 and "out.meta.json is missing" in err
    out.write_text('{"id": "a"}\nnot a line\n')
    with pytest.raises(SystemExit) as e:  # neither --resume nor --overwrite: finished work is not thrown away
        run_cli(capsys, *job)
    assert e.value.code == 2 and "already holds finished lines: --resume to continue that job" in capsys.readouterr().err
    rc, _, err = run_cli(capsys, *job, "--overwrite")  # a fresh start over anything there
    assert rc == 0 and list(records(out)) == ["b"]


def test_a_sampled_job_of_the_seed_keyed_sampler_is_not_resumed_with_the_prompt_keyed_one(tmp_path, capsys):
    """A job that samples records what its keys mix (the seed and the prompt since 2026-11-28): an output started
    before, whose sampled tokens came from the seed alone, is not finished with the other sampler; a greedy job,
    whose tokens no key decides, resumes either way."""
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text('{"id": "a", "prompt": "x"}\n{"id": "b", "prompt": "y", "temperature": 0.8}\n')
    job = ("--input", inp, "--output", out, "--max-new-tokens", "2", "--dtype", "float32")
    assert run_cli(capsys, *job)[0] == 0
    meta = json.loads((tmp_path / "out.meta.json").read_text())
    assert meta["sampling_keys"] == "seed and prompt"
    (tmp_path / "out.meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "sampling_keys"}))
    out.write_text(out.read_text().splitlines(keepends=True)[0])  # one line left to run
    rc, _, err = run_cli(capsys, *job, "--resume")
    assert rc == 2 and ("it was started with sampling_keys 'seed (moe-jax before 2026-11-28)', this run has 'seed and "
                        "prompt'") in err, err
    inp.write_text('{"id": "a", "prompt": "x"}\n{"id": "b", "prompt": "y"}\n')  # greedy: no key decides a token
    rc, _, err = run_cli(capsys, *job, "--resume")
    assert rc == 0, err
    assert "sampling_keys" not in json.loads((tmp_path / "out.meta.json").read_text())


def test_resume_is_refused_where_a_finished_requests_line_changed(tmp_path, capsys, caplog):
    """A finished id whose input line now asks for something else (a line added above lines without ids
    renumbers them; an id kept with another prompt) is refused, naming the line; an unfinished line may change,
    and its record follows what ran; a number written otherwise (1 for 1.0) is no change; an output whose meta
    file records no requests is resumed unchecked."""
    from moe_jax.job_requests import JobRequest

    inp, out, meta_file = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "out.meta.json"
    job = ("--input", inp, "--output", out, "--max-new-tokens", "2", "--dtype", "float32")
    inp.write_text('{"prompt": "A", "temperature": 0}\n{"prompt": "B"}\n')
    assert run_cli(capsys, *job)[0] == 0
    first = out.read_text()
    inp.write_text('{"prompt": "NEW"}\n{"prompt": "A", "temperature": 0}\n{"prompt": "B"}\n')
    rc, _, err = run_cli(capsys, *job, "--resume")
    assert rc == 2 and "2 of its finished requests ask for something else in" in err
    assert "line 1 (id 1), line 2 (id 2): restore those lines, or write to a new --output" in err
    assert out.read_text() == first  # nothing written, nothing lost
    inp.write_text('{"prompt": "A", "temperature": 0.0}\n{"prompt": "B", "max_new_tokens": 1}\n')
    rc, _, err = run_cli(capsys, *job, "--resume")
    assert rc == 2 and "line 2 (id 2)" in err and "line 1 (id 1)" not in err  # 0.0 is 0
    out.write_text(first.splitlines(keepends=True)[0])  # line 2's result lost: it runs again, changed
    inp.write_text('{"prompt": "A", "temperature": 0.0}\n{"prompt": "B2"}\n{"id": "c", "prompt": "C"}\n')
    assert run_cli(capsys, *job, "--resume")[0] == 0
    assert sorted(records(out), key=str) == [1, 2, "c"]
    recorded = dict(map(tuple, json.loads(meta_file.read_text())["requests"]))
    assert recorded[2] == JobRequest(2, 2, "B2").fingerprint() != JobRequest(2, 2, "B").fingerprint()
    # the digests jobs recorded before a line's empty "stop" meant none whatever --stop says: no "stop", an empty
    # one (null, [] as OpenAI batch files write it) and a stop string each keep theirs, so those jobs resume
    assert JobRequest(1, 1, "x", stop=()).fingerprint() == JobRequest(1, 1, "x").fingerprint() == "7e2b07ff93a9b00c"
    assert JobRequest(1, 1, "x", stop=("a",)).fingerprint() == "12cd5aa63222745a"
    digests = {JobRequest(1, 1, "x", sampling={f: v}).fingerprint() for f, v in (
        ("seed", 3), ("top_p", 0.5), ("top_k", 4), ("temperature", 0.7), ("max_new_tokens", 9), ("logprobs", 2))}
    assert len(digests - {JobRequest(1, 1, "x").fingerprint()}) == 6  # each field a line asks for is in its digest
    inp.write_text('{"prompt": "A", "temperature": 0}\n{"prompt": "B"}\n{"id": "c", "prompt": "C"}\n')
    rc, _, err = run_cli(capsys, *job, "--resume")
    assert rc == 2 and "line 2 (id 2)" in err  # B2 is what finished
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({k: v for k, v in meta.items() if k != "requests"}))
    with caplog.at_level("WARNING", logger="moe_jax"):
        assert run_cli(capsys, *job, "--resume")[0] == 0  # written before requests were recorded: unchecked
    assert "records no requests, so whether the 3 finished ones are still those of" in caplog.text


def test_a_resume_without_temperature_takes_the_recorded_one(tmp_path, capsys, caplog):
    """As the printed resume command gives it, and for an OpenAI batch output started when such files defaulted
    to 0 (now OpenAI's 1)."""
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text('{"id": "a", "prompt": "x"}\n')
    job = ("--input", inp, "--output", out, "--max-new-tokens", "2", "--dtype", "float32")
    assert run_cli(capsys, *job, "--temperature", "0.5")[0] == 0
    inp.write_text('{"id": "a", "prompt": "x"}\n{"id": "b", "prompt": "y"}\n')
    with caplog.at_level("INFO", logger="moe_jax"):
        rc, _, err = run_cli(capsys, *job, "--resume")
    assert rc == 0 and f"resuming with the temperature {out} was started with, 0.5" in caplog.text, err
    assert sorted(records(out)) == ["a", "b"]


def test_an_interrupt_before_the_output_is_started_leaves_it_and_says_so(tmp_path):
    """SIGINT while a fresh (--overwrite) job loads: the old output is as it was, and the command printed runs
    the job again as given (a resume would keep the old lines)."""
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text('{"prompt": "A"}\n')
    out.write_text('{"id": "old", "token_ids": [1], "text": "x", "finish_reason": "length"}\n')
    args = ["--input", str(inp), "--output", str(out), "--overwrite", "--max-new-tokens", "4"]
    proc = subprocess.Popen([sys.executable, "-m", "moe_jax.generate", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if "policy auto -> resident" in line:  # the engine is being built: the output is not started yet
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == 130, rest
    assert f"interrupted before this job wrote to {out} (it is as it was); to run it again: " in rest
    assert shlex.join([sys.executable, "-m", "moe_jax.generate", *args]) in rest and "--resume" not in rest
    assert list(records(out)) == ["old"]


def test_killed_job_resumes_to_the_uninterrupted_outputs(tmp_path, long_job):
    inp, reference = long_job
    out = tmp_path / "out.jsonl"
    proc, args = start_job(inp, out, tmp_path / "err.txt")
    proc.kill()
    proc.wait()
    assert 1 <= len(records(out)) < LONG_N  # killed in the middle, whole lines only
    assert main([*args, "--resume"]) == 0
    assert records(out) == reference  # every id exactly once, greedy outputs identical


def test_sigint_keeps_whole_lines_and_prints_the_resume_command(tmp_path, long_job):
    """The printed command (this interpreter, --overwrite dropped, --resume added) resumes the job."""
    inp, reference = long_job
    out, err = tmp_path / "out.jsonl", tmp_path / "err.txt"
    proc, args = start_job(inp, out, err, "--overwrite")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    done = records(out)
    assert 1 <= len(done) < LONG_N and all(done[i] == reference[i] for i in done)
    message = err.read_text()
    assert "interrupted by SIGINT" in message and "Traceback" not in message
    kept = [a for a in args if a != "--overwrite"]
    command = shlex.join([sys.executable, "-m", "moe_jax.generate", *kept, "--resume"])
    assert f"to resume: {command}\n" in message
    assert main(shlex.split(command)[3:]) == 0
    assert records(out) == reference


@pytest.mark.parametrize("after, delay", [("policy auto -> resident", 0), ("moe_ffn: impl=", 0.2),
                                          ("moe_ffn: impl=", 0.5)])
def test_an_early_sigint_exits_130_not_a_crash(after, delay):
    """SIGINT while the engine is built or compiles its first steps (`delay` s after the line `after`; XLA's
    threads busy): the exit code, not a crash in the interpreter's teardown (before the fix, a segfault after
    the message whenever the signal came 0.2-0.8 s after "moe_ffn: impl=" on the 2-core VM)."""
    proc = subprocess.Popen([sys.executable, "-m", "moe_jax.generate", "--prompt", "Hi", "--max-new-tokens", "512"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONFAULTHANDLER": "1"})
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if after in line:
            time.sleep(delay)
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == 130, "".join(lines) + rest
    assert "interrupted by SIGINT" in rest and "Fatal Python error" not in rest


def test_sigterm_exits_143_and_restores_the_handlers(tmp_path, long_job, capsys):
    inp, _ = long_job
    out = tmp_path / "out.jsonl"
    previous = signal.signal(signal.SIGTERM, lambda *_: None)  # a late signal must not kill pytest
    try:
        def terminate_after_first_line():
            deadline = time.monotonic() + 240
            while whole_lines(out) < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            os.kill(os.getpid(), signal.SIGTERM)

        threading.Thread(target=terminate_after_first_line, daemon=True).start()
        rc, _, err = run_cli(capsys, "--input", inp, "--output", out, *LONG_ARGS)
        assert rc == 143 and "interrupted by SIGTERM" in err and "--resume" in err
        assert 1 <= len(records(out)) < LONG_N
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_progress_logs_plain_lines_when_not_a_terminal(caplog):
    with caplog.at_level(logging.INFO, logger="moe_jax"):
        p = Progress(total=2, every_s=0.0)
        p.update(1, 10)
        p.update(1, 6)
        p.close()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("progress:")]
    assert len(lines) == 2 and lines[-1].startswith("progress: 2/2 requests, 16 tokens,") and "tok/s, ETA" in lines[-1]


def test_progress_says_the_rate_and_the_time_left(caplog, monkeypatch):
    """tok/s over the time since the start, and the ETA of the requests left at the time each one took so far."""
    import types

    import moe_jax.progress

    clock = iter([100.0, 102.0, 110.0])
    monkeypatch.setattr(moe_jax.progress, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    with caplog.at_level(logging.INFO, logger="moe_jax"):
        p = Progress(total=4, every_s=0.0)
        p.update(1, 10)  # at 2 s: 5 tok/s, 3 requests left at 2 s each
        p.update(1, 30)  # at 10 s: 4 tok/s, 2 left at 5 s each
        p.close()
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("progress:")] == [
        "progress: 1/4 requests, 10 tokens, 5.0 tok/s, ETA 6 s", "progress: 2/4 requests, 40 tokens, 4.0 tok/s, ETA 10 s"]


def test_duplicate_prompts_sample_independently_unless_seeded(tmp_path, capsys):
    """Each request draws from its own seed (the job's seed and its id); a line's "seed" fixes it, and a line's
    sampling fields replace the flags for that line."""
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "prompt": "same prompt"}) + "\n" for i in range(3))
                   + "".join(json.dumps({"id": f"s{i}", "prompt": "same prompt", "seed": 5}) + "\n" for i in range(2))
                   + json.dumps({"id": "greedy", "prompt": "same prompt", "temperature": 0, "max_new_tokens": 3}) + "\n")
    assert run_cli(capsys, "--input", inp, "--output", out, "--temperature", "1.0", "--max-new-tokens", "8")[0] == 0
    toks = {json.loads(l)["id"]: tuple(json.loads(l)["token_ids"]) for l in out.read_text().splitlines()}
    assert len({toks[0], toks[1], toks[2]}) == 3 and toks["s0"] == toks["s1"]
    greedy = moe_jax.LLM("tiny-mixtral", policy="resident").generate(["same prompt"], SamplingParams(max_new_tokens=3))
    assert toks["greedy"] == tuple(greedy[0].token_ids)


def test_stop_strings_from_the_flag_and_from_lines(tmp_path, capsys):
    """--stop applies to every line without its own "stop"; a line's "stop" replaces it (an empty list or null:
    none); both end the request on the token completing the string, the text cut before it."""
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    prompts = {"a": "Hello there", "b": "x"}
    inp.write_text("".join(json.dumps({"id": k, "prompt": p}) + "\n" for k, p in prompts.items()))
    common = ("--max-new-tokens", "24", "--dtype", "float32", "--policy", "resident")
    assert run_cli(capsys, "--input", inp, "--output", out, *common)[0] == 0
    full = records(out)
    stop_a, stop_b = (next(t[i:i + 2] for i in range(len(t) // 3, len(t) - 1) if "\ufffd" not in t[i:i + 2])
                      for t in (full["a"]["text"], full["b"]["text"]))
    inp.write_text(json.dumps({"id": "a", "prompt": prompts["a"]}) + "\n"
                   + json.dumps({"id": "b", "prompt": prompts["b"], "stop": [stop_b]}) + "\n"
                   + json.dumps({"id": "a-none", "prompt": prompts["a"], "stop": []}) + "\n"
                   + json.dumps({"id": "a-null", "prompt": prompts["a"], "stop": None}) + "\n")
    rc, _, err = run_cli(capsys, "--input", inp, "--output", out, "--stop", stop_a, *common, "--overwrite")
    assert rc == 0, err
    got = records(out)
    for k, stop in (("a", stop_a), ("b", stop_b)):
        text = full[k]["text"]
        assert got[k]["text"] == text[:text.find(stop)] and got[k]["finish_reason"] == "stop"
        assert got[k]["token_ids"] == full[k]["token_ids"][:len(got[k]["token_ids"])] < full[k]["token_ids"]
    for k in ("a-none", "a-null"):
        assert (got[k]["text"], got[k]["finish_reason"]) == (full["a"]["text"], "length"), k


def test_stop_strings_need_a_tokenizer(tmp_path, capsys, hf_checkpoints):
    model = hf_checkpoints["mixtral"][0]  # no tokenizer.json
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"prompt_token_ids": [1, 2, 3]}\n{"prompt_token_ids": [4, 5], "stop": "x"}\n{"prompt_token_ids": [4], "stop": 3}\n')
    rc, _, err = run_cli(capsys, "--model", model, "--input", inp)
    assert rc == 2 and "in.jsonl:2: stop strings need a model with tokenizer.json" in err
    assert "in.jsonl:3: 'stop' must be a string or a list of strings, got 3" in err
    inp.write_text('{"prompt_token_ids": [1, 2, 3]}\n')
    rc, _, err = run_cli(capsys, "--model", model, "--input", inp, "--stop", "x")
    assert rc == 2 and "--stop needs a model with tokenizer.json" in err


def test_logprobs_in_output_lines(tmp_path, capsys, reference):
    """--logprobs and a line's own "logprobs" put the completion's logprobs (and top tokens) in its line; a
    line asking for none has neither field; --prompt prints the line as JSON."""
    got = float32_job(tmp_path, capsys, '{"id": "a", "prompt": "hello", "logprobs": 2}\n{"id": "b", "prompt": "abc"}\n'
                                        '{"id": "c", "prompt_token_ids": [5, 6, 7], "logprobs": 0}\n', 3)
    want = reference.generate(["hello", [5, 6, 7]],
                        [SamplingParams(max_new_tokens=3, logprobs=2, seed=request_seed(0, "a")),
                         SamplingParams(max_new_tokens=3, logprobs=0, seed=request_seed(0, "c"))])
    assert "logprobs" not in got["b"] and "top_logprobs" not in got["b"] and "top_logprobs" not in got["c"]
    for rid, c in zip("ac", want):
        assert got[rid]["token_ids"] == c.token_ids
        np.testing.assert_allclose(got[rid]["logprobs"], c.logprobs, rtol=1e-6)
    assert got["a"]["top_logprobs"] == [[list(p) for p in top] for top in want[0].top_logprobs]
    rc, printed, _ = run_cli(capsys, "--prompt", "hello", "--logprobs", "1", "--max-new-tokens", "3", "--dtype", "float32")
    line = json.loads(printed)
    assert rc == 0 and line["token_ids"] == want[0].token_ids and len(line["top_logprobs"][0]) == 1


def test_output_lines_stay_json_whatever_the_floats(tmp_path):
    """JSON has no NaN or infinity: such a logprob is written as null, and the line still parses. The line is
    handed to the OS at its write, before any close (a process killed then keeps it)."""
    from moe_jax.job_output import CompletionWriter

    out = tmp_path / "out.jsonl"
    writer = CompletionWriter(out)
    writer.write({"id": "a", "logprobs": [-0.5, float("nan"), float("-inf")], "top_logprobs": [[[3, float("nan")]]]})
    line = out.read_text()
    writer.close()
    assert out.read_text() == line
    assert "NaN" not in line and "Infinity" not in line
    assert json.loads(line) == {"id": "a", "logprobs": [-0.5, None, None], "top_logprobs": [[[3, None]]]}


def test_n_completions_in_a_plain_line(tmp_path, capsys, reference):
    """A plain line's "n": its line holds "choices", each as a one-completion line would have it (sampled with
    the request's seed, then that seed mixed with the choice's number); lines without n keep the flat shape."""
    from moe_jax.generate import sample_seed

    got = float32_job(tmp_path, capsys, '{"id": "a", "prompt": "hello", "n": 3, "temperature": 1.0, "logprobs": 0}\n'
                                        '{"id": "b", "prompt": "hello", "temperature": 1.0}\n', 4)
    seed = request_seed(0, "a")
    want = reference.generate(["hello"] * 3, [SamplingParams(max_new_tokens=4, temperature=1.0, logprobs=0,
                                                       seed=sample_seed(seed, i)) for i in range(3)])
    assert set(got["a"]) == {"id", "choices"} and [ch["token_ids"] for ch in got["a"]["choices"]] == \
        [w.token_ids for w in want]
    assert all(len(ch["logprobs"]) == len(ch["token_ids"]) for ch in got["a"]["choices"])
    assert {"token_ids", "text", "finish_reason"} <= set(got["b"]) and "choices" not in got["b"]
    assert {sample_seed(0, i) for i in (1, 2, 3)}.isdisjoint({request_seed(0, i) for i in (1, 2, 3)})  # line ids
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "n": 0}\n')
    rc, _, err = run_cli(capsys, "--input", bad, "--output", tmp_path / "o3.jsonl")
    assert rc == 2 and "bad.jsonl:1: 'n' must be an integer in 1..64, got 0" in err


def test_one_run_at_a_time_writes_an_output(tmp_path, capsys):
    """A run holds OUT.lock while it runs: a second run on the same OUT fails at once, naming the holder, and
    leaves OUT as it was; the lock is gone once a run ends."""
    from moe_jax.job_output import output_lock

    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text('{"id": "a", "prompt": "x"}\n{"id": "b", "prompt": "y"}\n')
    job = ("--input", inp, "--output", out, "--max-new-tokens", "2", "--dtype", "float32")
    assert run_cli(capsys, *job)[0] == 0 and not (tmp_path / "out.lock").exists()
    before = out.read_bytes()
    with output_lock(out):
        for more in (("--resume",), ("--overwrite",)):
            rc, _, err = run_cli(capsys, *job, *more)
            assert rc == 2 and f"--output {out} is being written by another run (pid {os.getpid()}, which holds" in err
            assert out.read_bytes() == before
    assert run_cli(capsys, *job, "--resume")[0] == 0 and out.read_bytes() == before


def test_files_that_cannot_be_read_or_written_are_error_lines(tmp_path, capsys, monkeypatch):
    """An input path through a file, an output directory that takes no files (found before the model loads),
    and a write that fails mid-job (a full disk): one error line each, no traceback; the last keeps what finished
    and says how to resume."""
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "prompt": "x" * (i + 1)}) + "\n" for i in range(3)))
    rc, _, err = run_cli(capsys, "--input", inp / "x")
    assert rc == 2 and f"error: {inp / 'x'}: cannot read it (Not a directory)" in err and "Traceback" not in err
    rc, _, err = run_cli(capsys, "--input", inp, "--output", "/proc/out.jsonl")
    assert rc == 2 and "error: --output /proc/out.jsonl: cannot write in /proc (" in err and "Traceback" not in err
    out = tmp_path / "out.jsonl"
    real_write, calls = moe_jax.job_output.CompletionWriter.write, []

    def write_then_fill_the_disk(self, record):
        calls.append(record)
        if len(calls) > 1:
            with moe_jax.job_output._writing(self.path):
                raise OSError(28, "No space left on device")
        real_write(self, record)
    monkeypatch.setattr(moe_jax.job_output.CompletionWriter, "write", write_then_fill_the_disk)
    rc, _, err = run_cli(capsys, "--input", inp, "--output", out, "--max-new-tokens", "2", "--max-batch-size", "1")
    assert rc == 2 and f"error: {out}: cannot write (No space left on device)" in err and "Traceback" not in err
    assert len(records(out)) == 1 and "--resume" in err.split("to resume: ")[1]
    monkeypatch.setattr(moe_jax.job_output.CompletionWriter, "write", real_write)
    rc, _, err = run_cli(capsys, "--input", inp, "--output", out, "--max-new-tokens", "3", "--resume")
    assert rc == 2 and "it was started with max_new_tokens 2" in err and "to resume" not in err  # not a write error


def test_a_full_disk_is_an_output_error_through_the_writers_close():
    """A real failed write leaves its bytes in the file's buffer, whose flush at close fails again: that is an
    OutputError too, not an OSError past the CLI's handler (/dev/full: every write is ENOSPC)."""
    from moe_jax.job_output import CompletionWriter, OutputError

    writer = CompletionWriter(Path("/dev/full"))
    with pytest.raises(OutputError, match="/dev/full: cannot write \\(No space left on device\\)"):
        writer.write({"id": 1, "text": "x"})
    with pytest.raises(OutputError, match="/dev/full: cannot write"):
        writer.close()


def test_a_resume_warns_of_repeated_ids_in_the_output(tmp_path, capsys, caplog):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text('{"id": "a", "prompt": "x"}\n{"id": "b", "prompt": "y"}\n')
    job = ("--input", inp, "--output", out, "--max-new-tokens", "2", "--dtype", "float32")
    assert run_cli(capsys, *job)[0] == 0
    first = out.read_text().splitlines(keepends=True)[0]
    out.write_text(first + first)  # as two runs writing at once left it, before runs took OUT.lock
    with caplog.at_level("WARNING", logger="moe_jax"):
        assert run_cli(capsys, *job, "--resume")[0] == 0
    assert "holds 1 lines whose id an earlier line has (two runs writing it at once?), e.g. line 2" in caplog.text


def test_json_nested_too_deeply_is_a_bad_line(tmp_path, capsys):
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"prompt": "x"}\n' + "[" * 100_000 + "\n")
    rc, _, err = run_cli(capsys, "--input", inp)
    assert rc == 2 and "in.jsonl:2: JSON nested too deeply to read" in err and "Traceback" not in err
