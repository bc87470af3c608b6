"""``raw``: the KV bytes as they are, layer-major."""

from __future__ import annotations

import warnings

import numpy as np
import torch

from codec.base import Codec
from codec.errors import CorruptStream, InvalidInput

__all__ = ["RawCodec", "tensor_bytes", "tensor_from_bytes", "check_kv"]

_TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def torch_dtype(name: str) -> torch.dtype:
    return _TORCH_DTYPES[name]


def check_kv(kv: torch.Tensor, layout, num_layers: int | None = None) -> None:
    """Raise :class:`InvalidInput` unless ``kv`` matches the layout's shape convention and dtype."""
    if not isinstance(kv, torch.Tensor):
        raise InvalidInput(f"KV must be a torch.Tensor, got {type(kv).__name__}")
    if kv.dtype != torch_dtype(layout.dtype):
        raise InvalidInput(f"KV dtype {kv.dtype} does not match layout dtype {layout.dtype}")
    layers = layout.num_layers if num_layers is None else num_layers
    if kv.dim() != 5 or kv.shape[0] != layers or kv.shape[1] != 2 or tuple(kv.shape[3:]) != (
            layout.num_kv_heads, layout.head_dim):
        raise InvalidInput(
            f"KV shape {tuple(kv.shape)} does not match [layers={layers}, 2, tokens, "
            f"kv_heads={layout.num_kv_heads}, head_dim={layout.head_dim}]")


def tensor_bytes(kv: torch.Tensor) -> bytes:
    """The tensor's bytes in C order (copied to the CPU if needed)."""
    flat = kv.detach().contiguous().view(-1).view(torch.uint8)
    return flat.cpu().numpy().tobytes()


def tensor_from_bytes(data: bytes | memoryview, shape, dtype: torch.dtype, *, device="cpu",
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """Copy ``data`` into a new (or the given) tensor of ``shape`` and ``dtype``."""
    n = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
    if len(data) != n:
        raise CorruptStream(f"decoded {len(data)} bytes, expected {n} for shape {tuple(shape)}")
    src = np.frombuffer(data, dtype=np.uint8)
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=device)
    elif tuple(out.shape) != tuple(shape) or out.dtype != dtype:
        raise InvalidInput(f"out has shape {tuple(out.shape)}/{out.dtype}, expected {tuple(shape)}/{dtype}")
    if out.device.type == "cpu" and out.is_contiguous():
        out.view(-1).view(torch.uint8).numpy()[:] = src
    else:
        with warnings.catch_warnings():  # the source buffer is read-only; it is only read here
            warnings.simplefilter("ignore", UserWarning)
            staged = torch.frombuffer(data, dtype=torch.uint8)
        out.copy_(staged.view(dtype).view(shape))
    return out


class RawCodec(Codec):
    """No compression: section bytes are the tensor bytes."""

    name = "raw"
    lossless = True

    def encode(self, kv: torch.Tensor, *, layer_start: int | None = None) -> bytes:
        return tensor_bytes(kv)

    def decode(self, data, num_layers, num_tokens, *, meta=b"", device="cpu", out=None, layer_start=None):
        shape = self.layout.shape(num_tokens, num_layers)
        return tensor_from_bytes(data, shape, torch_dtype(self.layout.dtype), device=device, out=out)
