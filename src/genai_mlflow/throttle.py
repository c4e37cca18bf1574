"""``Throttle``: at most one log line per interval, so a storm of failures is not a storm of logs."""

from __future__ import annotations

import time


class Throttle:
    def __init__(self, interval_s: float) -> None:
        self._interval = interval_s
        self._next = 0.0

    def ready(self) -> bool:
        now = time.monotonic()
        if now < self._next:
            return False
        self._next = now + self._interval
        return True
