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


def run_suite(tmp_path: Path, *steps: str, budget: int = 570, python: str = 'echo "ran: $*"', logs: Path | None = None,
              min_step: int = 60) -> tuple[subprocess.CompletedProcess, Path, Path]:
    """The suite with a stand-in interpreter: a shell script whose body is `python`."""
    fake = tmp_path / "fake_python"
    fake.write_text(f"#!/bin/sh\n{python}\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    out, logs = tmp_path / "out", logs or tmp_path / "logs"
    env = dict(os.environ, PYTHON=str(fake), OUT=str(out), GPU_SUITE_LOGS=str(logs), GPU_SUITE_BUDGET_S=str(budget),
               GPU_SUITE_MIN_STEP_S=str(min_step))
    return subprocess.run(["bash", str(SUITE), *steps], env=env, capture_output=True, text=True, timeout=60), out, logs


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
