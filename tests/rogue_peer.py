"""A pyzmq stand-in for SLAC Rogue's stream TcpServer / TcpClient, for the bridge tests.

It follows Rogue's TcpCore (slaclab/rogue src/rogue/interfaces/stream/TcpCore.cpp) as the
notes describe it: one context, a PULL socket for inbound frames and a PUSH socket for
outbound frames; the server binds PULL on P and PUSH on P+1, the client connects PULL to
P+1 and PUSH to P; PUSH has IMMEDIATE=1 and LINGER=0, PULL LINGER=0. Each frame is a 4-part
message [u16 flags (little-endian), u8 channel, u8 error, payload]. The layout is written
out here with struct, independently of framewire's codec. Every wait has a timeout.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import trio
import zmq

from framewire.daemon.zeromq import AsyncSocket, open_context

PATIENCE = 10.0


def consecutive_free_ports() -> int:
    """A port P such that P and P+1 are both free on 127.0.0.1 right now."""
    for _ in range(100):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port: int = first.getsockname()[1]
            if port >= 65535:
                continue
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
                return port
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
