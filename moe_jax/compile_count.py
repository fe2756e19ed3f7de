"""How many XLA compiles this process has run, and their seconds: a compile inside a timed run is a stall
(seconds on a GPU, for a Pallas kernel's layer) that no figure should carry unnoticed.

`counts()` reads a process-wide tally kept by a JAX monitoring listener (registered on first use): the
backend compiles (one per new shape of a jitted call) and the seconds JAX reports for lowering them (Pallas
kernels included) and compiling them; tracing is left out (nested calls report it inside each other). Calls
served from JAX's caches count nothing.
"""
from __future__ import annotations

import threading
from typing import NamedTuple

import jax

_EVENTS = ("/jax/core/compile/jaxpr_to_mlir_module_duration", "/jax/core/compile/backend_compile_duration")
_COMPILE = _EVENTS[-1]


class Compiles(NamedTuple):
    """compiles: backend compiles; seconds: their lowering and compiling, as JAX reports them."""

    compiles: int = 0
    seconds: float = 0.0

    def __sub__(self, earlier: "Compiles") -> "Compiles":
        return Compiles(self.compiles - earlier.compiles, self.seconds - earlier.seconds)


_tally = [0, 0.0]
_lock = threading.Lock()
_registered = False


def _listen(event: str, duration_secs: float, **_) -> None:
    if event in _EVENTS:
        with _lock:
            _tally[0] += event == _COMPILE
            _tally[1] += duration_secs


def counts() -> Compiles:
    """The process's compiles so far (from the first call of this function on)."""
    global _registered
    with _lock:
        if not _registered:
            jax.monitoring.register_event_duration_secs_listener(_listen)
            _registered = True
        return Compiles(*_tally)
