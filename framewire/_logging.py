"""How the daemon's log lines look: for a terminal, for the systemd journal, for log shippers.

Three renderings of the same records, chosen by :func:`setup_logging`:

* ``text`` on a terminal or in a file: ``TIME LEVEL LOGGER: message``;
* ``text`` when stderr is the systemd journal (see :func:`stderr_is_journal`): each line
  starts with its syslog priority (``<3>`` error, ``<4>`` warning, ``<6>`` info, ``<7>``
  debug) and carries no timestamp of its own, so ``journalctl -p err`` finds the errors and
  the journal's own timestamp is the only one;
* ``json``: one JSON object per line with ``time``, ``level``, ``logger``, ``message`` and,
  when the record carries one, ``exception`` (the formatted traceback).

Whether a record carries a traceback is the caller's decision: the daemon logs an expected
operational failure as one line (its traceback in a separate DEBUG record) and attaches the
traceback only to what is a bug (framewire/daemon/supervisor.py). Under the journal every
line of a multi-line record carries the priority prefix, so a traceback stays at its
record's priority.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
from typing import Final, Literal, TextIO, TypeAlias

__all__ = [
    "LOG_FORMATS",
    "JsonFormatter",
    "LogFormat",
    "TextFormatter",
    "setup_logging",
    "stderr_is_journal",
    "syslog_priority",
]

LogFormat: TypeAlias = Literal["text", "json"]
LOG_FORMATS: Final[tuple[LogFormat, ...]] = ("text", "json")

#: syslog priorities (RFC 5424 severities) by logging level, highest level first.
_PRIORITIES: Final = (
    (logging.CRITICAL, 2),
    (logging.ERROR, 3),
    (logging.WARNING, 4),
    (logging.INFO, 6),
)
_DEBUG_PRIORITY: Final = 7


def syslog_priority(levelno: int) -> int:
    """The syslog priority for a logging level: CRITICAL 2, ERROR 3, WARNING 4, INFO 6, else 7."""
    for level, priority in _PRIORITIES:
        if levelno >= level:
            return priority
    return _DEBUG_PRIORITY


def stderr_is_journal(stream: TextIO | None = None) -> bool:
    """Whether ``stream`` (default stderr) is connected to the systemd journal.

    systemd sets ``JOURNAL_STREAM=DEVICE:INODE`` for a service whose stdout or stderr goes
    to the journal; the stream is the journal only if its file descriptor has that device
    and inode (a child whose stderr was redirected inherits the variable but not the
    stream). Never fails: a missing or malformed variable, or a stream without a file
    descriptor, means False.
    """
    value = os.environ.get("JOURNAL_STREAM", "")
    device, sep, inode = value.partition(":")
    if not sep:
        return False
    stream = sys.stderr if stream is None else stream
    try:
        info = os.fstat(stream.fileno())
        return (info.st_dev, info.st_ino) == (int(device), int(inode))
    except (OSError, ValueError, AttributeError):
        return False


class TextFormatter(logging.Formatter):
    """``TIME LEVEL LOGGER: message``, or ``<PRIORITY>LEVEL LOGGER: message`` for the journal.

    With ``journal``, every line of a multi-line message (or traceback) carries the priority
    prefix, since the journal makes each line its own entry.
    """

    def __init__(self, *, journal: bool = False) -> None:
        super().__init__(datefmt="%Y-%m-%d %H:%M:%S")
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        body = f"{record.levelname:<7} {record.name}: {message}"
        if record.exc_info and record.exc_info[1] is not None:
            body += "\n" + "".join(traceback.format_exception(*record.exc_info)).rstrip()
        if record.stack_info:
            body += "\n" + record.stack_info.rstrip()
        if self.journal:
            prefix = f"<{syslog_priority(record.levelno)}>"
            return "\n".join(prefix + line for line in body.split("\n"))
        return f"{self.formatTime(record, self.datefmt)} {body}"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line: ``time`` (ISO 8601 with milliseconds and
    the UTC offset), ``level``, ``logger``, ``message``, and ``exception`` (the formatted
    traceback) when the record carries one."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created))
        offset = time.strftime("%z", time.localtime(record.created))
        entry: dict[str, object] = {
            "time": f"{stamp}.{int(record.msecs):03d}{offset[:3]}:{offset[3:]}",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info and record.exc_info[1] is not None:
            entry["exception"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(
    level: str, log_format: LogFormat = "text", *, stream: TextIO | None = None
) -> logging.Handler:
    """Send every log record at ``level`` (``debug``, ``info``, ...) or above to ``stream``
    (default stderr) in ``log_format``, replacing the root logger's handlers.

    ``text`` detects the journal with :func:`stderr_is_journal`. Returns the handler.
    Raises ValueError for an unknown level or format.
    """
    if log_format not in LOG_FORMATS:
        raise ValueError(f"unknown log format {log_format!r} (expected text or json)")
    stream = sys.stderr if stream is None else stream
    handler = logging.StreamHandler(stream)
    formatter: logging.Formatter
    if log_format == "json":
        formatter = JsonFormatter()
    else:
        formatter = TextFormatter(journal=stderr_is_journal(stream))
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    return handler
