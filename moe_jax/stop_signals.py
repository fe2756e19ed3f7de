"""SIGINT and SIGTERM during a job: an exception in the main thread, so that the job keeps what has
finished, says how to resume and exits with 128 + the signal number (130, 143)."""
from __future__ import annotations

import contextlib
import signal

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


@contextlib.contextmanager
def interruptible():
    """While active, the first SIGINT or SIGTERM raises Interrupted; later ones are ignored so that the
    caller's cleanup (closing the output) runs to its end. The previous handlers come back on exit."""
    def handle(signum, frame):
        for s in SIGNALS:
            signal.signal(s, signal.SIG_IGN)
        raise Interrupted(signum)

    old = {s: signal.signal(s, handle) for s in SIGNALS}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
