"""Real xdas peers for the interop tests, each run as its own process.

    python xdas_peer.py publish ADDRESS      ZMQPublisher bound to ADDRESS
    python xdas_peer.py subscribe ADDRESS    ZMQSubscriber connected to ADDRESS
    python xdas_peer.py subscribe-on-cue ADDRESS
                                             the same, once a line "subscribe" is read

The publisher prints "ready" once a subscriber (framewire) is subscribed, then reads lines
"send FIRST LAST" from stdin and submits packets FIRST..LAST, printing "sent <n> <digest>"
for each. The subscriber prints "subscribed" once the publisher's welcome arrived, then
"got <n> <digest>" for every packet it decodes. Importing xdas can take many seconds on a
busy machine: a subscriber that is to join late starts early as subscribe-on-cue, prints
"loaded", and connects only when told. Packet n is a deterministic DataArray (time
samples n*10 .. n*10+9, 8 distances); the digest is a SHA-256 of its values and coordinates,
so equal digests mean the decoded array equals the one submitted.
"""

from __future__ import annotations

import hashlib
import sys

import numpy as np
import xdas
from xdas.processing import ZMQPublisher, ZMQSubscriber

SAMPLES, CHANNELS = 10, 8
START = np.datetime64("2024-01-01T00:00:00.000000000")
STEP = np.timedelta64(10, "ms")


def packet(n: int) -> xdas.DataArray:
    values = np.random.default_rng(n).standard_normal((SAMPLES, CHANNELS)).astype("float32")
    first = START + n * SAMPLES * STEP
    return xdas.DataArray(
        values,
        coords={
            "time": {"tie_indices": [0, SAMPLES - 1], "tie_values": [first, first + 9 * STEP]},
            "distance": {"tie_indices": [0, CHANNELS - 1], "tie_values": [0.0, 70.0]},
        },
        attrs={"packet": n},
    )


def digest(da: xdas.DataArray) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(da.values).tobytes())
    h.update(np.asarray(da.coords["time"].values).astype("datetime64[ns]").tobytes())
    h.update(np.asarray(da.coords["distance"].values).astype("float64").tobytes())
    return h.hexdigest()


def publish(address: str) -> None:
    with ZMQPublisher(address) as publisher:
        publisher.wait_for_subscribers(1, timeout=60)
        print("ready", flush=True)
        for line in sys.stdin:
            command, first, last = line.split()
            assert command == "send"
            for n in range(int(first), int(last) + 1):
                da = packet(n)
                publisher.submit(da)
                print(f"sent {n} {digest(da)}", flush=True)


def subscribe(address: str) -> None:
    with ZMQSubscriber(address, timeout=60) as subscriber:
        subscriber.wait_until_subscribed()
        print("subscribed", flush=True)
        for da in subscriber:
            print(f"got {int(da.attrs['packet'])} {digest(da)}", flush=True)


def main() -> None:
    role, address = sys.argv[1], sys.argv[2]
    if role == "publish":
        publish(address)
    elif role == "subscribe":
        subscribe(address)
    elif role == "subscribe-on-cue":
        print("loaded", flush=True)
        if sys.stdin.readline().strip() != "subscribe":
            raise SystemExit("expected the line 'subscribe'")
        subscribe(address)
    else:
        raise SystemExit(f"unknown role {role!r}")


if __name__ == "__main__":
    main()
