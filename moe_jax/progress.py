"""Progress of a generation job: a tqdm bar on a terminal, plain periodic log lines otherwise."""
from __future__ import annotations

import logging
import sys
import time

from tqdm import tqdm

log = logging.getLogger("moe_jax")


class Progress:
    """Counts finished requests and generated tokens; shows tok/s and the ETA."""

    def __init__(self, total: int, every_s: float = 10.0):
        self.total, self.done, self.tokens, self.every_s = total, 0, 0, every_s
        self.start = self._last = time.perf_counter()
        self._bar = tqdm(total=total, unit="req", file=sys.stderr, dynamic_ncols=True) if sys.stderr.isatty() else None

    def update(self, requests: int, tokens: int) -> None:
        self.done += requests
        self.tokens += tokens
        now = time.perf_counter()
        rate = self.tokens / max(now - self.start, 1e-9)
        if self._bar is not None:
            self._bar.set_postfix_str(f"{rate:.1f} tok/s", refresh=False)
            self._bar.update(requests)
        elif now - self._last >= self.every_s or self.done == self.total:
            self._last = now
            eta = (now - self.start) / self.done * (self.total - self.done)
            log.info("progress: %d/%d requests, %d tokens, %.1f tok/s, ETA %.0f s",
                     self.done, self.total, self.tokens, rate, eta)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
