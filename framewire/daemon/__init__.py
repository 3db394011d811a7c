"""Everything that does I/O: streams, endpoints, transports, the supervisor, the daemon.

Nothing here parses bytes; that is the codecs' job (:mod:`framewire.protocols`).

The names below are imported when first used: a program that needs one module of the
package (the client needs :mod:`.transport`; ``framewire status`` needs no endpoint) does
not load the daemon whole.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from .endpoints import Endpoint as Endpoint
    from .endpoints import EndpointContext as EndpointContext
    from .endpoints import Transports as Transports
    from .service import Daemon as Daemon
    from .service import DaemonStartFailed as DaemonStartFailed
    from .service import serve as serve
    from .stream import Policy as Policy
    from .stream import QueueBounds as QueueBounds
    from .stream import Stream as Stream
    from .stream import StreamRegistry as StreamRegistry
    from .stream import Subscription as Subscription
    from .stream import SubscriptionClosed as SubscriptionClosed
    from .supervisor import Supervisor as Supervisor

#: Each public name and the submodule that defines it.
_HOMES: Final = {
    "Endpoint": ".endpoints",
    "EndpointContext": ".endpoints",
    "Transports": ".endpoints",
    "Daemon": ".service",
    "DaemonStartFailed": ".service",
    "serve": ".service",
    "Policy": ".stream",
    "QueueBounds": ".stream",
    "Stream": ".stream",
    "StreamRegistry": ".stream",
    "Subscription": ".stream",
    "SubscriptionClosed": ".stream",
    "Supervisor": ".supervisor",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(home, __name__), name)
