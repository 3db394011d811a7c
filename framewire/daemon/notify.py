"""systemd's notify protocol, spoken directly on ``$NOTIFY_SOCKET`` (no dependency).

Outside systemd (no ``NOTIFY_SOCKET``) every call does nothing. A failed send is logged once
at debug level and otherwise ignored, as sd_notify(3) does: the daemon must never fail
because its supervisor went away.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

import trio

__all__ = ["SystemdNotifier", "monotonic_usec"]

log = logging.getLogger("framewire.systemd")


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, as systemd wants it for ``MONOTONIC_USEC``.

    Never ``trio.current_time()``: trio's clock has a random offset (and may be a MockClock).
    """
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class SystemdNotifier:
    """Sends notify messages to systemd.

    ``address`` is the value of ``NOTIFY_SOCKET``: a filesystem path, or ``@name`` for an
    abstract socket. ``watchdog_interval`` is how often to send ``WATCHDOG=1`` (half of
    ``WATCHDOG_USEC``), or None when systemd did not ask for a watchdog.
    """

    def __init__(self, address: str | None, *, watchdog_usec: int | None = None) -> None:
        self.address = address
        self.watchdog_interval = watchdog_usec / 2e6 if watchdog_usec else None
        self._socket: trio.socket.SocketType | None = None
        self._failed = False
        #: Every message sent, newest last (the most recent few), for status and tests.
        self.sent: list[str] = []

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> SystemdNotifier:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or None
        watchdog_usec: int | None = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            watchdog_usec = int(usec)
        return cls(address, watchdog_usec=watchdog_usec)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    async def notify(self, *fields: str) -> None:
        """Send ``KEY=value`` fields as one message. Never raises for a send failure."""
        if self.address is None:
            await trio.lowlevel.checkpoint()
            return
        message = "\n".join(fields)
        target = self.address
        if target.startswith("@"):
            target = "\0" + target[1:]
        try:
            if self._socket is None:
                self._socket = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            await self._socket.sendto(message.encode(), target)
        except OSError as exc:
            if not self._failed:
                log.debug("cannot notify systemd at %s: %s", self.address, exc)
                self._failed = True
            return
        self.sent = [*self.sent[-31:], message]

    async def ready(self, status: str) -> None:
        await self.notify("READY=1", f"STATUS={status}")

    async def reloading(self) -> None:
        await self.notify("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}")

    async def stopping(self) -> None:
        await self.notify("STOPPING=1")

    async def status(self, text: str) -> None:
        await self.notify(f"STATUS={text}")

    async def watchdog(self) -> None:
        await self.notify("WATCHDOG=1")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
