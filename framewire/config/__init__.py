"""Configuration: the attrs schema, TOML loading with a strict cattrs converter, the default.

Load a file with :func:`load_config`; every error in it comes back together in one
:class:`ConfigError`, each line naming the path of the bad value.
"""

from ._address import Address as Address
from ._address import parse_address as parse_address
from ._load import ConfigError as ConfigError
from ._load import default_config_text as default_config_text
from ._load import load_config as load_config
from ._load import parse_config as parse_config
from ._positions import KeyPositions as KeyPositions
from ._positions import Position as Position
from ._positions import key_positions as key_positions
from ._schema import BackoffConfig as BackoffConfig
from ._schema import BridgeConfig as BridgeConfig
from ._schema import BufferConfig as BufferConfig
from ._schema import Config as Config
from ._schema import DaemonConfig as DaemonConfig
from ._schema import EndpointConfig as EndpointConfig
from ._schema import FileConfig as FileConfig
from ._schema import GeneratorConfig as GeneratorConfig
from ._schema import HistoryConfig as HistoryConfig
from ._schema import LinkConfig as LinkConfig
from ._schema import NatsConfig as NatsConfig
from ._schema import NatsServerConfig as NatsServerConfig
from ._schema import PubSubConfig as PubSubConfig
from ._schema import ReceiverConfig as ReceiverConfig
from ._schema import RecorderConfig as RecorderConfig
from ._schema import SenderConfig as SenderConfig
from ._schema import ServerConfig as ServerConfig
from ._schema import StatusConfig as StatusConfig
from ._schema import StreamConfig as StreamConfig
from ._schema import TLSConfig as TLSConfig
from ._units import format_duration as format_duration
from ._units import format_size as format_size
from ._units import parse_duration as parse_duration
from ._units import parse_size as parse_size
from ._zmq_address import ZmqAddress as ZmqAddress
from ._zmq_address import parse_zmq_address as parse_zmq_address
