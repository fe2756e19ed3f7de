"""scripts/gpu_suite.sh's driver on CPU, with a stand-in interpreter: a device command returns at most 8
files from $OUT, so the suite must leave exactly its summary and one log tarball there; steps run in the
order named, share the time budget, and an unknown step is refused before anything runs."""
from __future__ import annotations

import os
import stat
import subprocess
import tarfile
from pathlib import Path

SUITE = Path(__file__).resolve().parents[2] / "scripts" / "gpu_suite.sh"


def _script(path: Path, body: str) -> Path:
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def run_suite(tmp_path: Path, *steps: str, budget: int = 570, python: str = 'echo "ran: $*"', logs: Path | None = None,
              min_step: int = 60, hopper: bool = False, env: dict | None = None
              ) -> tuple[subprocess.CompletedProcess, Path, Path]:
    """The suite with a stand-in interpreter: a shell script whose body is `python`; hopper: a stand-in
    nvidia-smi on PATH that reports an H100 (compute capability 9.0); env: more environment variables."""
    fake = _script(tmp_path / "fake_python", python)
    out, logs = tmp_path / "out", logs or tmp_path / "logs"
    env = dict(os.environ, PYTHON=str(fake), OUT=str(out), GPU_SUITE_LOGS=str(logs), GPU_SUITE_BUDGET_S=str(budget),
               GPU_SUITE_MIN_STEP_S=str(min_step), **(env or {}))
    if hopper:
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir(exist_ok=True)
        _script(bin_dir / "nvidia-smi", 'case "$*" in *compute_cap*) echo 9.0 ;; *) echo "NVIDIA H100 80GB HBM3" ;; esac')
        env["PATH"] = f"{bin_dir}:{env['PATH']}"
    # `all` with the real scripts' argument parsing starts a Python per step: 30-40 s alone on a 2-core VM, more
    # beside another process (it passed 60 s once)
    return subprocess.run(["bash", str(SUITE), *steps], env=env, capture_output=True, text=True, timeout=180), out, logs


def _rows(out: Path) -> dict[str, str]:
    """summary.md as {step: status}, in order."""
    cells = [line.split("|") for line in (out / "summary.md").read_text().splitlines()[2:]]
    return {c[1].strip(): c[2].strip() for c in cells}


# The stand-in for our kernel's GPU tests (run by the check) and for every step.
KERNEL_TESTS = 'case "$*" in *test_mgpu.py*) {} ;; *) echo "ran: $*" ;; esac'


def test_a_failing_kernel_check_sends_the_engine_steps_to_jax_kernel(tmp_path):
    proc, out, logs = run_suite(tmp_path, "bench_host_attention", "bench_offload_quick", "bench_offload_quick_triton",
                                hopper=True, python=KERNEL_TESTS.format('echo "1 failed, 4 passed"; exit 1'))
    assert proc.returncode == 1  # the failed check fails the suite, the steps still run
    assert list(_rows(out).items()) == [("bench_host_attention", "ok"), ("mgpu_check", "fail"),
                                        ("bench_offload_quick", "ok"), ("bench_offload_quick_triton", "ok")]
    assert "--moe-impl jax_mgpu --layers 4" in (logs / "bench_offload_quick.log").read_text()
    triton = (logs / "bench_offload_quick_triton.log").read_text()
    assert "--moe-impl pallas_triton" in triton and "jax_mgpu" not in triton.split("\n", 1)[1]


def test_a_passing_kernel_check_leaves_the_default_kernel(tmp_path):
    proc, out, logs = run_suite(tmp_path, "bench_offload_quick", hopper=True,
                                python=KERNEL_TESTS.format('echo "5 passed in 9.1s"'))
    assert proc.returncode == 0, proc.stdout
    assert list(_rows(out)) == ["mgpu_check", "bench_offload_quick"] and _rows(out)["mgpu_check"] == "ok"
    ran = (logs / "bench_offload_quick.log").read_text().split("\n", 1)[1]
    assert "ran: scripts/bench_offload.py --hardware" in ran and "--moe-impl" not in ran


def test_kernel_tests_that_only_skip_fail_the_check(tmp_path):
    proc, out, logs = run_suite(tmp_path, "bench_offload_quick", hopper=True,
                                python=KERNEL_TESTS.format('echo "5 skipped in 0.1s"'))
    assert _rows(out)["mgpu_check"] == "fail" and "--moe-impl jax_mgpu" in (logs / "bench_offload_quick.log").read_text()


def test_the_tests_step_stands_for_the_check_when_it_passed(tmp_path):
    proc, out, logs = run_suite(tmp_path, "tests", "bench_offload_quick", hopper=True,
                                python=KERNEL_TESTS.format("exit 1"))  # the check itself would fail
    assert proc.returncode == 0, proc.stdout
    assert _rows(out)["mgpu_check"] == "ok" and "the tests step" in (out / "summary.md").read_text()
    assert not (logs / "mgpu_check.log").exists()


def test_a_later_command_reuses_the_check_and_a_given_kernel_is_not_checked(tmp_path):
    """On a warm machine the logs folder survives: the second command takes the first one's outcome."""
    logs = tmp_path / "logs"
    run_suite(tmp_path, "bench_offload_quick", hopper=True, logs=logs,
              python=KERNEL_TESTS.format('echo "1 failed, 4 passed"; exit 1'))
    assert (logs / "mgpu_check.status").read_text().strip() == "fail"
    proc, out, _ = run_suite(tmp_path, "bench_offload_quick", hopper=True, logs=logs,
                             python=KERNEL_TESTS.format('echo "never run"; exit 3'))
    assert _rows(out)["mgpu_check"] == "fail" and "an earlier command's check" in (out / "summary.md").read_text()
    assert "--moe-impl jax_mgpu --layers 4" in (logs / "bench_offload_quick.log").read_text()
    assert proc.returncode == 0  # reported by the first command; this one ran what it was asked to
    proc, out, _ = run_suite(tmp_path, "tests", "bench_offload_quick", hopper=True, logs=logs,
                             python=KERNEL_TESTS.format("exit 1"))  # this command's tests pass: they decide
    assert _rows(out)["mgpu_check"] == "ok" and (logs / "mgpu_check.status").read_text().strip() == "ok"
    assert "--moe-impl" not in (logs / "bench_offload_quick.log").read_text().split("\n", 1)[1]
    (logs / "mgpu_check.status").write_text("ok\n")
    proc, out, _ = run_suite(tmp_path, "tests", "bench_offload_quick", hopper=True, logs=logs,
                             python='case "$*" in *"-m gpu tests"*) exit 1 ;; *test_mgpu.py*) exit 1 ;; *) echo ok ;; esac')
    assert _rows(out)["mgpu_check"] == "fail"  # a failing tests step: checked afresh, not the stale "ok"
    (logs / "mgpu_check.status").unlink()
    proc, out, _ = run_suite(tmp_path, "bench_offload_quick", hopper=True, logs=logs,
                             python=KERNEL_TESTS.format('echo "never run"; exit 3'))
    assert _rows(out)["mgpu_check"] == "fail"  # checked afresh
    env = dict(MOE_IMPL="--moe-impl pallas_triton")
    proc, out, _ = run_suite(tmp_path, "bench_offload_quick", hopper=True, logs=tmp_path / "logs2", env=env,
                             python=KERNEL_TESTS.format("exit 1"))
    assert "mgpu_check" not in _rows(out) and proc.returncode == 0
    assert "--moe-impl pallas_triton --layers 4" in (tmp_path / "logs2" / "bench_offload_quick.log").read_text()


def test_no_kernel_check_off_hopper_or_without_engine_steps(tmp_path):
    proc, out, _ = run_suite(tmp_path, "bench_offload_quick")  # no nvidia-smi: not Hopper
    assert list(_rows(out)) == ["bench_offload_quick"]
    proc, out, _ = run_suite(tmp_path, "bench_host_attention", hopper=True)
    assert list(_rows(out)) == ["bench_host_attention"]


def test_steps_run_in_the_order_named_and_only_two_files_come_back(tmp_path):
    proc, out, logs = run_suite(tmp_path, "bench_host_attention", "tests")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["gpu_suite_logs.tgz", "summary.md"]
    rows = [line.split("|")[1].strip() for line in (out / "summary.md").read_text().splitlines()[2:]]
    assert rows == ["bench_host_attention", "tests"]
    assert "ran: scripts/bench_host_attention.py --batch" in (logs / "bench_host_attention.log").read_text()
    with tarfile.open(out / "gpu_suite_logs.tgz") as tar:
        names = {Path(n).name for n in tar.getnames()}
    assert {"env.log", "tests.log", "bench_host_attention.log"} <= names
    assert proc.stdout.rstrip().splitlines()[-1].startswith("| tests ")  # the table comes last


def test_steps_past_the_budget_are_skipped_and_fail_the_suite(tmp_path):
    proc, out, _ = run_suite(tmp_path, "tests", budget=30)
    assert proc.returncode == 1
    assert "| skipped " in (out / "summary.md").read_text()


def test_an_unknown_step_is_refused_before_anything_runs(tmp_path):
    proc, _, logs = run_suite(tmp_path, "tests", "bench_nonesuch")
    assert proc.returncode == 2 and "unknown step 'bench_nonesuch'" in proc.stderr
    assert not (logs / "tests.log").exists()


def test_a_step_ended_by_the_budget_is_cut_not_failed(tmp_path):
    """The budget's end interrupts a running step (SIGINT, so a benchmark prints what it measured): "cut",
    which does not fail the suite; the next step is skipped, which does."""
    proc, out, logs = run_suite(tmp_path, "bench_expert_kernel", budget=3, min_step=1,
                                python='trap \'echo "interrupted: printed what it measured"; exit 130\' INT; '
                                       'case "$*" in *import*) exit 0;; esac; sleep 30 & wait')
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| bench_expert_kernel" in (out / "summary.md").read_text() and "| cut " in (out / "summary.md").read_text()
    assert "interrupted: printed what it measured" in (logs / "bench_expert_kernel.log").read_text()
    proc, out, _ = run_suite(tmp_path, "bench_expert_kernel", "tests", budget=3, min_step=1,
                             python='trap "exit 130" INT; case "$*" in *import*) exit 0;; esac; sleep 30 & wait')
    assert proc.returncode == 1 and "| skipped " in (out / "summary.md").read_text()


def test_logs_inside_out_are_refused(tmp_path):
    proc, out, _ = run_suite(tmp_path, "tests", logs=tmp_path / "out" / "logs")
    assert proc.returncode == 2 and "must lie outside OUT" in proc.stderr


# A stand-in interpreter that parses each step's arguments with the real script's (or module's) argparse
# parser and stops there: what a GPU session would run is checked to parse, without running it.
PARSE_ONLY = """
import argparse, runpy, sys
parse = argparse.ArgumentParser.parse_args
def parse_only(self, args=None, namespace=None):
    parse(self, args, namespace)
    print("parsed:", self.prog)
    raise SystemExit(0)
argparse.ArgumentParser.parse_args = parse_only
args = sys.argv[1:]
if args[:2] == ["-m", "pytest"]:
    print("parsed: pytest (not run)")
elif args[0] == "-m":
    sys.argv = [args[1], *args[2:]]
    runpy.run_module(args[1], run_name="__main__", alter_sys=True)
else:
    sys.argv = args
    sys.path.insert(0, "scripts")
    runpy.run_path(args[0], run_name="__main__")
"""


def test_every_step_parses_with_the_real_scripts(tmp_path):
    """`all` steps, as an H100 session would run them (HRM profile; jax's kernel given, as after a failed
    check of ours, so that --moe-impl is in their arguments): every command's arguments parse."""
    import sys

    driver = tmp_path / "parse_only.py"
    driver.write_text(PARSE_ONLY)
    env = {"PYTHONPATH": str(SUITE.parents[1]), "MOE_IMPL": "--moe-impl jax_mgpu"}
    proc, out, logs = run_suite(tmp_path, "all", hopper=True, env=env, python=f'exec {sys.executable} {driver} "$@"')
    rows = _rows(out)
    assert len(rows) > 15 and set(rows.values()) == {"ok"}, (out / "summary.md").read_text()
    for name in rows:
        log = (logs / f"{name}.log").read_text()
        assert "parsed:" in log, log[-2000:]
    assert "--moe-impl jax_mgpu" in (logs / "bench_throughput_g64.log").read_text()
    assert "--hardware h100-80gb" in (logs / "bench_offload.log").read_text()


# A stand-in whose env probe (the -c code importing jax) prints the host_views line given, and whose steps print
# the MOE_JAX_HOST_VIEWS they see.
VIEWS_PROBE = ('case "$*" in *host_views*) echo "{}" ;; *) echo "ran: $* views=${{MOE_JAX_HOST_VIEWS:-unset}}" ;; '
               'esac')


def test_views_that_fail_the_probe_are_off_in_every_step(tmp_path):
    proc, out, logs = run_suite(tmp_path, "bench_offload_quick",
                                python=VIEWS_PROBE.format("host_views: FAIL, the engine copies: bad pointer"))
    assert proc.returncode == 0, proc.stderr
    assert "host_views: off for every step (MOE_JAX_HOST_VIEWS=0)" in (logs / "env.log").read_text()
    assert "views=0" in (logs / "bench_offload_quick.log").read_text()


def test_views_that_pass_the_probe_are_left_on(tmp_path):
    proc, out, logs = run_suite(tmp_path, "bench_offload_quick",
                                python=VIEWS_PROBE.format("host_views: views of pinned memory work"))
    assert proc.returncode == 0, proc.stderr
    assert "off for every step" not in (logs / "env.log").read_text()
    assert "views=unset" in (logs / "bench_offload_quick.log").read_text()


# A stand-in whose page probe (the -c code making HostKVCaches) prints the kv_pages line given, and whose steps
# print the MOE_JAX_KV_HUGE_PAGES they see.
PAGES_PROBE = ('case "$*" in *HostKVCache*) echo "{}" ;; *) echo "ran: $* pages=${{MOE_JAX_KV_HUGE_PAGES:-unset}}" ;; '
               'esac')


def test_a_slow_first_touch_of_huge_pages_gives_every_step_4k_pages(tmp_path):
    slow = "kv_pages: first touch 2 MiB 0.60 GB/s, 4 KiB 4.00 GB/s; a 50 GB cache 83 s against 12 s -> 4 KiB"
    proc, out, logs = run_suite(tmp_path, "bench_offload_quick", python=PAGES_PROBE.format(slow))
    assert proc.returncode == 0, proc.stderr
    assert "4 KiB pages for every step's KV cache (MOE_JAX_KV_HUGE_PAGES=0)" in (logs / "env.log").read_text()
    assert "pages=0" in (logs / "bench_offload_quick.log").read_text()
    fast = "kv_pages: first touch 2 MiB 6.00 GB/s, 4 KiB 8.00 GB/s; a 50 GB cache 8 s against 6 s -> 2 MiB"
    proc, out, logs = run_suite(tmp_path, "bench_offload_quick", python=PAGES_PROBE.format(fast),
                                logs=tmp_path / "logs2")
    assert "for every step's KV cache" not in (logs / "env.log").read_text()
    assert "pages=unset" in (logs / "bench_offload_quick.log").read_text()
    proc, out, logs = run_suite(tmp_path, "bench_offload_quick", python=PAGES_PROBE.format(slow),
                                logs=tmp_path / "logs3", env={"MOE_JAX_KV_HUGE_PAGES": "1"})  # the caller's choice
    assert "pages=1" in (logs / "bench_offload_quick.log").read_text()


def test_a_step_past_its_own_limit_is_a_timeout_that_fails_the_suite(tmp_path):
    """Inside the budget, a step that passes its own limit is "timeout" (a failure), not "cut": a stand-in
    `timeout` on PATH shortens the step's limit to 1 s (the real one still sends SIGINT)."""
    import shutil

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    real = shutil.which("timeout")
    _script(bin_dir / "timeout", f'if [ "$1" = --signal=INT ]; then a=$1 b=$2; shift 3; exec {real} "$a" "$b" 1 "$@"; fi\n'
                                 f'exec {real} "$@"')
    proc, out, logs = run_suite(tmp_path, "bench_expert_kernel", env={"PATH": f"{bin_dir}:{os.environ['PATH']}"},
                                python='trap \'echo "interrupted"; exit 130\' INT; '
                                       'case "$*" in *import*) exit 0;; esac; sleep 30 & wait')
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert _rows(out) == {"bench_expert_kernel": "timeout"}
    assert "interrupted" in (logs / "bench_expert_kernel.log").read_text()


def test_the_summary_is_rewritten_after_each_step(tmp_path):
    """A command killed mid-run still returns the rows of the steps that ran: each step's stand-in prints the
    summary.md it finds in $OUT."""
    proc, out, logs = run_suite(tmp_path, "bench_host_attention", "tests",
                                python='cat "$OUT/summary.md" 2>/dev/null || echo "no summary yet"')
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no summary yet" in (logs / "bench_host_attention.log").read_text()
    seen = (logs / "tests.log").read_text()
    assert "| bench_host_attention" in seen and "| tests " not in seen


def test_a_probe_that_crashes_turns_views_off(tmp_path):
    """No "views ... work" line (the probe crashed before printing any host_views line): every step copies."""
    proc, out, logs = run_suite(tmp_path, "bench_offload_quick",
                                python='case "$*" in *host_views*) echo "Traceback: Segmentation fault"; exit 139 ;; '
                                       '*) echo "ran: $* views=${MOE_JAX_HOST_VIEWS:-unset}" ;; esac')
    assert proc.returncode == 0, proc.stderr
    assert "host_views: off for every step (MOE_JAX_HOST_VIEWS=0)" in (logs / "env.log").read_text()
    assert "views=0" in (logs / "bench_offload_quick.log").read_text()


def test_an_h200_runs_with_its_measured_profile(tmp_path):
    """On an H200 the steps take the committed measured profile (benchmarks/profiles/h200-measured.json), not the
    uncalibrated built-in one; an unknown GPU gets no --hardware."""
    assert (SUITE.parents[1] / "benchmarks" / "profiles" / "h200-measured.json").is_file()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _script(bin_dir / "nvidia-smi", 'case "$*" in *compute_cap*) echo 9.0 ;; *) echo "NVIDIA H200" ;; esac')
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "MOE_IMPL": "--moe-impl jax_mgpu"}  # no kernel check
    proc, out, logs = run_suite(tmp_path, "bench_offload_quick", env=env)
    log = (logs / "bench_offload_quick.log").read_text()
    assert "--hardware benchmarks/profiles/h200-measured.json " in log, log
    assert "HRM profile: --hardware benchmarks/profiles/h200-measured.json" in (logs / "env.log").read_text()
    _script(bin_dir / "nvidia-smi", 'echo "NVIDIA A10G"')
    proc, out, logs = run_suite(tmp_path, "bench_offload_quick", env=env, logs=tmp_path / "logs2")
    assert "--hardware" not in (logs / "bench_offload_quick.log").read_text().split("\n", 1)[1]
