"""The codec plug point: KV tensors of a layer group <-> encoded section bytes.

A codec turns the KV of a group of layers, a tensor of shape ``[layers, 2, tokens, kv_heads, head_dim]`` in the
layout's dtype, into bytes, and back. Codecs are stateless apart from what they are built with (for CacheGen, the
model profile), so one instance may be used from many threads at once.

Contract:
- ``encode`` accepts a tensor on any device and returns ``bytes``; it does not keep a reference to the input.
- ``decode`` returns a tensor of exactly the shape and dtype described, on ``device``; when ``out`` is given it must
  have that shape and dtype and is written in place (and returned).
- ``decode`` raises :class:`codec.errors.CorruptStream` when the bytes cannot be decoded to that shape (a lossy codec
  cannot detect every corruption; the chunk checksum does that before decode is called).
- ``lossless`` is True when ``decode(encode(x))`` is bit-identical to ``x``.
- ``meta()`` returns bytes recorded once per chunk header (e.g. the profile id); ``decode`` receives them back.
- ``layer_start`` tells the codec which model layer the group's first layer is (codecs with per-layer parameters,
  such as CacheGen, need it; ``None`` means unknown, which such codecs accept only for a group of all layers).
  ``encode`` and ``decode`` of one section must be given the same value.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol

if TYPE_CHECKING:
    import torch

__all__ = ["Codec", "KVShape", "ShapeLike", "DTYPE_SIZES"]

DTYPE_SIZES = {"float32": 4, "bfloat16": 2, "float16": 2}


class ShapeLike(Protocol):
    """What a codec needs to know of a model's KV: any object with these fields (``kdn``'s ``KVLayout`` is one)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str


@dataclass(frozen=True)
class KVShape:
    """A plain KV shape description: ``[num_layers, 2, tokens, num_kv_heads, head_dim]`` of ``dtype``."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "bfloat16"

    @property
    def itemsize(self) -> int:
        return DTYPE_SIZES[self.dtype]

    def layer_bytes(self, num_tokens: int) -> int:
        return 2 * num_tokens * self.num_kv_heads * self.head_dim * self.itemsize

    def shape(self, num_tokens: int, num_layers: int | None = None) -> tuple[int, int, int, int, int]:
        layers = self.num_layers if num_layers is None else num_layers
        return (layers, 2, num_tokens, self.num_kv_heads, self.head_dim)


class Codec(ABC):
    """Encodes and decodes one layer group of KV."""

    name: ClassVar[str]
    lossless: ClassVar[bool]
    #: True when ``encode`` of a CUDA tensor runs on the GPU (callers then keep the KV where it is).
    encodes_on_device: ClassVar[bool] = False

    def __init__(self, layout: ShapeLike) -> None:
        self.layout = shape_of(layout)

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


def shape_of(layout: ShapeLike) -> KVShape:
    """The plain :class:`KVShape` of any shape-like object (the codec keeps only these four fields)."""
    if isinstance(layout, KVShape):
        return layout
    return KVShape(int(layout.num_layers), int(layout.num_kv_heads), int(layout.head_dim), str(layout.dtype))
