"""Endpoint kinds, one module each, found by the ``kind`` in config."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

from ...config import EndpointConfig
from ._base import ClientInfo as ClientInfo
from ._base import Endpoint as Endpoint
from ._base import EndpointContext as EndpointContext
from ._base import EndpointStatus as EndpointStatus
from ._base import Transports as Transports

if TYPE_CHECKING:
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

#: Each ``kind`` and the module and class that implement it, imported when first needed (a
#: program that uses the endpoints' common parts, or one kind, does not load them all).
_KINDS: Final[dict[str, tuple[str, str]]] = {
    "server": (".server", "ServerEndpoint"),
    "receiver": (".receiver", "ReceiverEndpoint"),
    "generator": (".generator", "GeneratorEndpoint"),
    "sender": (".sender", "SenderEndpoint"),
    "file": (".file", "FileEndpoint"),
    "recorder": (".recorder", "RecorderEndpoint"),
    "link": (".link", "LinkEndpoint"),
    "bridge": (".bridge", "BridgeEndpoint"),
    "pubsub": (".pubsub", "PubSubEndpoint"),
    "nats": (".nats", "NatsEndpoint"),
}
_CLASSES: Final = {name: module for module, name in _KINDS.values()}


def kind_class(kind: str) -> type[Endpoint[Any]]:
    """The endpoint class of ``kind``. Raises KeyError for an unknown kind."""
    module, name = _KINDS[kind]
    cls: type[Endpoint[Any]] = getattr(importlib.import_module(module, __name__), name)
    return cls


def __getattr__(name: str) -> Any:
    module = _CLASSES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module, __name__), name)


def start_order(endpoints: Mapping[str, EndpointConfig]) -> list[tuple[str, EndpointConfig]]:
    """``endpoints`` in the order to start them: as listed, pure sources last."""
    return sorted(endpoints.items(), key=lambda item: kind_class(item[1].kind).starts_last)


def make_endpoint(name: str, config: EndpointConfig, context: EndpointContext) -> Endpoint[Any]:
    """The endpoint for ``config`` (by its ``kind``)."""
    return kind_class(config.kind)(name, config, context)
