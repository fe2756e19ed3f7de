"""The host memory a job can still take, in bytes, from /proc/meminfo.

Some virtual machines start with MemTotal far below the memory they were given and grow it as the guest
uses it: a balloon device holds the rest and gives it back on demand. There MemAvailable understates what
a job can take, so two things count as available beside it, each logged when it changes the answer:
  * memory the balloon holds (/proc/vmstat nr_balloon_pages), up to the host memory the job is planned
    with (`planned`, e.g. the HRM hardware profile's) beyond MemTotal;
  * or, where MOE_JAX_HOST_MEMORY_GB says how much memory the machine really has (the size its provider
    gives, which MemTotal may not show yet), that amount beyond MemTotal.
"""
from __future__ import annotations

import logging
import os
from typing import NamedTuple

log = logging.getLogger("moe_jax")

GiB = 2**30
HOST_MEMORY_VAR = "MOE_JAX_HOST_MEMORY_GB"


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


def balloon_bytes(path: str = "/proc/vmstat") -> int:
    """Bytes a virtio balloon holds (the guest can get them back), 0 where there is none or it is unknown."""
    try:
        with open(path) as f:
            for line in f:
                name, _, value = line.partition(" ")
                if name == "nr_balloon_pages":
                    return int(value) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        pass
    return 0


def _declared_bytes() -> float | None:
    value = os.environ.get(HOST_MEMORY_VAR)
    if value is None:
        return None
    try:
        gb = float(value)
    except ValueError:
        gb = -1.0
    if not gb > 0:
        raise ValueError(f"{HOST_MEMORY_VAR}={value!r}: expected the machine's host memory in GiB, a positive number")
    return gb * GiB


def available_bytes(planned: float | None = None) -> int | None:
    """Bytes the host can still give: MemAvailable, plus what MemTotal does not show yet (see the module
    doc); None where unknown."""
    info = meminfo()
    if info is None:
        return None
    declared = _declared_bytes()
    if declared is not None:
        unseen, why = max(0, int(declared - info.total)), f"{HOST_MEMORY_VAR} declares {declared / GiB:.1f} GiB"
    else:
        unseen = min(max(0, int(planned - info.total)), balloon_bytes()) if planned is not None else 0
        why = "a balloon holds it (this job is planned with %.1f GiB)" % (planned / GiB) if unseen else ""
    if unseen:
        log.warning("host memory: counting %.1f GiB beyond MemTotal %.1f GiB as available (MemAvailable %.1f "
                    "GiB): %s", unseen / GiB, info.total / GiB, info.available / GiB, why)
    return info.available + unseen


def total_bytes() -> int:
    """The machine's host memory, bytes: MOE_JAX_HOST_MEMORY_GB where declared, else MemTotal plus what a
    balloon holds (the physical pages where /proc/meminfo is unknown)."""
    declared = _declared_bytes()
    if declared is not None:
        return int(declared)
    info = meminfo()
    total = info.total if info else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return total + balloon_bytes()
