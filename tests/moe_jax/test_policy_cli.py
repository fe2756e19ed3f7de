"""`python -m moe_jax.policy`, run as a subprocess."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run(*args):
    return subprocess.run([sys.executable, "-m", "moe_jax.policy", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_json_and_plot(tmp_path):
    plot = tmp_path / "roofline.png"
    p = run("--model", "mixtral-8x7b", "--hardware", "l4", "--prompt-len", "77", "--gen-len", "32", "--json",
            "--plot", str(plot))
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    for key in ("batch_size", "micro_batch_size", "num_micro_batches", "resident_expert_fraction",
                "attention_device", "kv_device", "per_layer_seconds", "bottleneck",
                "predicted_decode_tokens_per_s", "predicted_tokens_per_s"):
        assert key in d
    assert set(d["per_layer_seconds"]) == {"h2d", "cpu", "gpu"}
    assert d["batch_size"] == d["micro_batch_size"] * d["num_micro_batches"]
    assert plot.stat().st_size > 0


def test_summary_from_checkpoint_dir(tmp_path):
    from moe_jax.presets import preset_hf_config

    (tmp_path / "config.json").write_text(json.dumps(preset_hf_config("qwen3-30b-a3b")))
    p = run("--model", str(tmp_path), "--hardware", "t4", "--prompt-len", "128", "--gen-len", "64")
    assert p.returncode == 0, p.stderr
    assert "policy: N=" in p.stdout and "tok/s" in p.stdout


def test_expert_codec_plans_coded_streaming(tmp_path):
    args = ("--model", "mixtral-8x7b", "--hardware", "h100-80gb", "--prompt-len", "77", "--gen-len", "64",
            "--gpu-memory-gb", "16", "--json")
    plain, coded = (json.loads(run(*args, *extra).stdout) for extra in ([], ["--expert-codec", "exp4"]))
    assert (plain["expert_codec"], coded["expert_codec"]) == ("none", "exp4")
    assert coded["per_layer_seconds"]["h2d"] < plain["per_layer_seconds"]["h2d"]
    assert coded["pinned_pool_gib"] < plain["pinned_pool_gib"] and coded["batch_size"] > plain["batch_size"]
    plot = tmp_path / "roofline.png"
    p = run(*args[:-1], "--expert-codec", "exp4", "--plot", str(plot))
    assert p.returncode == 0 and "experts streamed coded (exp4)" in p.stdout and plot.stat().st_size > 0


def test_int8_kv_cache_plans_a_larger_batch():
    args = ("--model", "mixtral-8x7b", "--hardware", "h100-80gb", "--prompt-len", "512", "--gen-len", "256",
            "--gpu-memory-gb", "24")
    plain, small = (json.loads(run(*args, "--json", *extra).stdout) for extra in ([], ["--kv-cache-dtype", "int8"]))
    assert (plain["kv_cache_dtype"], small["kv_cache_dtype"]) == ("auto", "int8")
    assert small["batch_size"] > 1.6 * plain["batch_size"]
    p = run(*args, "--kv-cache-dtype", "int8")
    assert p.returncode == 0 and "KV cache on cpu (int8)" in p.stdout


def test_plans_what_the_engine_runs_unless_asked_and_plots_a_fully_resident_policy(tmp_path):
    """By default only CPU attention over a host KV cache (what the offload engine runs) is planned; with
    --gpu-attention HRM may plan attention on the GPU and says the engine does not run it. A policy with every
    expert resident (nothing on the link) plots too."""
    args = ("--model", "qwen3-30b-a3b", "--hardware", "h100-80gb", "--prompt-len", "77", "--gen-len", "64")
    engine, hrm_only = (json.loads(run(*args, "--json", *extra).stdout) for extra in ([], ["--gpu-attention"]))
    assert (engine["attention_device"], engine["kv_device"]) == ("cpu", "cpu")
    assert hrm_only["attention_device"] == "gpu"
    assert "HRM's plan only" in run(*args, "--gpu-attention").stdout
    plot = tmp_path / "olmoe.svg"
    p = run("--model", "olmoe-1b-7b", "--hardware", "h100-80gb", "--prompt-len", "77", "--gen-len", "64", "--plot",
            str(plot))
    assert p.returncode == 0, p.stderr
    assert "r_w=1.000" in p.stdout and plot.stat().st_size > 0


def test_a_model_saved_by_moe_jax(tmp_path):
    from moe_jax.flax_model import MoEDecoder

    MoEDecoder.from_pretrained("tiny-qwen3-moe").save(tmp_path / "saved")
    p = run("--model", str(tmp_path / "saved"), "--hardware", "t4", "--prompt-len", "16", "--gen-len", "8")
    assert p.returncode == 0 and "policy: N=" in p.stdout, p.stderr


@pytest.mark.parametrize("hardware, extra, message", [
    ("v100", [], "unknown hardware 'v100'"),
    ("BAD_JSON", [], "invalid JSON"),
    ("l4", ["--host-memory-gb", "40"], "host memory too small"),
    ("l4", ["--expert-codec", "exp4", "--dtype", "float32"], "codes bfloat16 weights"),
    ("l4", ["--plot", "/nonexistent/r.png"], "--plot /nonexistent/r.png: give a file name ending in .png"),
    ("l4", ["--plot", "r.xyz"], "--plot r.xyz: give a file name ending in .png, .svg, .pdf"),
])
def test_errors(tmp_path, hardware, extra, message):
    if hardware == "BAD_JSON":
        hardware = str(tmp_path / "bad.json")
        Path(hardware).write_text("{not json")
    p = run("--model", "mixtral-8x7b", "--hardware", hardware, "--prompt-len", "77", "--gen-len", "32", *extra)
    assert p.returncode == 2
    assert p.stdout == "" and len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr
    assert message in p.stderr


def test_a_plan_past_jax_share_of_a_built_in_card_says_how_to_run_it():
    """The built-in h100-80gb profile holds the card's 79.6 GiB; a JAX process allocates 0.75 of it unless
    XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise: a plan over that says so, and the cap it names plans within it."""
    args = ("--model", "mixtral-8x7b", "--hardware", "h100-80gb", "--prompt-len", "512", "--gen-len", "256")
    p = run(*args)
    assert p.returncode == 0, p.stderr
    assert ("more than the 0.75 of 79.6 GiB a JAX process allocates (XLA_PYTHON_CLIENT_MEM_FRACTION): set "
            "XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 before JAX starts, or plan with --gpu-memory-gb 59.7") in p.stdout
    capped = run(*args, "--gpu-memory-gb", "59.7", "--json")
    assert capped.returncode == 0 and "note:" not in capped.stderr + capped.stdout
    assert json.loads(capped.stdout)["gpu_memory_gib"] <= 59.7


def test_max_batch_size_caps_the_plan():
    args = ("--model", "mixtral-8x7b", "--hardware", "l4", "--prompt-len", "77", "--gen-len", "32", "--json")
    assert json.loads(run(*args).stdout)["batch_size"] > 64
    assert json.loads(run(*args, "--max-batch-size", "64").stdout)["batch_size"] <= 64


def test_the_summary_and_the_json_report_the_same_prediction():
    args = ("--model", "mixtral-8x7b", "--hardware", "l4", "--prompt-len", "77", "--gen-len", "32")
    d, text = json.loads(run(*args, "--json").stdout), run(*args).stdout
    assert d["predicted_decode_tokens_per_s"] == pytest.approx(d["batch_size"] / d["step_seconds"])
    assert d["predicted_tokens_per_s"] < d["predicted_decode_tokens_per_s"]
    assert (f"predicted: decode {d['predicted_decode_tokens_per_s']:.1f} tok/s, end to end "
            f"{d['predicted_tokens_per_s']:.1f} tok/s") in text


def test_a_host_cap_alone_still_gets_the_jax_share_note():
    """A host memory cap does not cap the GPU: a plan past JAX's share of the built-in card still says so."""
    p = run("--model", "mixtral-8x7b", "--hardware", "h100-80gb", "--prompt-len", "512", "--gen-len", "256",
            "--host-memory-gb", "100")
    assert p.returncode == 0, p.stderr
    assert "more than the 0.75 of 79.6 GiB a JAX process allocates" in p.stdout
