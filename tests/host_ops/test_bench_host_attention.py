"""Smoke test of scripts/bench_host_attention.py at tiny sizes (its figures mean nothing here)."""
from __future__ import annotations

import importlib.util
import os
import pathlib
import time

import numba
import pytest

import host_ops
from host_ops import numba_target


def _bench():
    path = pathlib.Path(host_ops.__file__).parents[1] / "scripts" / "bench_host_attention.py"
    spec = importlib.util.spec_from_file_location("bench_host_attention", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


TINY = ["--batch", "2", "3", "--context", "64", "--q-heads", "8", "--kv-heads", "2", "--head-dim", "64",
        "--stream-gib", "0.01", "--max-kv-gib", "0.00008", "--repeats", "1", "--working-set-gib", "0.0001"]


def test_bench_prints_bandwidths_and_ratio(capsys):
    _bench().main([*TINY, "--kv-dtype", "bfloat16"])
    out = capsys.readouterr().out
    assert "host read bandwidth" in out and "skipped (> --max-kv-gib)" in out
    assert out.strip().splitlines()[-1].count("|") == 4  # the summary row: read GB/s | attention GB/s | ratio


def test_bench_times_int8_beside_bfloat16_by_default(capsys):
    _bench().main(TINY)
    lines = capsys.readouterr().out.strip().splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith("decode attention"))
    assert "int8's speed-up over it" in lines[i] and lines[i + 1].split()[-3:] == ["int8", "ms", "x"]
    assert len(lines[i + 2].split()) == 8  # batch, context, MiB, ms, GB/s, ratio, int8 ms, speed-up
    cells = lines[-1].strip("|").split("|")  # read GB/s | attention GB/s | ratio | int8 speed-up range
    low, high = (float(x) for x in cells[3].strip().rstrip("x").split("-"))
    assert len(cells) == 4 and 0 < low <= high


def test_bench_times_latent_attention_against_llvms_vector_width(capsys):
    _bench().main([*TINY, "--kv-dtype", "bfloat16", "--latent", "4", "64", "2", "128"])
    lines = capsys.readouterr().out.strip().splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith("latent attention"))
    reference = numba_target.NO_256_BIT_PREFERENCE in numba_target.compiled_features().split(",")
    assert ("reference: LLVM's own vector width" in lines[i]) == reference
    rows = [line.split() for line in lines[i + 2:]]
    assert [r[:2] for r in rows] == [["4", "64"], ["2", "128"]]
    assert all(len(r) == (6 if reference else 4) and float(r[2]) > 0 for r in rows)


@pytest.mark.parametrize("flags, message", [
    (["--latent", "2", "16", "3"], "--latent takes (batch, context) pairs, got 3 numbers"),
    (["--busy-cores", "-1"], "--busy-cores must be >= 0, got -1"),
    (["--busy-threads", "1"], "--busy-threads times the --busy-cores measurement: give --busy-cores too"),
    (["--busy-cores", "1", "--busy-threads", "0"], "--busy-threads must lie in 1.."),
    (["--link-load"], "--link-load needs a GPU; JAX's device here is cpu"),
    (["--idle-gap", "-1"], "--idle-gap must be >= 0 ms, got [-1.0]"),
    (["--pages", "0"], "--pages must be a positive number of GiB, got 0.0"),
    (["--working-set-gib", "0"], "--working-set-gib must be a positive number of GiB, got 0.0"),
    (["--engine-shape", "0", "16"], "--engine-shape takes a batch and a context of at least 1, got [0, 16]")])
def test_bench_refuses_bad_flags(capsys, flags, message):
    with pytest.raises(SystemExit):
        _bench().main([*TINY, *flags])
    assert message in capsys.readouterr().err


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs 2 numba threads")
def test_bench_times_the_decode_shape_with_cores_busy_at_each_thread_count(capsys):
    _bench().main([*TINY, "--kv-dtype", "bfloat16", "--busy-cores", "1", "--threads", "2", "--busy-threads", "1", "2"])
    lines = capsys.readouterr().out.splitlines()
    i = next(i for i, x in enumerate(lines) if x.startswith("with 1 busy process(es) (spinning)"))
    rows = [x.split() for x in lines[i + 2:i + 4]]
    assert [r[0] for r in rows] == ["2", "1"]  # --threads first, then the others, each once
    assert all(float(x) > 0 for r in rows for x in r[1:4])
    cores = len(os.sched_getaffinity(0))  # an even spread: 2 threads' work over the free cores (1 of 2 on CI)
    assert [float(r[4]) for r in rows] == [round(min(2, cores) / min(n, max(cores - 1, 1)), 2) for n in (2, 1)]


def test_bench_times_the_decode_shape_after_idle_gaps(capsys, monkeypatch):
    bench, slept = _bench(), []
    monkeypatch.setattr(bench.time, "sleep", lambda s: slept.append(s))  # the module's `time`: sleeps counted, not slept
    bench.main([*TINY, "--kv-dtype", "bfloat16", "--idle-gap", "2", "0.5"])
    repeats = int(TINY[TINY.index("--repeats") + 1]) + 1  # and the warm-up round
    assert [s for s in slept if s] == [0.002] * repeats + [0.0005] * repeats  # a sleep before each call of each gap
    lines = capsys.readouterr().out.splitlines()
    i = next(i for i, x in enumerate(lines) if x.startswith("after an idle gap before each call"))
    rows = [x.split() for x in lines[i + 2:i + 5]]
    assert [r[0] for r in rows] == ["0", "2", "0.5"] and rows[0][2] == "1.00"  # back to back, then each gap
    assert all(float(x) > 0 for r in rows for x in r[1:])


def _caches_made(bench, monkeypatch) -> list[tuple[tuple, dict]]:
    """(args, kwargs) of each HostKVCache the bench makes from here on (the class's own `footprint` kept)."""
    made, real = [], bench.HostKVCache

    def cache(*args, **kwargs):
        made.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(bench, "HostKVCache", cache)
    monkeypatch.setattr(cache, "footprint", real.footprint, raising=False)
    return made


def test_bench_compares_the_caches_page_sizes_first(capsys, monkeypatch):
    bench = _bench()
    real, made = bench.HostKVCache, _caches_made(bench, monkeypatch)
    bench.main([*TINY, "--kv-dtype", "bfloat16", "--pages", "0.05"])
    layers = round(0.05 * 2**30 / real.footprint(1, 256, 128, 2, 64))  # 3 layers of the engine's micro-batch
    made = [(args[0], kwargs["huge_pages"]) for args, kwargs in made]
    assert made[:2] == [(layers, False), (layers, True)] and layers > 1  # 4 KiB first, then huge, each filled
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("KV cache pages (0.05 GiB bfloat16 each, fresh memory)")  # before anything else
    rows = [x.split() for x in lines[2:5]]
    assert [r[:2] for r in rows[:2]] == [["4", "KiB"], ["2", "MiB"]] and rows[2][0] == "x"
    (small_gbs, small_ms), (huge_gbs, huge_ms) = ((float(x) for x in r[2:4]) for r in rows[:2])
    assert min(small_gbs, small_ms, huge_gbs, huge_ms) > 0
    ratios = [float(x) for x in rows[2][1:3]]  # of the unrounded figures
    assert ratios == [pytest.approx(huge_gbs / small_gbs, rel=0.05, abs=0.01),
                      pytest.approx(huge_ms / small_ms, rel=0.05, abs=0.01)]


def test_bench_goes_round_a_working_set_of_layers(capsys, monkeypatch):
    """Each shape's calls go round the layers of a cache of about --working-set-gib (so that its KV comes from DRAM,
    not the last-level cache), the engine's decode micro-batch (--engine-shape) too."""
    bench, calls = _bench(), []
    real, attend = bench.HostKVCache, bench.HostKVCache.attend
    made = _caches_made(bench, monkeypatch)

    def counted_attend(self, layer, *args, **kwargs):
        calls.append((self, layer))  # the cache itself, kept alive: an id could be reused by the next one
        return attend(self, layer, *args, **kwargs)

    monkeypatch.setattr(real, "attend", counted_attend)
    bench.main([*TINY, "--kv-dtype", "bfloat16", "--idle-gap", "1", "--engine-shape", "2", "32", "--repeats", "4"])
    made = [args[:3] for args, _ in made]  # layers, slots, context
    layers = {(b, c): max(1, round(0.0001 * 2**30 / real.footprint(1, b, c, 2, 64))) for b, c in [(2, 64), (2, 32)]}
    assert made == [(layers[2, 64], 2, 64)] + [(layers[2, 32], 2, 32)] * 2  # the table's (3 x 64 skipped), the engine's
    assert min(layers.values()) >= 2  # the engine's shape back to back and after the gap: each more than one layer
    caches = list({id(c): c for c, _ in calls}.values())
    assert len(caches) == len(made)
    for cache, (L, *_) in zip(caches, made):  # 5 calls a cache (the warm-up and 4 repeats) going round its layers
        assert [layer for c, layer in calls if c is cache] == [r % L for r in range(5)]
    assert f"batch 2, context 32, going round {layers[2, 32]} layer(s)" in capsys.readouterr().out


def test_attention_gbs_is_one_layers_bytes_over_the_best_call(monkeypatch):
    """Each call reads one layer of the cache (its bytes over its layers), the fastest call taken."""
    from types import SimpleNamespace

    bench = _bench()
    cache = SimpleNamespace(nbytes=4e9, num_layers=4)
    monkeypatch.setattr(bench, "attention_seconds", lambda *a, **k: ([cache], [[0.5, 0.25, 1.0]]))
    assert bench.attention_gbs(2, 64, 8, 2, 64, 3, layers=4) == [(0.25, 4.0)]


def test_link_load_counts_only_the_copies_in_the_loaded_window(monkeypatch):
    """--link-load's GB/s: the copies that ended while the loaded figure was measured, over that time (not the
    copies of the warm-up before it). Copies stand in at 10 ms each, the attention at 0.1 s."""
    import jax

    bench = _bench()

    class Copy:
        def block_until_ready(self):
            time.sleep(0.01)

    monkeypatch.setattr(jax, "jit", lambda f, **k: lambda x: Copy())
    real_sleep = time.sleep
    monkeypatch.setattr(bench, "median_seconds", lambda *a, **k: (real_sleep(0.1), 0.1)[1])
    idle, busy, gbs = bench.link_load_seconds(2, 16, 8, 2, 64, 1, mib=1)
    assert (idle, busy) == (0.1, 0.1)
    # no copy ends sooner than 10 ms after the one before: at most one more than 0.1 s / 10 ms in the window (the
    # warm-up's 0.2 s of copies, counted too, would give about 3x); a loaded machine's longer sleeps give fewer
    assert 0 < gbs <= 1.1 * 2**20 / 0.01 / 1e9 + 1e-9
