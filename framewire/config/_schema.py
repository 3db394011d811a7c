"""The configuration schema: frozen attrs classes, one per section and endpoint kind.

Frozen classes compare by value, so a reload can tell exactly which endpoints changed.
Validators raise :class:`FieldError`, which the loader turns into ``path: message`` lines.
"""

from __future__ import annotations

import importlib.util
import math
import re
from collections.abc import Callable
from typing import Annotated, Final, Literal, TypeAlias

import attrs

from .. import protocols
from ._address import Address, parse_address
from ._units import format_duration, format_size, parse_duration, parse_size
from ._zmq_address import ZmqAddress, parse_zmq_address

__all__ = [
    "BackoffConfig",
    "BridgeConfig",
    "BufferConfig",
    "Config",
    "DaemonConfig",
    "Duration",
    "EndpointConfig",
    "FieldError",
    "FileConfig",
    "GeneratorConfig",
    "HistoryConfig",
    "LinkConfig",
    "ListenAddress",
    "NatsConfig",
    "NatsServerConfig",
    "PubSubConfig",
    "ReceiverConfig",
    "RecorderConfig",
    "SenderConfig",
    "ServerConfig",
    "Size",
    "StatusConfig",
    "TLSConfig",
]

_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
LOG_LEVELS: Final = ("debug", "info", "warning", "error")
Policy: TypeAlias = Literal["lossy", "lossless"]


class FieldError(ValueError):
    """A value that parsed but is not allowed. ``field`` extends the error's path."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@attrs.frozen
class Check:
    """Marks an ``Annotated`` type with the function that parses and validates it.

    The loader's converter runs ``parse`` on the raw TOML value; a ValueError it raises
    becomes an error line naming the value's path. Code that builds configs directly just
    passes the plain value.
    """

    parse: Callable[[object], object]


def _strict(expected: type) -> Callable[[object], object]:
    words = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}

    def parse(value: object) -> object:
        if expected is float and type(value) is int:
            return float(value)
        if type(value) is not expected:
            raise ValueError(f"expected {words[expected]}, got {describe(value)}")
        return value

    return parse


def describe(value: object) -> str:
    """A value as an error message shows it."""
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return repr(value)


def _positive(parse: Callable[[object], object]) -> Check:
    def check(raw: object) -> object:
        value = parse(raw)
        if value <= 0:  # type: ignore[operator]
            word = "integer" if type(value) is int else "number"
            raise ValueError(f"expected a positive {word}, got {value!r}")
        return value

    return Check(check)


def _non_negative(parse: Callable[[object], object]) -> Check:
    def check(raw: object) -> object:
        value = parse(raw)
        if value < 0:  # type: ignore[operator]
            raise ValueError(f"expected 0 or more, got {value!r}")
        return value

    return Check(check)


def check_name(value: object) -> str:
    text = _strict(str)(value)
    assert isinstance(text, str)
    if not _NAME.fullmatch(text):
        raise ValueError(
            f"{text!r} is not a valid name (letters, digits, '_', '.', '-'; at most 64)"
        )
    return text


def check_protocol(value: object) -> str:
    text = _strict(str)(value)
    assert isinstance(text, str)
    try:
        protocols.get(text)
    except protocols.UnknownProtocol as exc:
        raise ValueError(str(exc)) from None
    return text


StrictInt = Annotated[int, Check(_strict(int))]
StrictFloat = Annotated[float, Check(_strict(float))]
StrictBool = Annotated[bool, Check(_strict(bool))]
StrictStr = Annotated[str, Check(_strict(str))]
PositiveInt = Annotated[int, _positive(_strict(int))]
NonNegativeInt = Annotated[int, _non_negative(_strict(int))]
PositiveFloat = Annotated[float, _positive(_strict(float))]
NonNegativeFloat = Annotated[float, _non_negative(_strict(float))]
#: Bytes, written as an integer or a string such as "256MiB".
Size = Annotated[int, Check(parse_size)]
PositiveSize = Annotated[int, _positive(parse_size)]
#: Seconds, written as a number or a string such as "5s" or "250ms".
Duration = Annotated[float, Check(parse_duration)]
#: The largest ``max_frame_size`` accepted: a frame is held whole in memory (once per
#: connection receiving it, and shared by every queue it is in), so beyond this a single peer
#: could ask for more memory than a machine running framewire should give one frame.
MAX_FRAME_SIZE_CEILING: Final = 4 << 30


def _frame_size(raw: object) -> object:
    value = parse_size(raw)
    if value <= 0:
        raise ValueError(f"expected a positive size, got {value!r}")
    if value > MAX_FRAME_SIZE_CEILING:
        ceiling = format_size(MAX_FRAME_SIZE_CEILING)
        raise ValueError(f"{value} bytes is over the ceiling for one frame ({ceiling})")
    return value


#: ``max_frame_size``: a positive size of at most :data:`MAX_FRAME_SIZE_CEILING`.
FrameSize = Annotated[int, Check(_frame_size)]
PositiveDuration = Annotated[float, _positive(parse_duration)]
Name = Annotated[str, Check(check_name)]


def _at_least_one(value: object) -> object:
    number = _strict(float)(value)
    if number < 1:  # type: ignore[operator]
        raise ValueError(f"expected a number of 1 or more, got {number!r}")
    return number


def _file_path(value: object) -> str:
    text = _strict(str)(value)
    assert isinstance(text, str)
    if not text.strip():
        raise ValueError("expected a file path, got an empty string")
    return text


#: A file system path.
FilePath = Annotated[str, Check(_file_path)]


def _secret(value: object) -> str:
    """A string; an error names the type of a bad value, never the value (a password)."""
    if type(value) is not str:
        words = {int: "an integer", float: "a number", bool: "a boolean"}
        raise ValueError(f"expected a string, got {words.get(type(value), describe(value))}")
    return value


#: A password or token written inline: a string, never shown in an error.
Secret = Annotated[str, Check(_secret)]

#: A growth factor: a number >= 1.
Growth = Annotated[float, Check(_at_least_one)]
ProtocolName = Annotated[str, Check(check_protocol)]
#: An address to connect to, and one to listen on ("*" and port 0 allowed).
ConnectAddress = Annotated[Address, Check(parse_address)]
ListenAddress = Annotated[Address, Check(lambda value: parse_address(value, listening=True))]


def _host_port(value: object) -> Address:
    if isinstance(value, str) and "://" not in value:
        value = f"tcp://{value}"
    address = parse_address(value, listening=True)
    if address.scheme != "tcp":
        raise ValueError(f"address {value!r}: expected host:port (or tcp://host:port)")
    return address


def _socket_mode(value: object) -> int:
    """A file mode: an integer (TOML ``0o660``) or a string of octal digits (``"660"``)."""
    if isinstance(value, str) and value.isascii() and value.isdigit():
        if any(digit in "89" for digit in value):
            raise ValueError(f"socket_mode {value!r} is not an octal number")
        value = int(value, 8)
    if type(value) is not int or not 0 <= value <= 0o777:
        raise ValueError(
            f'expected a file mode such as 0o660 or "660" (permission bits only), '
            f"got {describe(value)}"
        )
    return value


#: Permission bits of a UNIX socket file.
SocketMode = Annotated[int, Check(_socket_mode)]
#: The mode UNIX socket files are created with unless configured: owner and group.
DEFAULT_SOCKET_MODE: Final = 0o660


@attrs.frozen
class TLSConfig:
    """``[endpoints.<name>.tls]``: TLS for a ``tls://`` address.

    Listening, ``certificate`` and ``key`` are required; ``require_client_cert`` demands a
    client certificate signed by ``ca`` (mutual TLS). Connecting, the server's certificate is
    verified against ``ca`` (the system's trust store without it) and the address's host, or
    ``server_name``, unless ``verify = false``; ``certificate`` and ``key`` are presented as
    the client certificate when set. Files are PEM and are read when the endpoint starts.
    """

    certificate: FilePath | None = None
    key: FilePath | None = None
    ca: FilePath | None = None
    require_client_cert: StrictBool = False
    #: dv-processing's peers speak only TLS 1.2, so 1.2 is the default.
    minimum_version: Literal["1.2", "1.3"] = "1.2"
    verify: StrictBool = True
    server_name: StrictStr | None = None
    handshake_timeout: PositiveDuration = 10.0

    def __attrs_post_init__(self) -> None:
        if (self.certificate is None) != (self.key is None):
            raise FieldError("key", "set both certificate and key, or neither")
        if self.require_client_cert and self.ca is None:
            raise FieldError(
                "ca", "require_client_cert needs ca (the CA client certificates are signed by)"
            )


def check_transport(
    field: str, address: Address | None, tls: TLSConfig | None, *, listening: bool
) -> None:
    """``tls`` goes with a ``tls://`` address and the other way round. Raises FieldError."""
    if address is None:
        return
    if address.scheme == "tls" and tls is None:
        raise FieldError("tls", f"{field} = {str(address)!r} needs a [tls] table")
    if tls is not None and address.scheme != "tls":
        raise FieldError(
            "tls", f"a [tls] table needs a tls:// address (this endpoint's {field} is {address})"
        )
    if tls is not None and listening:
        if tls.certificate is None:
            raise FieldError("tls.certificate", "required to listen with TLS (and key)")
        if not tls.verify or tls.server_name is not None:
            raise FieldError("tls", "verify and server_name apply to connecting endpoints only")
    if tls is not None and not listening and tls.require_client_cert:
        raise FieldError("tls.require_client_cert", "applies to listening endpoints only")


#: ``host:port`` to listen on (a ``tcp://`` prefix is accepted too).
HostPort = Annotated[Address, Check(_host_port)]


@attrs.frozen
class BackoffConfig:
    """Reconnect or restart backoff: ``min(initial * factor**n, maximum)`` with jitter.

    The delay before attempt n is drawn uniformly from [delay/2, delay]; it starts again from
    ``initial`` after a connection that stayed up for ``stable_after``.
    """

    initial: PositiveDuration = 0.5
    maximum: PositiveDuration = 30.0
    factor: Growth = 2.0
    stable_after: Duration = 10.0

    def __attrs_post_init__(self) -> None:
        if self.maximum < self.initial:
            raise FieldError("maximum", f"must be at least initial ({self.initial}s)")


#: The largest ``send_buffer``: SO_SNDBUF is a C int, and Linux doubles what it is given.
MAX_SEND_BUFFER: Final = 1 << 30


@attrs.frozen
class ServerConfig:
    """``kind = "server"``: listen and fan a stream out to every client."""

    listen: ListenAddress
    stream: Name
    kind: Literal["server"] = "server"
    protocol: ProtocolName = "native"
    max_clients: PositiveInt = 64
    policy: Policy = "lossy"
    max_queue_frames: PositiveInt = 1024
    max_queue_bytes: PositiveSize = 64 << 20
    max_metadata_frames: PositiveInt = 1024
    max_metadata_bytes: PositiveSize = 64 << 20
    decimate: dict[str, NonNegativeInt] = attrs.field(factory=dict)
    send_timeout: PositiveDuration = 30.0
    close_on_end: StrictBool = False
    #: SO_SNDBUF for each client's socket; None: the kernel's own autotuning.
    send_buffer: PositiveSize | None = None
    #: Native only: tell clients that ask (a REQUEST with ``gaps``) where their frames were
    #: dropped, with a GAP notice at that point.
    gap_frames: StrictBool = False
    #: Give every new client the last this many seconds of the stream's history before
    #: live (needs ``[streams.NAME.history]``), in the server's protocol.
    replay: PositiveDuration | None = None
    tls: TLSConfig | None = None
    socket_mode: SocketMode = DEFAULT_SOCKET_MODE

    def __attrs_post_init__(self) -> None:
        check_decimation(self.protocol, self.decimate)
        check_transport("listen", self.listen, self.tls, listening=True)
        if self.send_buffer is not None and self.send_buffer > MAX_SEND_BUFFER:
            raise FieldError(
                "send_buffer",
                f"at most {MAX_SEND_BUFFER >> 20}MiB (the kernel doubles it, into a C int), "
                f"got {self.send_buffer}",
            )
        if self.gap_frames and self.protocol != "native":
            raise FieldError("gap_frames", "native servers only: other protocols have no GAP")


def check_decimation(protocol: str, decimate: dict[str, int]) -> None:
    """Decimated types must be data types of ``protocol``. Raises FieldError."""
    spec = protocols.get(protocol)
    for type_tag in decimate:
        canonical = type_tag
        if spec.canonical_type is not None:
            try:
                canonical = spec.canonical_type(type_tag)
            except ValueError as exc:
                raise FieldError(f"decimate.{type_tag}", str(exc)) from None
        if spec.data_types is not None and canonical not in spec.data_types:
            raise FieldError(
                f"decimate.{type_tag}",
                f"{canonical!r} is a metadata type in protocol {protocol!r} "
                f"(only {', '.join(sorted(spec.data_types))} may be decimated): "
                "metadata is never decimated",
            )


def check_crc(protocol: str, verify_crc: bool) -> None:
    """``verify_crc`` needs a protocol with a CRC and the CRC package. Raises FieldError."""
    if not verify_crc:
        return
    if not protocols.get(protocol).has_crc:
        raise FieldError("verify_crc", f"protocol {protocol!r} has no CRC to verify")
    if importlib.util.find_spec("google_crc32c") is None:
        raise FieldError(
            "verify_crc", "needs the google-crc32c package: pip install 'framewire[crc]'"
        )


#: ``frame_timeout`` when unset is the time a frame of ``max_frame_size`` takes at this many
#: bytes a second (1 MiB/s, 8.4 Mbit/s) ...
FRAME_TIMEOUT_RATE: Final = 1 << 20
#: ... but never less than this many seconds (10 minutes).
FRAME_TIMEOUT_FLOOR: Final = 600.0


def frame_timeout_for(frame_timeout: float | None, max_frame_size: int) -> float:
    """The seconds a frame in progress may take to arrive whole: ``frame_timeout`` as
    configured (0: no limit, ``inf``), or, unset, the default: the time ``max_frame_size``
    takes at :data:`FRAME_TIMEOUT_RATE`, at least :data:`FRAME_TIMEOUT_FLOOR` (10 minutes
    for the default 64 MiB, 68 minutes for a 4 GiB frame)."""
    if frame_timeout is None:
        return max(FRAME_TIMEOUT_FLOOR, max_frame_size / FRAME_TIMEOUT_RATE)
    return frame_timeout or math.inf


@attrs.frozen
class ReceiverConfig:
    """``kind = "receiver"``: take frames from producers (listen) or one upstream (connect)."""

    stream: Name
    kind: Literal["receiver"] = "receiver"
    listen: ListenAddress | None = None
    connect: ConnectAddress | None = None
    protocol: ProtocolName = "native"
    max_frame_size: FrameSize = 64 << 20
    max_clients: PositiveInt = 16
    reconnect: BackoffConfig = attrs.field(factory=BackoffConfig)
    connect_timeout: PositiveDuration = 10.0
    idle_timeout: Duration = 0.0
    frame_timeout: Duration | None = None
    verify_crc: StrictBool = False
    tls: TLSConfig | None = None
    socket_mode: SocketMode = DEFAULT_SOCKET_MODE

    def __attrs_post_init__(self) -> None:
        if (self.listen is None) == (self.connect is None):
            raise FieldError("listen", "set exactly one of listen or connect")
        check_crc(self.protocol, self.verify_crc)
        check_transport("listen", self.listen, self.tls, listening=True)
        check_transport("connect", self.connect, self.tls, listening=False)

    @property
    def frame_timeout_seconds(self) -> float:
        """How long a frame in progress may take (``inf``: no limit); see
        :func:`frame_timeout_for`."""
        return frame_timeout_for(self.frame_timeout, self.max_frame_size)


#: The smallest disk buffer: a few segments of a few records (the spool needs 16 KiB).
MIN_DISK_BUFFER: Final = 1 << 20
#: A disk buffer's size unless ``max_size`` says otherwise.
DEFAULT_DISK_BUFFER: Final = 1 << 30


@attrs.frozen
class BufferConfig:
    """``[endpoints.NAME.buffer]``: what a consuming endpoint holds for its far end.

    ``type = "memory"`` (the default) is the endpoint's bounded queue as it always was:
    ``max_queue_frames`` and ``max_size`` bytes (``max_queue_bytes`` unless given).
    ``type = "disk"`` is a write-ahead queue of checksummed segment files in ``path``
    (:mod:`framewire.spool`) that survives restarts; its segment files never pass
    ``max_size`` (default 1 GiB). ``path`` defaults to a directory per endpoint under the
    daemon's state directory (``$STATE_DIRECTORY/buffers/NAME`` under systemd, else
    ``$XDG_STATE_HOME/framewire/buffers/NAME``, ``~/.local/state/...``); the daemon resolves
    it, since the file alone cannot.

    ``when_full = "block"`` holds the stream back while the buffer is full;
    ``"drop_oldest"`` drops the oldest DATA frames to make room (metadata never).
    ``sync`` (disk only) is the spool's policy: what a power loss can lose, at what cost.
    """

    type: Literal["memory", "disk"] = "memory"
    max_size: PositiveSize | None = None
    when_full: Literal["block", "drop_oldest"] = "block"
    path: FilePath | None = None
    sync: Literal["none", "batch", "interval"] | None = None
    sync_interval: PositiveDuration | None = None

    def __attrs_post_init__(self) -> None:
        if self.type == "memory":
            for key in ("path", "sync", "sync_interval"):
                if getattr(self, key) is not None:
                    raise FieldError(key, 'applies to type = "disk" only')
            return
        if self.max_size is not None and self.max_size < MIN_DISK_BUFFER:
            raise FieldError(
                "max_size",
                f"a disk buffer needs at least {format_size(MIN_DISK_BUFFER)}, got {self.max_size}",
            )
        if self.sync_interval is not None and self.sync != "interval" and self.sync is not None:
            raise FieldError("sync_interval", 'applies to sync = "interval" only')

    @property
    def is_disk(self) -> bool:
        return self.type == "disk"

    @property
    def disk_max_size(self) -> int:
        """A disk buffer's bound in bytes on disk."""
        return self.max_size if self.max_size is not None else DEFAULT_DISK_BUFFER

    @property
    def sync_policy(self) -> Literal["none", "batch", "interval"]:
        return self.sync if self.sync is not None else "interval"

    @property
    def sync_seconds(self) -> float:
        return self.sync_interval if self.sync_interval is not None else 1.0


def check_disk_buffer(
    buffer: BufferConfig,
    protocol: str | None,
    close_on_end: bool = False,
    *,
    policy: str | None = None,
) -> None:
    """What a disk buffer cannot carry (yet). Raises FieldError."""
    if not buffer.is_disk:
        return
    if close_on_end:
        raise FieldError(
            "close_on_end",
            'cannot be combined with a disk buffer (buffer.type = "disk"): the end of a '
            "stream is not kept in the buffer",
        )
    if policy == "lossy":
        raise FieldError(
            "policy",
            "a disk buffer takes every frame; to drop the oldest data when it is full, set "
            'buffer.when_full = "drop_oldest"',
        )
    if protocol is not None and protocols.get(protocol).session_metadata_types:
        raise FieldError(
            "buffer.type",
            f"a disk buffer cannot carry protocol {protocol!r} yet (its session headers end "
            "a connection); use a memory buffer",
        )


def memory_queue_bytes(buffer: BufferConfig, max_queue_bytes: int) -> int:
    """A memory queue's bound in bytes: the buffer's ``max_size`` for a memory buffer that
    sets it, else ``max_queue_bytes``."""
    if not buffer.is_disk and buffer.max_size is not None:
        return buffer.max_size
    return max_queue_bytes


def buffer_policy(buffer: BufferConfig, policy: str) -> Policy:
    """The policy of an endpoint's own subscription: a disk buffer's hand-over is
    lossless; a memory buffer is lossy with ``policy = "lossy"`` or ``when_full =
    "drop_oldest"``."""
    if buffer.is_disk:
        return "lossless"
    if policy == "lossy" or buffer.when_full == "drop_oldest":
        return "lossy"
    return "lossless"


class _Queued:
    """What every endpoint with a queue for its far end and a ``[buffer]`` table has."""

    __slots__ = ()
    buffer: BufferConfig
    max_queue_bytes: int

    @property
    def queue_bytes(self) -> int:
        """The memory queue's bound in bytes (see :func:`memory_queue_bytes`)."""
        return memory_queue_bytes(self.buffer, self.max_queue_bytes)


class _QueuedWithPolicy(_Queued):
    """An endpoint with a queue, a ``[buffer]`` table and a ``policy``."""

    __slots__ = ()
    policy: Policy

    @property
    def queue_policy(self) -> Policy:
        """Its own subscription's policy (see :func:`buffer_policy`)."""
        return buffer_policy(self.buffer, self.policy)


@attrs.frozen
class SenderConfig(_Queued):
    """``kind = "sender"``: deliver a stream to a remote reader, losslessly, reconnecting."""

    connect: ConnectAddress
    stream: Name
    kind: Literal["sender"] = "sender"
    protocol: ProtocolName = "native"
    max_queue_frames: PositiveInt = 1024
    max_queue_bytes: PositiveSize = 64 << 20
    reconnect: BackoffConfig = attrs.field(factory=BackoffConfig)
    connect_timeout: PositiveDuration = 10.0
    send_timeout: PositiveDuration = 30.0
    close_on_end: StrictBool = False
    tls: TLSConfig | None = None
    buffer: BufferConfig = attrs.field(factory=BufferConfig)

    def __attrs_post_init__(self) -> None:
        check_transport("connect", self.connect, self.tls, listening=False)
        check_disk_buffer(self.buffer, self.protocol, self.close_on_end)


@attrs.frozen
class FileConfig:
    """``kind = "file"``: publish a recorded file (``.gz`` too) at a rate or flat out."""

    path: FilePath
    stream: Name
    kind: Literal["file"] = "file"
    protocol: ProtocolName = "native"
    rate: NonNegativeFloat = 0.0
    loop: StrictBool = False
    max_frame_size: FrameSize = 64 << 20
    verify_crc: StrictBool = False

    def __attrs_post_init__(self) -> None:
        check_crc(self.protocol, self.verify_crc)


@attrs.frozen
class RecorderConfig(_QueuedWithPolicy):
    """``kind = "recorder"``: write a stream to files (``.gz`` compresses), rotating by size."""

    path: FilePath
    stream: Name
    kind: Literal["recorder"] = "recorder"
    protocol: ProtocolName = "native"
    max_file_size: Size = 0
    policy: Policy = "lossless"
    max_queue_frames: PositiveInt = 1024
    max_queue_bytes: PositiveSize = 64 << 20
    buffer: BufferConfig = attrs.field(factory=BufferConfig)

    def __attrs_post_init__(self) -> None:
        check_disk_buffer(self.buffer, self.protocol, policy=self.policy)


@attrs.frozen
class GeneratorConfig:
    """``kind = "generator"``: synthetic frames, a metadata frame first."""

    stream: Name
    kind: Literal["generator"] = "generator"
    rate: NonNegativeFloat = 10.0
    size: Size = 1024
    type: StrictStr = "synthetic"
    metadata_type: StrictStr = "generator"
    count: NonNegativeInt = 0

    def __attrs_post_init__(self) -> None:
        if self.type == self.metadata_type:
            raise FieldError("metadata_type", "must differ from type")


#: The shortest ``dead_host_timeout``: TCP's keepalive timers count whole seconds.
MIN_DEAD_HOST_TIMEOUT: Final = 3.0


@attrs.frozen
class LinkConfig(_QueuedWithPolicy):
    """``kind = "link"``: a bidirectional link that keeps itself up (Datalink-style).

    It publishes what the peer sends into ``publish`` and sends what ``subscribe`` carries;
    at least one of the two, and not the same stream (the link would echo its peer).

    ``peer_keepalives`` says whether the peer sends keepalives, and so whether a peer silent
    for ``timeout`` is dead: unset, true for ``native`` (the peer is framewire) and false for
    ``datalink`` (Datalink sends one only when its application calls ``write_keep_alive``).
    ``native`` with ``peer_keepalives = false`` is refused.
    """

    kind: Literal["link"] = "link"
    listen: ListenAddress | None = None
    connect: ConnectAddress | None = None
    protocol: ProtocolName = "native"
    publish: Name | None = None
    subscribe: Name | None = None
    keepalive: PositiveDuration = 1.0
    timeout: PositiveDuration = 5.0
    peer_keepalives: StrictBool | None = None
    dead_host_timeout: PositiveDuration = 30.0
    reconnect: BackoffConfig = attrs.field(factory=BackoffConfig)
    connect_timeout: PositiveDuration = 10.0
    send_timeout: PositiveDuration = 30.0
    policy: Policy = "lossless"
    max_queue_frames: PositiveInt = 1024
    max_queue_bytes: PositiveSize = 64 << 20
    max_metadata_frames: PositiveInt = 1024
    max_metadata_bytes: PositiveSize = 64 << 20
    max_frame_size: FrameSize = 64 << 20
    frame_timeout: Duration | None = None
    tls: TLSConfig | None = None
    socket_mode: SocketMode = DEFAULT_SOCKET_MODE
    buffer: BufferConfig = attrs.field(factory=BufferConfig)

    @property
    def frame_timeout_seconds(self) -> float:
        """How long a frame in progress may take (``inf``: no limit); see
        :func:`frame_timeout_for`."""
        return frame_timeout_for(self.frame_timeout, self.max_frame_size)

    def __attrs_post_init__(self) -> None:
        if (self.listen is None) == (self.connect is None):
            raise FieldError("listen", "set exactly one of listen or connect")
        check_disk_buffer(self.buffer, self.protocol, policy=self.policy)
        check_transport("listen", self.listen, self.tls, listening=True)
        check_transport("connect", self.connect, self.tls, listening=False)
        if not protocols.get(self.protocol).has_keepalive:
            keepalive = ", ".join(n for n in protocols.names() if protocols.get(n).has_keepalive)
            raise FieldError(
                "protocol",
                f"protocol {self.protocol!r} has no keepalive; a link needs one ({keepalive})",
            )
        if self.publish is None and self.subscribe is None:
            raise FieldError("publish", "set publish, subscribe or both")
        if self.publish is not None and self.publish == self.subscribe:
            raise FieldError(
                "subscribe", "must differ from publish (the link would send its peer's frames back)"
            )
        if self.peer_keepalives is False and self.protocol == "native":
            raise FieldError(
                "peer_keepalives",
                "a native link's peer is framewire, which always sends keepalives: "
                'peer_keepalives = false is for protocol = "datalink" only',
            )
        if self.expects_peer_keepalives and self.keepalive >= self.timeout:
            raise FieldError(
                "keepalive", f"must be shorter than timeout ({self.timeout:g}s), or the peer dies"
            )
        if self.dead_host_timeout < MIN_DEAD_HOST_TIMEOUT:
            raise FieldError(
                "dead_host_timeout",
                f"must be at least {MIN_DEAD_HOST_TIMEOUT:g}s (TCP keepalive counts whole "
                f"seconds), got {self.dead_host_timeout:g}s",
            )

    @property
    def expects_peer_keepalives(self) -> bool:
        """Whether the peer sends keepalives: then a peer silent for ``timeout`` is dead, and
        the link counts as up once it has heard the peer rather than on connecting."""
        if self.peer_keepalives is not None:
            return self.peer_keepalives
        return self.protocol != "datalink"


def _zmq_bind_address(value: object) -> ZmqAddress:
    return parse_zmq_address(value, binding=True)


def _bridge_address(value: object) -> ZmqAddress:
    address = parse_zmq_address(value, binding=True)
    if address.transport != "tcp":
        raise ValueError(
            f"a Rogue bridge speaks tcp on two ports (P and P+1), got {str(address)!r}"
        )
    if not 1 <= address.port <= 65534:
        raise ValueError(
            f"port must be from 1 to 65534: a Rogue bridge uses port P and P+1 "
            f"(so port 0, any free port, cannot be used), got {address.port}"
        )
    return address


def _channels(value: object) -> tuple[int, ...]:
    if not isinstance(value, list | tuple):
        raise ValueError(f"expected an array of channel numbers, got {describe(value)}")
    channels = []
    for item in value:
        if type(item) is not int or not 0 <= item <= 255:
            raise ValueError(f"a Rogue channel is an integer from 0 to 255, got {describe(item)}")
        channels.append(item)
    return tuple(sorted(set(channels)))


#: A ZeroMQ address an endpoint binds or connects (checked against its role).
ZmqEndpointAddress = Annotated[ZmqAddress, Check(_zmq_bind_address)]
BridgeAddress = Annotated[ZmqAddress, Check(_bridge_address)]
RogueChannels = Annotated[tuple[int, ...], Check(_channels)]


def _check_connectable(address: ZmqAddress, role: str) -> None:
    if address.transport == "tcp" and (address.host is None or address.port == 0):
        raise FieldError(
            "address",
            f"role {role!r} connects, so it needs a host and a port, got {str(address)!r}",
        )


@attrs.frozen
class BridgeConfig(_QueuedWithPolicy):
    """``kind = "bridge"``: Rogue's two-port stream bridge (TcpServer/TcpClient) over ZeroMQ.

    Frames from the peer are published into ``publish``; frames of ``subscribe`` are sent to
    the peer, losslessly by default (with no peer the publishers of ``subscribe`` wait).
    """

    role: Literal["server", "client"]
    address: BridgeAddress
    kind: Literal["bridge"] = "bridge"
    protocol: Literal["rogue"] = "rogue"
    publish: Name | None = None
    subscribe: Name | None = None
    metadata_channels: RogueChannels = ()
    policy: Policy = "lossless"
    max_queue_frames: PositiveInt = 1024
    max_queue_bytes: PositiveSize = 64 << 20
    max_frame_size: FrameSize = 64 << 20
    buffer: BufferConfig = attrs.field(factory=BufferConfig)

    def __attrs_post_init__(self) -> None:
        check_disk_buffer(self.buffer, None, policy=self.policy)  # Rogue has no sessions
        if self.role == "client":
            _check_connectable(self.address, self.role)
        if self.publish is None and self.subscribe is None:
            raise FieldError("publish", "set publish, subscribe or both")
        if self.publish is not None and self.publish == self.subscribe:
            raise FieldError(
                "subscribe",
                "must differ from publish (the bridge would send its peer's frames back)",
            )


@attrs.frozen
class PubSubConfig:
    """``kind = "pubsub"``: a ZeroMQ publisher (XPUB, bound) or subscriber (SUB, connected),
    as xdas's ZMQPublisher and ZMQSubscriber speak; messages are opaque payloads."""

    role: Literal["publisher", "subscriber"]
    address: ZmqEndpointAddress
    stream: Name
    kind: Literal["pubsub"] = "pubsub"
    welcome: StrictStr = "xdas"
    topic: StrictStr = ""
    type: StrictStr = "zmq"
    max_queue_frames: PositiveInt = 1024
    max_queue_bytes: PositiveSize = 64 << 20
    max_frame_size: FrameSize = 64 << 20

    def __attrs_post_init__(self) -> None:
        if self.role == "subscriber":
            _check_connectable(self.address, self.role)
        elif self.topic:
            raise FieldError("topic", "only a subscriber subscribes to a topic")
        if not self.type:
            raise FieldError("type", "must not be empty")


_NATS_SCHEMES: Final = ("nats", "tls")
#: A subject token framewire accepts in a prefix: no wildcards, no white space, no dots.
_SUBJECT_TOKEN: Final = re.compile(r"[^\s.*>]+")
#: A JetStream stream or consumer name: no dots, wildcards, white space or path separators.
_JETSTREAM_NAME: Final = re.compile(r"[^\s.*>/\\]{1,200}")
#: The largest chunk: JetStream refuses messages of 32 MiB or more (headers included).
MAX_NATS_CHUNK: Final = (32 << 20) - (64 << 10)


def _nats_server(value: object) -> str:
    text = _strict(str)(value)
    assert isinstance(text, str)
    scheme, sep, rest = text.partition("://")
    if not sep or scheme not in _NATS_SCHEMES:
        raise ValueError(f"{text!r}: expected nats://host:port or tls://host:port")
    if "@" in rest:
        shown = f"{scheme}://...@{rest.rpartition('@')[2]}"  # never the secret itself
        raise ValueError(
            f"{shown!r}: put credentials in user and password (or password_file), token (or "
            "token_file), nkey_seed or creds, not in the address"
        )
    host, colon, port = rest.rstrip("/").rpartition(":")
    if not colon:
        host, port = rest.rstrip("/"), "4222"
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r}: expected nats://host:port or tls://host:port")
    return f"{scheme}://{host}:{int(port)}"


def _nats_servers(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ValueError(f"expected an array of server addresses, got {describe(value)}")
    servers = tuple(_nats_server(item) for item in value)
    if len({server.partition("://")[0] for server in servers}) > 1:
        raise ValueError("mix of nats:// and tls:// servers: use one scheme for all")
    return servers


def _nats_subject(value: object) -> str:
    text = _strict(str)(value)
    assert isinstance(text, str)
    if not all(_SUBJECT_TOKEN.fullmatch(token) for token in text.split(".")):
        raise ValueError(
            f"{text!r} is not a NATS subject prefix (dot-separated tokens, without "
            "wildcards * and > or white space)"
        )
    return text


def _jetstream_name(value: object) -> str:
    text = _strict(str)(value)
    assert isinstance(text, str)
    if not _JETSTREAM_NAME.fullmatch(text):
        raise ValueError(
            f"{text!r} is not a JetStream name (no dots, *, >, slashes or white space)"
        )
    return text


def _optional_jetstream_name(value: object) -> str:
    text = _strict(str)(value)
    assert isinstance(text, str)
    return _jetstream_name(text) if text else text


def _nats_chunk(raw: object) -> object:
    value = parse_size(raw)
    if not 1024 <= value <= MAX_NATS_CHUNK:
        raise ValueError(
            f"expected a size from 1KiB to {format_size(MAX_NATS_CHUNK)} (JetStream refuses "
            f"messages of 32 MiB or more), got {value!r}"
        )
    return value


def _nats_pack(raw: object) -> object:
    value = parse_size(raw)
    if not 1024 <= value <= MAX_NATS_CHUNK:
        raise ValueError(
            f"expected a size from 1KiB to {format_size(MAX_NATS_CHUNK)}, got {value!r}"
        )
    return value


def _replicas(raw: object) -> object:
    value = _strict(int)(raw)
    if not 1 <= value <= 5:  # type: ignore[operator]
        raise ValueError(f"expected 1 to 5 replicas, got {value!r}")
    return value


NatsServers = Annotated[tuple[str, ...], Check(_nats_servers)]
NatsSubject = Annotated[str, Check(_nats_subject)]
JetStreamName = Annotated[str, Check(_jetstream_name)]


_DOMAIN: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _jetstream_domain(value: object) -> str:
    text = _strict(str)(value)
    assert isinstance(text, str)
    if not _DOMAIN.fullmatch(text):
        raise ValueError(
            f"{text!r} is not a JetStream domain (letters, digits, '-' and '_', at most 64)"
        )
    return text


#: A JetStream domain: one subject token (it becomes ``$JS.DOMAIN.API``).
JetStreamDomain = Annotated[str, Check(_jetstream_domain)]
OptionalJetStreamName = Annotated[str, Check(_optional_jetstream_name)]
NatsChunk = Annotated[int, Check(_nats_chunk)]
NatsPack = Annotated[int, Check(_nats_pack)]
Replicas = Annotated[int, Check(_replicas)]


@attrs.frozen
class NatsConfig(_Queued):
    """``kind = "nats"``: publish a stream to NATS, or subscribe from NATS into a stream.

    ``mode = "core"``: live and lossy, no acks; ``mode = "jetstream"``: durable, acked, read
    back through a durable pull consumer. See docs/configuration.md for every key.
    """

    direction: Literal["publish", "subscribe"]
    stream: Name
    #: Empty: the embedded nats-server of ``[nats] embedded = true`` (the loader requires
    #: one or the other).
    servers: NatsServers = ()
    kind: Literal["nats"] = "nats"
    mode: Literal["core", "jetstream"] = "core"
    subject: NatsSubject | None = None
    jetstream_stream: JetStreamName | None = None
    create: StrictBool = True
    replicas: Replicas = 1
    storage: Literal["file", "memory"] = "file"
    max_bytes: Size = 0
    max_age: Duration = 0.0
    discard: Literal["old", "new"] = "old"
    duplicate_window: PositiveDuration = 120.0
    retention: Literal["limits", "interest"] = "limits"
    #: The JetStream domain the endpoint addresses (its streams and consumers live there).
    domain: JetStreamDomain | None = None
    #: Subscribe + jetstream: the domain whose same-named streams this endpoint's own
    #: streams source, across a leaf node link (a hub reading a site).
    source_domain: JetStreamDomain | None = None
    durable: OptionalJetStreamName = ""
    start: Literal["new", "all"] = "new"
    policy: Policy | None = None
    max_queue_frames: PositiveInt = 1024
    max_queue_bytes: PositiveSize = 64 << 20
    max_inflight_bytes: PositiveSize = 32 << 20
    chunk_size: NatsChunk = 8 << 20
    #: Core publish: wait for the slowest reader that says how far it has read (within
    #: 16 MiB), so the server never cuts it off as a slow consumer.
    flow_control: StrictBool = False
    pack_frames: NonNegativeInt = 0
    pack_bytes: NatsPack = 64 << 10
    max_frame_size: FrameSize = 64 << 20
    ack_timeout: PositiveDuration = 10.0
    connect_timeout: PositiveDuration = 10.0
    #: A PING to the server this often; after ``max_outstanding_pings`` unanswered, the
    #: connection is taken for dead and made again (a blackholed link is found within
    #: ``ping_interval * (max_outstanding_pings + 1)``).
    ping_interval: PositiveDuration = 10.0
    max_outstanding_pings: PositiveInt = 2
    user: StrictStr | None = None
    #: Secrets (``password``, ``token``) are left out of the repr: never in a log line.
    password: Secret | None = attrs.field(default=None, repr=False)
    #: A file holding the password (or token); see docs/configuration.md#secrets.
    password_file: FilePath | None = None
    token: Secret | None = attrs.field(default=None, repr=False)
    token_file: FilePath | None = None
    nkey_seed: FilePath | None = None
    creds: FilePath | None = None
    tls: TLSConfig | None = None
    reconnect: BackoffConfig = attrs.field(factory=BackoffConfig)
    buffer: BufferConfig = attrs.field(factory=BufferConfig)

    def __attrs_post_init__(self) -> None:
        if self.direction == "subscribe" and self.buffer != BufferConfig():
            raise FieldError(
                "buffer", 'applies to direction = "publish" (what waits for NATS) only'
            )
        check_disk_buffer(self.buffer, None, policy=self.policy)
        tls_servers = bool(self.servers) and self.servers[0].startswith("tls://")
        if tls_servers and self.tls is None:
            raise FieldError("tls", f"servers {self.servers[0]!r} needs a [tls] table")
        if self.tls is not None:
            if not tls_servers:
                raise FieldError("tls", "a [tls] table needs tls:// servers")
            if self.tls.require_client_cert:
                raise FieldError("tls.require_client_cert", "applies to listening endpoints only")
        methods = [
            name
            for name, value in (
                ("user", self.user),
                ("token", self.token),
                ("token_file", self.token_file),
                ("nkey_seed", self.nkey_seed),
                ("creds", self.creds),
            )
            if value is not None
        ]
        if len(methods) > 1:
            raise FieldError(
                methods[1], f"set one way to authenticate, not {' and '.join(methods)}"
            )
        if self.password is not None and self.password_file is not None:
            raise FieldError("password_file", "set password or password_file, not both")
        for key in ("password", "password_file"):
            if getattr(self, key) is not None and self.user is None:
                raise FieldError(key, "needs user")
        subscribing = self.direction == "subscribe"
        if self.policy is not None and subscribing:
            raise FieldError("policy", 'applies to direction = "publish" (the queue to NATS) only')
        if self.pack_frames and subscribing:
            raise FieldError(
                "pack_frames",
                'applies to direction = "publish" only (a subscriber takes packs apart anyway)',
            )
        if self.flow_control and (subscribing or self.mode != "core"):
            raise FieldError(
                "flow_control",
                'applies to direction = "publish" with mode = "core" only (a subscriber always '
                "says how far it has read; JetStream has its own)",
            )
        if self.pack_frames == 1 or self.pack_frames > 65536:
            raise FieldError(
                "pack_frames", f"expected 0 (no packing) or 2 to 65536, got {self.pack_frames}"
            )
        if self.discard == "new" and self.retention == "limits":
            raise FieldError(
                "discard",
                '"new" with retention = "limits" stops publishing for good once max_bytes of '
                "traffic is stored: a limits stream frees no room when frames are read. Set "
                'retention = "interest" (frames leave the stream once every consumer has '
                'acknowledged them) or discard = "old"',
            )
        if self.max_age and self.max_age < self.duplicate_window:
            raise FieldError(
                "max_age",
                f"{format_duration(self.max_age)} is shorter than duplicate_window "
                f"({format_duration(self.duplicate_window)}): nats-server refuses such a "
                "stream; raise max_age or lower duplicate_window",
            )
        if self.source_domain is not None:
            if not (subscribing and self.mode == "jetstream"):
                raise FieldError(
                    "source_domain", 'applies to direction = "subscribe" with mode = "jetstream"'
                )
            if self.source_domain == self.domain:
                raise FieldError("source_domain", f"is the endpoint's own domain ({self.domain!r})")
        if self.durable and not (subscribing and self.mode == "jetstream"):
            raise FieldError(
                "durable", 'applies to direction = "subscribe" with mode = "jetstream" only'
            )

    @property
    def explicit_stream_settings(self) -> frozenset[str]:
        """The JetStream stream settings this configuration gives other than by default."""
        fields = attrs.fields_dict(NatsConfig)
        return frozenset(
            key
            for key in (
                "max_bytes",
                "max_age",
                "discard",
                "duplicate_window",
                "replicas",
                "storage",
                "retention",
            )
            if getattr(self, key) != fields[key].default
        )

    @property
    def subject_prefix(self) -> str:
        """Subjects are ``PREFIX.data.TYPE`` and ``PREFIX.meta.TYPE``."""
        return self.subject if self.subject is not None else f"fw.{self.stream}"

    @property
    def stream_name(self) -> str:
        """The JetStream stream of the frames: by default ``FW_`` and the prefix, without a
        leading ``fw.`` and with ``_`` for dots (``fw.camera`` -> ``FW_camera``)."""
        if self.jetstream_stream is not None:
            return self.jetstream_stream
        prefix = self.subject_prefix
        name = "FW_" + prefix.removeprefix("fw.").replace(".", "_")
        return name[:200]

    @property
    def meta_stream_name(self) -> str:
        """The last-value store of the metadata: the stream name and ``_META``."""
        return f"{self.stream_name}_META"

    @property
    def queue_policy(self) -> Policy:
        """The publishing queue's policy: as configured, else lossy for core, lossless for
        JetStream."""
        if self.buffer.is_disk:
            return "lossless"
        if self.policy is not None:
            return buffer_policy(self.buffer, self.policy)
        return "lossy" if self.mode == "core" else buffer_policy(self.buffer, "lossless")


EndpointConfig: TypeAlias = (
    ServerConfig
    | ReceiverConfig
    | GeneratorConfig
    | SenderConfig
    | FileConfig
    | RecorderConfig
    | LinkConfig
    | BridgeConfig
    | PubSubConfig
    | NatsConfig
)
ENDPOINT_KINDS: Final[dict[str, type[EndpointConfig]]] = {
    "server": ServerConfig,
    "receiver": ReceiverConfig,
    "generator": GeneratorConfig,
    "sender": SenderConfig,
    "file": FileConfig,
    "recorder": RecorderConfig,
    "link": LinkConfig,
    "bridge": BridgeConfig,
    "pubsub": PubSubConfig,
    "nats": NatsConfig,
}


@attrs.frozen
class DaemonConfig:
    """``[daemon]``: process-wide settings."""

    grace_period: Duration = 5.0
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    restart: BackoffConfig = attrs.field(factory=lambda: BackoffConfig(stable_after=60.0))


DEFAULT_STATUS_ADDRESS: Final = Address("tcp", "127.0.0.1", 8765)


@attrs.frozen
class StatusConfig:
    """``[status]``: the status websocket. Absent: no status server."""

    listen: HostPort = DEFAULT_STATUS_ADDRESS
    interval: PositiveDuration = 1.0
    #: Left out of the repr: never in a log line.
    token: Secret | None = attrs.field(default=None, repr=False)
    #: A file holding the token; see docs/configuration.md#secrets.
    token_file: FilePath | None = None
    max_clients: PositiveInt = 32
    #: Clients (of all endpoints) with series of their own in /metrics; the rest are summed.
    metrics_max_clients: PositiveInt = 100

    def __attrs_post_init__(self) -> None:
        if self.token is not None and self.token_file is not None:
            raise FieldError("token_file", "set token or token_file, not both")


#: Where the embedded server listens unless configured: NATS's own default port, loopback.
DEFAULT_NATS_LISTEN: Final = Address("tcp", "127.0.0.1", 4222)
#: The largest ``max_payload``: NATS itself refuses more than 64 MiB unless ``max_pending``
#: is raised too, and advises 8 MiB at most.
MAX_PAYLOAD_CEILING: Final = 64 << 20
MAX_PAYLOAD_FLOOR: Final = 1 << 10


def _payload(raw: object) -> object:
    value = parse_size(raw)
    if not MAX_PAYLOAD_FLOOR <= value <= MAX_PAYLOAD_CEILING:
        raise ValueError(
            f"expected a size from {format_size(MAX_PAYLOAD_FLOOR)} to "
            f"{format_size(MAX_PAYLOAD_CEILING)}, got {value}"
        )
    return value


def _server_name(raw: object) -> object:
    if type(raw) is not str:
        raise ValueError(f"expected a string, got {raw!r}")
    if not raw or any(c.isspace() or c in "\"'{}#" for c in raw):
        raise ValueError(f"{raw!r} is not a server name (no spaces, quotes, braces or '#')")
    return raw


#: A nats-server ``server_name``: one word.
ServerName = Annotated[str, Check(_server_name)]
#: ``max_payload``: 1 KiB to 64 MiB.
MaxPayload = Annotated[int, Check(_payload)]


@attrs.frozen
class NatsServerConfig:
    """``[nats]``: with ``embedded = true``, ``framewire run`` starts a local nats-server with
    JetStream and supervises it like an endpoint (see framewire/daemon/nats/_server.py).

    ``nats`` endpoints without ``servers`` connect to it. ``store_dir`` defaults to
    ``$STATE_DIRECTORY/nats`` (systemd's StateDirectory=), else
    ``$XDG_STATE_HOME/framewire/nats`` (``~/.local/state/framewire/nats``). ``config_file``
    names a nats-server configuration file whose settings are added to the generated ones
    (authorization, TLS, leaf node remotes, cluster routes), in nats-server's own syntax.
    """

    embedded: StrictBool = False
    #: host:port (``*:port``: every interface); port 0 picks a free port at the first start
    #: and keeps it across restarts.
    listen: HostPort = DEFAULT_NATS_LISTEN
    store_dir: FilePath | None = None
    #: JetStream file storage bound (nats-server ``max_file_store``).
    max_store: PositiveSize = 10 << 30
    #: JetStream memory storage bound (``max_memory_store``), for ``storage = "memory"``.
    max_memory_store: PositiveSize = 256 << 20
    max_payload: MaxPayload = 8 << 20
    #: JetStream writes every message to disk before acknowledging it (``sync_interval:
    #: always``): a power loss then loses nothing acknowledged, at a cost in speed. Without
    #: it, the last up to 2 minutes may sit in the page cache (a crash of the server alone
    #: loses nothing).
    sync_always: StrictBool = False
    server_name: ServerName | None = None
    #: The JetStream domain of this server (a site's leaf node, a hub): written into the
    #: generated ``jetstream`` block, so a ``config_file`` never needs one.
    domain: JetStreamDomain | None = None
    config_file: FilePath | None = None
    #: The nats-server program; default: beside the Python running framewire, then $PATH.
    binary: FilePath | None = None
    #: How long a start may take until the server accepts connections.
    start_timeout: PositiveDuration = 10.0
    #: After SIGTERM, how long the server may take to exit before SIGKILL.
    stop_timeout: PositiveDuration = 10.0


def _type_names(value: object) -> tuple[str, ...]:
    if not isinstance(value, list | tuple):
        raise ValueError(f"expected an array of frame type names, got {describe(value)}")
    names = []
    for item in value:
        if type(item) is not str or not item:
            raise ValueError(f"a frame type name is a non-empty string, got {describe(item)}")
        names.append(item)
    return tuple(dict.fromkeys(names))


#: Metadata frame types, each a non-empty string (duplicates dropped).
TypeNames = Annotated[tuple[str, ...], Check(_type_names)]

#: The least a stream's history may be bounded to.
MIN_HISTORY: Final = 1 << 20


@attrs.frozen
class HistoryConfig:
    """``[streams.NAME.history]``: keep the stream's recent frames on disk, time-indexed
    (:class:`framewire.spool.StreamHistory`), so native clients can rewind (``--since``).

    ``max_bytes`` bounds the files on disk (the oldest segment goes first), ``max_age``
    (seconds; optional) drops what is older. ``path`` defaults to ``history/NAME`` under the
    daemon's state directory (resolved by the daemon). ``max_queue_bytes`` bounds what the
    stream hands to the history's writer and it has not written yet: beyond it, frames are
    dropped from the history (and counted), never held back from the live stream.
    """

    max_bytes: PositiveSize
    max_age: PositiveDuration | None = None
    path: FilePath | None = None
    max_queue_bytes: PositiveSize = 64 << 20

    def __attrs_post_init__(self) -> None:
        if self.max_bytes < MIN_HISTORY:
            raise FieldError(
                "max_bytes",
                f"a history needs at least {format_size(MIN_HISTORY)}, got {self.max_bytes}",
            )


@attrs.frozen
class StreamConfig:
    """``[streams.NAME]``: bounds of one stream's metadata cache (streams not listed get the
    defaults; a producer whose metadata would pass them is refused), and its history."""

    max_metadata_types: PositiveInt = 256
    max_metadata_bytes: PositiveSize = 64 << 20
    history: HistoryConfig | None = None
    #: Metadata types that start a run (``["Observation"]`` for G3): when one arrives, the
    #: metadata cached from the previous run is retired (see docs/configuration.md).
    run_starts: TypeNames = ()


@attrs.frozen
class Config:
    """A whole configuration file."""

    daemon: DaemonConfig = attrs.field(factory=DaemonConfig)
    status: StatusConfig | None = None
    streams: dict[Name, StreamConfig] = attrs.field(factory=dict)
    endpoints: dict[Name, EndpointConfig] = attrs.field(factory=dict)
    nats: NatsServerConfig | None = None

    def required_descriptors(self) -> int:
        """File descriptors the configured endpoints may need at their limits."""
        clients = sum(getattr(endpoint, "max_clients", 0) for endpoint in self.endpoints.values())
        status = self.status.max_clients if self.status else 0
        return clients + status + 2 * len(self.endpoints) + 64
