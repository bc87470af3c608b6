"""The KV layout of one model replica (or tensor-parallel rank) and its fingerprint.

KV tensors in KDN always have the shape ``[num_layers, 2, num_tokens, num_kv_heads, head_dim]``
(axis 1: 0 = keys, 1 = values), contiguous, in the layout's dtype. Keys are stored *after* RoPE, as engines
keep them.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field

from codec.base import DTYPE_SIZES
from kdn.errors import InvalidRequest

__all__ = ["KVLayout", "DTYPE_SIZES"]

FINGERPRINT_BYTES = 16
FULL = "full_attention"
SLIDING = "sliding_attention"
_HASHED_WHEN_SET = ("sliding_window", "part")
_PART_RE = re.compile(r"^(full|sliding)/[0-9a-f]{32}$")


@dataclass(frozen=True)
class KVLayout:
    """Everything that decides whether stored KV can be used by an engine instance.

    Two engines may share chunks only when their layouts have the same :meth:`fingerprint`.
    """

    model_id: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "bfloat16"
    revision: str = ""
    rope_theta: float = 0.0
    rope_scaling: str = ""
    """Canonical JSON of the model's rope_scaling dict, or empty."""
    tp_rank: int = 0
    tp_size: int = 1
    layer_types: tuple[str, ...] = field(default_factory=tuple)
    """Per-layer attention type (e.g. ``full_attention``, ``sliding_attention``); empty means all full."""
    sliding_window: int = 0
    """Window ``W`` of the ``sliding_attention`` layers in tokens (a query sees itself and the ``W - 1`` tokens
    before it); 0 when no layer slides. Hashed only when set, so layouts without it keep their fingerprint."""
    part: str = ""
    """Empty for a whole model's layout; ``full/<fingerprint>`` or ``sliding/<fingerprint>`` for the layout of
    objects that hold only one type's layers of the layout with that fingerprint (:meth:`part_layout`). Hashed
    only when set."""

    def __post_init__(self) -> None:
        if not self.model_id:
            raise InvalidRequest("layout: model_id must not be empty")
        for name in ("num_layers", "num_kv_heads", "head_dim", "tp_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0 or value > 1 << 16:
                raise InvalidRequest(f"layout: {name} must be a positive int, got {value!r}")
        if self.dtype not in DTYPE_SIZES:
            raise InvalidRequest(f"layout: dtype {self.dtype!r} not in {sorted(DTYPE_SIZES)}")
        if not 0 <= self.tp_rank < self.tp_size:
            raise InvalidRequest(f"layout: tp_rank {self.tp_rank} outside [0, {self.tp_size})")
        if self.layer_types and len(self.layer_types) != self.num_layers:
            raise InvalidRequest("layout: layer_types must have one entry per layer")
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if not isinstance(self.sliding_window, int) or not 0 <= self.sliding_window <= 1 << 24:
            raise InvalidRequest(f"layout: sliding_window must be an int in [0, 2**24], got {self.sliding_window!r}")
        if self.sliding_window and SLIDING not in self.layer_types:
            raise InvalidRequest("layout: sliding_window is set but no layer is sliding_attention")
        if not isinstance(self.part, str) or (self.part and not _PART_RE.match(self.part)):
            raise InvalidRequest(f"layout: part must be empty or full/<hex> / sliding/<hex>, got {self.part!r}")

    # -- layer types ----------------------------------------------------------------------------------------------
    def layer_kind(self, layer: int) -> str:
        """``full`` or ``sliding`` (a ``sliding_attention`` layer of a layout with a window); other attention types
        raise :class:`InvalidRequest` (KDN does not know which of their KV a later token needs)."""
        kind = self.layer_types[layer] if self.layer_types else FULL
        if kind in ("", FULL):
            return "full"
        if kind == SLIDING and self.sliding_window:
            return "sliding"
        if kind == SLIDING:
            raise InvalidRequest("layout: sliding_attention layers need sliding_window")
        raise InvalidRequest(f"layout: layer type {kind!r} of layer {layer} is not supported")

    def layers_of(self, kind: str) -> tuple[int, ...]:
        """Indices of the layers of ``kind`` (``full`` or ``sliding``), in order."""
        if kind not in ("full", "sliding"):
            raise InvalidRequest(f"layout: layer kind must be full or sliding, got {kind!r}")
        return tuple(i for i in range(self.num_layers) if self.layer_kind(i) == kind)

    @property
    def is_hybrid(self) -> bool:
        """True when some layer is a sliding-window layer (its KV is needed only for the last ``W`` tokens)."""
        return bool(self.layers_of("sliding"))

    def part_layout(self, kind: str) -> KVLayout:
        """The layout of objects holding only this layout's ``kind`` layers (same heads, dim, dtype, RoPE).

        Its fingerprint commits to this layout's (through :attr:`part`), so the parts of two models never mix.
        A layout without sliding layers is its own ``full`` part: same fingerprint, same keys as before."""
        if self.part:
            raise InvalidRequest("layout: a part layout has no parts")
        layers = self.layers_of(kind)
        if kind == "full" and len(layers) == self.num_layers:
            return self
        if not layers:
            raise InvalidRequest(f"layout: no {kind} layers")
        data = self.to_dict()
        data.update(num_layers=len(layers), layer_types=[self.layer_types[i] for i in layers],
                    sliding_window=self.sliding_window if kind == "sliding" else 0,
                    part=f"{kind}/{self.fingerprint().hex()}")
        return KVLayout.from_dict(data)

    @property
    def itemsize(self) -> int:
        return DTYPE_SIZES[self.dtype]

    @property
    def bytes_per_token(self) -> int:
        """Raw KV bytes of one token over all layers (K and V)."""
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * self.itemsize

    def layer_bytes(self, num_tokens: int) -> int:
        """Raw bytes of one layer's K and V for ``num_tokens`` tokens."""
        return 2 * num_tokens * self.num_kv_heads * self.head_dim * self.itemsize

    def shape(self, num_tokens: int, num_layers: int | None = None) -> tuple[int, int, int, int, int]:
        """The KV tensor shape for ``num_tokens`` tokens (all layers unless ``num_layers`` is given)."""
        layers = self.num_layers if num_layers is None else num_layers
        return (layers, 2, num_tokens, self.num_kv_heads, self.head_dim)

    def fingerprint(self) -> bytes:
        """16-byte digest of every field (``sliding_window`` and ``part`` only when set); part of every key and every
        chunk header."""
        fields = asdict(self)
        for name in _HASHED_WHEN_SET:  # fields added later: absent from the hash at their default
            if not fields[name]:
                del fields[name]
        canonical = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.blake2b(canonical, digest_size=FINGERPRINT_BYTES, person=b"kdn-layout-v1").digest()

    def to_dict(self) -> dict:
        data = asdict(self)
        data["layer_types"] = list(self.layer_types)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> KVLayout:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise InvalidRequest(f"layout: unknown fields {sorted(unknown)}")
        data = dict(data)
        data["layer_types"] = tuple(data.get("layer_types", ()))
        return cls(**data)

    @classmethod
    def from_hf_config(cls, config, model_id: str | None = None, dtype: str = "bfloat16",
                       tp_rank: int = 0, tp_size: int = 1) -> KVLayout:
        """Build the layout from a Hugging Face ``PretrainedConfig`` (Llama/Qwen2/Mistral/Gemma style)."""
        cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        rope_theta = getattr(cfg, "rope_theta", None)
        rope_params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
        if rope_theta is None and isinstance(rope_params, dict):
            rope_theta = rope_params.get("rope_theta", 0.0)
        if isinstance(rope_params, dict) and "full_attention" in rope_params:
            rope_params = rope_params["full_attention"]
        layer_types = tuple(getattr(cfg, "layer_types", None) or ())
        window = int(getattr(cfg, "sliding_window", None) or 0) if SLIDING in layer_types else 0
        return cls(
            model_id=model_id or getattr(cfg, "_name_or_path", "") or cfg.model_type,
            num_layers=cfg.num_hidden_layers,
            num_kv_heads=kv_heads // tp_size if kv_heads >= tp_size else 1,
            head_dim=head_dim,
            dtype=dtype,
            rope_theta=float(rope_theta or 0.0),
            rope_scaling=json.dumps(rope_params, sort_keys=True, default=str) if rope_params else "",
            tp_rank=tp_rank,
            tp_size=tp_size,
            layer_types=layer_types,
            sliding_window=window,
        )
