"""What the NATS endpoint says about errors and acks: one readable line, no Python reprs, no
raw protocol lines."""

from __future__ import annotations

import logging
import types

import attrs
import pytest
import trio
import trio.testing

from framewire.daemon.nats import _spool, describe_nats_error, parse_ack

errors = pytest.importorskip("nats.js.errors")


@attrs.define
class Reply:
    """An ack message as nats-py hands it over (headers and data)."""

    headers: dict[str, str] | None
    data: bytes


def test_jetstream_api_errors_say_what_happened_without_description_none() -> None:
    unavailable = errors.ServiceUnavailableError(code=503, err_code=None, description=None)
    assert describe_nats_error(unavailable) == (
        "JetStream did not answer (no responders: JetStream is off, or the stream has no "
        "leader) (503)"
    )
    full = errors.APIError(code=503, err_code=10077, description="maximum bytes exceeded")
    assert describe_nats_error(full) == "maximum bytes exceeded (503/10077)"
    assert "None" not in describe_nats_error(errors.APIError(code=400))
    # nats-py's own, without a code: the class says it.
    bare = errors.ServiceUnavailableError()
    assert describe_nats_error(bare) == (
        "JetStream did not answer (no responders: JetStream is off, or the stream has no "
        "leader) (503)"
    )


def test_a_status_reply_without_a_description_does_not_leak_the_next_header_line() -> None:
    # What nats-py 2.16 makes of "NATS/1.0 503\r\nNats-Subject: x": the next header line
    # inside Description.
    reply = Reply({"Status": "503", "Description": "\nNats-Subject: x", "Nats-Subject": "x"}, b"")
    outcome = parse_ack(reply)  # type: ignore[arg-type]
    assert (outcome.ok, outcome.code) == (False, 503)
    assert outcome.description == "no responders: no JetStream stream captures this subject"
    described = parse_ack(Reply({"Status": "408", "Description": "Request Timeout"}, b""))  # type: ignore[arg-type]
    assert described.description == "Request Timeout"


def test_acks_stored_duplicate_and_refused() -> None:
    stored = parse_ack(Reply(None, b'{"stream":"S","seq":7,"duplicate":true}'))  # type: ignore[arg-type]
    assert (stored.ok, stored.sequence, stored.duplicate) == (True, 7, True)
    refused = parse_ack(
        Reply(None, b'{"error":{"code":503,"err_code":10077,"description":"too large"}}')  # type: ignore[arg-type]
    )
    assert (refused.ok, refused.code, refused.err_code) == (False, 503, 10077)
    assert parse_ack(Reply(None, b"[1]")).description == "an ack that is not a JSON object"  # type: ignore[arg-type]


def test_asyncios_tls_eof_warning_is_not_logged(caplog: pytest.LogCaptureFixture) -> None:
    """At every disconnection over TLS, asyncio warns that "returning true from
    eof_received() has no effect when using ssl" (nats-py's TLS upgrade); it says nothing,
    and is not logged once the NATS endpoint's nats-py is loaded."""
    import logging

    from framewire.daemon.nats import require_nats

    require_nats()
    caplog.set_level(logging.WARNING, logger="asyncio")
    logging.getLogger("asyncio").warning(
        "returning true from eof_received() has no effect when using ssl"
    )
    logging.getLogger("asyncio").warning("something else")
    assert [r.getMessage() for r in caplog.records] == ["something else"]


async def test_a_stream_filling_again_while_a_backlog_drains_is_one_warning(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A bounded stream that a reader works through fills and drains again and again: the
    owner warns once and says once that it drained; a new fill after FILL_QUIET is news."""
    endpoint = types.SimpleNamespace(
        layout=types.SimpleNamespace(owner=True, stream="FW_camera"),
        status=types.SimpleNamespace(detail={}),
        log=logging.getLogger("framewire.endpoint.to-nats"),
    )
    watch = _spool.StreamWatch(endpoint, None)  # type: ignore[arg-type]

    def look(fill: float) -> None:
        info = types.SimpleNamespace(
            state=types.SimpleNamespace(bytes=int(fill * 16384), messages=1),
            config=types.SimpleNamespace(max_bytes=16384, max_msgs=-1, discard="new"),
        )
        watch._report_fill(info)

    caplog.set_level(logging.INFO, logger="framewire")
    for _ in range(5):  # full, drained, full, ... within a few seconds
        look(0.97)
        await trio.sleep(1)
        look(0.1)
        await trio.sleep(1)
    look(0.97)  # and it stays full: status says so, the log already did
    lines = [r.getMessage() for r in caplog.records if "% full" in r.getMessage()]
    assert len(lines) == 2
    assert "97% full): when it is full, publishing waits" in lines[0]
    assert lines[1].endswith("(10% full)")
    assert endpoint.status.detail["stream_fill"] == 0.97
    await trio.sleep(_spool.FILL_QUIET)
    look(0.1)
    look(0.9)  # a minute after the last line: news again
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 2
    assert "90% full" in warned[1].getMessage()
