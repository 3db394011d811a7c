"""Everything that does I/O: streams, endpoints, transports, the supervisor, the daemon.

Nothing here parses bytes; that is the codecs' job (:mod:`framewire.protocols`).
"""

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
