"""Where the daemon keeps state that outlives it: the embedded nats-server's store, the
endpoints' disk buffers."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from ..config import BufferConfig

__all__ = ["buffer_directory", "default_buffer_dir", "default_history_dir", "state_directory"]


def state_directory(environ: Mapping[str, str] | None = None) -> Path:
    """The daemon's state directory.

    Under systemd, ``$STATE_DIRECTORY`` (the unit's ``StateDirectory=``, the first one if
    several are listed); else ``$XDG_STATE_HOME/framewire``, with ``XDG_STATE_HOME``
    defaulting to ``~/.local/state``.
    """
    env = os.environ if environ is None else environ
    state = env.get("STATE_DIRECTORY", "")
    if state:
        return Path(state.split(":")[0])
    xdg = env.get("XDG_STATE_HOME", "") or str(Path.home() / ".local" / "state")
    return Path(xdg) / "framewire"


def default_buffer_dir(endpoint: str, environ: Mapping[str, str] | None = None) -> Path:
    """Where the disk buffer of ``endpoint`` lives unless its ``buffer.path`` says otherwise:
    ``buffers/NAME`` under :func:`state_directory`."""
    return state_directory(environ) / "buffers" / endpoint


def buffer_directory(endpoint: str, buffer: BufferConfig) -> Path | None:
    """The directory of ``endpoint``'s disk buffer (its ``path``, else the default), or None
    for a memory buffer."""
    if not buffer.is_disk:
        return None
    return Path(buffer.path) if buffer.path is not None else default_buffer_dir(endpoint)


def default_history_dir(stream: str, environ: Mapping[str, str] | None = None) -> Path:
    """Where the history of ``stream`` lives unless its ``history.path`` says otherwise:
    ``history/NAME`` under :func:`state_directory`."""
    return state_directory(environ) / "history" / stream
