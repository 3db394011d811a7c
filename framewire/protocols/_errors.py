"""Errors a codec raises. All are :class:`ValueError`: the bytes were wrong, not the program."""

from __future__ import annotations

__all__ = ["FrameTooLarge", "ProtocolError", "TruncatedFrame", "UnknownProtocol"]


class ProtocolError(ValueError):
    """The peer sent bytes that are not a valid frame of this protocol.

    The connection they came on cannot be trusted any more and should be closed; nothing
    decoded before the error is affected.
    """


class FrameTooLarge(ProtocolError):
    """A frame announced a size over the configured maximum. Raised before any allocation."""


class TruncatedFrame(ProtocolError):
    """The input ended in the middle of a frame."""


class UnknownProtocol(LookupError):
    """No codec is registered under the requested name."""
