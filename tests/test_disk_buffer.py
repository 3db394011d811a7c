"""Disk buffers (``[endpoints.NAME.buffer] type = "disk"``) through a real daemon and real
loopback sockets: a sender whose reader is away takes everything its producer sends onto the
disk, survives SIGKILL, and delivers it all in order to a reader that appears later;
``drop_oldest`` keeps the newest data and every metadata frame; and each fault (a full disk,
a deleted or unwritable directory, a corrupt segment, two endpoints on one directory) is one
log line and a state in status, never a crash.

The reader's port is reserved by a socket that is bound but not listening (so a connect to it
is refused), and made to listen when the test wants a reader there: nothing else can take
the port in between.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio

from framewire import Frame, FrameKind
from framewire.daemon import Daemon
from framewire.protocols.native import NativeDecoder
from framewire.spool import DiskQueue

from .helpers import NativePeer, connect, endpoint_port, running_daemon, wait_until

MIB = 1 << 20


def meta(type_: str, body: bytes) -> Frame:
    return Frame(FrameKind.METADATA, type_, body)


def data(i: int, size: int = 64) -> Frame:
    body = i.to_bytes(8, "big") * (size // 8)
    return Frame(FrameKind.DATA, "d", body, timestamp=i)


@contextmanager
def reserved_port() -> Iterator[socket.socket]:
    """A loopback socket bound to a free port but not listening: connects are refused."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock
    finally:
        sock.close()


async def accept_reader(sock: socket.socket) -> NativePeer:
    """Make the reserved socket listen; the sender's next connection, as a native peer."""
    sock.listen(1)
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock.dup()))
    with trio.fail_after(30):
        stream = await listener.accept()
    await listener.aclose()
    return NativePeer(stream)


def config(port: int, directory: Path, buffer: str = "", sender: str = "") -> str:
    return f"""
[daemon]
grace_period = "2s"

[endpoints.in]
kind = "receiver"
listen = "tcp://127.0.0.1:0"
stream = "s"
max_frame_size = "4MiB"

[endpoints.out]
kind = "sender"
connect = "tcp://127.0.0.1:{port}"
stream = "s"
max_queue_frames = 64
max_queue_bytes = "4MiB"
reconnect = {{ initial = "50ms", maximum = "200ms" }}
{sender}

[endpoints.out.buffer]
type = "disk"
path = "{directory}"
{buffer}
"""


def detail(daemon: Daemon, name: str = "out") -> dict[str, object]:
    return daemon.endpoints[name].status.current_detail()


async def test_a_reader_that_comes_later_gets_everything_in_order(tmp_path: Path) -> None:
    sent = [meta("config", b"v1")] + [data(i, 4096) for i in range(2000)]
    with reserved_port() as sock:
        async with running_daemon(config(sock.getsockname()[1], tmp_path / "buf")) as daemon:
            producer = await connect(endpoint_port(daemon, "in"))
            with trio.fail_after(30):
                await producer.send(sent)  # more than the sender's queue: the disk takes it
            await wait_until(lambda: detail(daemon)["buffer_frames"] == len(sent), patience=30)
            assert detail(daemon)["buffer_state"] == "ok"
            assert daemon.endpoints["out"].status.state in ("connecting", "reconnecting")
            reader = await accept_reader(sock)
            with trio.fail_after(30):
                got = await reader.read(len(sent))
            assert got == sent
            await wait_until(lambda: detail(daemon)["buffer_frames"] == 0)
            assert detail(daemon)["buffer_dropped_frames"] == 0
            await producer.stream.aclose()
            await reader.stream.aclose()
