"""Hardware profiles: built-ins, JSON files, and calibrate on this machine."""
import dataclasses
import json

import numpy as np
import pytest

from moe_jax.hrm import PROFILES, Hardware, HardwareError, choose_policy, hardware_profile
from moe_jax.hrm.calibrate import main as calibrate_main
from moe_jax.presets import preset_config


def test_builtin_profiles():
    assert set(PROFILES) == {"t4", "l4", "a100-40gb", "a100-80gb", "h100-80gb", "h200"}
    l4, h100 = hardware_profile("l4"), hardware_profile("h100-80gb")
    assert (l4.gpu_memory, l4.gpu_bandwidth, l4.gpu_flops, l4.cpu_flops) == (24 * 2**30, 285e9, 104e12, 1.6e12)
    assert (l4.link_bandwidth, l4.host_memory, l4.host_bandwidth) == (16e9, 192 * 2**30, 76e9)
    # DESIGN.md §3, measured: dense bf16, pinned H2D, host DRAM read (16 threads), numba attention, host RAM
    assert (h100.gpu_flops, h100.link_bandwidth, h100.host_bandwidth) == (796e12, 52e9, 56.6e9)
    assert (h100.attention_bandwidth, h100.host_memory) == (43e9, 125 * 2**30)
    # the H200 machine: its own GPU and its host as `calibrate` measured it; the H100 machine's host is of the
    # same class, its CPU compute roof taken from that measurement
    h200 = hardware_profile("h200")
    assert (h200.gpu_memory, h200.gpu_bandwidth, h200.host_bandwidth) == (139 * 2**30, 4.8e12, 83e9)
    assert (h200.attention_bandwidth, h200.int8_attention_bandwidth, h200.cpu_flops) == (52e9, 34.6e9, 0.34e12)
    assert (h100.cpu_flops, h100.link_bandwidth, h100.host_memory) == (h200.cpu_flops, h200.link_bandwidth,
                                                                       h200.host_memory)
    assert h100.int8_attention_bandwidth / h100.attention_bandwidth == pytest.approx(34.6 / 52)


def test_grouped_expert_matmuls_slow_down_with_few_rows_per_expert(mixtral):
    """The expert op runs at the measured fraction of the dense rate for its rows per expert (interpolated in
    log2, constant beyond the measured points), relative to expert_flops where a profile has one; other ops at
    gpu_flops."""
    from moe_jax.hrm.costs import decode_ops
    from moe_jax.hrm.hardware import GROUPED_MATMUL_EFFICIENCY, grouped_matmul_efficiency

    assert grouped_matmul_efficiency(256) == pytest.approx(0.55) and grouped_matmul_efficiency(1e6) == pytest.approx(0.83)
    assert grouped_matmul_efficiency(512) == pytest.approx((0.55 + 0.75) / 2)  # halfway in log2 from 256 to 1024
    assert list(grouped_matmul_efficiency([0, 4, 64, 1024])) == pytest.approx([0.55, 0.55, 0.55, 0.75])
    assert [r for r, _ in GROUPED_MATMUL_EFFICIENCY] == sorted(r for r, _ in GROUPED_MATMUL_EFFICIENCY)
    h200 = hardware_profile("h200")
    ops = decode_ops(mixtral, "bfloat16", 1024, 100)  # 2048 rows over 8 experts: 256 each
    experts = ops["experts"]
    assert experts.rows_per_group == pytest.approx(256, rel=1e-3)
    assert h200.gpu_seconds(experts) == pytest.approx(max(experts.flops / (h200.gpu_flops * 0.55),
                                                          experts.bytes / h200.gpu_bandwidth))
    measured = dataclasses.replace(h200, expert_flops=600e12)  # calibrated at many rows: the curve scales it
    assert measured.gpu_seconds(experts) == pytest.approx(experts.flops / (600e12 * 0.55 / 0.83))
    assert h200.gpu_seconds(ops["o_proj"]) == pytest.approx(max(ops["o_proj"].flops / h200.gpu_flops,
                                                                ops["o_proj"].bytes / h200.gpu_bandwidth))
    none = decode_ops(mixtral, "bfloat16", np.array([0, 1]), 100)["experts"]  # no tokens: no time, no NaN
    assert list(h200.gpu_seconds(none)) == [0, pytest.approx(h200.gpu_seconds(decode_ops(mixtral, "bfloat16", 1, 100)["experts"]))]


def test_json_profile(tmp_path):
    path = tmp_path / "hw.json"
    path.write_text(json.dumps({**dataclasses.asdict(PROFILES["t4"]), "name": "mine", "notes": {"x": 1}}))
    assert hardware_profile(str(path)) == dataclasses.replace(PROFILES["t4"], name="mine")


@pytest.mark.parametrize("content, message", [
    ("{", "invalid JSON at line 1"),
    ("[1]", "expected a JSON object"),
    (json.dumps({"name": "x"}), "missing field"),
    (json.dumps({**dataclasses.asdict(PROFILES["t4"]), "gpu_tflops": 1}), "unknown field"),
    (json.dumps({**dataclasses.asdict(PROFILES["t4"]), "link_bandwidth": -1}), "link_bandwidth must be a positive"),
    (json.dumps({**dataclasses.asdict(PROFILES["t4"]), "link_bandwidth": None}), "link_bandwidth must be a positive"),
    (json.dumps({**dataclasses.asdict(PROFILES["t4"]), "gpu_flops": 0}), "gpu_flops must be a positive"),
])
def test_bad_json_profile(tmp_path, content, message):
    path = tmp_path / "hw.json"
    path.write_text(content)
    with pytest.raises(HardwareError, match=message):
        hardware_profile(str(path))


def test_unknown_profile():
    with pytest.raises(HardwareError, match="unknown hardware 'v100'"):
        hardware_profile("v100")


def test_calibrate_quick(tmp_path, capsys):
    path = tmp_path / "me.json"
    assert calibrate_main(["--quick", "--output", str(path), "--name", "here"]) == 0
    hw = hardware_profile(str(path))
    assert isinstance(hw, Hardware) and hw.name == "here"
    assert hw.gpu_flops > 0 and hw.link_bandwidth > 0 and hw.launch_seconds > 0
    notes = json.loads(path.read_text())["notes"]
    assert hw.attention_bandwidth > 0
    assert (hw.int8_attention_bandwidth or 0) > 0 or "timing noise" in notes["int8_attention_bandwidth"]
    assert (hw.attention_row_seconds or 0) > 0 or notes["attention_row_seconds"].startswith("none: the short context")
    assert 0 < hw.cpu_flops != notes["host_matmul_flops"] > 0  # the attention kernel's rate, the BLAS one noted
    assert choose_policy(preset_config("tiny-mixtral"), hw, 16, 16).policy.batch_size >= 1


@pytest.mark.parametrize("short_s, per_row, why", [
    (1.5, 0.5 / (96 * 4), None),  # 128 rows of context 4 against 32 of 16: 96 more rows, 4 query heads
    (0.9, None, "no slower than the long one"),
    (3.0, None, "timing noise"),  # 2 s / 96 rows: the long call's 32 rows would take 0.67 of its 1 s
])
def test_calibrate_prices_query_rows_only_where_the_timings_allow(monkeypatch, short_s, per_row, why):
    """calibrate's fit t = rows x heads x per row + bytes / bandwidth, from a long-context and a short-context
    call over the same bytes: a per-row time only where it is positive and leaves the long call mostly bytes
    (noise on a busy machine gave a negative bandwidth before); the bandwidth always positive."""
    from types import SimpleNamespace

    from moe_jax.hrm import calibrate

    times = {16: 1.0, 4: short_s}  # context -> seconds of the call
    monkeypatch.setattr(calibrate, "_timed_host_attention", lambda batch, context, *a: (
        SimpleNamespace(nbytes=1e9), times[context]))
    bw, row, note = calibrate.host_attention_rates(32, 16, 4, 1, 8, short_context=4)
    assert row == pytest.approx(per_row) if per_row else row is None
    assert (note is None) if why is None else why in note
    assert bw == pytest.approx(1e9 / (1.0 - 32 * 4 * (row or 0)))


def test_calibrate_survives_a_kernel_that_fails_here(tmp_path, monkeypatch):
    """A kernel that cannot compile or run on a new machine costs its figure, noted, not the profile."""
    from moe_jax.hrm import calibrate

    def broken(*args):
        raise RuntimeError("Mosaic GPU lowering failed")

    monkeypatch.setattr(calibrate, "expert_flops", broken)
    path = tmp_path / "me.json"
    assert calibrate_main(["--quick", "--output", str(path)]) == 0
    d = json.loads(path.read_text())
    assert d["expert_flops"] is None and hardware_profile(str(path)).link_bandwidth > 0
    assert any("not measured: RuntimeError: Mosaic GPU lowering failed" in str(v) for v in d["notes"].values())


def test_calibrate_checks_its_arguments_before_measuring(tmp_path, capsys):
    for argv, message in ((["--output", str(tmp_path / "missing" / "x.json")], "give a file in an existing directory"),
                          (["--output", str(tmp_path)], "give a file in an existing directory"),
                          (["--output", str(tmp_path / "x.json"), "--moe-impl", "palas"], "invalid choice: 'palas'")):
        with pytest.raises(SystemExit) as e:
            calibrate_main(["--quick", *argv])
        assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_attention_rows_cost_their_own_time_on_the_cpu():
    """With attention_row_seconds, the CPU term of a decode adds each query row and head's time: for as many KV
    bytes, short contexts (more rows) cost more; without it (the built-in profiles), bytes alone."""
    from moe_jax.hrm.costs import decode_ops

    cfg, base = preset_config("mixtral-8x7b"), PROFILES["h200"]
    timed = dataclasses.replace(base, attention_row_seconds=1e-8)
    long, short = (decode_ops(cfg, "bfloat16", b, c)["attention"] for b, c in ((256, 1024), (4096, 64)))
    assert long.head_rows == 256 * 32 and short.head_rows == 4096 * 32
    for op in (long, short):
        assert timed.cpu_seconds(op) == pytest.approx(base.cpu_seconds(op) + op.head_rows * 1e-8)
    assert timed.cpu_seconds(short) / timed.cpu_seconds(long) > base.cpu_seconds(short) / base.cpu_seconds(long) > 1
    assert base.attention_row_seconds is None


def test_calibrate_takes_the_best_of_its_runs_after_a_warm_up(monkeypatch):
    """best_seconds: the fastest of `repeats` timed calls (not their mean), the warm-up call untimed."""
    from moe_jax.hrm import calibrate

    clock, calls = iter([0.0, 3.0, 10.0, 11.0, 20.0, 22.0]), []
    monkeypatch.setattr(calibrate.time, "perf_counter", lambda: next(clock))
    assert calibrate.best_seconds(lambda: calls.append(1), repeats=3) == 1.0 and len(calls) == 4


def test_calibrate_rates_are_bytes_and_flops_per_second(monkeypatch):
    """Each figure's units as HRM reads them (bytes/s, FLOP/s) from a call of a known time: the link copies its
    bytes once, the device copy reads and writes them, the host read reads them once."""
    from moe_jax.hrm import calibrate

    monkeypatch.setattr(calibrate, "best_seconds", lambda fn, repeats=3: (fn(), 0.5)[1])
    n = 2**20
    assert calibrate.link_bandwidth(n) == n / 0.5
    assert calibrate.device_copy_bandwidth(n) == 2 * n / 0.5
    assert calibrate.host_read_bandwidth(n, 2) == n / 0.5
    assert calibrate.device_matmul_flops(64) == 2 * 64**3 / 0.5


def test_calibrate_profile_takes_the_largest_token_counts_expert_rate(monkeypatch):
    """expert_flops is the rate at the most tokens (rows per expert HRM's curve scales down from); every count's
    rate is noted."""
    from moe_jax.hrm import calibrate

    monkeypatch.setattr(calibrate, "expert_flops", lambda tokens, *a: tokens * 1e9)
    hw, notes = calibrate.calibrate(calibrate.QUICK, "here")
    assert hw.expert_flops == max(calibrate.QUICK.expert_tokens) * 1e9
    assert notes["expert_flops_by_tokens"] == {str(t): t * 1e9 for t in calibrate.QUICK.expert_tokens}


def test_builtin_launch_time_and_t4():
    """The built-in profiles' launch time (50 us: unmeasured, the default) and MoE-Lightning's T4 (the original's
    HardwareConfig)."""
    assert {p.launch_seconds for p in PROFILES.values()} == {50e-6}
    t4 = PROFILES["t4"]
    assert (t4.gpu_memory, t4.gpu_bandwidth, t4.gpu_flops, t4.cpu_flops) == (15 * 2**30, 300e9, 65e12, 0.8e12)
    assert (t4.link_bandwidth, t4.host_memory, t4.host_bandwidth) == (16e9, 192 * 2**30, 76e9)
