"""The codec plug point: KV tensors of a layer group <-> encoded section bytes.

A codec turns the KV of a group of layers, a tensor of shape ``[layers, 2, tokens, kv_heads, head_dim]`` in the
layout's dtype, into bytes, and back. Codecs are stateless apart from what they are built with (for CacheGen, the
model profile), so one instance may be used from many threads at once.

Contract:
- ``encode`` accepts a tensor on any device and returns ``bytes``; it does not keep a reference to the input.
- ``decode`` returns a tensor of exactly the shape and dtype described, on ``device``; when ``out`` is given it must
  have that shape and dtype and is written in place (and returned).
- ``decode`` raises :class:`kdn.errors.CorruptObject` when the bytes cannot be decoded to that shape (a lossy codec
  cannot detect every corruption; the chunk checksum does that before decode is called).
- ``lossless`` is True when ``decode(encode(x))`` is bit-identical to ``x``.
- ``meta()`` returns bytes recorded once per chunk header (e.g. the profile id); ``decode`` receives them back.
- ``layer_start`` tells the codec which model layer the group's first layer is (codecs with per-layer parameters,
  such as CacheGen, need it; ``None`` means unknown, which such codecs accept only for a group of all layers).
  ``encode`` and ``decode`` of one section must be given the same value.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    import torch

    from kdn.layout import KVLayout

__all__ = ["Codec"]


class Codec(ABC):
    """Encodes and decodes one layer group of KV."""

    name: ClassVar[str]
    lossless: ClassVar[bool]
    #: True when ``encode`` of a CUDA tensor runs on the GPU (callers then keep the KV where it is).
    encodes_on_device: ClassVar[bool] = False

    def __init__(self, layout: KVLayout) -> None:
        self.layout = layout

    def meta(self) -> bytes:
        """Per-chunk codec metadata for the chunk header (empty by default)."""
        return b""

    @abstractmethod
    def encode(self, kv: torch.Tensor, *, layer_start: int | None = None) -> bytes:
        """Encode ``kv`` of shape ``[layers, 2, tokens, kv_heads, head_dim]`` (model layers from ``layer_start``)."""

    @abstractmethod
    def decode(self, data: bytes | memoryview, num_layers: int, num_tokens: int, *, meta: bytes = b"",
               device: str | torch.device = "cpu", out: torch.Tensor | None = None,
               layer_start: int | None = None) -> torch.Tensor:
        """Decode bytes produced by :meth:`encode` for ``num_layers`` layers of ``num_tokens`` tokens."""
