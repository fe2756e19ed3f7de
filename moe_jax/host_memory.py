"""The host memory a job can still take, in bytes, from /proc/meminfo.

Some virtual machines start with MemTotal far below the memory they were given and grow it as the guest
uses it (a Firecracker microVM whose balloon deflates on demand, for one). There MemAvailable understates
what a job can take. Given the memory the host is planned with (`planned`: the HRM hardware profile's host
memory), the part the kernel does not show yet, planned − MemTotal, counts as available too, and a log
line says so each time it changes the answer.
"""
from __future__ import annotations

import logging
from typing import NamedTuple

log = logging.getLogger("moe_jax")

GiB = 2**30


class MemInfo(NamedTuple):
    total: int  # MemTotal, bytes
    available: int  # MemAvailable, bytes


def meminfo(path: str = "/proc/meminfo") -> MemInfo | None:
    """MemTotal and MemAvailable from /proc/meminfo (Linux), or None where unknown."""
    fields = {}
    try:
        with open(path) as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name in ("MemTotal", "MemAvailable"):
                    fields[name] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    if len(fields) < 2:
        return None
    return MemInfo(fields["MemTotal"], fields["MemAvailable"])


def available_bytes(planned: float | None = None) -> int | None:
    """Bytes the host can still give: MemAvailable, plus planned − MemTotal where the host is planned with
    more than MemTotal shows (a VM that grows its memory with use); None where unknown."""
    info = meminfo()
    if info is None:
        return None
    unseen = int(planned - info.total) if planned is not None and planned > info.total else 0
    if unseen:
        log.warning("host memory: MemTotal %.1f GiB is below the %.1f GiB this job is planned with; counting "
                    "the %.1f GiB it does not show yet as available (MemAvailable %.1f GiB), as on a VM whose "
                    "memory grows with use", info.total / GiB, planned / GiB, unseen / GiB, info.available / GiB)
    return info.available + unseen
