"""A server's ``send_buffer``: each client's socket gets the SO_SNDBUF asked for, status says
what the kernel gave, and a kernel that gives less says so in one warning line."""

from __future__ import annotations

import logging
import socket
import sys
from pathlib import Path

import pytest
import trio
import trio.testing

from framewire import Frame, FrameKind
from framewire.daemon.transport import set_send_buffer

from .helpers import running_daemon, server_clients

linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="Linux reports SO_SNDBUF doubled"
)

WMEM_MAX = Path("/proc/sys/net/core/wmem_max")
#: The kernel's cap on SO_SNDBUF (0: unknown here).
CAP = int(WMEM_MAX.read_text()) if WMEM_MAX.exists() else 0


def config(send_buffer: str) -> str:
    return f"""
[daemon]
grace_period = "5s"

[endpoints.in]
kind = "receiver"
listen = "tcp://127.0.0.1:0"
stream = "camera"

[endpoints.out]
kind = "server"
listen = "tcp://127.0.0.1:0"
stream = "camera"
send_buffer = {send_buffer}
"""


@linux_only
async def test_each_client_gets_the_send_buffer_and_status_shows_what_the_kernel_gave(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    async with running_daemon(config('"256KiB"')) as daemon:
        peers = await server_clients(daemon, 2)
        out = daemon.endpoints["out"].status
        assert out.detail["send_buffer"] == 2 * 256 * 1024
        # The clients are served as before.
        frame = Frame(FrameKind.DATA, "sample", b"x" * 1000, timestamp=1)
        await daemon.streams.get("camera").publish([frame])
        with trio.fail_after(10):
            for peer in peers:
                assert await peer.read(1) == [frame]
        for peer in peers:
            await peer.stream.aclose()
    assert not [r for r in caplog.records if "send_buffer" in r.getMessage()]


@linux_only
@pytest.mark.skipif(not CAP, reason="needs net.core.wmem_max")
async def test_a_send_buffer_the_kernel_caps_is_one_warning_and_the_truth_in_status(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cap = CAP
    caplog.set_level(logging.WARNING)
    async with running_daemon(config(str(2 * cap))) as daemon:
        peers = await server_clients(daemon, 3)
        assert daemon.endpoints["out"].status.detail["send_buffer"] == 2 * cap
        for peer in peers:
            await peer.stream.aclose()
    warnings = [r.getMessage() for r in caplog.records if "send_buffer" in r.getMessage()]
    assert warnings == [
        f"send_buffer {2 * cap} bytes is more than the kernel allows (net.core.wmem_max): "
        f"clients get {cap}"
    ]


async def test_set_send_buffer_is_none_for_streams_without_a_socket() -> None:
    left, _right = trio.testing.memory_stream_pair()
    assert set_send_buffer(left, 1 << 20) is None


@linux_only
async def test_set_send_buffer_on_a_unix_socket_and_a_closed_one() -> None:
    a, b = socket.socketpair()
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(a))
    assert set_send_buffer(stream, 128 * 1024) == 2 * 128 * 1024
    await stream.aclose()
    assert set_send_buffer(stream, 128 * 1024) is None  # closed: not raised
    b.close()
