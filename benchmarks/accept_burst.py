"""Accepts per second for a burst of connects against a framewire receiver.

Run ``python benchmarks/accept_burst.py`` (``--help`` for options). It starts a framewire
daemon (its own process) with one ``receiver`` listening on loopback TCP and
``max_clients = 1``, then opens ``--connects`` (default 2,000) non-blocking connections at
once and waits for each to be accepted: with a client already connected, the receiver
refuses every further producer by closing its connection, so a client's end of file (or
reset) is the proof that the daemon accepted it. Each client sends one byte once connected, as
a producer sends its first frame at once. The first client stays connected and is never counted.

It reports how long the whole burst took, from the first connect() to the last end of file,
as accepts per second, and how many connects took longer than 0.9 s: those lost their SYN to
a full listen backlog and waited for the kernel's retry (1 s, then 3 s, ...). Every wait
has a timeout; the daemon is stopped on the way out.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import selectors
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Final

from _harness import HOST, Child, daemon_argv, free_port, machine_text, wait_for_port

DAEMON_CONFIG: Final = """\
[daemon]
grace_period = "1s"
log_level = "error"

[endpoints.burst-in]
kind = "receiver"
listen = "tcp://{host}:{port}"
protocol = "native"
stream = "burst"
max_clients = 1
"""
#: A connection that took longer than this to be accepted waited for a retransmission.
SYN_RETRY: Final = 0.9


def burst(port: int, connects: int, timeout: float) -> tuple[float, list[float]]:
    """Open ``connects`` connections at once; wait until the daemon has closed each.

    Returns the seconds from the first connect() to the last end of file, and each
    connection's own seconds from its connect() to its end of file. Raises RuntimeError if
    they are not all done within ``timeout`` seconds.
    """
    selector = selectors.DefaultSelector()
    started: dict[socket.socket, float] = {}
    took: list[float] = []
    t0 = time.monotonic()
    try:
        for _ in range(connects):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            code = sock.connect_ex((HOST, port))
            if code not in (0, errno.EINPROGRESS):
                sock.close()
                raise RuntimeError(f"connect failed: {errno.errorcode.get(code, code)}")
            started[sock] = time.monotonic()
            selector.register(sock, selectors.EVENT_WRITE, sock)
        deadline = t0 + timeout
        while started:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"{len(started)} of {connects} not accepted in {timeout:g}s")
            for key, events in selector.select(left):
                sock = key.data
                if events & selectors.EVENT_WRITE:
                    # Connected (as far as this end knows): send a byte, as a producer would
                    # send its first frame; if the daemon dropped our handshake's last ACK
                    # (accept queue full), this byte's retransmission completes it.
                    with contextlib.suppress(OSError):
                        sock.send(b"\0")
                    selector.modify(sock, selectors.EVENT_READ, sock)
                    continue
                try:
                    data = sock.recv(1)
                except ConnectionError:
                    data = b""
                if data:
                    continue
                took.append(time.monotonic() - started.pop(sock))
                selector.unregister(sock)
                sock.close()
        return time.monotonic() - t0, took
    finally:
        for sock in started:
            sock.close()
        selector.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--connects", type=int, default=2000, help="connections in the burst")
    parser.add_argument("--repeat", type=int, default=3, help="bursts, each against a new daemon")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds allowed per burst")
    args = parser.parse_args()
    print(f"framewire accept burst: {machine_text()}, {args.connects} connects per burst")
    rates = []
    with tempfile.TemporaryDirectory(prefix="framewire-accept-") as tmp:
        for _ in range(args.repeat):
            port = free_port()
            config = Path(tmp) / "burst.toml"
            config.write_text(DAEMON_CONFIG.format(host=HOST, port=port))
            with Child("daemon", daemon_argv(config), stderr_path=Path(tmp) / "daemon.log") as d:
                wait_for_port(port, 30.0, d)
                with socket.create_connection((HOST, port), timeout=5.0):  # the one producer
                    time.sleep(0.2)  # let the wait_for_port probe's refusal pass
                    seconds, took = burst(port, args.connects, args.timeout)
            retried = sum(1 for t in took if t > SYN_RETRY)
            rate = args.connects / seconds
            rates.append(rate)
            print(
                f"  {seconds:6.3f} s  {rate:9,.0f} accepts/s  slowest connect {max(took):.3f} s"
                f"  {retried} waited for a retransmission"
            )
    print(f"median: {statistics.median(rates):,.0f} accepts/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
