"""``lz4``: LZ4 block compression of the raw KV bytes (fast, lossless, small gains on bf16)."""

from __future__ import annotations

import lz4.block

from codec.base import Codec
from codec.errors import CorruptStream
from codec.raw import tensor_bytes, tensor_from_bytes, torch_dtype

__all__ = ["LZ4Codec"]


class LZ4Codec(Codec):
    name = "lz4"
    lossless = True

    def encode(self, kv, *, layer_start=None) -> bytes:
        return lz4.block.compress(tensor_bytes(kv), store_size=False)

    def decode(self, data, num_layers, num_tokens, *, meta=b"", device="cpu", out=None, layer_start=None):
        shape = self.layout.shape(num_tokens, num_layers)
        size = num_layers * self.layout.layer_bytes(num_tokens)
        try:
            raw = lz4.block.decompress(data, uncompressed_size=size)
        except lz4.block.LZ4BlockError as exc:
            raise CorruptStream(f"lz4 section does not decode: {exc}") from exc
        return tensor_from_bytes(raw, shape, torch_dtype(self.layout.dtype), device=device, out=out)
