"""The codec's own errors (it imports nothing from ``kdn``; ``kdn.format.chunk_codec`` maps them onto KDN's tree).

::

    CodecError
    ├── InvalidInput     wrong shape, dtype, level, options or profile; unknown codec (also a ValueError)
    └── CorruptStream    a bitstream or profile file that does not decode
"""

from __future__ import annotations

__all__ = ["CodecError", "InvalidInput", "CorruptStream"]


class CodecError(Exception):
    """Base of every error the codec raises on purpose."""


class InvalidInput(CodecError, ValueError):
    """The input is not something this codec can encode or decode with (shape, dtype, level, profile)."""


class CorruptStream(CodecError):
    """Encoded bytes that fail to decode: truncated, malformed or from another codec."""
