"""Real spt3g peers for the interop tests, each run as its own process.

    python g3_peer.py send HOST PORT SCRIPT      G3NetworkSender in connect mode
    python g3_peer.py serve PORT SCRIPT          G3NetworkSender in listen mode ('*')
    python g3_peer.py read URL [--stalled]       G3Reader ('tcp://h:p' or 'tcp://*:p'); stalled,
                                                 it reads nothing until a line on stdin
    python g3_peer.py write PATH SCRIPT          G3Writer

SCRIPT is a comma-separated list of frames to make: a one-letter type code optionally
followed by ':<n>' for a payload of n bytes (S:1000000 is a Scan with 1 MB of data), 'WAIT'
(print "waiting" and wait for a line on stdin) or 'SLEEP:<s>'. Every frame's one key holds
its sequence number, so frames are unique. Senders print one line per frame sent and readers one
line per frame read: "<type code> <sha256 of the frame's serialised bytes>".
"""

from __future__ import annotations

import hashlib
import sys
import time

from spt3g import core

TYPES = {
    "T": core.G3FrameType.Timepoint,
    "S": core.G3FrameType.Scan,
    "C": core.G3FrameType.Calibration,
    "O": core.G3FrameType.Observation,
    "W": core.G3FrameType.Wiring,
    "H": core.G3FrameType.Housekeeping,
    "P": core.G3FrameType.PipelineInfo,
    "G": core.G3FrameType.GcpSlow,
    "N": core.G3FrameType.none,
    "Z": core.G3FrameType.EndProcessing,
}
CODES = {value: key for key, value in TYPES.items()}


def describe(frame: core.G3Frame) -> str:
    wire = frame.__getstate__()[1]
    return f"{CODES.get(frame.type, '?')} {hashlib.sha256(wire).hexdigest()}"


def frames(script: str):  # type: ignore[no-untyped-def]
    for seq, item in enumerate(script.split(",")):
        code, _, size = item.partition(":")
        if code in ("WAIT", "SLEEP"):
            yield code, size
            continue
        frame = core.G3Frame(TYPES[code])
        # One key per frame: spt3g serialises keys in hash-map order, so only a frame with a
        # single key is guaranteed to serialise to the same bytes after a round trip.
        frame["data"] = core.G3String(f"{seq}:" + "x" * int(size or 0))
        yield "FRAME", frame


def run_sender(sender, script: str) -> None:  # type: ignore[no-untyped-def]
    for what, item in frames(script):
        if what == "WAIT":
            print("waiting", flush=True)
            sys.stdin.readline()
        elif what == "SLEEP":
            time.sleep(float(item))
        else:
            sender(item)
            print(describe(item), flush=True)


def main() -> None:
    role = sys.argv[1]
    if role == "send":
        host, port, script = sys.argv[2], int(sys.argv[3]), sys.argv[4]
        for _ in range(100):  # the relay may not listen yet
            try:
                sender = core.G3NetworkSender(hostname=host, port=port, max_queue_size=0)
                break
            except RuntimeError:
                time.sleep(0.1)
        run_sender(sender, script)
        sender(core.G3Frame(core.G3FrameType.EndProcessing))
        del sender
    elif role == "serve":
        port, script = int(sys.argv[2]), sys.argv[3]
        sender = core.G3NetworkSender(hostname="*", port=port, max_queue_size=0)
        print("listening", flush=True)
        run_sender(sender, script)
        sender(core.G3Frame(core.G3FrameType.EndProcessing))
    elif role == "read":
        url = sys.argv[2]
        stalled = sys.argv[3:] == ["--stalled"]
        if url.startswith("tcp://*"):
            print("listening", flush=True)
            reader = core.G3Reader(url)
        elif not url.startswith("tcp://"):
            reader = core.G3Reader(url)  # a file
        else:
            for _ in range(100):
                try:
                    reader = core.G3Reader(url, timeout=30.0)
                    break
                except RuntimeError:
                    time.sleep(0.1)
            print("connected", flush=True)
        if stalled:
            sys.stdin.readline()
        while True:
            got = reader.Process(None)
            if not got:
                break
            for frame in got:
                print(describe(frame), flush=True)
        print("end", flush=True)
    elif role == "write":
        path, script = sys.argv[2], sys.argv[3]
        writer = core.G3Writer(path)
        run_sender(writer, script)
        writer(core.G3Frame(core.G3FrameType.EndProcessing))
        del writer
    else:
        raise SystemExit(f"unknown role {role!r}")


if __name__ == "__main__":
    main()
