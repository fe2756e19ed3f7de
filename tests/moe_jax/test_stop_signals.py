"""stop_signals: SIGINT/SIGTERM as Interrupted in the main thread, once, even where Python swallows it."""
from __future__ import annotations

import gc
import io
import logging
import os
import signal
import time

import pytest

from moe_jax.stop_signals import Interrupted, interruptible


def wait_for_interrupt(seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.01)


def test_an_interrupted_swallowed_by_a_gc_callback_comes_again():
    """Raised inside a garbage-collection callback (JAX installs one), the exception is only reported as
    "ignored": the signal is sent again, and the job stops all the same."""
    fired = []

    def callback(phase, info):
        if phase == "start" and not fired:
            fired.append(phase)
            signal.getsignal(signal.SIGINT)(signal.SIGINT, None)  # the handler, as if the signal landed here

    gc.callbacks.append(callback)
    try:
        with pytest.raises(Interrupted) as e, interruptible():
            gc.collect()
            assert fired
            wait_for_interrupt()
    finally:
        gc.callbacks.remove(callback)
    assert e.value.exit_code == 130 and signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_interrupted_is_no_exception_for_the_logging_module(caplog):
    """Raised while a line is logged, it stops the job rather than being printed by logging's error handler."""
    class SlowStream(io.StringIO):
        def write(self, s):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.5)  # the signal's handler runs in here, inside StreamHandler.emit's `except Exception`
            return super().write(s)

    log = logging.getLogger("moe_jax.test_stop_signals")
    handler = logging.StreamHandler(SlowStream())
    log.addHandler(handler)
    try:
        with pytest.raises(Interrupted) as e, interruptible():
            log.warning("a line")
            pytest.fail("the job went on")
    finally:
        log.removeHandler(handler)
    assert e.value.exit_code == 143


def test_later_signals_are_ignored_while_the_first_unwinds():
    with pytest.raises(Interrupted) as e, interruptible():
        try:
            os.kill(os.getpid(), signal.SIGINT)
            wait_for_interrupt()
        finally:
            os.kill(os.getpid(), signal.SIGTERM)  # during the cleanup: ignored
            time.sleep(0.1)
    assert e.value.signum == signal.SIGINT
