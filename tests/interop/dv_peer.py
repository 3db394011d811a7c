"""Real dv-processing peers for the interop tests, each run as its own process.

    python dv_peer.py write ADDRESS [--lz4] [--tls CERT KEY CA]
        A NetworkWriter on ADDRESS ("PORT" on 127.0.0.1, or an absolute UNIX socket path)
        serving an EventStream (id 0, 640x480). Prints "ready", then obeys stdin lines:
        "clients N" (wait until N clients are connected, print "clients N"), "write B T0 E"
        (write B batches of E events from timestamp T0 us, print "wrote <digest>"), "write B
        T0 E paced" (the same, but after each batch is sent print "batch <index>" and wait
        for a line before the next), "exit".
    python dv_peer.py read ADDRESS FROM COUNT [--tls CERT KEY]
        A NetworkReader. Prints "connected <camera> <compression>", then reads until it has
        COUNT events with timestamps >= FROM and prints "done <total events> <digest>", or
        "timeout <total events>".

The digest is the SHA-256 of the (timestamp, x, y, polarity) of every counted event, in order,
so a writer and its readers print the same digest for the same events. A peer ends with
os._exit: deleting a NetworkWriter with clients deadlocks the process (see the notes).
"""

from __future__ import annotations

import hashlib
import os
import sys
import time

import dv_processing as dv
import numpy as np

PATIENCE = 60.0
WIDTH, HEIGHT = 640, 480


def events(t0: int, count: int) -> dv.EventStore:
    store = dv.EventStore()
    for k in range(count):
        store.push_back(t0 + k, k % WIDTH, (7 * k) % HEIGHT, bool(k % 2))
    return store


def rows(batch: dv.EventStore) -> np.ndarray:
    array = batch.numpy()
    return np.stack([array["timestamp"], array["x"], array["y"], array["polarity"]], axis=1).astype(
        np.int64
    )


def sent(writer: dv.io.NetworkWriter) -> None:
    """Wait (up to PATIENCE) until the writer's IO thread has sent every queued packet."""
    deadline = time.monotonic() + PATIENCE
    while writer.getQueuedPacketCount() and time.monotonic() < deadline:
        time.sleep(0.01)


def write(args: list[str]) -> None:
    address = args[0]
    stream = dv.io.Stream.EventStream(0, "events", "DVXplorer_test", (WIDTH, HEIGHT))
    if "--lz4" in args:
        stream.setCompression(dv.CompressionType.LZ4)
    if "--tls" in args:
        cert, key, ca = args[args.index("--tls") + 1 : args.index("--tls") + 4]
        writer = dv.io.NetworkWriter("127.0.0.1", int(address), stream, cert, key, ca)
    elif address.startswith("/"):
        writer = dv.io.NetworkWriter(address, stream)
    else:
        writer = dv.io.NetworkWriter("127.0.0.1", int(address), stream)
    print("ready", flush=True)
    for line in sys.stdin:
        command = line.split()
        if command[0] == "clients":
            deadline = time.monotonic() + PATIENCE
            while writer.getClientCount() < int(command[1]) and time.monotonic() < deadline:
                time.sleep(0.01)
            print(f"clients {writer.getClientCount()}", flush=True)
        elif command[0] == "write":
            batches, t0, size = map(int, command[1:4])
            paced = command[4:] == ["paced"]
            digest = hashlib.sha256()
            for index in range(batches):
                batch = events(t0 + index * size, size)
                writer.writeEvents(batch)
                digest.update(rows(batch).tobytes())
                if paced:
                    sent(writer)
                    print(f"batch {index}", flush=True)
                    sys.stdin.readline()
            sent(writer)  # before anyone ends this process
            print(f"wrote {digest.hexdigest()}", flush=True)
        elif command[0] == "exit":
            break
    os._exit(0)


def read(args: list[str]) -> None:
    address, start, count = args[0], int(args[1]), int(args[2])
    if "--tls" in args:
        cert, key = args[args.index("--tls") + 1 : args.index("--tls") + 3]
        reader = dv.io.NetworkReader("127.0.0.1", int(address), cert, key)
    elif address.startswith("/"):
        reader = dv.io.NetworkReader(address)
    else:
        reader = dv.io.NetworkReader("127.0.0.1", int(address))
    definition = reader.getStreamDefinition()
    print(f"connected {reader.getCameraName()} {definition.getCompression()}", flush=True)
    digest = hashlib.sha256()
    total = counted = 0
    deadline = time.monotonic() + PATIENCE
    while counted < count and time.monotonic() < deadline:
        batch = reader.getNextEventBatch()
        if batch is None:
            if not reader.isRunning():
                break
            time.sleep(0.002)
            continue
        table = rows(batch)
        total += len(table)
        kept = table[table[:, 0] >= start]
        counted += len(kept)
        digest.update(kept.tobytes())
    if counted >= count:
        print(f"done {total} {digest.hexdigest()}", flush=True)
    else:
        print(f"timeout {total}", flush=True)
    os._exit(0)


if __name__ == "__main__":
    {"write": write, "read": read}[sys.argv[1]](sys.argv[2:])
