"""framewire: a trio daemon that relays framed data streams.

The public surface is small: :class:`Frame` and :class:`FrameKind` here, the codecs in
:mod:`framewire.protocols`, configuration in :mod:`framewire.config`.
"""

from ._version import __version__ as __version__
from .frame import Frame as Frame
from .frame import FrameKind as FrameKind
