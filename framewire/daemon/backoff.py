"""Exponential backoff with jitter, for reconnects and endpoint restarts."""

from __future__ import annotations

import random

from ..config import BackoffConfig

__all__ = ["Backoff"]


class Backoff:
    """Delays ``min(initial * factor**n, maximum)``, each drawn from [delay/2, delay].

    Call :meth:`next_delay` before each retry; call :meth:`reset` after a success that lasted
    (the caller decides what "lasted" means, usually ``config.stable_after``). Pass a seeded
    ``random.Random`` to get a reproducible schedule.
    """

    def __init__(self, config: BackoffConfig, rng: random.Random | None = None) -> None:
        self.config = config
        self._rng = rng or random.Random()
        self.attempt = 0

    def reset(self) -> None:
        self.attempt = 0

    def ceiling(self) -> float:
        """The un-jittered delay for the next attempt."""
        config = self.config
        return min(config.initial * config.factor**self.attempt, config.maximum)

    def next_delay(self) -> float:
        ceiling = self.ceiling()
        # Stop growing the exponent once capped so factor**attempt cannot overflow.
        if ceiling < self.config.maximum:
            self.attempt += 1
        return self._rng.uniform(ceiling / 2, ceiling)
