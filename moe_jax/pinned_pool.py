"""XLA's pinned-host memory pool, which holds the experts the offload engine streams.

On a GPU backend, `pinned_host` arrays come from a BFC allocator whose cap, XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB,
is read once, when JAX starts the backend (DESIGN.md §3). The pool grows by doubling regions up to the cap,
so once it holds more than half of the cap it has reserved about all of it: the cap is what host memory
loses to the pool. The engine's pinned arrays are one chunk of one weight each, a micro-batch's share of a
layer's streamed experts (at most one layer's, 0.94 GB for Mixtral 8x7B, at one micro-batch), small next to
the regions, so a cap 5% + 2 GiB above the streamed bytes holds them (DESIGN.md's fragmentation was with 5 GB
arrays; on an H200, 7.55 GiB of 672 MiB arrays, a layer's weight whole, did not fit into a 9 GiB pool). HRM
counts the same cap, and a cap fixed already must be at least that.
"""
from __future__ import annotations

import logging
import os

import numpy as np

from moe_jax.expert_pages import ExpertPages
from moe_jax.expert_codec import streamed_expert_bytes

log = logging.getLogger("moe_jax")

LIMIT_VAR = "XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB"
DEFAULT_CAP_GIB = 64  # XLA's cap when LIMIT_VAR is unset (DESIGN.md §3: 5 GB arrays failed at 60 GB)
MARGIN, SLACK_GIB = 1.05, 2
GiB = 2**30
# The prefill's k/v wait in the pool, in pinned arrays, until the CPU has written them into the host KV cache;
# before it runs a prefill call, the engine waits for the oldest writes until that call's k/v and those
# still waiting come to at most this many bytes (or the call's alone, where they are more), a part of SLACK_GIB. Unbounded, a GPU that runs
# the prefill's layers faster than the CPU writes their k/v fills the pool (H200, Mixtral 8x7B, 1528 prompts
# of 77 tokens: about 0.5 GiB a layer, 16 GiB for the 32 layers, where the pool had 5 GiB to spare).
STAGED_BYTES = GiB


def cap_bytes(streamed_bytes):
    """The cap, in bytes, that `streamed_bytes` of streamed experts need (NumPy arrays broadcast)."""
    return (np.floor(MARGIN * np.asarray(streamed_bytes) / GiB) + SLACK_GIB) * GiB


def setting_gib(streamed_bytes: float) -> int:
    """The cap, in whole GiB (as LIMIT_VAR takes it), that `streamed_bytes` of streamed experts need."""
    return int(cap_bytes(streamed_bytes) // GiB)


def streamed_bytes(cfg, dtype, policy=None, codec: str = "none") -> int:
    """Bytes of the experts the offload engine keeps in pinned host memory under `policy`, coded as its
    expert_codec says (None: every expert, coded as `codec` says)."""
    if policy is None:
        return cfg.num_moe_layers * cfg.num_experts * streamed_expert_bytes(cfg, dtype, codec)
    n = ExpertPages.for_model(cfg, policy.resident_expert_fraction, 1).num_streamed
    return n * streamed_expert_bytes(cfg, dtype, policy.expert_codec)


def _gpu_backend_started() -> bool | None:
    """True: a GPU backend runs (its cap is fixed); False: one runs, not a GPU; None: none started yet."""
    from jax._src import xla_bridge

    backends = getattr(xla_bridge, "_backends", None) or {}
    if not backends:
        return None
    return any(name in ("cuda", "rocm", "gpu") for name in backends)


def fixed_cap_bytes() -> int | None:
    """The cap in force on a running GPU backend (LIMIT_VAR, else XLA's default); None while it can still be
    set (no backend yet) or where there is no pool (a CPU backend)."""
    if not _gpu_backend_started():
        return None
    try:
        return int(os.environ.get(LIMIT_VAR, DEFAULT_CAP_GIB)) * GiB
    except ValueError:  # XLA reads a whole number of GiB, else keeps its default
        return DEFAULT_CAP_GIB * GiB


_ours: str | None = None  # the LIMIT_VAR value this module set (it may revise it until the backend starts)


def reserve(streamed: int) -> None:
    """Set the cap for `streamed` bytes of experts before JAX starts its GPU backend. A setting of the
    caller's is left alone; a backend already running keeps its cap (a warning says when it is too small)."""
    global _ours
    gb = setting_gib(streamed)
    current = os.environ.get(LIMIT_VAR)
    if current is not None and current != _ours:
        log.log(logging.INFO if current.isdigit() and int(current) >= gb else logging.WARNING,
                "%s=%s set by the caller (the streamed experts need %d GiB)", LIMIT_VAR, current, gb)
        return
    started = _gpu_backend_started()
    if started is not None:  # too late: the backend read its settings already (it matters only for a GPU)
        if started and (fixed_cap_bytes() or 0) < gb * GiB:
            log.warning("JAX started with a %s GiB pinned-host pool; set %s=%d before it starts to stream %.1f GiB "
                        "of experts", current or DEFAULT_CAP_GIB, LIMIT_VAR, gb, streamed / GiB)
        return
    os.environ[LIMIT_VAR] = _ours = str(gb)
    log.info("%s=%d (pinned host pool for %.1f GiB of streamed experts)", LIMIT_VAR, gb, streamed / GiB)
