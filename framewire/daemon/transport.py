"""Where bytes flow: listeners, connectors and the :class:`Connection` endpoints talk through.

Endpoints never open sockets themselves: they are given a listener (``trio.abc.Listener``)
or a :data:`Connector` (an async callable returning a stream), so tests can hand them memory
streams instead. This module makes the real ones from config addresses: TCP
(``tcp://``), UNIX sockets (``unix:///path``) and TLS on top of either transport
(:class:`TLSListener`, :func:`tls_connector`; ``tls://`` is TCP with TLS).

TLS handshakes are bounded in time. A connector finishes its handshake before it returns
and raises ConnectionError when it fails. A :class:`TLSListener` hands out streams whose
handshake has not happened yet, so a slow or hostile client never holds up ``accept()``:
the endpoint calls :meth:`Connection.establish` in the client's own task, which runs the
handshake under the listener's timeout and raises :class:`HandshakeFailed` with one line
that says who and why.

TLS 1.3 moved the server's verdict on a client's certificate after the client's handshake:
a client that only sends (a ``sender``) would write its first frames before a refusal
reaches it, and they would be lost. So a sending client first waits for the verdict
(:meth:`Connection.hear_tls_verdict`): an alert (refused: :class:`TLSRefused`, saying why),
a session ticket (accepted: OpenSSL servers send them at once), or :data:`TLS_VERDICT_WAIT`
seconds without a refusal. framewire's own servers send no tickets before their first write
(trio's choice: a client that only sends and never reads would close on unread bytes, and
its kernel would then reset the connection and drop what it had not yet sent), so a sender
waits that long on each connection to them.
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import math
import os
import select
import socket
import ssl
import stat
import termios
from collections.abc import Awaitable, Callable, Sequence
from typing import Final, TypeAlias

import trio

from ..config import Address, TLSConfig
from ..frame import Buffer, Frame
from ..protocols import Decoder, ProtocolError, WholeReadDecoder

__all__ = [
    "ACCEPT_RETRY_ERRNOS",
    "DEFAULT_SOCKET_MODE",
    "TLS_VERDICT_WAIT",
    "Connection",
    "Connector",
    "FrameReader",
    "HandshakeFailed",
    "HangupWatch",
    "TLSListener",
    "TLSRefused",
    "UnixSocketListener",
    "client_tls_context",
    "connector_for",
    "enable_tcp_keepalive",
    "nbytes_of",
    "open_listeners",
    "open_unix_listener",
    "peer_name",
    "server_tls_context",
    "system_backlog",
    "tcp_connector",
    "tcp_socket_of",
    "tls_connector",
    "tls_refusal_reason",
    "unix_connector",
]

#: Makes one outgoing connection. Raises OSError (or trio errors) when it cannot.
Connector: TypeAlias = Callable[[], Awaitable[trio.abc.Stream]]
#: Reads into a decoder: returns the bytes read (0: the peer closed) and the frames they
#: completed (several reads' worth when whole frames were waiting). See
#: :meth:`Connection.frame_reader`.
FrameReader: TypeAlias = Callable[[], Awaitable[tuple[int, list[Frame]]]]

#: Writes at most this big are joined into one buffer; bigger ones go out as a gather write.
JOIN_LIMIT: Final = 256 * 1024
#: ... and only when their buffers average at most this: a few large frames (a writer
#: catching up on 64 KiB frames) go out as a gather write rather than be copied together.
JOIN_AVERAGE: Final = 4096
#: accept() errors that mean "out of resources for now": wait a little and accept again.
ACCEPT_RETRY_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
#: TCP_NOTSENT_LOWAT for relay connections.
NOTSENT_LOWAT: Final = 4 << 20
#: :meth:`Connection.receive_into` reads what is already there without a trip through the
#: scheduler, but yields to it (lets other tasks run) after at most this many reads ...
RECEIVE_YIELD_READS: Final = 16
#: ... or this many bytes, whichever comes first, so a connection whose peer floods it
#: cannot starve the daemon's other tasks.
RECEIVE_YIELD_BYTES: Final = 4 << 20
#: A read into a new bytes object for a large frame (see :meth:`Connection.frame_reader`)
#: that finds fewer bytes in the socket than the frame needs takes at most this many: the
#: frame's start, so the bytes that arrived early are not copied again into the buffer its
#: rest is read into.
WHOLE_READ_HEAD: Final = 64 * 1024
#: The most bytes a whole read waits for (SO_RCVLOWAT) before it reads a frame that the
#: socket holds only part of: a larger frame is read as it arrives. The kernel caps the mark
#: further at what the receive buffer can hold (half of ``tcp_rmem``'s maximum, or of a
#: fixed SO_RCVBUF) and wakes the reader anyway under memory pressure, at the end of the
#: stream and on an error, so a mark is never waited for that could not be reached.
RCVLOWAT_MAX: Final = 4 << 20
#: How many of the first bytes a socket holds a whole read peeks at to learn the size of the
#: frame they start (a native header is 28 bytes and its type tag; more is harmless).
PEEK_BYTES: Final = 512
#: Where FIONREAD puts how many bytes a socket holds (one task reads it at a time).
_INQ: Final = array.array("i", [0])


def _bytes_held(fd: int) -> int:
    """How many received bytes socket ``fd`` holds unread (FIONREAD). Raises OSError."""
    fcntl.ioctl(fd, termios.FIONREAD, _INQ)
    return _INQ[0]


#: Buffers per writev() call (Linux's IOV_MAX is 1024).
_IOV_MAX: Final = 1024
#: Mode of a UNIX socket file unless configured: owner and group may connect.
DEFAULT_SOCKET_MODE: Final = 0o660
#: Where Linux keeps the largest listen backlog it allows.
_SOMAXCONN_PATH: Final = "/proc/sys/net/core/somaxconn"
#: Linux and the BSDs keep the backlog in 16 bits.
_MAX_BACKLOG: Final = 0xFFFF
_TLS_VERSIONS: Final = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


class HandshakeFailed(trio.BrokenResourceError):
    """A TLS handshake failed or timed out. Its message is one log line: peer and reason."""


class TLSRefused(ConnectionError):
    """A TLS 1.3 server refused us after our side of the handshake was done (our client
    certificate: missing, or not signed by a CA it trusts). Its message says why."""


#: Seconds a sending TLS 1.3 client waits for the server's verdict on its certificate when
#: the server sends no session ticket (one that sends one is heard at once). A refusal
#: comes a round trip after the handshake; one that takes longer than this is heard only
#: when the first write fails, and what was written before it is lost.
TLS_VERDICT_WAIT: Final = 1.0
#: How often :meth:`Connection.hear_tls_verdict` looks for a session ticket while it waits.
_VERDICT_POLL: Final = 0.002


def nbytes_of(buffer: Buffer) -> int:
    """How many bytes ``buffer`` holds (a memoryview's ``len`` counts items)."""
    return buffer.nbytes if isinstance(buffer, memoryview) else len(buffer)


async def _handshake_already_done() -> None:
    """Stands in for a finished TLS handshake's coroutine function (see below)."""


#: Seconds a failed handshake's alert may take to leave.
ALERT_TIMEOUT: Final = 1.0


async def _send_alert(stream: trio.SSLStream[trio.abc.Stream]) -> None:
    """Send the TLS alert that a failed handshake left unsent (why it failed: "certificate
    required", "unknown CA"), so the peer hears the reason rather than a bare close. trio's
    SSLStream keeps no public handle on it: without its private outgoing buffer this does
    nothing. Never raises."""
    outgoing = getattr(stream, "_outgoing", None)
    if outgoing is None:
        return
    with contextlib.suppress(Exception):
        alert = outgoing.read()
        if alert:
            with trio.move_on_after(ALERT_TIMEOUT):
                await stream.transport_stream.send_all(alert)


def tls_refusal_reason(error: BaseException) -> str:
    """What a TLS alert in ``error``'s chain means for a client: why the server refused it
    (for a client that heard the alert after its handshake: see the module docstring)."""
    reason = _tls_reason(error)
    upper = reason.upper().replace(" ", "_")
    if "CERTIFICATE_REQUIRED" in upper or "PEER_DID_NOT_RETURN_A_CERTIFICATE" in upper:
        return "the server requires a client certificate ([tls] certificate and key)"
    if any(word in upper for word in ("UNKNOWN_CA", "BAD_CERTIFICATE", "CERTIFICATE_UNKNOWN")):
        return (
            "the server refused our client certificate (not signed by a CA it trusts, or "
            f"not for this use): {reason}"
        )
    if "EOF" in upper:
        return "the server closed the TLS connection without saying why"
    return reason


def _release_handshake(stream: trio.SSLStream[trio.abc.Stream]) -> None:
    """Break trio.SSLStream's reference cycle once its handshake has run.

    An SSLStream keeps its handshake as a run-once helper holding a bound method of the stream
    itself: a cycle that only the cyclic garbage collector frees, so every TLS connection's
    OpenSSL state (tens of KiB) would outlive its close until a collection (4,475 failed
    handshakes once held 300 MiB). After the handshake has started the helper never calls the
    method again, so it is replaced by a function that holds nothing. If trio's internals
    change this does nothing; tests/test_hardening.py notices.
    """
    once = getattr(stream, "_handshook", None)
    if once is not None and getattr(once, "started", False):
        with contextlib.suppress(AttributeError, TypeError):
            once._afn = _handshake_already_done


def _peek(sock: trio.socket.SocketType, fd: int, size: int) -> bytes:
    """Up to ``size`` of the first bytes plain socket ``sock`` (descriptor ``fd``) holds,
    left there for the next read. Raises OSError (BlockingIOError when it holds none)."""
    view = socket.socket(sock.family, sock.type, sock.proto, fileno=fd)
    try:
        return view.recv(size, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    finally:
        view.detach()  # the descriptor stays trio's


def peer_name(stream: trio.abc.Stream) -> str:
    """``host:port`` of the remote end (``unix:PATH`` on a UNIX socket), or a description for
    non-socket streams. A TLS stream is named by the transport under it."""
    if isinstance(stream, trio.SSLStream):
        return peer_name(stream.transport_stream)
    if isinstance(stream, trio.SocketStream):
        if stream.socket.family == socket.AF_UNIX:
            with contextlib.suppress(OSError):
                return f"unix:{stream.socket.getsockname() or 'peer'}"
            return "disconnected peer"
        try:
            peer = stream.socket.getpeername()
        except OSError:
            return "disconnected peer"
        if isinstance(peer, tuple):
            host, port = peer[0], peer[1]
            return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return str(peer) or "unix peer"
    return type(stream).__name__


class Connection:
    """A byte stream with the fast paths the endpoints need.

    * :meth:`receive_into` reads straight into a caller's buffer (``recv_into`` on sockets).
      On a plain socket it reads what the kernel already holds without a trip through
      trio's scheduler, and yields to the scheduler at least every
      :data:`RECEIVE_YIELD_READS` reads or :data:`RECEIVE_YIELD_BYTES` bytes.
      :meth:`receive_bytes` does the same into a new bytes object, and
      :meth:`frame_reader` chooses between the two for a decoder.
    * :meth:`send` writes a list of buffers as one write: small ones joined, large ones as a
      gather write, never one system call per frame. On a plain socket it first writes
      what the kernel takes at once, without a trip through trio's scheduler, and waits
      (within :attr:`send_timeout`) only for the rest.
    * :meth:`write_nowait` writes one buffer at once, from any task, while no send is in
      progress: what the kernel does not take is kept and goes out first with the next
      :meth:`send` (or :meth:`send` of nothing), so a frame's bytes are never interleaved.

    It wraps any ``trio.abc.Stream``; sockets get the zero-copy paths, other streams (memory
    streams in tests, TLS) the generic ones. Like ``send_all``, a cancelled :meth:`send`
    leaves the connection unusable: close it.
    """

    __slots__ = (
        "_already_read",
        "_lowat",
        "_read_credit",
        "_read_credit_bytes",
        "_send_scope",
        "_sending",
        "_socket",
        "bytes_received",
        "bytes_sent",
        "frame_waiting",
        "handshake_timeout",
        "peer",
        "send_timeout",
        "stream",
        "yield_on_send",
    )

    def __init__(
        self,
        stream: trio.abc.Stream,
        peer: str | None = None,
        *,
        handshake_timeout: float = 10.0,
    ) -> None:
        self.stream = stream
        self.handshake_timeout = handshake_timeout
        self.peer = peer if peer is not None else peer_name(stream)
        self._socket = stream.socket if isinstance(stream, trio.SocketStream) else None
        #: The socket's SO_RCVLOWAT as last set (1: the kernel's default, wake on any byte);
        #: 0 where epoll does not honour it (UNIX sockets, other streams), never set there.
        self._lowat = 0
        if self._socket is not None and self._socket.family in (socket.AF_INET, socket.AF_INET6):
            self._lowat = 1
            with contextlib.suppress(OSError, AttributeError):
                # trio wakes a writer when less than 16 KiB is unsent, which suits chatty
                # traffic; a relay writes in bulk, and fewer, larger writes cost ~8% less CPU
                # per relayed 1 MiB frame (benchmarks/relay.py). The kernel's send buffer
                # still bounds what is queued there.
                self._socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, NOTSENT_LOWAT)
        self.bytes_received = 0
        self.bytes_sent = 0
        #: Told the size of a frame whose start arrived when a whole read waits for the
        #: rest of it in the socket (see :meth:`receive_bytes`): no read returns meanwhile.
        self.frame_waiting: Callable[[int], None] | None = None
        self._already_read = b""
        # Reads and bytes receive_into may still take before it must yield.
        self._read_credit = RECEIVE_YIELD_READS
        self._read_credit_bytes = RECEIVE_YIELD_BYTES
        #: The longest one :meth:`send` may wait for the peer to take its bytes; then it
        #: raises trio.TooSlowError (and the connection is unusable). Only time spent
        #: waiting counts: a write the kernel takes at once never times out.
        self.send_timeout = math.inf
        #: The deadline of the write :meth:`send` waits to finish, while it waits.
        self._send_scope: trio.CancelScope | None = None
        #: Whether :meth:`send` is always a schedule point (as trio's ``send_all`` is). A
        #: writer whose loop yields elsewhere anyway (it waits on a subscription) turns it
        #: off: a write the kernel takes at once then costs no trip through the scheduler,
        #: one of the three a fanned-out frame used to cost each client.
        self.yield_on_send = True
        #: True while :meth:`send` runs; what :meth:`write_nowait` could not write (which
        #: :meth:`send` writes first) while it waits; else False. (One slot for both: 10,000
        #: idle clients each hold a Connection.)
        self._sending: bool | memoryview = False

    def give_back(self, data: bytes) -> None:
        """Bytes already read from the stream (by whoever vetted it): :meth:`receive_into`
        returns them first."""
        self._already_read = data + self._already_read

    def take_back(self) -> bytes:
        """What :meth:`give_back` holds that nobody has read yet, no longer held here (for a
        connection that hands its stream on)."""
        data, self._already_read = self._already_read, b""
        return data

    @property
    def socket_fd(self) -> int | None:
        """The descriptor of the plain (not TLS) socket this connection is, while it is
        open; None for other streams and once closed."""
        sock = self._socket
        if sock is None:
            return None
        fd = sock.fileno()
        return fd if fd >= 0 else None

    def bytes_waiting(self) -> int:
        """How many received bytes the plain socket holds that nobody has read yet (FIONREAD):
        0 for other streams, and when it cannot be told (closed)."""
        sock = self._socket
        if sock is None:
            return 0
        try:
            return _bytes_held(sock.fileno())
        except OSError:
            return 0

    async def establish(self) -> None:
        """Finish setting the connection up: the TLS handshake of an accepted TLS stream,
        within :attr:`handshake_timeout`. Nothing to do for other streams.

        Raises :class:`HandshakeFailed` (a trio.BrokenResourceError) naming the peer and
        the reason; the connection is then unusable: close it.
        """
        stream = self.stream
        if not isinstance(stream, trio.SSLStream):
            return
        try:
            with trio.fail_after(self.handshake_timeout):
                await stream.do_handshake()
        except trio.TooSlowError:
            _release_handshake(stream)
            raise HandshakeFailed(
                f"TLS handshake with {self.peer} failed: no handshake within "
                f"{self.handshake_timeout:g}s"
            ) from None
        except trio.BrokenResourceError as exc:
            await _send_alert(stream)
            _release_handshake(stream)
            raise HandshakeFailed(
                f"TLS handshake with {self.peer} failed: {_tls_reason(exc)}"
            ) from None
        _release_handshake(stream)

    async def hear_tls_verdict(self, patience: float = TLS_VERDICT_WAIT) -> bool:
        """On a TLS 1.3 client connection, before sending anything: wait for the server's
        verdict on our certificate (see the module docstring).

        Returns True when the server said it accepted us (a session ticket, or data, which
        :meth:`receive_into` then returns first), False when it said nothing within
        ``patience`` seconds (a server that sends no tickets; it did not refuse us in that
        time). At once True for other connections (TLS 1.2 checks the certificate within the
        handshake). Raises :class:`TLSRefused` saying why when the server refused us or
        closed the connection.
        """
        stream = self.stream
        if (
            not isinstance(stream, trio.SSLStream)
            or stream.server_side
            or stream.version() != "TLSv1.3"
        ):
            return True
        heard: bytes | bytearray | trio.BrokenResourceError | None = None

        def ticket() -> bool:
            session = stream.session
            return session is not None and session.has_ticket

        async with trio.open_nursery() as nursery:

            async def listen() -> None:
                nonlocal heard
                try:
                    heard = await stream.receive_some()
                except trio.BrokenResourceError as exc:
                    heard = exc
                nursery.cancel_scope.cancel()

            nursery.start_soon(listen)
            with trio.move_on_after(patience):
                while not ticket():  # noqa: ASYNC110 - OpenSSL takes a ticket in silently
                    await trio.sleep(_VERDICT_POLL)
            nursery.cancel_scope.cancel()
        if isinstance(heard, trio.BrokenResourceError):
            raise TLSRefused(tls_refusal_reason(heard)) from None
        if heard == b"":
            raise TLSRefused("the server closed the connection after the TLS handshake")
        if heard:
            self.give_back(bytes(heard))
            return True
        return ticket()

    async def receive_into(self, buffer: memoryview) -> int:
        """Read up to ``len(buffer)`` bytes into ``buffer``; 0 means the peer closed.

        Raises trio.BrokenResourceError when the connection broke.
        """
        if self._already_read:
            n = min(len(buffer), len(self._already_read))
            buffer[:n] = self._already_read[:n]
            self._already_read = self._already_read[n:]
            self.bytes_received += n
            await trio.lowlevel.checkpoint()
            return n
        sock = self._socket
        if sock is not None:
            n = await self._receive_socket(sock, buffer)
        else:
            data = await self.stream.receive_some(len(buffer))
            n = len(data)
            buffer[:n] = data
        self.bytes_received += n
        return n

    async def receive_bytes(
        self,
        max_bytes: int,
        *,
        whole: bool = False,
        frame_size: Callable[[bytes], int] | None = None,
    ) -> bytes:
        """Read up to ``max_bytes`` bytes (at least 1) into a new bytes object; ``b""``
        means the peer closed.

        On a plain socket this is ``read(2)`` into a bytes object that is allocated, not
        zero-filled, and shrunk to what arrived: it holds only the bytes received. It
        reads, waits and yields as :meth:`receive_into` does. With ``whole``, a socket
        that holds some but fewer than ``max_bytes`` bytes gives at most
        :data:`WHOLE_READ_HEAD` of them, unless ``frame_size`` says more about them.

        ``frame_size`` (with ``whole``, used on TCP sockets only) tells, from the first
        bytes the socket holds (at most :data:`PEEK_BYTES`, peeked at, not taken), how many
        bytes the frame they start needs (0: it cannot tell). When the socket holds that
        many the read takes exactly them, one frame. When it holds fewer, the read waits
        once, with SO_RCVLOWAT set to that size (at most :data:`RCVLOWAT_MAX`), so the
        kernel wakes it only when the frame is whole (or the peer closed, or the receive
        buffer is under pressure), and then takes the frame in one read, or, if the frame
        is still not whole, at most :data:`WHOLE_READ_HEAD` as above. Nothing is read or
        allocated for bytes that have not arrived, whatever a header announced.

        Other streams use ``receive_some`` (a bytearray it returns is copied into bytes).
        Raises trio.BrokenResourceError when the connection broke, trio.ClosedResourceError
        when another task closed it while this one waited.
        """
        if self._already_read:
            data = self._already_read[:max_bytes]
            self._already_read = self._already_read[max_bytes:]
            self.bytes_received += len(data)
            await trio.lowlevel.checkpoint()
            return data
        sock = self._socket
        if sock is not None:
            await self._take_read_turn()
            if not self._lowat:
                frame_size = None
            # The frame's size once learnt; the low-water mark the read waits for (once).
            needed = 0
            lowat = 1
            while True:
                fd = sock.fileno()  # a closed socket's -1: EBADF
                size = max_bytes
                if whole:
                    wait = False
                    with contextlib.suppress(OSError):  # the read says why
                        held = _bytes_held(fd)
                        if 0 < held < size or 0 < needed <= held:
                            size = min(held, WHOLE_READ_HEAD)
                            if frame_size is not None and not needed:
                                needed = frame_size(_peek(sock, fd, min(held, PEEK_BYTES)))
                            if needed and held >= needed:
                                size = needed  # the frame, whole
                            elif needed and lowat == 1:
                                lowat = min(needed, RCVLOWAT_MAX)
                                wait = True
                    if wait:
                        if self.frame_waiting is not None:
                            self.frame_waiting(needed)
                        await self._wait_readable(sock, lowat)
                        continue
                try:
                    data = os.read(fd, size)
                except BlockingIOError:
                    await self._wait_readable(sock)
                    continue
                except OSError as exc:
                    raise trio.BrokenResourceError(f"receive failed: {exc}") from exc
                break
            self._spend_read_credit(len(data))
        else:
            some = await self.stream.receive_some(max_bytes)
            data = some if type(some) is bytes else bytes(some)
        self.bytes_received += len(data)
        return data

    def frame_reader(self, decoder: Decoder) -> FrameReader:
        """An async function that reads from this connection into ``decoder`` and
        returns the bytes read (0: the peer closed; the decoder is then not told) and the
        frames they completed.

        On a plain socket, with a decoder that takes whole reads
        (:class:`~framewire.protocols.WholeReadDecoder`: the length-delimited ones and raw),
        it turns the decoder's ``whole_reads`` on and reads with :meth:`receive_bytes`
        whenever the decoder asks for a read of its own (a large frame expected whole, a
        raw chunk; for a frame that the socket does not hold whole yet, only its start:
        ``wants_whole``), else with :meth:`receive_into` into ``get_buffer()``, as it does when
        the memory for a new bytes object cannot be had. On TCP a frame the socket holds
        only part of is waited for whole (``whole_frame_size``, SO_RCVLOWAT: see
        :meth:`receive_bytes`). After a whole read that completed frames, the whole frames
        the socket already holds are read too, each with one read, while the read credit
        lasts (:data:`RECEIVE_YIELD_READS`, :data:`RECEIVE_YIELD_BYTES`), and returned
        together: they are then published, queued and written as one batch (frames before
        bad bytes among them are returned, and the next call raises the error). Other streams
        and decoders always read once, into ``get_buffer()``. Raises what those reads
        raise, and the decoder's :class:`~framewire.protocols.ProtocolError`.
        """
        if self._socket is not None and isinstance(decoder, WholeReadDecoder):
            whole: WholeReadDecoder = decoder
            whole.whole_reads = True

            async def read_whole() -> tuple[int, list[Frame]]:
                size = whole.whole_read_size()
                if size:
                    try:
                        data = await self.receive_bytes(
                            size, whole=whole.wants_whole, frame_size=whole.whole_frame_size
                        )
                    except MemoryError:
                        pass  # nothing was read: read into the decoder's buffer instead
                    else:
                        if not data:
                            return 0, []
                        frames = whole.bytes_received(data)
                        nbytes = len(data)
                        # Whole frames the socket already holds come along (one publish,
                        # one write for them all), while the read credit lasts.
                        while frames:
                            size = whole.whole_read_size()
                            more = self._read_held(size) if size else None
                            if more is None:
                                break
                            nbytes += len(more)
                            try:
                                frames += whole.bytes_received(more)
                            except ProtocolError:
                                # The frames before the bad bytes go out as they would
                                # have, read one call at a time; the decoder is poisoned,
                                # so the next call raises this error again.
                                break
                        return nbytes, frames
                n = await self.receive_into(whole.get_buffer())
                return n, (whole.buffer_updated(n) if n else [])

            return read_whole

        async def read_into() -> tuple[int, list[Frame]]:
            n = await self.receive_into(decoder.get_buffer())
            return n, (decoder.buffer_updated(n) if n else [])

        return read_into

    def _read_held(self, size: int) -> bytes | None:
        """``size`` bytes the plain socket already holds, read at once into a new bytes
        object, if it holds that many and the read credit lasts; else None, nothing read.
        Any failure is left to the next ordinary read, which raises it."""
        sock = self._socket
        if sock is None or self._read_credit <= 0:
            return None
        fd = sock.fileno()
        try:
            if _bytes_held(fd) < size:
                return None
            data = os.read(fd, size)
        except (OSError, MemoryError):
            return None
        if not data:
            return None
        self._spend_read_credit(len(data))
        self.bytes_received += len(data)
        return data

    async def _take_read_turn(self) -> None:
        """Before a socket read: a cancellation point, and a schedule point once the read
        credit is spent (which then starts afresh)."""
        if self._read_credit > 0:
            await trio.lowlevel.checkpoint_if_cancelled()
        else:
            await trio.lowlevel.checkpoint()
            self._read_credit = RECEIVE_YIELD_READS
            self._read_credit_bytes = RECEIVE_YIELD_BYTES

    async def _wait_readable(self, sock: trio.socket.SocketType, lowat: int = 1) -> None:
        """Nothing (or not enough) to read: wait in trio until the socket holds ``lowat``
        bytes (SO_RCVLOWAT, on TCP sockets; elsewhere until it holds any), the peer closed
        or the connection broke. The reader lets others run meanwhile, so its credit starts
        afresh. The mark stays set until a wait for another one: every wait sets its own."""
        if self._lowat and self._lowat != lowat:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, lowat)
            except OSError:
                # Not to be had (the socket is closing: the read will say so): wake on any
                # byte, as without a mark.
                self._lowat = 0
            else:
                self._lowat = lowat
        await trio.lowlevel.wait_readable(sock)
        self._read_credit = RECEIVE_YIELD_READS
        self._read_credit_bytes = RECEIVE_YIELD_BYTES

    def _spend_read_credit(self, nbytes: int) -> None:
        self._read_credit -= 1
        self._read_credit_bytes -= nbytes
        if self._read_credit_bytes <= 0:
            self._read_credit = 0

    async def _receive_socket(self, sock: trio.socket.SocketType, buffer: memoryview) -> int:
        """recv_into on a plain socket, at most ``len(buffer)`` bytes: at once when the
        kernel holds data and the read credit lasts (a cancellation is still noticed);
        after :data:`RECEIVE_YIELD_READS` reads or :data:`RECEIVE_YIELD_BYTES` bytes it
        first yields to the scheduler; when nothing is there it waits for the socket to be
        readable (a schedule point too) and reads then.

        Raises trio.BrokenResourceError when the connection broke (or was closed here),
        trio.ClosedResourceError when another task closed it while this one waited.
        """
        await self._take_read_turn()
        while True:
            try:
                n = os.readv(sock.fileno(), (buffer,))  # a closed socket's -1: EBADF
            except BlockingIOError:
                # Nothing there: wait, then read it ourselves, without a second try.
                await self._wait_readable(sock)
                continue
            except OSError as exc:
                raise trio.BrokenResourceError(f"receive failed: {exc}") from exc
            self._spend_read_credit(n)
            return n

    @property
    def has_unsent(self) -> bool:
        """Whether bytes :meth:`write_nowait` left are waiting for the next :meth:`send`."""
        return self._sending is not True and self._sending is not False

    def idle_plain_socket(self) -> trio.socket.SocketType | None:
        """This connection's plain (not TLS) socket, while nothing is being sent on it (no
        :meth:`send` in progress, nothing left by a direct write); else None.

        For a writer that writes to many idle connections at once, as :meth:`write_nowait`
        does to one: it must look the descriptor up from the socket (``fileno()``, -1 once
        closed) for each write, never keep the number (a closed socket's number may be
        another client's next), and report what it wrote with :meth:`wrote_directly`.
        """
        return self._socket if self._sending is False else None

    def wrote_directly(self, data: Buffer, written: int, nbytes: int) -> None:
        """``written`` of the ``nbytes`` bytes of ``data`` were written to the socket
        :meth:`idle_plain_socket` gave, while it was idle, by someone else than this connection:
        count them all in :attr:`bytes_sent`, and keep the rest (if any) to go out first
        with the next :meth:`send`, as :meth:`write_nowait` does."""
        self.bytes_sent += nbytes
        if written < nbytes:
            self._sending = memoryview(data).cast("B")[written:]

    def write_nowait(self, data: Buffer, nbytes: int | None = None) -> int:
        """Write ``data`` at once, without waiting and without a checkpoint, if this is an
        idle plain socket: no :meth:`send` in progress and nothing left by an earlier call.

        ``nbytes`` is its size, when the caller knows it. Returns how many bytes the kernel
        took. 0: nothing was written, nothing is kept (busy, full, closed, or not a plain
        socket); the caller still has all of ``data``. All of it: done. Fewer: the rest is
        kept and goes out first with the next :meth:`send` (which may be a send of
        nothing), so the caller must make sure one follows. Either way all of ``data``
        counts in :attr:`bytes_sent` at once (the rest is the connection's to write), so a
        caller counting what it handed over counts whole frames. Raises
        trio.BrokenResourceError if the peer is gone; the connection is then unusable:
        close it.
        """
        sock = self._socket
        if sock is None or self._sending is not False:
            return 0
        fd = sock.fileno()
        if fd < 0:
            return 0  # closed
        try:
            written = os.write(fd, data)
        except BlockingIOError:
            return 0
        except OSError as exc:
            raise trio.BrokenResourceError(f"send failed: {exc}") from exc
        size = nbytes_of(data) if nbytes is None else nbytes
        self.bytes_sent += size
        if written < size:
            self._sending = memoryview(data).cast("B")[written:]
        return written

    async def send(self, buffers: Sequence[Buffer], nbytes: int | None = None) -> None:
        """Write every buffer, in order, after what :meth:`write_nowait` left unsent (with
        no buffers, only that). ``nbytes`` is their total, when the caller knows it.

        Raises trio.BrokenResourceError if the peer is gone, trio.TooSlowError if the peer
        took none of the rest for :attr:`send_timeout` seconds, trio.BusyResourceError if
        another task is sending on this connection. After any of them (or a cancellation)
        the connection is unusable: close it.
        """
        unsent = self._sending
        if not buffers and unsent is False:
            await trio.lowlevel.checkpoint()
            return
        if unsent is True:
            raise trio.BusyResourceError("another task is sending on this connection")
        # ``total`` is what this call adds to bytes_sent: a direct write's rest was counted
        # when it began. ``size`` is what it writes.
        total = size = nbytes if nbytes is not None else sum(map(nbytes_of, buffers))
        if unsent is not False:
            buffers = [unsent, *buffers]
            size += unsent.nbytes
        self._sending = True
        try:
            rest: Sequence[Buffer] = buffers
            if self._socket is not None:
                await trio.lowlevel.checkpoint_if_cancelled()
                rest = self._write_now(buffers, size)
                if not rest:
                    if self.yield_on_send:
                        await trio.lowlevel.cancel_shielded_checkpoint()
                    self.bytes_sent += total
                    return
            if self.send_timeout == math.inf:
                await self._send_waiting(rest)
            else:
                with trio.fail_after(self.send_timeout) as self._send_scope:
                    await self._send_waiting(rest)
        finally:
            self._sending = False
            self._send_scope = None
        self.bytes_sent += total

    def change_send_timeout(self, seconds: float) -> None:
        """Make :attr:`send_timeout` ``seconds`` (a reload changed it), for a write waiting
        now too: its deadline becomes ``seconds`` after it began to wait (so it may pass at
        once). A write that waits with no deadline (the timeout was infinite) keeps none."""
        scope = self._send_scope
        if scope is not None:
            scope.deadline += seconds - self.send_timeout
        self.send_timeout = seconds

    def _write_now(self, buffers: Sequence[Buffer], total: int) -> Sequence[Buffer]:
        """Write what the socket takes without waiting; return what is left.

        Small buffers are joined into one write, larger ones gathered (at most
        :data:`_IOV_MAX` per call). Raises trio.BrokenResourceError (peer gone) and
        trio.ClosedResourceError (the socket was closed).
        """
        fd = self.socket_fd
        if fd is None:
            raise trio.ClosedResourceError("the connection was closed")
        try:
            if len(buffers) == 1:
                first = buffers[0]
                written = os.write(fd, first)
                if written == total:
                    return ()
                return [memoryview(first).cast("B")[written:]]
            if total <= JOIN_LIMIT and total <= JOIN_AVERAGE * len(buffers):
                joined = b"".join(buffers)
                written = os.write(fd, joined)
                return () if written == total else [memoryview(joined)[written:]]
            pending = list(buffers)
            index = 0
            while index < len(pending):
                chunk = pending[index : index + _IOV_MAX]
                written = os.writev(fd, chunk)
                index = _advance(pending, index, written)
                if index < len(pending) and written < sum(map(nbytes_of, chunk)):
                    break  # the kernel's buffer is full
            return pending[index:]
        except BlockingIOError:
            return buffers
        except OSError as exc:
            raise trio.BrokenResourceError(f"send failed: {exc}") from exc

    async def _send_waiting(self, buffers: Sequence[Buffer]) -> None:
        """Write ``buffers`` through the stream, waiting for the peer as needed.

        On a plain socket: wait until it is writable, write what it takes, again until
        all is written (one scheduler trip per wait, none after a write).
        """
        sock = self._socket
        if sock is not None:
            rest = buffers
            while rest:
                await trio.lowlevel.wait_writable(sock)
                rest = self._write_now(rest, sum(map(nbytes_of, rest)))
            return
        if len(buffers) == 1:
            await self.stream.send_all(buffers[0])
        elif sum(map(nbytes_of, buffers)) <= JOIN_LIMIT:
            await self.stream.send_all(b"".join(buffers))
        else:
            for buffer in buffers:
                await self.stream.send_all(buffer)

    async def aclose(self) -> None:
        await self.stream.aclose()


def _advance(pending: list[Buffer], index: int, sent: int) -> int:
    """After ``sent`` bytes of ``pending[index:]`` went out: the index of the first buffer
    not fully sent, its sent part cut off in place."""
    while sent:
        size = nbytes_of(pending[index])
        if sent >= size:
            sent -= size
            index += 1
        else:
            pending[index] = memoryview(pending[index]).cast("B")[sent:]
            sent = 0
    return index


#: Bytes a :class:`HangupWatch` reads from a peer per readiness (what it reads is discarded).
_DISCARD_SIZE: Final = 4096
#: Readiness events a :class:`HangupWatch` takes from the kernel per wake-up.
_WATCH_EVENTS: Final = 1024


class HangupWatch:
    """Notices, for many connections whose peers only listen, when a peer hangs up (or
    sends something), with one task and one kernel readiness set (Linux ``epoll``) instead
    of a reading task and buffer per connection: 10,000 idle clients of a server cost
    about 6 KiB less each.

    :meth:`run` is that task. :meth:`add` registers a connection until :meth:`remove`: on
    the peer's EOF or a broken connection ``on_gone()`` is called; on input, bytes are read
    and discarded, or with ``on_input`` given, reported to ``on_input(nbytes)`` and then
    ``on_gone()`` called. Either way the connection is no longer watched. Only plain
    sockets can be watched so: :meth:`add` refuses other streams (TLS, memory streams) and
    works only where ``select.epoll`` exists; the caller then reads the connection itself.
    """

    def __init__(self) -> None:
        epoll = getattr(select, "epoll", None)
        self._epoll: select.epoll | None = epoll() if epoll is not None else None
        self._watched: dict[int, tuple[Callable[[], None], Callable[[int], None] | None]] = {}
        self._discard = bytearray(_DISCARD_SIZE)

    def close(self) -> None:
        if self._epoll is not None:
            self._epoll.close()
            self._epoll = None

    def add(
        self,
        connection: Connection,
        on_gone: Callable[[], None],
        on_input: Callable[[int], None] | None = None,
    ) -> int | None:
        """Watch ``connection``; return the key to :meth:`remove` it with, or None when it
        cannot be watched so (read it yourself). Remove it before closing the connection:
        its descriptor may be reused."""
        fd = connection.socket_fd
        epoll = self._epoll
        if fd is None or epoll is None or fd in self._watched:
            return None
        epoll.register(fd, select.EPOLLIN | select.EPOLLRDHUP)
        self._watched[fd] = (on_gone, on_input)
        return fd

    def remove(self, key: int) -> None:
        """Stop watching the connection :meth:`add` gave ``key`` for. Idempotent."""
        if self._watched.pop(key, None) is not None and self._epoll is not None:
            with contextlib.suppress(OSError, ValueError):
                self._epoll.unregister(key)

    async def run(self) -> None:
        """Wait for peers' input and hang-ups and act on them; runs until cancelled.

        Raises trio.ClosedResourceError once :meth:`close` was called.
        """
        epoll = self._epoll
        if epoll is None:
            await trio.sleep_forever()
        while True:
            await trio.lowlevel.wait_readable(epoll)
            if self._epoll is None:
                raise trio.ClosedResourceError("the hang-up watch was closed")
            for fd, _ in epoll.poll(0, _WATCH_EVENTS):
                watched = self._watched.get(fd)
                if watched is not None:
                    self._peer_ready(fd, *watched)
            # Not kept while waiting: the last peer's callbacks hold its client's state.
            watched = None

    def _peer_ready(
        self, fd: int, on_gone: Callable[[], None], on_input: Callable[[int], None] | None
    ) -> None:
        try:
            nbytes = os.readv(fd, [self._discard])
        except BlockingIOError:
            return  # nothing after all (another reader, or a spurious wake-up)
        except OSError:
            nbytes = 0  # reset or broken: gone, as far as a listener is concerned
        if nbytes and on_input is None:
            return  # discarded; the rest, if any, on the next wake-up
        if nbytes and on_input is not None:
            on_input(nbytes)
        # Gone, or it sent what it may not: stop watching at once, so a peer that keeps
        # its end open costs no further wake-ups while its connection is taken down.
        self.remove(fd)
        on_gone()


#: TCP keepalive probes sent before the kernel gives up on a silent host.
TCP_KEEPALIVE_PROBES: Final = 3


def tcp_socket_of(stream: trio.abc.Stream) -> trio.socket.SocketType | None:
    """The TCP socket under ``stream`` (under its TLS, if any); None for UNIX sockets and
    streams that are not sockets (memory streams in tests)."""
    if isinstance(stream, trio.SSLStream):
        return tcp_socket_of(stream.transport_stream)
    if isinstance(stream, trio.SocketStream) and stream.socket.family in (
        socket.AF_INET,
        socket.AF_INET6,
    ):
        return stream.socket
    return None


def set_send_buffer(stream: trio.abc.Stream, size: int) -> int | None:
    """Ask the kernel for a send buffer of ``size`` bytes (SO_SNDBUF) on the socket under
    ``stream`` (under its TLS, if any; TCP or UNIX). This turns the kernel's autotuning of
    that buffer off, and the kernel caps it at ``net.core.wmem_max``.

    Returns the buffer the kernel actually gave, as it reports it (Linux doubles the size
    asked, for its own bookkeeping, so an uncapped request reads back as ``2 * size``);
    None for a stream without a socket, or when the option cannot be set (the connection
    keeps its old buffer). Never raises.
    """
    while isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    if not isinstance(stream, trio.SocketStream):
        return None
    sock = stream.socket
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
        given: int = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    except OSError:
        return None
    return given


def enable_tcp_keepalive(stream: trio.abc.Stream, dead_host_timeout: float) -> bool:
    """Make the kernel notice, within about ``dead_host_timeout`` seconds, that the host at
    the other end of ``stream`` vanished, even when neither side has anything to say.

    Sets SO_KEEPALIVE with TCP_KEEPIDLE, TCP_KEEPINTVL and :data:`TCP_KEEPALIVE_PROBES`
    probes adding up to ``dead_host_timeout`` (whole seconds, at least 1 each), and
    TCP_USER_TIMEOUT to ``dead_host_timeout``, so written bytes that stay unacknowledged that
    long break the connection too (keepalive probes are not sent while data is in flight).
    A connection that then dies reads or writes as broken (trio.BrokenResourceError).

    Returns False, changing nothing, for a stream without a TCP socket; options the platform
    lacks are skipped. Never raises: a socket option that cannot be set is not a reason to
    drop a connection.
    """
    sock = tcp_socket_of(stream)
    if sock is None:
        return False
    interval = max(1, round(dead_host_timeout / (2 * TCP_KEEPALIVE_PROBES)))
    idle = max(1, round(dead_host_timeout) - TCP_KEEPALIVE_PROBES * interval)
    options = [
        (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPIDLE", None), idle),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPINTVL", None), interval),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPCNT", None), TCP_KEEPALIVE_PROBES),
        (
            socket.IPPROTO_TCP,
            getattr(socket, "TCP_USER_TIMEOUT", None),
            round(dead_host_timeout * 1000),
        ),
    ]
    for level, option, value in options:
        if option is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(level, option, value)
    return True


def tcp_connector(address: Address) -> Connector:
    """A connector for ``tcp://host:port`` (or the TCP under ``tls://host:port``)."""
    if address.host is None:
        raise ValueError(f"cannot connect to {address}: no host")
    host: str = address.host

    async def connect() -> trio.abc.Stream:
        return await trio.open_tcp_stream(host, address.port)

    return connect


def unix_connector(address: Address) -> Connector:
    """A connector for ``unix:///path``. Connecting raises OSError (e.g. no such file)."""
    path = address.path
    if path is None:
        raise ValueError(f"cannot connect to {address}: not a UNIX socket address")

    async def connect() -> trio.abc.Stream:
        return await trio.open_unix_socket(path)

    return connect


def connector_for(address: Address) -> Connector:
    """The plain connector for ``address``: TCP for ``tcp://`` and ``tls://`` (TLS is added
    by :func:`tls_connector`), a UNIX socket for ``unix://``."""
    return unix_connector(address) if address.is_unix else tcp_connector(address)


def system_backlog() -> int:
    """The largest listen backlog the system allows: ``net.core.somaxconn`` on Linux
    (``/proc/sys/net/core/somaxconn``), else ``socket.SOMAXCONN``; at most 65535.

    Never fails: an unreadable or odd file means ``socket.SOMAXCONN``.
    """
    try:
        with open(_SOMAXCONN_PATH, encoding="ascii") as file:
            value = int(file.read().strip())
    except (OSError, ValueError):
        value = socket.SOMAXCONN
    return max(1, min(value, _MAX_BACKLOG))


async def open_listeners(
    address: Address, *, backlog: int | None = None, socket_mode: int = DEFAULT_SOCKET_MODE
) -> list[trio.abc.Listener[trio.abc.Stream]]:
    """Bind and listen on ``address`` (``tcp://*:port``: every interface, IPv4 and IPv6;
    ``unix:///path``: see :func:`open_unix_listener`, with ``socket_mode``).

    ``backlog`` None (the default) is the largest the system allows, so a burst of connects
    waits in the kernel's queue instead of losing SYNs (and waiting a second for the retry):
    trio then asks for 65535 and the kernel caps it at ``net.core.somaxconn``.

    Raises OSError (e.g. address in use) with the address in the message.
    """
    if address.is_unix:
        return [await open_unix_listener(address, mode=socket_mode, backlog=backlog)]
    try:
        listeners = await trio.open_tcp_listeners(address.port, host=address.host, backlog=backlog)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise OSError(exc.errno, f"cannot listen on {address}: address already in use") from exc
        raise OSError(exc.errno, f"cannot listen on {address}: {exc.strerror or exc}") from exc
    bound: list[trio.abc.Listener[trio.abc.Stream]] = [*listeners]
    return bound


class UnixSocketListener(trio.abc.Listener[trio.abc.Stream]):
    """A listening UNIX socket that removes its socket file when closed.

    The file is removed only if it is still the one this listener made (same device and
    inode), so a newer listener's file at the same path is left alone.
    """

    def __init__(self, sock: trio.socket.SocketType, path: str) -> None:
        self.listener = trio.SocketListener(sock)
        self.path = path
        info = os.stat(path)
        self._identity = (info.st_dev, info.st_ino)

    async def accept(self) -> trio.abc.Stream:
        return await self.listener.accept()

    async def aclose(self) -> None:
        try:
            info = os.lstat(self.path)
        except OSError:
            pass
        else:
            if (info.st_dev, info.st_ino) == self._identity:
                with contextlib.suppress(OSError):
                    os.unlink(self.path)
        await self.listener.aclose()


async def open_unix_listener(
    address: Address, *, mode: int = DEFAULT_SOCKET_MODE, backlog: int | None = None
) -> UnixSocketListener:
    """Listen on the UNIX socket ``address.path``, its file made with permission bits ``mode``,
    with a listen ``backlog`` of :func:`system_backlog` unless given.

    A socket file left at the path by a process that is gone (nothing accepts on it) is
    replaced. Raises OSError, naming the address: EADDRINUSE when something still listens
    there, EEXIST when the path is a file that is not a socket (it is never removed), or
    whatever bind() or chmod() raised (e.g. no such directory, permission denied).
    """
    path = address.path
    if path is None:
        raise ValueError(f"{address} is not a UNIX socket address")
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise OSError(exc.errno, f"cannot listen on {address}: {exc.strerror or exc}") from exc
    else:
        if not stat.S_ISSOCK(info.st_mode):
            raise OSError(
                errno.EEXIST,
                f"cannot listen on {address}: {path} exists and is not a socket; "
                "not removing it (move it away or choose another path)",
            )
        if await _unix_socket_is_live(path):
            raise OSError(
                errno.EADDRINUSE,
                f"cannot listen on {address}: another process is listening on it",
            )
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # stale: left by a process that did not clean up
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.bind(path)
        # Before listen(): nobody can connect until the mode is right.
        os.chmod(path, mode)
        sock.listen(system_backlog() if backlog is None else backlog)
        return UnixSocketListener(sock, path)
    except OSError as exc:
        sock.close()
        with contextlib.suppress(OSError):
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)
        if exc.errno == errno.EADDRINUSE:
            raise OSError(exc.errno, f"cannot listen on {address}: address already in use") from exc
        raise OSError(exc.errno, f"cannot listen on {address}: {exc.strerror or exc}") from exc
    except BaseException:
        sock.close()
        raise


async def _unix_socket_is_live(path: str) -> bool:
    """Whether something accepts connections on the UNIX socket at ``path``."""
    probe = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await probe.connect(path)
    except OSError:
        return False
    else:
        return True
    finally:
        probe.close()


# -- TLS ----------------------------------------------------------------------------------


def _load_chain(context: ssl.SSLContext, tls: TLSConfig) -> None:
    if tls.certificate is None or tls.key is None:
        return
    try:
        context.load_cert_chain(tls.certificate, tls.key)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(
            f"tls: cannot load certificate {tls.certificate} with key {tls.key}: {exc}"
        ) from None


def _load_ca(context: ssl.SSLContext, ca: str) -> None:
    try:
        context.load_verify_locations(cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"tls: cannot load CA file {ca}: {exc}") from None


def server_tls_context(tls: TLSConfig) -> ssl.SSLContext:
    """The context a TLS listener uses: its certificate, the minimum version and, with
    ``require_client_cert``, mutual TLS against ``ca``.

    Raises ValueError naming the file that cannot be read or used.
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = _TLS_VERSIONS[tls.minimum_version]
    if tls.certificate is None:
        raise ValueError("tls: a listening endpoint needs certificate and key")
    _load_chain(context, tls)
    if tls.require_client_cert:
        assert tls.ca is not None  # the config demands it
        _load_ca(context, tls.ca)
        context.verify_mode = ssl.CERT_REQUIRED
    else:
        context.verify_mode = ssl.CERT_NONE
    return context


def client_tls_context(tls: TLSConfig) -> ssl.SSLContext:
    """The context a TLS connector uses: the server is verified against ``ca`` (or the
    system's trust store) unless ``verify`` is off; the client certificate is presented
    when configured.

    Raises ValueError naming the file that cannot be read or used.
    """
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = _TLS_VERSIONS[tls.minimum_version]
    if tls.verify:
        if tls.ca is not None:
            _load_ca(context, tls.ca)
    else:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    _load_chain(context, tls)
    return context


def _tls_reason(exc: BaseException) -> str:
    """The most specific reason in ``exc``'s chain (an SSL error's, when there is one)."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return f"certificate verify failed: {cause.verify_message}"
        if isinstance(cause, ssl.SSLError):
            return (cause.reason or str(cause)).lower().replace("_", " ")
        cause = cause.__cause__ or cause.__context__
    return str(exc) or type(exc).__name__


class TLSListener(trio.abc.Listener[trio.abc.Stream]):
    """Wraps every stream a listener accepts in server-side TLS.

    :meth:`accept` returns at once, before any handshake; the caller finishes it with
    :meth:`Connection.establish` (a :class:`Connection` made with :attr:`handshake_timeout`).
    """

    def __init__(
        self,
        transport_listener: trio.abc.Listener[trio.abc.Stream],
        context: ssl.SSLContext,
        *,
        handshake_timeout: float,
    ) -> None:
        self.transport_listener = transport_listener
        self.context = context
        self.handshake_timeout = handshake_timeout

    async def accept(self) -> trio.abc.Stream:
        stream = await self.transport_listener.accept()
        return trio.SSLStream(stream, self.context, server_side=True)

    async def aclose(self) -> None:
        await self.transport_listener.aclose()


def tls_connector(
    connector: Connector,
    context: ssl.SSLContext,
    *,
    address: Address,
    server_name: str | None = None,
    handshake_timeout: float = 10.0,
) -> Connector:
    """``connector``'s streams with TLS on top, the handshake done before it returns.

    The server's certificate is checked against ``server_name``, or the address's host. A
    failed or timed-out handshake raises ConnectionError (an OSError, so reconnecting
    endpoints retry it with backoff) saying why, e.g. ``certificate verify failed``.
    """
    hostname = server_name or address.host or address.path

    async def handshake(transport: trio.abc.Stream) -> trio.abc.Stream:
        stream = trio.SSLStream(transport, context, server_hostname=hostname)
        try:
            with trio.fail_after(handshake_timeout):
                await stream.do_handshake()
        finally:
            _release_handshake(stream)
        return stream

    async def connect() -> trio.abc.Stream:
        transport = await connector()
        try:
            return await handshake(transport)
        except trio.TooSlowError:
            await trio.aclose_forcefully(transport)
            raise ConnectionError(
                f"TLS handshake with {address} failed: no handshake within {handshake_timeout:g}s"
            ) from None
        except trio.BrokenResourceError as exc:
            await trio.aclose_forcefully(transport)
            raise ConnectionError(
                f"TLS handshake with {address} failed: {_tls_reason(exc)}"
            ) from None

    return connect


def bound_addresses(listeners: Sequence[trio.abc.Listener[trio.abc.Stream]]) -> list[str]:
    """``host:port`` of each listening socket, for logs and status."""
    out = []
    for listener in listeners:
        inner = getattr(listener, "listener", None)  # a listener that may be handed over
        if isinstance(inner, trio.abc.Listener) and not isinstance(listener, UnixSocketListener):
            listener = inner
        if isinstance(listener, TLSListener):
            out += [f"tls {name}" for name in bound_addresses([listener.transport_listener])]
        elif isinstance(listener, UnixSocketListener):
            out.append(f"unix:{listener.path}")
        elif isinstance(listener, trio.SocketListener):
            name = listener.socket.getsockname()
            if listener.socket.family == socket.AF_INET6:
                out.append(f"[{name[0]}]:{name[1]}")
            else:
                out.append(f"{name[0]}:{name[1]}")
        else:
            out.append(type(listener).__name__)
    return out
