"""Smoke test of scripts/bench_host_attention.py at tiny sizes (its figures mean nothing here)."""
from __future__ import annotations

import importlib.util
import pathlib

import host_ops


def test_bench_prints_bandwidths_and_ratio(capsys):
    path = pathlib.Path(host_ops.__file__).parents[1] / "scripts" / "bench_host_attention.py"
    spec = importlib.util.spec_from_file_location("bench_host_attention", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--batch", "2", "3", "--context", "64", "--q-heads", "8", "--kv-heads", "2", "--head-dim", "64",
                "--stream-gib", "0.01", "--max-kv-gib", "0.00008", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "host read bandwidth" in out and "skipped (> --max-kv-gib)" in out
    assert out.strip().splitlines()[-1].count("|") == 4  # the summary row: read GB/s | attention GB/s | ratio
