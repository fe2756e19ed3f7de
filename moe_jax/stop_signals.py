"""SIGINT and SIGTERM during a job: an exception in the main thread, so that the job keeps what has
finished, says how to resume and exits with 128 + the signal number (130, 143)."""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)
REDELIVER_S = 0.05  # after a swallowed Interrupted, the signal comes again this much later


class Interrupted(BaseException):
    """A BaseException, as KeyboardInterrupt: no `except Exception` on the way may take it for an error of its
    own (the logging module's would print it and carry on, when the signal lands while a line is logged)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


@contextlib.contextmanager
def interruptible():
    """While active, the first SIGINT or SIGTERM raises Interrupted; later ones are ignored so that the
    caller's cleanup (closing the output) runs to its end. Where Python swallows the exception (raised inside a
    garbage-collection callback, as JAX installs one, it is only reported as "ignored"), the same signal is sent
    again shortly after, until one is raised where it propagates. The previous handlers come back on exit."""
    state = {"raised": False, "again": None}  # again: the timer sending a swallowed signal again

    def handle(signum, frame):
        if state["raised"]:  # a later signal, while the first one unwinds the job
            return
        state["raised"] = True
        raise Interrupted(signum)

    def unraisable(hook):
        if not isinstance(hook.exc_value, Interrupted):
            return previous_hook(hook)
        state["raised"] = False
        state["again"] = threading.Timer(REDELIVER_S, os.kill, (os.getpid(), hook.exc_value.signum))
        state["again"].start()

    previous_hook, sys.unraisablehook = sys.unraisablehook, unraisable
    old = {s: signal.signal(s, handle) for s in SIGNALS}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        sys.unraisablehook = previous_hook
        if state["again"] is not None:
            state["again"].cancel()
