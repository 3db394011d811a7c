"""A small client for application code: talk to a framewire ``link`` (or server, or receiver).

Two flavours with the same methods:

* trio: ``async with open_client("tcp://127.0.0.1:4550") as client:`` then
  ``await client.send(frame)``, ``await client.receive()``, ``async for frame in client``;
* blocking: ``with BlockingClient("tcp://127.0.0.1:4550") as client:`` then
  ``client.send(frame)``, ``client.receive()``, ``for frame in client``; plain sockets,
  every operation bounded by a timeout.

Both connect to ``tcp://host:port``, ``unix:///path`` or ``tls://host:port``. TLS verifies
the server against the system's trust store unless given an ``ssl_context`` (e.g.
``ssl.create_default_context(cafile="ca.pem")``); the blocking client does TLS with the ssl
module, never plain TCP to a ``tls://`` address.

Both speak ``protocol="native"`` (the default) or ``"datalink"`` (then only payload and
timestamp travel). With ``keepalive`` set they send the protocol's keepalive whenever they
have sent nothing for that many seconds, so a ``link`` endpoint (whose ``timeout`` is
longer) keeps them connected: the trio client from a background task, the blocking one while
it waits in :meth:`BlockingClient.receive` (call :meth:`BlockingClient.keepalive` if your
code does neither for longer). Keepalives from the peer are consumed silently and count as
signs of life. The clients do not reconnect: on a lost connection they raise and the caller
decides.

Arrays (numpy is an optional dependency: ``pip install 'framewire[numpy]'``):
``send_array(array)`` sends the array's bytes in one frame whose headers carry its dtype and
shape (``{"dtype": "<f8", "shape": "3,4"}``); ``receive_array()`` rebuilds it without the
reader knowing the shape. :func:`frame_from_array` and :func:`array_from_frame` do the same
for frames you move yourself. Datalink frames carry no headers, so arrays need ``native``.
"""

from __future__ import annotations

import collections
import datetime
import importlib.util
import math
import socket
import ssl
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final

import attrs
import trio

from . import protocols
from .config import Address, parse_address
from .daemon.keepalive import KeepaliveConnection, send_keepalives
from .daemon.transport import (
    TLS_VERDICT_WAIT,
    TLSRefused,
    connector_for,
    tls_connector,
    tls_refusal_reason,
)
from .frame import EMPTY_HEADERS, Buffer, Frame, FrameKind
from .protocols import native

if TYPE_CHECKING:
    import numpy.typing as npt

__all__ = [
    "BlockingClient",
    "Client",
    "ConnectionClosed",
    "FramesLost",
    "Gap",
    "RewindRefused",
    "RewindStart",
    "array_from_frame",
    "frame_from_array",
    "gap_of",
    "open_client",
    "rewind_answer",
    "rewind_request",
]

#: Default largest frame a client accepts.
MAX_FRAME_SIZE: Final = 64 << 20
#: Writes up to this size are joined into one system call by the blocking client.
_JOIN_LIMIT: Final = 256 * 1024
#: The frame type :meth:`Client.send_array` uses unless told otherwise.
ARRAY_TYPE: Final = "ndarray"


class ConnectionClosed(ConnectionError):
    """The peer closed the connection. ``clean`` when it ended its stream properly (the
    native END_OF_STREAM, or EOF at a frame boundary)."""

    def __init__(self, message: str, *, clean: bool) -> None:
        super().__init__(message)
        self.clean = clean


class RewindRefused(ConnectionError):
    """A rewind (``since=``) the server did not serve: it refused it (the message says
    why: a time in the future, a bad rate...), or it did not answer at all (its stream
    keeps no history, or it is an older framewire): then it serves live frames only."""


@attrs.frozen
class RewindStart:
    """The server's answer to a rewind: the arrival time (ns since the epoch, the server's
    clock) of the first frame it replays, the time asked for, and whether the history
    starts later than asked (``clamped``)."""

    start_ns: int
    asked_ns: int
    clamped: bool
    rate: str


def rewind_request(
    since: float | datetime.timedelta | datetime.datetime | None,
    rate: str | float = "full",
    *,
    gaps: bool = False,
) -> bytes:
    """The REQUEST frame a client sends first (docs/protocol.md): a rewind when ``since``
    is given (a span back from the server's now, in seconds or a timedelta, or a time, an
    aware datetime; ``rate`` ``"full"``, ``"original"`` or a factor of the original speed),
    and with ``gaps`` a GAP notice wherever the server drops frames for this client.
    Raises ValueError for a naive datetime or a negative span (the server checks the rest
    and refuses politely)."""
    headers: dict[str, str] = {}
    if isinstance(since, datetime.datetime):
        if since.tzinfo is None:
            raise ValueError("since: a datetime needs a time zone (e.g. datetime.UTC)")
        delta = since - datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
        headers["since_ns"] = str(
            (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1000
        )
    elif since is not None:
        seconds = since.total_seconds() if isinstance(since, datetime.timedelta) else since
        if not seconds >= 0:
            raise ValueError(f"since: expected a span of 0 or more seconds, got {since!r}")
        headers["ago_ns"] = str(round(seconds * 1e9))
    if since is not None:
        headers["rate"] = rate if isinstance(rate, str) else repr(float(rate))
    if gaps:
        headers["gaps"] = "1"
    return native.encode_control(native.KIND_REQUEST, headers)


def rewind_answer(first: Frame) -> RewindStart:
    """The server's answer to a rewind, from the first thing it sent (a
    :class:`~framewire.protocols.native.Notice` or a frame). Raises :class:`RewindRefused`
    for a refusal, or when a frame came first (no answer will come)."""
    if isinstance(first, native.Notice):
        if first.what == "refused":
            raise RewindRefused(
                f"the server refused the rewind: {first.headers.get('reason', 'no reason')}"
            )
        if first.what == "rewind":
            headers = first.headers
            try:
                return RewindStart(
                    int(headers.get("start_ns", "0")),
                    int(headers.get("asked_ns", "0")),
                    headers.get("clamped") == "1",
                    headers.get("rate", "full"),
                )
            except ValueError:
                raise RewindRefused(f"a rewind answer that makes no sense: {headers}") from None
    raise RewindRefused(
        "the server did not answer the rewind request: its stream keeps no history, or "
        "it is an older framewire (it serves live frames only)"
    )


@attrs.frozen
class Gap:
    """Frames the server dropped for this client (it was too slow), where they were
    dropped: ``frames`` and ``bytes`` lost, between the frame stamped ``after_ns`` (the
    last one sent before, 0 if none) and the one stamped ``before_ns`` (the next one)."""

    frames: int
    bytes: int
    after_ns: int
    before_ns: int


class FramesLost(Exception):
    """Raised by :meth:`Client.receive` at the point where the server dropped frames (a
    client that asked for ``gaps``); the next :meth:`Client.receive` returns the frame
    after the loss. :attr:`gap` says how many."""

    def __init__(self, gap: Gap) -> None:
        super().__init__(
            f"the server dropped {gap.frames} frames ({gap.bytes} bytes) here: this client "
            "did not keep up"
        )
        self.gap = gap


def gap_of(notice: native.Notice) -> Gap:
    """The :class:`Gap` a ``gap`` notice tells of. Raises ProtocolError if it makes no
    sense."""
    headers = notice.headers
    try:
        return Gap(
            int(headers["frames"]),
            int(headers["bytes"]),
            int(headers.get("after_ns", "0")),
            int(headers.get("before_ns", "0")),
        )
    except (KeyError, ValueError):
        raise protocols.ProtocolError(f"a gap notice that makes no sense: {headers}") from None


def _parse(
    address: str, ssl_context: ssl.SSLContext | None, server_name: str | None
) -> tuple[Address, ssl.SSLContext | None]:
    """``address`` (``tcp://host:port``, ``host:port``, ``tls://host:port`` or
    ``unix:///path``) and the TLS context to use with it: ``ssl_context``, or for ``tls://``
    without one a default context that verifies the server against the system's trust
    store. Raises ValueError for a bad address, or TLS settings given for an address that is
    not ``tls://``."""
    parsed = parse_address(address if "://" in address else f"tcp://{address}")
    if parsed.scheme != "tls":
        if ssl_context is not None or server_name is not None:
            raise ValueError(f"{parsed}: ssl_context and server_name are for tls:// addresses only")
        return parsed, None
    return parsed, ssl_context if ssl_context is not None else ssl.create_default_context()


def _tls_failure(address: Address, exc: BaseException) -> ConnectionError:
    """A failed handshake as the ConnectionError the clients raise, saying why."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        why = f"certificate verify failed: {exc.verify_message}"
    elif isinstance(exc, ssl.SSLError):
        why = (exc.reason or str(exc)).lower().replace("_", " ")
    else:
        why = str(exc) or type(exc).__name__
    return ConnectionError(f"TLS handshake with {address} failed: {why}")


# -- arrays -----------------------------------------------------------------------------


def _require_numpy() -> None:
    if importlib.util.find_spec("numpy") is None:
        raise ImportError(
            "array helpers need numpy: pip install 'framewire[numpy]' (or pip install numpy)"
        )


def frame_from_array(
    array: npt.ArrayLike,
    *,
    type: str = ARRAY_TYPE,
    timestamp: int | None = None,
    headers: Mapping[str, str] = EMPTY_HEADERS,
    kind: FrameKind = FrameKind.DATA,
) -> Frame:
    """A frame holding ``array``'s bytes (C order) with its dtype and shape in the headers.

    ``timestamp`` defaults to now (ns since the epoch). The payload is a view of the array
    (or of a C-ordered copy if it was not C-contiguous): do not modify the array until the
    frame is sent. Raises ValueError for object or structured dtypes, which have no portable
    byte form, and ImportError without numpy.
    """
    _require_numpy()
    import numpy

    value = numpy.asarray(array)
    dtype = value.dtype
    if dtype.hasobject or dtype.fields is not None:
        raise ValueError(f"cannot send an array of dtype {dtype}: no portable byte form")
    # ascontiguousarray copies only when needed (and makes a 0-d array 1-d: shape is kept).
    payload = numpy.ascontiguousarray(value).reshape(-1).view(numpy.uint8).data
    described = {
        **headers,
        "dtype": dtype.str,
        "shape": ",".join(str(n) for n in value.shape),
    }
    return Frame(kind, type, payload, time.time_ns() if timestamp is None else timestamp, described)


def array_from_frame(frame: Frame, *, copy: bool = False) -> npt.NDArray[Any]:
    """The array a :func:`frame_from_array` frame holds.

    Without ``copy`` the array is a read-only view of the frame's payload. Raises ValueError
    if the frame has no ``dtype``/``shape`` headers (datalink frames never do) or they do not
    match the payload, and ImportError without numpy.
    """
    _require_numpy()
    import numpy

    try:
        dtype_text, shape_text = frame.headers["dtype"], frame.headers["shape"]
    except KeyError:
        raise ValueError(
            f"frame of type {frame.type!r} has no dtype and shape headers: it was not sent "
            "as an array (datalink frames carry no headers)"
        ) from None
    try:
        dtype = numpy.dtype(dtype_text)
        shape = tuple(int(n) for n in shape_text.split(",")) if shape_text else ()
    except (TypeError, ValueError) as exc:
        raise ValueError(f"bad array headers dtype={dtype_text!r} shape={shape_text!r}") from exc
    if dtype.hasobject:
        raise ValueError(f"refusing an array of dtype {dtype}")
    expected = math.prod(shape) * dtype.itemsize
    payload = frame.payload
    size = payload.nbytes if isinstance(payload, memoryview) else len(payload)
    if size != expected or any(n < 0 for n in shape):
        raise ValueError(
            f"payload of {size} bytes does not hold an array of shape {shape} and dtype {dtype}"
        )
    array = numpy.frombuffer(payload, dtype=dtype).reshape(shape)
    return array.copy() if copy else array


# -- trio -------------------------------------------------------------------------------


class Client:
    """A trio connection speaking framewire frames. Made by :func:`open_client`.

    One task may send while another receives. Like a trio stream, a cancelled :meth:`send`
    leaves the connection unusable: close it.
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        protocol: str = "native",
        max_frame_size: int = MAX_FRAME_SIZE,
        peer_timeout: float | None = None,
    ) -> None:
        spec = protocols.get(protocol)
        self.protocol = protocol
        self.connection = KeepaliveConnection(stream)
        self.peer_timeout = peer_timeout
        self._encoder = spec.make_encoder()
        self._decoder = spec.make_decoder(max_frame_size)
        self._received: collections.deque[Frame] = collections.deque()
        #: After a rewind (``since=``): where the server's replay starts.
        self.rewind: RewindStart | None = None
        self._rewind_pending = False

    def _asked(self, *, rewind: bool) -> None:
        """A request went out: accept the server's notices (and await its rewind answer)."""
        decoder = self._decoder
        if not isinstance(decoder, native.NativeDecoder):
            raise ValueError("since= and gaps= need protocol='native'")
        decoder.accept_notices = True
        self._rewind_pending = rewind

    async def send(self, frame: Frame) -> None:
        """Send one frame. Raises trio.BrokenResourceError if the peer is gone, ValueError
        if the protocol cannot carry the frame."""
        await self.connection.send(self._encoder.encode(frame))

    async def send_many(self, frames: list[Frame]) -> None:
        """Send frames in one write (much faster than one :meth:`send` each for small ones)."""
        await self.connection.send(self._encoder.encode_batch(frames))

    async def send_keepalive(self) -> None:
        await self.connection.send([self._encoder.keepalive()])

    async def receive(self) -> Frame:
        """The next frame.

        Raises :class:`ConnectionClosed` when the peer closed or ended its stream,
        :class:`~framewire.protocols.ProtocolError` for bad bytes, TimeoutError when
        ``peer_timeout`` is set and nothing at all (not even a keepalive) arrived for that long,
        trio.BrokenResourceError if the connection broke; after a rewind request
        :class:`RewindRefused` if the server refused it or did not answer; with ``gaps``
        :class:`FramesLost` where the server dropped frames (call again for the next frame),
        or use :meth:`receive_with_gaps` to have the :class:`Gap` returned instead.
        """
        item = await self.receive_with_gaps()
        if isinstance(item, Gap):
            raise FramesLost(item)
        return item

    async def receive_with_gaps(self) -> Frame | Gap:
        """The next frame, or a :class:`Gap` where the server dropped frames (a client that
        asked for ``gaps``). Raises as :meth:`receive` does (but for FramesLost)."""
        while True:
            frame = await self._receive_frame()
            if self._rewind_pending:
                self.rewind = rewind_answer(frame)
                self._rewind_pending = False
                continue
            if isinstance(frame, native.Notice):
                if frame.what == "gap":
                    return gap_of(frame)
                continue  # a notice of a later version: nothing to do with it
            return frame

    async def _receive_frame(self) -> Frame:
        received, decoder = self._received, self._decoder
        while not received:
            if decoder.ended:
                raise ConnectionClosed("the peer ended its stream", clean=True)
            with trio.move_on_after(math.inf if self.peer_timeout is None else self.peer_timeout):
                nbytes = await self.connection.receive_into(decoder.get_buffer())
                if nbytes == 0:
                    decoder.end_of_input()
                    raise ConnectionClosed("the peer closed the connection", clean=True)
                received.extend(decoder.buffer_updated(nbytes))
                continue
            raise TimeoutError(f"nothing from the peer for {self.peer_timeout:g}s")
        return received.popleft()

    def __aiter__(self) -> AsyncIterator[Frame]:
        return self._frames()

    async def _frames(self) -> AsyncIterator[Frame]:
        """Frames until the peer closes cleanly."""
        while True:
            try:
                frame = await self.receive()
            except ConnectionClosed:
                return
            yield frame

    async def send_array(
        self,
        array: npt.ArrayLike,
        *,
        type: str = ARRAY_TYPE,
        timestamp: int | None = None,
        headers: Mapping[str, str] = EMPTY_HEADERS,
    ) -> None:
        """Send ``array`` with its dtype and shape (see :func:`frame_from_array`)."""
        await self.send(frame_from_array(array, type=type, timestamp=timestamp, headers=headers))

    async def receive_array(self, *, copy: bool = False) -> npt.NDArray[Any]:
        """Receive the next frame as an array (see :func:`array_from_frame`)."""
        return array_from_frame(await self.receive(), copy=copy)

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.connection.stream)


@asynccontextmanager
async def open_client(
    address: str,
    *,
    protocol: str = "native",
    keepalive: float | None = 1.0,
    peer_timeout: float | None = None,
    connect_timeout: float = 10.0,
    max_frame_size: int = MAX_FRAME_SIZE,
    ssl_context: ssl.SSLContext | None = None,
    server_name: str | None = None,
    since: float | datetime.timedelta | datetime.datetime | None = None,
    rate: str | float = "full",
    gaps: bool = False,
) -> AsyncIterator[Client]:
    """Connect to ``address`` and yield a :class:`Client`.

    ``address`` is ``tcp://host:port`` (or ``host:port``), ``unix:///path`` or
    ``tls://host:port``. TLS uses ``ssl_context`` (e.g.
    ``ssl.create_default_context(cafile="ca.pem")``, with ``load_cert_chain`` for a client
    certificate), by default one that verifies the server against the system's trust store;
    the certificate must name ``server_name`` (default: the address's host). A TLS 1.3
    server judges the client's certificate after the handshake: the client waits for that
    verdict before it is yielded (until the server sends anything, or up to 1 s from a
    server that sends nothing, as framewire's receivers do), so that a refused client raises
    ConnectionError saying why instead of sending frames the server drops.

    With ``keepalive`` (seconds; None for none) a background task sends keepalives while the
    client sends nothing. ``peer_timeout``: see :meth:`Client.receive`. Raises OSError when the
    connection is refused (ConnectionError, saying why, when the TLS handshake fails),
    trio.TooSlowError when connecting (handshake included) takes longer than
    ``connect_timeout``, ValueError for a bad address or protocol, or TLS settings for an
    address that is not ``tls://``. The connection is closed on the way out.

    Rewind (native servers whose stream keeps a history): ``since`` asks to start that many
    seconds (or a timedelta) back, or at a time (an aware datetime); ``rate`` is ``"full"``
    (as fast as the client reads), ``"original"`` or a factor of it. The client receives
    the metadata current then, the history, then the live stream with no gap or duplicate;
    :attr:`Client.rewind` says where the replay started once the first frame is received.
    :meth:`Client.receive` raises :class:`RewindRefused` if the server refused (a time in
    the future, an absurd rate) or did not answer (no history there, or an older server).

    ``gaps`` asks a native server with ``gap_frames = true`` to say where it drops frames
    for this client: :meth:`Client.receive` raises :class:`FramesLost` there,
    :meth:`Client.receive_with_gaps` returns a :class:`Gap`.
    """
    request = rewind_request(since, rate, gaps=gaps) if since is not None or gaps else None
    parsed, context = _parse(address, ssl_context, server_name)
    protocols.get(protocol)
    connect = connector_for(parsed)
    if context is not None:
        connect = tls_connector(
            connect,
            context,
            address=parsed,
            server_name=server_name,
            handshake_timeout=connect_timeout,
        )
    with trio.fail_after(connect_timeout):
        stream = await connect()
    client = Client(
        stream, protocol=protocol, max_frame_size=max_frame_size, peer_timeout=peer_timeout
    )
    try:
        if request is not None:
            client._asked(rewind=since is not None)
            await client.connection.send([request])
        try:
            # TLS 1.3: the server's verdict on our certificate comes after the handshake.
            await client.connection.hear_tls_verdict()
        except TLSRefused as exc:
            raise ConnectionError(f"TLS connection to {parsed} refused: {exc}") from None
        async with trio.open_nursery() as nursery:
            if keepalive is not None:
                nursery.start_soon(
                    send_keepalives, client.connection, client._encoder.keepalive(), keepalive
                )
            yield client
            nursery.cancel_scope.cancel()
    finally:
        await trio.aclose_forcefully(stream)


# -- blocking ---------------------------------------------------------------------------


class BlockingClient:
    """A plain-socket connection speaking framewire frames, for code without trio.

    ``address`` is ``tcp://host:port`` (or ``host:port``), ``unix:///path`` or
    ``tls://host:port``; TLS is the ssl module's, with ``ssl_context`` and ``server_name``
    as for :func:`open_client` (by default the server is verified against the system's
    trust store; over TLS 1.3 the client waits for the server's verdict on its certificate
    as :func:`open_client` does).

    ``timeout`` bounds every operation: a connect (and TLS handshake), a write that makes no
    progress, and a :meth:`receive` during which nothing at all (not even a keepalive)
    arrives; each raises TimeoutError (None: wait forever). With ``keepalive`` (seconds),
    :meth:`send` and :meth:`receive` send a keepalive when nothing was sent for that long,
    including while :meth:`receive` waits. Not thread-safe. Raises OSError when the
    connection is refused or the socket file is missing, ConnectionError saying why when
    the TLS handshake fails, ValueError for a bad address or protocol.
    """

    def __init__(
        self,
        address: str,
        *,
        protocol: str = "native",
        keepalive: float | None = 1.0,
        timeout: float | None = 10.0,
        max_frame_size: int = MAX_FRAME_SIZE,
        ssl_context: ssl.SSLContext | None = None,
        server_name: str | None = None,
    ) -> None:
        parsed, context = _parse(address, ssl_context, server_name)
        spec = protocols.get(protocol)
        self.protocol = protocol
        self.keepalive_interval = keepalive
        self.timeout = timeout
        self._encoder = spec.make_encoder()
        self._decoder = spec.make_decoder(max_frame_size)
        self._received: collections.deque[Frame] = collections.deque()
        self._sock = _connect_blocking(parsed, context, server_name, timeout)
        self._last_sent = -math.inf
        try:
            early = _hear_verdict_blocking(self._sock)
        except ConnectionError as exc:
            self._sock.close()
            raise ConnectionError(f"TLS connection to {parsed} refused: {exc}") from None
        if early:  # the server spoke first: its bytes are the first received
            self._take_in(early)

    @property
    def tls_version(self) -> str | None:
        """The TLS version in use (``"TLSv1.3"``), None on a plain connection."""
        sock = self._sock
        return sock.version() if isinstance(sock, ssl.SSLSocket) else None

    def __enter__(self) -> BlockingClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close()

    # -- sending --------------------------------------------------------------------------

    def _write(self, buffers: list[Buffer]) -> None:
        sock = self._sock
        sock.settimeout(self.timeout)
        total = sum(b.nbytes if isinstance(b, memoryview) else len(b) for b in buffers)
        if len(buffers) == 1:
            sock.sendall(buffers[0])
        elif total <= _JOIN_LIMIT:
            sock.sendall(b"".join(buffers))
        else:
            for buffer in buffers:
                sock.sendall(buffer)
        self._last_sent = time.monotonic()

    def send(self, frame: Frame) -> None:
        """Send one frame. Raises OSError (BrokenPipeError, ...) if the peer is gone,
        TimeoutError if a write stalls for ``timeout``, ValueError if the protocol cannot
        carry the frame."""
        self._write(self._encoder.encode(frame))

    def send_many(self, frames: list[Frame]) -> None:
        """Send frames with as few system calls as possible."""
        self._write(self._encoder.encode_batch(frames))

    def keepalive(self) -> None:
        """Send a keepalive now."""
        self._write([self._encoder.keepalive()])

    def send_array(
        self,
        array: npt.ArrayLike,
        *,
        type: str = ARRAY_TYPE,
        timestamp: int | None = None,
        headers: Mapping[str, str] = EMPTY_HEADERS,
    ) -> None:
        """Send ``array`` with its dtype and shape (see :func:`frame_from_array`)."""
        self.send(frame_from_array(array, type=type, timestamp=timestamp, headers=headers))

    # -- receiving ------------------------------------------------------------------------

    def _take_in(self, data: bytes) -> None:
        """Decode bytes already read from the socket (the server's first, read while the
        client waited for its TLS verdict)."""
        decoder = self._decoder
        view = memoryview(data)
        while view:
            buffer = decoder.get_buffer()
            n = min(len(buffer), len(view))
            buffer[:n] = view[:n]
            self._received.extend(decoder.buffer_updated(n))
            view = view[n:]

    def receive(self) -> Frame:
        """The next frame.

        Raises :class:`ConnectionClosed` when the peer closed or ended its stream,
        :class:`~framewire.protocols.ProtocolError` for bad bytes, TimeoutError when nothing
        arrived for ``timeout`` seconds, OSError if the connection broke.
        """
        received, decoder, sock = self._received, self._decoder, self._sock
        quiet_since = time.monotonic()
        while not received:
            if decoder.ended:
                raise ConnectionClosed("the peer ended its stream", clean=True)
            now = time.monotonic()
            wait = math.inf if self.timeout is None else quiet_since + self.timeout - now
            if wait <= 0:
                raise TimeoutError(f"nothing from the peer for {self.timeout:g}s")
            interval = self.keepalive_interval
            if interval is not None:
                due = self._last_sent + interval - now
                if due <= 0:
                    self.keepalive()
                    continue
                wait = min(wait, due)
            sock.settimeout(None if math.isinf(wait) else wait)
            try:
                nbytes = sock.recv_into(decoder.get_buffer())
            except TimeoutError:
                continue
            if nbytes == 0:
                decoder.end_of_input()
                raise ConnectionClosed("the peer closed the connection", clean=True)
            quiet_since = time.monotonic()
            received.extend(decoder.buffer_updated(nbytes))
        return received.popleft()

    def __iter__(self) -> Iterator[Frame]:
        """Frames until the peer closes cleanly."""
        while True:
            try:
                yield self.receive()
            except ConnectionClosed:
                return

    def receive_array(self, *, copy: bool = False) -> npt.NDArray[Any]:
        """Receive the next frame as an array (see :func:`array_from_frame`)."""
        return array_from_frame(self.receive(), copy=copy)


def _hear_verdict_blocking(sock: socket.socket, patience: float = TLS_VERDICT_WAIT) -> bytes:
    """On a TLS 1.3 socket, wait for the server's verdict on our certificate (see
    :meth:`framewire.daemon.transport.Connection.hear_tls_verdict`): return what the server
    sent meanwhile (b"" after a session ticket, or after ``patience`` seconds of silence);
    raise ConnectionError saying why when it refused us or closed. Other sockets: b"" at
    once. The socket's timeout is left as it was."""
    if not isinstance(sock, ssl.SSLSocket) or sock.version() != "TLSv1.3":
        return b""
    timeout = sock.gettimeout()
    deadline = time.monotonic() + patience
    try:
        while (session := sock.session) is None or not session.has_ticket:
            left = deadline - time.monotonic()
            if left <= 0:
                return b""
            # Short waits: OpenSSL takes a ticket in without returning from recv.
            sock.settimeout(min(left, 0.01))
            try:
                data = sock.recv(1 << 16)
            except TimeoutError:
                continue
            except (ssl.SSLError, OSError) as exc:
                raise ConnectionError(tls_refusal_reason(exc)) from None
            if not data:
                raise ConnectionError("the server closed the connection after the TLS handshake")
            return data
        return b""
    finally:
        sock.settimeout(timeout)


def _connect_blocking(
    address: Address,
    context: ssl.SSLContext | None,
    server_name: str | None,
    timeout: float | None,
) -> socket.socket:
    """A connected socket for ``address`` (TLS done when ``context`` is given)."""
    if address.is_unix:
        assert address.path is not None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(address.path)
        except BaseException:
            sock.close()
            raise
        return sock
    assert address.host is not None
    sock = socket.create_connection((address.host, address.port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if context is None:
        return sock
    try:
        # The handshake happens here, bounded by the socket's timeout.
        return context.wrap_socket(sock, server_hostname=server_name or address.host)
    except TimeoutError:
        sock.close()
        raise
    except (ssl.SSLError, OSError) as exc:
        sock.close()
        raise _tls_failure(address, exc) from None
    except BaseException:
        sock.close()
        raise
