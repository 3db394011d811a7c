"""A counted, rate-limited warning, for bad input a peer may send thousands of times."""

from __future__ import annotations

import logging
import math
from collections.abc import MutableMapping
from typing import Final

import trio

__all__ = ["RateLimitedWarning"]

#: Default seconds between two log lines of one :class:`RateLimitedWarning`.
INTERVAL: Final = 10.0


class RateLimitedWarning:
    """Counts every occurrence; logs at most one line per ``interval`` seconds.

    Each line says how many occurrences there were in all, and how many since the last line
    went unlogged. The count is also kept in ``detail[key]`` (an endpoint's status detail).
    Time is trio's clock, so MockClock drives it in tests; call it from inside trio.
    """

    def __init__(
        self,
        log: logging.Logger,
        what: str,
        *,
        detail: MutableMapping[str, object] | None = None,
        key: str | None = None,
        interval: float = INTERVAL,
    ) -> None:
        self.log = log
        self.what = what
        self.detail = detail
        self.key = key
        self.interval = interval
        self.count = 0
        self.lines = 0
        self._unlogged = 0
        self._next_line = -math.inf

    def __call__(self, reason: str) -> None:
        """One more occurrence, for ``reason``; logs it if the interval has passed."""
        self.count += 1
        if self.detail is not None and self.key is not None:
            self.detail[self.key] = self.count
        now = trio.current_time()
        if now < self._next_line:
            self._unlogged += 1
            return
        self._next_line = now + self.interval
        self.lines += 1
        if self._unlogged:
            self.log.warning(
                "%s: %s (%d in all; %d more since the last report)",
                self.what,
                reason,
                self.count,
                self._unlogged,
            )
        else:
            self.log.warning("%s: %s (%d in all)", self.what, reason, self.count)
        self._unlogged = 0
