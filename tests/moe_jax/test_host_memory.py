"""Host memory from /proc/meminfo, and the memory a VM that grows with use does not show yet."""
from __future__ import annotations

import logging

from moe_jax import host_memory
from moe_jax.host_memory import MemInfo, available_bytes, meminfo


def test_meminfo_reads_total_and_available_in_bytes(tmp_path):
    path = tmp_path / "meminfo"
    path.write_text("MemTotal:       131072000 kB\nMemFree:          1000 kB\nMemAvailable:   122880000 kB\n"
                    "Buffers:            4 kB\n")
    assert meminfo(str(path)) == MemInfo(total=131072000 * 1024, available=122880000 * 1024)
    path.write_text("MemTotal:       131072000 kB\n")  # no MemAvailable: unknown, not a guess
    assert meminfo(str(path)) is None
    assert meminfo(str(tmp_path / "missing")) is None
    live = meminfo()
    assert live is not None and 0 < live.available <= live.total


def test_available_counts_planned_memory_the_host_does_not_show_yet(monkeypatch, caplog):
    GiB = 2**30
    monkeypatch.setattr(host_memory, "meminfo", lambda: MemInfo(total=40 * GiB, available=30 * GiB))
    with caplog.at_level(logging.WARNING, logger="moe_jax"):
        assert available_bytes() == 30 * GiB
        assert available_bytes(32 * GiB) == 30 * GiB  # planned below MemTotal: what the host shows
        assert not caplog.text
        assert available_bytes(125 * GiB) == (30 + 85) * GiB
    assert "MemTotal 40.0 GiB is below the 125.0 GiB this job is planned with" in caplog.text
    monkeypatch.setattr(host_memory, "meminfo", lambda: None)
    assert available_bytes(125 * GiB) is None
