"""The configuration schema: frozen attrs classes, one per section and endpoint kind.

Frozen classes compare by value, so a reload can tell exactly which endpoints changed.
Validators raise :class:`FieldError`, which the loader turns into ``path: message`` lines.
"""

from __future__ import annotations

import re
from typing import Final, Literal, NewType, TypeAlias

import attrs

from .. import protocols
from ._address import Address

__all__ = [
    "BackoffConfig",
    "Config",
    "DaemonConfig",
    "Duration",
    "EndpointConfig",
    "FieldError",
    "GeneratorConfig",
    "ListenAddress",
    "ReceiverConfig",
    "ServerConfig",
    "Size",
]

#: Bytes, written as an integer or a string such as "256MiB".
Size = NewType("Size", int)
#: Seconds, written as a number or a string such as "5s" or "250ms".
Duration = NewType("Duration", float)
#: An address to listen on ("*" and port 0 allowed).
ListenAddress = NewType("ListenAddress", Address)

_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
LOG_LEVELS: Final = ("debug", "info", "warning", "error")
Policy: TypeAlias = Literal["lossy", "lossless"]


class FieldError(ValueError):
    """A value that parsed but is not allowed. ``field`` extends the error's path."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


#: Checked values: each NewType has a structuring hook in the loader that validates it, so
#: every bad value in a file is reported in one pass.
PositiveInt = NewType("PositiveInt", int)
NonNegativeInt = NewType("NonNegativeInt", int)
PositiveFloat = NewType("PositiveFloat", float)
NonNegativeFloat = NewType("NonNegativeFloat", float)
PositiveSize = NewType("PositiveSize", int)
PositiveDuration = NewType("PositiveDuration", float)
Name = NewType("Name", str)
ProtocolName = NewType("ProtocolName", str)


def check_name(value: str) -> str:
    if not _NAME.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a valid name (letters, digits, '_', '.', '-'; at most 64)"
        )
    return value


def check_protocol(value: str) -> str:
    try:
        protocols.get(value)
    except protocols.UnknownProtocol as exc:
        raise ValueError(str(exc)) from None
    return value


@attrs.frozen
class BackoffConfig:
    """Reconnect or restart backoff: ``min(initial * factor**n, maximum)`` with jitter.

    The delay before attempt n is drawn uniformly from [delay/2, delay]; it starts again from
    ``initial`` after a connection that stayed up for ``stable_after``.
    """

    initial: PositiveDuration = PositiveDuration(0.5)
    maximum: PositiveDuration = PositiveDuration(30.0)
    factor: PositiveFloat = PositiveFloat(2.0)
    stable_after: Duration = Duration(10.0)

    def __attrs_post_init__(self) -> None:
        if self.maximum < self.initial:
            raise FieldError("maximum", f"must be at least initial ({self.initial}s)")
        if self.factor < 1:
            raise FieldError("factor", f"must be 1 or more, got {self.factor}")


@attrs.frozen
class ServerConfig:
    """``kind = "server"``: listen and fan a stream out to every client."""

    listen: ListenAddress
    stream: Name
    kind: Literal["server"] = "server"
    protocol: ProtocolName = ProtocolName("native")
    max_clients: PositiveInt = PositiveInt(64)
    policy: Policy = "lossy"
    max_queue_frames: PositiveInt = PositiveInt(1024)
    max_queue_bytes: PositiveSize = PositiveSize(64 << 20)
    max_metadata_frames: PositiveInt = PositiveInt(1024)
    max_metadata_bytes: PositiveSize = PositiveSize(64 << 20)
    decimate: dict[str, NonNegativeInt] = attrs.field(factory=dict)
    send_timeout: PositiveDuration = PositiveDuration(30.0)

    def __attrs_post_init__(self) -> None:
        spec = protocols.get(self.protocol)
        for type_tag in self.decimate:
            if spec.metadata_types is not None and type_tag in spec.metadata_types:
                raise FieldError(
                    f"decimate.{type_tag}",
                    f"{type_tag!r} is a metadata type in protocol {self.protocol!r}; "
                    "metadata is never decimated",
                )


@attrs.frozen
class ReceiverConfig:
    """``kind = "receiver"``: take frames from producers (listen) or one upstream (connect)."""

    stream: Name
    kind: Literal["receiver"] = "receiver"
    listen: ListenAddress | None = None
    connect: Address | None = None
    protocol: ProtocolName = ProtocolName("native")
    max_frame_size: PositiveSize = PositiveSize(64 << 20)
    max_clients: PositiveInt = PositiveInt(16)
    reconnect: BackoffConfig = attrs.field(factory=BackoffConfig)
    connect_timeout: PositiveDuration = PositiveDuration(10.0)
    idle_timeout: Duration = Duration(0.0)

    def __attrs_post_init__(self) -> None:
        if (self.listen is None) == (self.connect is None):
            raise FieldError("listen", "set exactly one of listen or connect")


@attrs.frozen
class GeneratorConfig:
    """``kind = "generator"``: synthetic frames, a metadata frame first."""

    stream: Name
    kind: Literal["generator"] = "generator"
    rate: NonNegativeFloat = NonNegativeFloat(10.0)
    size: Size = Size(1024)
    type: str = "synthetic"
    metadata_type: str = "generator"
    count: NonNegativeInt = NonNegativeInt(0)

    def __attrs_post_init__(self) -> None:
        if self.type == self.metadata_type:
            raise FieldError("metadata_type", "must differ from type")


EndpointConfig: TypeAlias = ServerConfig | ReceiverConfig | GeneratorConfig
ENDPOINT_KINDS: Final[dict[str, type[EndpointConfig]]] = {
    "server": ServerConfig,
    "receiver": ReceiverConfig,
    "generator": GeneratorConfig,
}


@attrs.frozen
class DaemonConfig:
    """``[daemon]``: process-wide settings."""

    grace_period: Duration = Duration(5.0)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    restart: BackoffConfig = attrs.field(factory=lambda: BackoffConfig(stable_after=Duration(60.0)))


@attrs.frozen
class Config:
    """A whole configuration file."""

    daemon: DaemonConfig = attrs.field(factory=DaemonConfig)
    endpoints: dict[str, EndpointConfig] = attrs.field(factory=dict)
