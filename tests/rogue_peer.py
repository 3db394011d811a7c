"""A pyzmq stand-in for SLAC Rogue's stream TcpServer / TcpClient, for the bridge tests.

It follows Rogue's TcpCore (slaclab/rogue src/rogue/interfaces/stream/TcpCore.cpp) as the
notes describe it: one context, a PULL socket for inbound frames and a PUSH socket for
outbound frames; the server binds PULL on P and PUSH on P+1, the client connects PULL to
P+1 and PUSH to P; PUSH has IMMEDIATE=1 and LINGER=0, PULL LINGER=0. Each frame is a 4-part
message [u16 flags (little-endian), u8 channel, u8 error, payload]. The layout is written
out here with struct, independently of framewire's codec. Every wait has a timeout.
"""

from __future__ import annotations

import contextlib
import random
import socket
import struct
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio
import zmq

from framewire.daemon.zeromq import AsyncSocket, open_context

#: A last guard on each wait, not a measure of speed: every wait ends on its event, and a
#: machine whose CPUs are busy with other work can take many seconds over what is instant
#: alone (starting a process, a reconnect, a store's catch-up).
PATIENCE = 60.0


#: Where Linux says its ephemeral ports are (the ports a connect takes).
_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def _both_free(port: int) -> bool:
    """Whether ``port`` and ``port + 1`` can both be bound on 127.0.0.1 right now, as
    libzmq binds (SO_REUSEADDR)."""
    with socket.socket() as first, socket.socket() as second:
        for sock, number in ((first, port), (second, port + 1)):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", number))
            except OSError:
                return False
    return True


def consecutive_free_ports() -> int:
    """A port P such that P and P+1 are both free on 127.0.0.1 right now.

    Looked for first below the kernel's ephemeral range, where no outgoing connection
    takes a port: after a benchmark's tens of thousands of connections, most ports in the
    range can sit in TIME_WAIT for a minute, and none of those can be bound. Then, as a
    fallback, next to a port the kernel hands out.
    """
    candidates: list[int] = []
    with contextlib.suppress(OSError, ValueError):
        low = int(_EPHEMERAL_RANGE.read_text().split()[0])
        if low > 2048:
            candidates = random.sample(range(max(1024, low - 16384), low - 1), 50)
    for port in candidates:
        if _both_free(port):
            return port
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            given: int = probe.getsockname()[1]
        if given < 65535 and _both_free(given):
            return given
    raise RuntimeError("no two consecutive free ports found")


class RoguePeer:
    """One side of a Rogue bridge: ``send`` pushes a frame, ``receive`` pulls one."""

    def __init__(self, pull: AsyncSocket, push: AsyncSocket) -> None:
        self.pull = pull
        self.push = push

    async def send(self, flags: int, channel: int, error: int, payload: bytes) -> None:
        await self.send_parts([struct.pack("<H", flags), bytes([channel]), bytes([error]), payload])

    async def send_parts(self, parts: Sequence[bytes]) -> None:
        with trio.fail_after(PATIENCE):
            await self.push.send_multipart(parts)

    async def receive(self) -> tuple[int, int, int, bytes]:
        """The next frame as (flags, channel, error, payload); checks Rogue's part sizes."""
        with trio.fail_after(PATIENCE):
            parts = await self.pull.receive_multipart()
        assert len(parts) == 4, parts
        assert [len(part) for part in parts[:3]] == [2, 1, 1], parts
        (flags,) = struct.unpack("<H", parts[0])
        return flags, parts[1][0], parts[2][0], bytes(parts[3])


@asynccontextmanager
async def rogue_peer(role: str, port: int) -> AsyncIterator[RoguePeer]:
    """A Rogue ``TcpServer`` (role "server") or ``TcpClient`` ("client") on 127.0.0.1:port."""
    async with open_context() as context:
        zmq_context: Any = context
        pull = AsyncSocket(zmq_context.socket(zmq.PULL))
        push = AsyncSocket(zmq_context.socket(zmq.PUSH))
        try:
            push.socket.setsockopt(zmq.IMMEDIATE, 1)
            push.socket.setsockopt(zmq.LINGER, 0)
            pull.socket.setsockopt(zmq.LINGER, 0)
            pull.socket.setsockopt(zmq.RCVTIMEO, 100)
            if role == "server":
                pull.socket.bind(f"tcp://127.0.0.1:{port}")
                push.socket.bind(f"tcp://127.0.0.1:{port + 1}")
            else:
                pull.socket.connect(f"tcp://127.0.0.1:{port + 1}")
                push.socket.connect(f"tcp://127.0.0.1:{port}")
            yield RoguePeer(pull, push)
        finally:
            pull.close()
            push.close()
