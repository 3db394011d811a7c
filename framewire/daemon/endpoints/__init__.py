"""Endpoint kinds, one module each, found by the ``kind`` in config."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from ...config import EndpointConfig
from ._base import ClientInfo as ClientInfo
from ._base import Endpoint as Endpoint
from ._base import EndpointContext as EndpointContext
from ._base import EndpointStatus as EndpointStatus
from ._base import Transports as Transports
from .bridge import BridgeEndpoint as BridgeEndpoint
from .file import FileEndpoint as FileEndpoint
from .generator import GeneratorEndpoint as GeneratorEndpoint
from .link import LinkEndpoint as LinkEndpoint
from .nats import NatsEndpoint as NatsEndpoint
from .pubsub import PubSubEndpoint as PubSubEndpoint
from .receiver import ReceiverEndpoint as ReceiverEndpoint
from .recorder import RecorderEndpoint as RecorderEndpoint
from .sender import SenderEndpoint as SenderEndpoint
from .server import ServerEndpoint as ServerEndpoint

KINDS: Final[dict[str, type[Endpoint[Any]]]] = {
    "server": ServerEndpoint,
    "receiver": ReceiverEndpoint,
    "generator": GeneratorEndpoint,
    "sender": SenderEndpoint,
    "file": FileEndpoint,
    "recorder": RecorderEndpoint,
    "link": LinkEndpoint,
    "bridge": BridgeEndpoint,
    "pubsub": PubSubEndpoint,
    "nats": NatsEndpoint,
}


def start_order(endpoints: Mapping[str, EndpointConfig]) -> list[tuple[str, EndpointConfig]]:
    """``endpoints`` in the order to start them: as listed, pure sources last."""
    return sorted(endpoints.items(), key=lambda item: KINDS[item[1].kind].starts_last)


def make_endpoint(name: str, config: EndpointConfig, context: EndpointContext) -> Endpoint[Any]:
    """The endpoint for ``config`` (by its ``kind``)."""
    return KINDS[config.kind](name, config, context)
