"""Running real peer programs as subprocesses, with a timeout on every wait."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

G3_PEER = Path(__file__).with_name("g3_peer.py")
#: Seconds any one wait on a peer may take before the test fails: only a last guard against
#: a hang, so generous, since a peer's first line waits on imports (numpy, spt3g, xdas with
#: scipy) that alone can take tens of seconds on a machine whose CPUs are busy.
PATIENCE = 120.0


class Peer:
    """A subprocess whose stdout is read line by line."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self._buffer = b""
        self.lines: list[str] = []

    async def line(self) -> str:
        """The next line of output. Raises EOFError if the process closed its stdout."""
        assert self.process.stdout is not None
        with trio.fail_after(PATIENCE):
            while b"\n" not in self._buffer:
                chunk = await self.process.stdout.receive_some(65536)
                if not chunk:
                    raise EOFError(f"peer exited; output so far: {self.lines}")
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        text = line.decode()
        self.lines.append(text)
        return text

    async def expect(self, text: str) -> None:
        while (await self.line()) != text:
            pass

    async def frames_until(self, marker: str) -> list[str]:
        """Lines "<code> <sha256>" up to ``marker``."""
        out = []
        while (line := await self.line()) != marker:
            out.append(line)
        return out

    async def rest(self) -> list[str]:
        """Every remaining line, until the process closes its output."""
        out = []
        with trio.fail_after(PATIENCE):
            while True:
                try:
                    out.append(await self.line())
                except EOFError:
                    return out

    async def tell(self, text: str) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.send_all(text.encode() + b"\n")

    async def wait(self) -> int:
        with trio.fail_after(PATIENCE):
            return await self.process.wait()


@asynccontextmanager
async def g3_peer(*args: str) -> AsyncIterator[Peer]:
    """Run ``g3_peer.py ARGS``; kill it on the way out if it is still running."""
    async with run_peer(G3_PEER, *args) as peer:
        yield peer


def describe(code: str, wire: bytes) -> str:
    """The same line g3_peer.py prints for a frame."""
    return f"{code} {hashlib.sha256(wire).hexdigest()}"


DV_PEER = Path(__file__).with_name("dv_peer.py")


@asynccontextmanager
async def dv_peer(*args: str) -> AsyncIterator[Peer]:
    """Run ``dv_peer.py ARGS`` (a real NetworkWriter or NetworkReader); kill it on the way
    out if it is still running."""
    async with run_peer(DV_PEER, *args) as peer:
        yield peer


@asynccontextmanager
async def run_peer(script: Path, *args: str, cwd: Path | None = None) -> AsyncIterator[Peer]:
    """Run the peer program ``script ARGS`` in its own process, stdin and stdout piped;
    kill it on the way out if it is still running."""
    process = await trio.lowlevel.open_process(
        [sys.executable, str(script), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=None if cwd is None else str(cwd),
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        yield Peer(process)
    finally:
        if process.returncode is None:
            process.kill()
            with trio.move_on_after(10):
                await process.wait()
        for pipe in (process.stdin, process.stdout):
            if pipe is not None:
                await pipe.aclose()
