"""NATS: framewire streams across machines.

- :mod:`._thread`: nats-py (asyncio-only) on a thread of its own, crossed from trio once per
  batch (:class:`NatsThread`, :class:`Inbox`);
- :mod:`._jetstream`: acknowledged publishes, the JetStream streams a framewire stream lives
  in, reading them back;
- :mod:`._publisher`: a framewire stream to NATS (:class:`NatsPublisher`,
  :class:`JetStreamPublisher`);
- :mod:`._subscriber`: NATS into a framewire stream (:class:`NatsSubscriber`);
- :mod:`._spool`: the JetStream stream's health (:class:`StreamWatch`);
- :mod:`._server`: the embedded nats-server of ``[nats] embedded = true``
  (:class:`EmbeddedNatsServer`).

The endpoint that puts them together, ``kind = "nats"``, is
:mod:`framewire.daemon.endpoints.nats`; the message layout (subjects, headers, chunks, packs)
is the sans-IO :mod:`framewire.protocols.nats`.
"""

from ._jetstream import AckOutcome as AckOutcome
from ._jetstream import AckTracker as AckTracker
from ._jetstream import MissingStream as MissingStream
from ._jetstream import StreamLayout as StreamLayout
from ._jetstream import ensure_streams as ensure_streams
from ._jetstream import parse_ack as parse_ack
from ._jetstream import refusal_kind as refusal_kind
from ._publisher import JetStreamPublisher as JetStreamPublisher
from ._publisher import NatsPublisher as NatsPublisher
from ._server import NAME as NAME
from ._server import EmbeddedNatsServer as EmbeddedNatsServer
from ._server import NatsServerFailed as NatsServerFailed
from ._server import client_url as client_url
from ._server import default_store_dir as default_store_dir
from ._server import find_binary as find_binary
from ._server import server_config_text as server_config_text
from ._server import with_embedded_servers as with_embedded_servers
from ._spool import StreamWatch as StreamWatch
from ._subscriber import NatsSubscriber as NatsSubscriber
from ._thread import READ_SIZE as READ_SIZE
from ._thread import Inbox as Inbox
from ._thread import NatsThread as NatsThread
from ._thread import NatsUnavailable as NatsUnavailable
from ._thread import PendingCall as PendingCall
from ._thread import describe_nats_error as describe_nats_error
from ._thread import guard_late_pongs as guard_late_pongs
from ._thread import pings_outstanding as pings_outstanding
from ._thread import raise_read_size as raise_read_size
from ._thread import require_nats as require_nats
