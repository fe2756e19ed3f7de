"""Host memory from /proc/meminfo, and the memory a VM that grows with use does not show yet."""
from __future__ import annotations

import logging

import pytest

from moe_jax import host_memory
from moe_jax.host_memory import HOST_MEMORY_VAR, MemInfo, available_bytes, balloon_bytes, meminfo

GiB = 2**30


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


def test_balloon_bytes_from_vmstat(tmp_path):
    path = tmp_path / "vmstat"
    path.write_text("nr_free_pages 12\nnr_balloon_pages 1024\nballoon_inflate 7\n")
    assert balloon_bytes(str(path)) == 1024 * 4096
    path.write_text("nr_free_pages 12\n")
    assert balloon_bytes(str(path)) == 0 and balloon_bytes(str(tmp_path / "missing")) == 0


def test_only_a_balloon_or_a_declared_size_counts_beyond_memtotal(monkeypatch, caplog):
    monkeypatch.delenv(HOST_MEMORY_VAR, raising=False)
    monkeypatch.setattr(host_memory, "meminfo", lambda: MemInfo(total=40 * GiB, available=30 * GiB))
    monkeypatch.setattr(host_memory, "balloon_bytes", lambda: 0)
    with caplog.at_level(logging.WARNING, logger="moe_jax"):
        assert available_bytes() == 30 * GiB
        # a profile's memory is no evidence: a smaller machine with that GPU must still be refused
        assert available_bytes(125 * GiB) == 30 * GiB
        assert not caplog.text
        monkeypatch.setattr(host_memory, "balloon_bytes", lambda: 50 * GiB)
        assert available_bytes(32 * GiB) == 30 * GiB  # planned below MemTotal: what the host shows
        assert available_bytes(125 * GiB) == (30 + 50) * GiB  # the balloon's, at most planned - MemTotal
        assert available_bytes(70 * GiB) == (30 + 30) * GiB
    assert "counting 50.0 GiB beyond MemTotal 40.0 GiB as available" in caplog.text
    monkeypatch.setenv(HOST_MEMORY_VAR, "125")
    assert available_bytes() == (30 + 85) * GiB
    monkeypatch.setenv(HOST_MEMORY_VAR, "lots")
    with pytest.raises(ValueError, match="MOE_JAX_HOST_MEMORY_GB='lots': expected the machine's host memory"):
        available_bytes()
    monkeypatch.setattr(host_memory, "meminfo", lambda: None)
    assert available_bytes(125 * GiB) is None


def test_total_is_declared_or_memtotal_with_the_balloon(monkeypatch):
    from moe_jax.host_memory import total_bytes

    monkeypatch.delenv(HOST_MEMORY_VAR, raising=False)
    monkeypatch.setattr(host_memory, "meminfo", lambda: MemInfo(total=40 * GiB, available=30 * GiB))
    monkeypatch.setattr(host_memory, "balloon_bytes", lambda: 85 * GiB)
    assert total_bytes() == 125 * GiB
    monkeypatch.setattr(host_memory, "balloon_bytes", lambda: 0)
    assert total_bytes() == 40 * GiB
    monkeypatch.setenv(HOST_MEMORY_VAR, "128")
    assert total_bytes() == 128 * GiB
