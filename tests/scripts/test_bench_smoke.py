"""The offload benchmarks run end to end on a tiny preset on CPU (timings are not checked), their HRM
prediction for a given policy agrees with HRM's own search, and the PyTorch baseline's checkpoint
holds the same model as ours, which its offloaded placement runs as the plain model does."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import bench_common  # noqa: E402
from moe_jax.compile_count import Compiles  # noqa: E402
from moe_jax.offload_policy import Policy  # noqa: E402
from tests.conftest import reference  # noqa: E402

TINY = ["--model", "tiny-mixtral", "--gpu-memory-gb", "1", "--hardware", "h100-80gb", "--link-probe-mib", "16"]


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, f"scripts/{name}", *args], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def last_table_header(stdout: str) -> str:
    return next(line for line in stdout.splitlines() if line.startswith("| "))


def test_bench_continuous_batching(tmp_path):
    results = tmp_path / "RESULTS.md"
    p = run_script("bench_continuous_batching.py", "--model", "tiny-mixtral", "--gpu-memory-gb", "1", "--policy",
                   "4,2,2,0.5", "--num-prompts", "10", "--gen-min", "1", "--gen-max", "12", "--repeats", "2",
                   "--append-results", str(results))
    rows = [line.split("|") for line in p.stdout.splitlines() if line.startswith(("| continuous", "| waves"))]
    assert [r[1].strip() for r in rows] == ["continuous", "waves"] and rows[0][2] == rows[1][2]  # same tokens
    assert int(rows[0][5]) < int(rows[1][5])  # fewer decode steps
    assert "continuous / waves" in results.read_text()


def test_bench_offload(tmp_path):
    out, results = tmp_path / "offload.json", tmp_path / "RESULTS.md"
    p = run_script("bench_offload.py", *TINY, "--prompt-len", "8", "--gen-len", "4", "--num-prompts", "6",
                   "--policies", "auto;6,3,2,0.5", "--expert-codec", "exp4", "--kv-cache-dtype", "int8", "--json", str(out),
                   "--append-results", str(results))
    assert "overlap" in last_table_header(p.stdout) and "load + KV s" in last_table_header(p.stdout)
    assert p.stdout.rstrip().splitlines()[-1]
    d = json.loads(out.read_text())
    assert {"command", "device", "layers", "link_bytes_per_s", "runs"} <= d.keys() and len(d["runs"]) == 2
    for run in d["runs"]:
        assert {"policy", "tok_s", "decode_tok_s", "load_s", "per_layer_s", "overlap_efficiency", "peak_gpu_gib",
                "hrm", "measured_over_predicted", "prepare_s", "kv_fault_in_s"} <= run.keys()
        assert run["prepare_s"] >= run["kv_fault_in_s"] >= 0  # the cache kept for the warm-up and the timed run
        assert set(run["per_layer_s"]) == {"h2d_est", "cpu", "cpu_kernel", "cpu_write", "cpu_handoff", "cpu_fetch", "gpu_probe", "gpu_wait", "main_wait", "step"}
        assert run["tokens"] == 6 * 4
        assert run["compiles"] == 0, run["compile_s"]  # the warm-up compiled every shape the timed run took
    assert d["runs"][0]["warmup_compiles"] > 0 and d["runs"][0]["warmup_compile_s"] > 0
    assert d["runs"][1]["policy"]["micro_batch_size"] == 3
    assert [run["policy"]["expert_codec"] for run in d["runs"]] == ["exp4", "exp4"]
    assert [run["policy"]["kv_cache_dtype"] for run in d["runs"]] == ["int8", "int8"]
    assert "bench_offload.py" in results.read_text()


def test_bench_throughput_with_baseline(tmp_path):
    reference("torch", "transformers")  # the baseline (scripts/hf_baseline.py; accelerate only with a GPU)
    out, png = tmp_path / "throughput.json", tmp_path / "throughput.png"
    p = run_script("bench_throughput.py", *TINY, "--workloads", "mtbench:4", "--policies", "auto",
                   "--num-prompts", "6", "--baseline-batch", "4", "--baseline-gen-len", "3", "--json", str(out),
                   "--plot", str(png))
    assert "MoE-Lightning" in p.stdout and "PyTorch baseline" in p.stdout
    d = json.loads(out.read_text())
    assert {"runs", "baseline", "ours_on_baseline_workload", "link_bytes_per_s", "first_token_agreement"} <= d.keys()
    assert {"tok_s", "hrm", "vs_published"} <= d["runs"][0].keys()
    base = d["baseline"]
    assert "error" not in base, base
    assert {"mode", "tok_s_measured", "tok_s_full_model", "scale_to_full", "experts_implementation"} <= base.keys()
    assert d["ours_on_baseline_workload"]["tokens"] == base["tokens"] == 4 * 3
    assert base["mode"].startswith("plain transformers on CPU")  # no GPU here: a smoke test, and no ratio
    assert "no moe-jax / transformers ratio: the baseline ran without offload (plain transformers" in p.stdout
    import bench_throughput as bt

    offloaded = dict(base, mode="accelerate CPU offload", tok_s_full_model=2.0)
    ours = dict(d["ours_on_baseline_workload"], tok_s=30.0)
    assert "moe-jax / transformers on that workload, full model: **15.0x**" in bt.report(
        [], offloaded, ours, None, 2, True, 1e9, None, False)
    assert png.stat().st_size > 0


def test_bench_throughput_keeps_the_loaded_engine(tmp_path):
    """--keep-engine: a later run at the same cap keeps the first run's engine (its micro-batch count and resident
    experts), rebatched to HRM's best N and μ for it, with nothing reloaded and HRM's own policy reported beside."""
    out = tmp_path / "throughput.json"
    p = run_script("bench_throughput.py", *TINY, "--workloads", "mtbench:4", "--policies", "4,2,2,0;auto",
                   "--num-prompts", "6", "--keep-engine", "--no-baseline", "--json", str(out))
    first, kept = json.loads(out.read_text())["runs"]
    assert first["policy"]["batch_size"] == 4 and first["load_s"] > 0
    assert (kept["policy"]["num_micro_batches"], kept["policy"]["resident_expert_fraction"]) == (2, 0)
    assert kept["policy"]["batch_size"] == 6 and kept["load_s"] == 0 and kept["tokens"] == 6 * 4
    assert first["compiles"] == kept["compiles"] == 0  # the rebatched engine's warm-up compiled its new shapes
    assert kept["hrm_own"]["policy"]["resident_expert_fraction"] > 0 and kept["hrm_own"]["tok_s"] > 0
    assert "rebatched to" in p.stderr and "on the loaded engine (HRM's own: N=" in p.stdout


def test_bench_throughput_reports_the_baseline_when_our_setup_fails(tmp_path):
    """'auto' with no HRM profile (no --hardware, no GPU) fails after the PyTorch baseline ran: its figure is
    still printed and saved, with our error beside it, and the exit code says it failed."""
    reference("torch", "transformers")  # the baseline (scripts/hf_baseline.py; accelerate only with a GPU)
    out = tmp_path / "throughput.json"
    p = subprocess.run([sys.executable, "scripts/bench_throughput.py", "--model", "tiny-mixtral", "--gpu-memory-gb", "1",
                        "--link-probe-mib", "16", "--workloads", "mtbench:4", "--policies", "auto", "--baseline-batch",
                        "2", "--baseline-gen-len", "2", "--json", str(out)], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=240)
    assert p.returncode == 1, p.stderr[-3000:]
    d = json.loads(out.read_text())
    assert d["baseline"]["tokens"] == 2 * 2 and "needs an HRM hardware profile" in d["ours_on_baseline_workload"]["error"]
    assert "PyTorch baseline" in p.stdout and "ERROR: policy auto needs an HRM hardware profile" in p.stdout


def test_bench_throughput_predicts_without_running(capsys):
    """--predict-only: HRM's policy and figures for each run, as the runs would choose them, and nothing run."""
    import bench_throughput as bt

    assert bt.main(["--predict-only", "--hardware", "h100-80gb", "--workloads", "mtbench:64",
                    "--policies", "auto;64,32,2,0"]) == 0
    out = capsys.readouterr().out
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| mtbench")]
    assert [r[3].strip().startswith("N=") for r in rows] == [True, True] and rows[1][3].strip().startswith("N=64 ")
    assert all(float(r[4]) > 0 and r[7].split(";")[0].strip() in ("h2d", "cpu", "gpu") for r in rows)
    from moe_jax import hrm

    link = hrm.hardware_profile("h100-80gb").link_bandwidth  # e2e scaled to MoE-Lightning's 16 GB/s link
    assert all(float(r[8]) == pytest.approx(float(r[4]) * 16e9 / link, rel=1e-2, abs=0.06) for r in rows)
    with pytest.raises(SystemExit):
        bt.parse_args(["--predict-only"])  # no profile to predict with


def test_bench_throughput_predictions_mark_fixed_policies_that_do_not_fit(capsys):
    """HRM predicts a fixed policy without memory limits: --predict-only says where it would not fit, and where
    host memory (the KV cache) caps HRM's own batch."""
    import bench_throughput as bt

    assert bt.main(["--predict-only", "--hardware", "h200", "--workloads", "mtbench:64", "--policies",
                    "auto;2048,1024,2,0", "--gpu-memory-gb", "16"]) == 0
    auto, fixed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| mtbench")]
    assert "does not fit" not in auto and "N: host memory for KV" in auto
    assert "(does not fit: host 125.1 GiB of 112.5 usable)" in fixed


@pytest.mark.parametrize("flags, message", [
    (["--hardware", "h100_80gb"], "--hardware"), (["--policies", ";"], "names no policy"),
    (["--policies", "auto;4,2"], "'N,mu,n_ub,rw'"), (["--link-probe-mib", "0"], "--link-probe-mib"),
    (["--baseline-layers", "0"], "--baseline-layers")])
def test_bench_throughput_refuses_bad_flags_before_running(flags, message, capsys):
    import bench_throughput as bt

    with pytest.raises(SystemExit) as e:
        bt.parse_args(flags)
    assert e.value.code == 2 and message in capsys.readouterr().err


def in_process(monkeypatch, argv: list[str]) -> int:
    """bench_throughput's main in this process (JAX on the CPU), its environment settings undone after."""
    import bench_throughput as bt

    for var in ("XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB", "XLA_PYTHON_CLIENT_PREALLOCATE"):
        monkeypatch.setenv(var, "")  # restored (or removed) after the test
        monkeypatch.delenv(var)
    return bt.main(argv)


def test_bench_throughput_keeps_what_it_measured_when_a_later_run_fails(tmp_path, monkeypatch):
    """A run that fails after others were measured (here, its measurement raises) gives a row with its error;
    the other runs' figures are still printed and saved, and the exit code says one failed."""
    out, results = tmp_path / "throughput.json", tmp_path / "RESULTS.md"
    measure, calls = bench_common.measure_policy, []

    def failing_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("an XLA error, say")
        return measure(*a, **k)

    monkeypatch.setattr(bench_common, "measure_policy", failing_second)
    rc = in_process(monkeypatch, [*TINY, "--workloads", "mtbench:3,mtbench:4,reasoning:2", "--policies", "4,2,2,0",
                                  "--no-baseline", "--no-gpu-probe", "--json", str(out), "--append-results", str(results)])
    runs = json.loads(out.read_text())["runs"]
    assert rc == 1 and len(calls) == 3
    assert runs[0]["tokens"] == 4 * 3 and runs[2]["tokens"] == 4 * 2
    assert runs[1]["error"] == "RuntimeError: an XLA error, say" and "an XLA error, say" in results.read_text()


def test_bench_throughput_probes_a_kept_engines_runs_before_loading_it(tmp_path, monkeypatch):
    """--keep-engine: the GPU probes of the later runs at a cap run before the cap's first load, so that no probe
    stands beside a loaded engine in the process's peak GPU memory (the rows' "peak GiB")."""
    events, build = [], bench_common.build_llm
    monkeypatch.setattr(bench_common, "probe_gpu_layer_seconds",
                        lambda source, policy, *a: events.append(("probe", policy.micro_batch_size)) or 1e-3)
    monkeypatch.setattr(bench_common, "build_llm", lambda source, policy, *a, **k: events.append(("load",)) or
                        build(source, policy, *a, **k))
    assert in_process(monkeypatch, [*TINY, "--workloads", "mtbench:3", "--policies", "4,2,2,0;auto;4,4,1,0",
                                    "--num-prompts", "6", "--keep-engine", "--no-baseline"]) == 0
    # 4,2,2,0, then auto on its engine (N=6 μ=3), probed before the load; 4,4,1,0 changes the layout: a new
    # engine, probed after the old one is dropped, before the new one is loaded
    assert events == [("probe", 2), ("probe", 3), ("load",), ("probe", 4), ("load",)]


class TimedLLM:
    """An LLM as `timed_generate` drives it: its warm-up compiles 5 shapes; its timed run (0.2 s of prefill, then
    `steps` decode steps in 0.5 s) is interrupted by Ctrl-C, or, with `finish`, gives each prompt its tokens."""

    policy = Policy(batch_size=4, micro_batch_size=2, num_micro_batches=2)
    engine = None

    def __init__(self, steps: int, finish: bool = False):
        self.stats, self.steps, self.finish = None, steps, finish

    def prepare(self, prompts, params):
        pass

    def generate(self, prompts, params):
        if params.max_new_tokens <= bench_common.WARMUP_TOKENS:
            self.stats = SimpleNamespace(compiles=Compiles(5, 1.5))
            return []
        # the timed run: new stats, as the engine makes per call
        self.stats = SimpleNamespace(decode_steps=self.steps, decode_s=0.5, prefill_s=0.2, compiles=Compiles(0, 0.0),
                                     prefill_calls=1, prefill_write=np.zeros(2), prefill_wait=np.zeros(2))
        if not self.finish:
            raise KeyboardInterrupt
        return [SimpleNamespace(token_ids=[7] * params.max_new_tokens) for _ in prompts]


def test_an_interrupted_timed_run_reports_its_decode_steps():
    """Ctrl-C (gpu_suite's time limit) during the timed run, after some decode steps: the run reports their
    decode tok/s, marked interrupted; before any decode step there is nothing to report."""
    run = bench_common.timed_generate(TimedLLM(3), [[1, 2]] * 4, 64)
    assert run["interrupted"] and run["decode_steps"] == 3 and run["decode_tok_s"] == pytest.approx(4 * 3 / 0.5)
    assert run["tok_s"] is None and run["tokens"] is None and run["warmup_compiles"] == 5
    assert bench_common.timed_generate(TimedLLM(3), [[1, 2]] * 6, 64)["decode_tok_s"] is None  # waves: unknown
    with pytest.raises(KeyboardInterrupt):
        bench_common.timed_generate(TimedLLM(0), [[1, 2]] * 4, 64)


def test_a_timed_run_reports_tokens_over_wall_time_and_decode_tokens_over_decode_time():
    run = bench_common.timed_generate(TimedLLM(63, finish=True), [[1, 2]] * 4, 64)
    assert run["tokens"] == 4 * 64 and run["tok_s"] == pytest.approx(4 * 64 / run["wall_s"])
    assert run["decode_tok_s"] == pytest.approx(4 * 63 / 0.5)  # the first token of each prompt is the prefill's


def test_bench_expert_kernel_small(tmp_path):
    out = tmp_path / "expert.json"
    p = run_script("bench_expert_kernel.py", "--small", "--tokens", "64", "--models", "mixtral-small", "--json", str(out))
    rows = json.loads(out.read_text())
    assert [r["routing"] for r in rows] == ["uniform", "skewed"]
    for r in rows:  # on CPU: ragged_dot and the Triton kernel (interpreted) run, the Mosaic GPU kernels cannot
        assert r["xla_tflops"] > 0 and r["pallas_triton_tflops"] > 0 and r["moe_ffn_auto_ms"] > 0
        assert r["pallas_mgpu_tflops"] is None and "pallas_mgpu_error" in r and "jax_mgpu_error" in r
    assert "| jax ragged_dot_mgpu TF/s |" in p.stdout


def test_published_figures_are_compared_on_their_own_metric_and_link():
    import bench_throughput as bt

    row = {"workload": "moegen", "gen_len": 256, "tok_s": 400.0, "decode_tok_s": 520.0}
    vs = bt.versus_published(row, "mixtral-8x7b", True, link_bw=50e9)
    assert vs["system"] == "MoE-Gen" and vs["ratio"] == pytest.approx(520.0 * 25 / 50 / 469)  # decode-only, 25 GB/s
    vs = bt.versus_published(dict(row, workload="mtbench", gen_len=64), "mixtral-8x7b", True, link_bw=50e9)
    assert vs["system"] == "MoE-Lightning" and vs["ratio"] == pytest.approx(400.0 * 16 / 50 / 294.5)  # end to end
    assert "MoE-Lightning (e2e 128 vs 294.5)" in bt.published_cell(vs)
    bound = bt.versus_published(dict(row, workload="mtbench", gen_len=64, per_layer_s={
        "h2d_est": 0.05, "cpu": 0.02, "gpu_probe": None}), "mixtral-8x7b", True, link_bw=50e9)
    assert bt.published_cell(bound).endswith("(e2e 128 vs 294.5; our run h2d-bound)")
    assert bt.versus_published(row, "mixtral-8x7b", False, link_bw=50e9) is None  # a truncated model
    assert bt.versus_published(dict(row, gen_len=64), "mixtral-8x7b", True, link_bw=50e9) is None
    assert bt.parse_workloads("moegen") == [("moegen", 256)]
    lossy = bt.versus_published(dict(row, policy={"kv_cache_dtype": "int8"}), "mixtral-8x7b", True, link_bw=50e9)
    assert bt.published_cell(lossy).endswith("vs 469, ours with a lossy int8 KV cache)")
    assert "lossy" not in bt.published_cell(bt.versus_published(row, "mixtral-8x7b", True, link_bw=50e9))
    # an interrupted run's decode tok/s covers its first steps only: no comparison, even on a decode-only metric
    assert bt.versus_published(dict(row, interrupted=True), "mixtral-8x7b", True, link_bw=50e9) is None


@pytest.mark.parametrize("preset,hardware,cap,P,G", [("mixtral-8x7b", "l4", None, 77, 32),
                                                     ("mixtral-8x7b", "h100-80gb", 16, 128, 128),
                                                     ("qwen3-30b-a3b", "t4", None, 256, 64)])
def test_hrm_predict_agrees_with_the_search(preset, hardware, cap, P, G):
    from moe_jax import hrm
    from moe_jax.offload_engine import JobShape
    from moe_jax.presets import preset_config

    cfg = preset_config(preset)
    r = hrm.choose_policy(cfg, hardware, P, G, gpu_memory_gb=cap, placements=[("cpu", "cpu")])
    pred = bench_common.hrm_predict(cfg, hardware, r.policy, JobShape(P, G, P, None))
    for k, v in r.per_layer_seconds.items():
        assert pred["per_layer_s"][k] == pytest.approx(v, rel=1e-9)
    assert pred["tok_s"] == pytest.approx(r.tokens_per_s, rel=1e-9)
    assert pred["decode_tok_s"] == pytest.approx(r.decode_tokens_per_s, rel=1e-9)


def test_a_job_is_predicted_in_the_waves_the_engine_runs_it():
    """Fewer prompts than N: one wave of them, at its own micro-batches; more: the first N (the engine's admission
    order), then the rest on the rows that finish, their times summed."""
    from moe_jax.presets import preset_config

    cfg = preset_config("mixtral-8x7b")
    policy = Policy(1200, 400, 3, 0.0, gpu_memory_gb=16)
    rng = np.random.default_rng(0)
    prompts = [[1] * int(n) for n in rng.integers(20, 140, 1700)]
    few = bench_common.job_prediction(cfg, "h100-80gb", policy, prompts[:500], 64)
    assert few["waves"] == [500]
    alone = bench_common.hrm_predict(cfg, "h100-80gb", Policy(500, 400, 2, 0.0, gpu_memory_gb=16),
                                     bench_common.engine_lengths(prompts[:500], 64, cfg.max_positions))
    assert few["tok_s"] == alone["tok_s"] and few["decode_tok_s"] == alone["decode_tok_s"]
    both = bench_common.job_prediction(cfg, "h100-80gb", policy, prompts, 64)
    assert both["waves"] == [1200, 500]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # by need (prompt + 64), as admitted
    first, second = ([prompts[i] for i in part] for part in (order[:1200], order[1200:]))
    waves = [bench_common.hrm_predict(cfg, "h100-80gb", p, bench_common.engine_lengths(w, 64, cfg.max_positions))
             for p, w in ((policy, first), (Policy(500, 400, 2, 0.0, gpu_memory_gb=16), second))]
    seconds = sum(n * 64 / w["tok_s"] for n, w in zip((1200, 500), waves))
    assert both["tok_s"] == pytest.approx(1700 * 64 / seconds, rel=1e-12)
    assert both["prefill_s"] == pytest.approx(waves[0]["prefill_s"] + waves[1]["prefill_s"], rel=1e-12)
    assert waves[1]["tok_s"] < both["tok_s"] < waves[0]["tok_s"]
    # decode-only: the decode steps' tokens (the first of each prompt comes from its prefill) over their time
    assert both["decode_tok_s"] == pytest.approx(1700 * 63 / (63 * waves[0]["step_s"] + 63 * waves[1]["step_s"]),
                                                 rel=1e-12)
    assert both["gpu_gib"] == waves[0]["gpu_gib"] and both["bottleneck"] == waves[0]["bottleneck"]


def test_the_baselines_resident_layers_are_accelerates(tmp_path):
    """The full model's layers the baseline counts as kept on the GPU (free) are those accelerate's
    infer_auto_device_map keeps there under the cap (Mixtral 8x7B, bf16, on the meta device)."""
    reference("torch", "transformers", "accelerate")
    import hf_baseline
    import torch
    from accelerate.utils import infer_auto_device_map
    from transformers import AutoConfig, AutoModelForCausalLM

    (tmp_path / "config.json").write_text(json.dumps(hf_baseline.hf_config("mixtral-8x7b", 32, "bfloat16")))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tmp_path), dtype=torch.bfloat16)
    for cap in (16, 24):
        placed = infer_auto_device_map(model, max_memory={0: cap * 2**30, "cpu": 400 * 2**30},
                                       no_split_module_classes=model._no_split_modules)
        on_gpu = [k for k, v in placed.items() if k.startswith("model.layers.") and v == 0]
        assert hf_baseline.resident_layers("mixtral-8x7b", "bfloat16", cap) == len(on_gpu) > 0, (cap, on_gpu)


@pytest.mark.parametrize("preset", ["tiny-mixtral", "tiny-dbrx"])
def test_baseline_checkpoint_is_our_model(preset, tmp_path):
    """transformers, loading the exported checkpoint, computes our logits."""
    reference("torch", "transformers")
    import hf_baseline
    import torch

    import moe_jax

    hf_baseline.export_checkpoint(preset, 2, "float32", 0, tmp_path)
    model, _ = hf_baseline.load_model(tmp_path, "float32", "grouped_mm")
    ids = [[5, 9, 33, 100, 7, 12, 40]]
    with torch.no_grad():
        want = model(torch.tensor(ids)).logits[0].numpy()
    got = moe_jax.LLM(preset, dtype="float32", policy="resident").logits(ids)[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("preset", ["tiny-mixtral", "tiny-dbrx"])
def test_baseline_offload_layout_generates_the_plain_models_tokens(preset, tmp_path):
    """The baseline's device map (every decoder layer offloaded by accelerate, every other module on GPU 0),
    rehearsed on the CPU: the GPU's modules on the CPU and the layers on "disk", so that accelerate's hooks
    bring each layer's weights in for its forward as its CPU offload does on a GPU machine. Greedy tokens are
    the plain model's."""
    reference("torch", "transformers", "accelerate")
    import hf_baseline
    import torch

    ckpt = tmp_path / "ckpt"
    hf_baseline.export_checkpoint(preset, 2, "float32", 0, ckpt)
    placement = hf_baseline.device_map(ckpt)
    offloaded_layers = sorted(k for k, v in placement.items() if v == "cpu")
    assert set(placement.values()) == {"cpu", 0} and [k[-2:] for k in offloaded_layers] == [".0", ".1"]
    plain, _ = hf_baseline.load_model(ckpt, "float32", "grouped_mm")
    for name, _ in [*plain.named_parameters(), *plain.named_buffers()]:  # each placed once
        assert sum(name.startswith(k + ".") for k in placement) == 1, name
    rehearsal = {k: "disk" if v == "cpu" else "cpu" for k, v in placement.items()}
    offloaded, _ = hf_baseline.load_model(ckpt, "float32", "grouped_mm", rehearsal, tmp_path / "offload")
    assert offloaded.hf_device_map == rehearsal
    assert {p.device.type for k in offloaded_layers for p in offloaded.get_submodule(k).parameters()} == {"meta"}
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, plain.config.vocab_size, int(n)).tolist() for n in (5, 17, 11)]
    _, got = hf_baseline.timed_generate(offloaded, prompts, 4, torch.device("cpu"))
    _, want = hf_baseline.timed_generate(plain, prompts, 4, torch.device("cpu"))
    assert got.shape == (3, 4) and torch.equal(got, want)


def test_held_back_by_names_the_largest_term_and_what_no_term_explains():
    import bench_throughput as bt

    terms = {"h2d_est": 0.010, "cpu": 0.020, "gpu_probe": 0.005}
    tight = {"per_layer_s": {**terms, "step": 0.021}, "overlap_efficiency": 1.05, "host_limits_batch": True}
    assert bt.held_back_by(tight) == "decode: cpu; N: host memory for KV"
    loose = {"per_layer_s": {**terms, "step": 0.053}, "overlap_efficiency": 2.65,
             "measured_over_predicted": {"prefill": 1.5}}
    assert bt.held_back_by(loose) == "decode: cpu (62% of the step unexplained by any term); prefill 1.5x HRM's"


def test_per_layer_terms_and_overlap_are_per_layer_and_decode_step():
    from moe_jax.presets import preset_config

    cfg, policy = preset_config("tiny-mixtral"), Policy(4, 2, 2, 0.5)
    L, steps = cfg.num_layers, 10
    per = lambda x: np.full(L, x * steps)  # x seconds per layer and step
    st = SimpleNamespace(decode_steps=steps, decode_s=0.03 * steps * L, cpu=per(0.02), cpu_kernel=per(0.01),
                         cpu_write=per(0.004), cpu_handoff=per(0.003), cpu_fetch=per(0.002), gpu_wait=per(0.001),
                         main_wait=per(0.005))
    terms = bench_common.per_layer_terms({"stats": st}, cfg, policy, "bfloat16", 1e9, 0.01)
    assert terms["h2d_est"] == pytest.approx(bench_common.streamed_bytes_per_layer(cfg, policy, "bfloat16") / 1e9)
    want = {"cpu": 0.02, "cpu_kernel": 0.01, "cpu_write": 0.004, "cpu_handoff": 0.003, "cpu_fetch": 0.002,
            "gpu_probe": 0.01, "gpu_wait": 0.001, "main_wait": 0.005, "step": 0.03}
    assert {k: terms[k] for k in want} == pytest.approx(want)
    # step over the largest term; an unmeasured term (None) left out
    overlap = lambda h2d, cpu, gpu: bench_common.overlap_efficiency({"h2d_est": h2d, "cpu": cpu, "gpu_probe": gpu,
                                                                     "step": 0.03})
    assert overlap(0.01, 0.02, None) == pytest.approx(1.5) and overlap(0.025, 0.02, 0.001) == pytest.approx(1.2)


def test_measured_over_predicted_prices_the_runs_policy_on_all_its_prompts():
    from moe_jax.presets import preset_config

    cfg, policy = preset_config("mixtral-8x7b"), Policy(64, 32, 2, 0.0, gpu_memory_gb=16)
    prompts = bench_common.synthetic_prompts(100, 20, 134, cfg.vocab_size)  # two waves: 64, then 36
    run = {"tok_s": 100.0, "decode_tok_s": 150.0, "prefill_s": 2.0, "prefill_calls": None,
           "stats": SimpleNamespace(refilled=36)}
    terms = {"h2d_est": 0.04, "cpu": 0.01, "gpu_probe": 0.002, "step": 0.05}
    row = {}
    bench_common._predicted(row, run, terms, cfg, "h100-80gb", policy, prompts, 64, "bfloat16")
    pred = bench_common.job_prediction(cfg, "h100-80gb", policy, prompts, 64)
    assert row["hrm"] == pred and pred["waves"] == [64, 36]
    ratio = row["measured_over_predicted"]
    assert ratio["tok_s"] == pytest.approx(100.0 / pred["tok_s"])
    assert ratio["decode_tok_s"] == pytest.approx(150.0 / pred["decode_tok_s"])
    assert ratio["step"] == pytest.approx(0.05 * cfg.num_layers / pred["step_s"])  # HRM's step: all layers
    assert ratio["prefill"] == pytest.approx(2.0 / pred["prefill_s"])
    assert ratio["h2d"] == pytest.approx(0.04 / pred["per_layer_s"]["h2d"])
    assert ratio["cpu"] == pytest.approx(0.01 / pred["per_layer_s"]["cpu"])
    assert ratio["gpu"] == pytest.approx(0.002 / pred["per_layer_s"]["gpu"])


def test_the_synthetic_workloads_are_the_papers():
    import bench_throughput as bt

    assert bt.parse_workloads("mtbench,reasoning,summarization") == [("mtbench", 64), ("reasoning", 50),
                                                                      ("summarization", 64)]
    mtbench, reasoning, summarization = (bt.WORKLOADS[w] for w in ("mtbench", "reasoning", "summarization"))
    assert sum(mtbench[:2]) / 2 == 77 and reasoning[1] == 256 and summarization[1] == 1984
    assert bt.WORKLOADS["moegen"] == (512, 512, 256)
    for name in ("mtbench", "reasoning", "summarization"):  # (shortest prompt, longest, default gen)
        lo, hi, _ = bt.WORKLOADS[name]
        lengths = [len(p) for p in bt.workload_prompts(name, 2000, 1000, 0)]
        assert lo <= min(lengths) and max(lengths) <= hi and abs(np.mean(lengths) - (lo + hi) / 2) < 0.02 * hi


def test_the_main_tables_rows_fill_its_columns():
    import bench_throughput as bt

    policy = {"batch_size": 64, "micro_batch_size": 32, "num_micro_batches": 2, "resident_expert_fraction": 0.25,
              "expert_codec": "none", "kv_cache_dtype": "auto"}
    ok = {"workload": "mtbench", "gen_len": 64, "gpu_memory_gb": 16, "spec": "auto", "policy": policy, "prompts": 64,
          "tok_s": 123.4, "decode_tok_s": 234.5, "hrm": {"tok_s": 200.0}, "measured_over_predicted": {"tok_s": 0.617},
          "per_layer_s": {"h2d_est": 0.010, "cpu": 0.020, "gpu_probe": 0.005, "step": 0.021}, "overlap_efficiency": 1.05,
          "peak_gpu_gib": 14.5, "load_s": 30.0, "kv_fault_in_s": None,
          "vs_published": {"system": "MoE-Lightning", "metric": "tok_s", "ours_at_their_link": 100.0, "published": 294.5,
                           "ratio": 0.34}}
    failed = {"workload": "reasoning", "gen_len": 50, "gpu_memory_gb": 16, "spec": "auto", "error": "RuntimeError: x"}
    header, rule, *rows = bt.main_table([ok, failed]).splitlines()
    cells = lambda line: [c.strip() for c in line.split("|")[1:-1]]
    assert len(cells(header)) == len(bt.MAIN_HEADERS) == rule.count("---|")
    got = [dict(zip(cells(header), cells(r))) for r in rows]
    assert all(len(cells(r)) == len(bt.MAIN_HEADERS) for r in rows)
    assert {k: got[0][k] for k in ("workload", "gen", "cap GiB", "prompts", "tok/s e2e", "tok/s decode", "HRM tok/s",
                                   "e2e meas/HRM", "held back by", "overlap", "peak GiB", "load + KV s")} == {
        "workload": "mtbench", "gen": "64", "cap GiB": "16", "prompts": "64", "tok/s e2e": "123.4",
        "tok/s decode": "234.5", "HRM tok/s": "200.0", "e2e meas/HRM": "0.62", "held back by": "decode: cpu",
        "overlap": "1.05", "peak GiB": "14.50", "load + KV s": "30.0"}
    assert got[0]["policy"].startswith("HRM: N=64 ")
    assert got[0]["vs published, at its link"].startswith("0.34× MoE-Lightning")
    assert got[1]["prompts"] == "RuntimeError: x" and got[1]["vs published, at its link"] == ""


def test_an_interrupted_run_ends_bench_throughput_with_what_it_measured(tmp_path, monkeypatch):
    """gpu_suite's time limit: the run it interrupted is the last; its row is reported, and the exit code is 130."""
    import bench_throughput as bt

    made = []

    def interrupted_run(self, i):
        made.append(i)
        cap, workload, gen_len, spec = self.runs[i]
        return {"workload": workload, "gen_len": gen_len, "gpu_memory_gb": cap, "spec": spec, "prompts": 4,
                "policy": bench_common.policy_dict(bench_common.parse_policy(spec)), "tok_s": None, "decode_tok_s": 10.0,
                "decode_steps": 3, "interrupted": True, "hrm": None, "measured_over_predicted": None,
                "per_layer_s": {"h2d_est": 0.01, "cpu": 0.02, "gpu_probe": None, "step": 0.03},
                "overlap_efficiency": 1.5, "peak_gpu_gib": None, "load_s": 1.0, "kv_fault_in_s": None}

    monkeypatch.setattr(bt.Runner, "run", interrupted_run)
    out = tmp_path / "throughput.json"
    assert in_process(monkeypatch, [*TINY, "--workloads", "mtbench:3,mtbench:4", "--policies", "4,2,2,0",
                                    "--no-baseline", "--json", str(out)]) == 130
    d = json.loads(out.read_text())
    assert made == [0] and d["interrupted"] and [r["decode_steps"] for r in d["runs"]] == [3]


def test_an_interrupted_run_ends_bench_offload_with_what_it_measured(tmp_path, monkeypatch):
    """bench_offload likewise: the interrupted policy is the last run, reported, and the exit code is 130."""
    import bench_offload

    made = []

    def interrupted_policy(spec, source, args, hardware, link_bw):
        made.append(spec)
        return {"spec": spec, "policy": bench_common.policy_dict(bench_common.parse_policy(spec)), "tok_s": None,
                "decode_tok_s": 10.0, "decode_steps": 3, "interrupted": True, "hrm": None,
                "measured_over_predicted": None, "load_s": 1.0, "kv_fault_in_s": None, "peak_gpu_gib": None,
                "per_layer_s": {k: 0.01 for k in ("h2d_est", "cpu", "cpu_kernel", "cpu_write", "cpu_handoff",
                                                  "cpu_fetch", "gpu_probe", "step")}, "overlap_efficiency": 1.0,
                "host": {"kv_gib": 0.1, "pool_cap_gib": None, "free_gib": None, "rest_gib": None}}

    monkeypatch.setattr(bench_offload, "run_policy", interrupted_policy)
    for var in ("XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB", "XLA_PYTHON_CLIENT_PREALLOCATE"):  # main sets them: restored after
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    out = tmp_path / "offload.json"
    assert bench_offload.main([*TINY, "--policies", "4,2,2,0;6,3,2,0", "--json", str(out)]) == 130
    d = json.loads(out.read_text())
    assert made == ["4,2,2,0"] and d["interrupted"] and [r["decode_steps"] for r in d["runs"]] == [3]


def test_the_baselines_full_model_figure_scales_its_truncated_run(tmp_path, capsys):
    """hf_baseline: tokens over wall time, and the full model's estimate that divides it by the full model's
    offloaded bytes over the bytes of the layers run (on CPU: no offload, no layer resident)."""
    reference("torch", "transformers")
    import hf_baseline

    prompts, out = tmp_path / "prompts.json", tmp_path / "baseline.json"
    prompts.write_text(json.dumps([[5, 9, 33], [7, 12, 40, 41, 42]]))
    assert hf_baseline.main(["--model", "tiny-mixtral", "--layers", "1", "--prompts", str(prompts), "--gen-len", "3",
                             "--dtype", "float32", "--json", str(out)]) == 0
    base = json.loads(out.read_text())
    sizes = hf_baseline.layer_sizes("tiny-mixtral", "float32")
    assert (base["layers_run"], base["full_layers"], base["full_model_resident_layers"]) == (1, 2, 0)
    assert base["tokens"] == 2 * 3 and base["tok_s_measured"] == pytest.approx(6 / base["wall_s"])
    assert base["scale_to_full"] == pytest.approx(sum(sizes) / sizes[0]) and base["scale_to_full"] > 1
    assert base["tok_s_full_model"] == pytest.approx(base["tok_s_measured"] / base["scale_to_full"])
