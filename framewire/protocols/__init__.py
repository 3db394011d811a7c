"""Sans-IO codecs, one module per wire format, and a registry by name.

Nothing in this package imports trio or touches a socket: a codec is bytes in, frames out,
and frames in, buffers out. Look a codec up by the name used in config::

    spec = framewire.protocols.get("native")
    decoder = spec.make_decoder(max_frame_size)
    encoder = spec.make_encoder()
"""

from ._encoder import FrameEncoder as FrameEncoder
from ._errors import FrameTooLarge as FrameTooLarge
from ._errors import ProtocolError as ProtocolError
from ._errors import TruncatedFrame as TruncatedFrame
from ._errors import UnknownProtocol as UnknownProtocol
from ._framing import FrameDecoder as FrameDecoder
from ._registry import Decoder as Decoder
from ._registry import Encoder as Encoder
from ._registry import ProtocolSpec as ProtocolSpec
from ._registry import WholeReadDecoder as WholeReadDecoder
from ._registry import get as get
from ._registry import names as names
from ._registry import register as register
