"""GPU time of prefill and decode, and the time to load stored KV from a tier.

Two ways to get GPU time, chosen per (GPU, model):

- **measured** - a :class:`~costmodel.catalog.Throughput` entry (tokens/s, batch 1): ``T = tokens / rate``.
- **FLOP estimate** - prefill is compute-bound: ``T = FLOPs / (peak × mfu)`` with
  ``FLOPs(n new tokens after m cached ones) = 2·P·n + 4·layers·q_dim·(n·m + n(n+1)/2)``
  (weights, then QKᵀ and AV over the causal span). Decode is memory-bound: each step reads the weights
  (shared by ``decode_batch`` requests) and the request's KV, so per token
  ``max((2·P/batch + KV bytes) / (HBM GB/s × mbu), 2·P / (peak × mfu))``.

Both are additive: ``T_prefill(c + p) = T_prefill(c) + T_prefill(p | c)``, which is what lets the model split a
request into "the context" and "the prompt after the context".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from costmodel.catalog import GPU, Throughput, TierOffer
from costmodel.errors import InvalidInput
from costmodel.shapes import ModelShape

__all__ = ["Compute", "prefill_flops", "prefill_seconds", "decode_seconds", "load_seconds"]

_WEIGHT_BYTES_PER_PARAM = 2  # 16-bit weights


@dataclass(frozen=True)
class Compute:
    """How to turn tokens into GPU seconds for one model on one GPU."""

    model: ModelShape
    gpu: GPU
    throughput: Throughput | None = None
    """Measured rates; when set they replace the FLOP estimate."""
    mfu: float = 0.5
    """Fraction of peak FLOP/s reached in prefill (FLOP estimate)."""
    mbu: float = 0.7
    """Fraction of HBM bandwidth reached in decode (FLOP estimate)."""
    decode_batch: int = 1
    """Requests sharing each decode step; divides the decode GPU time charged to one request."""

    def __post_init__(self) -> None:
        for name in ("mfu", "mbu"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 < value <= 1):
                raise InvalidInput(f"{name} must be in (0, 1], got {value!r}")
        if isinstance(self.decode_batch, bool) or not isinstance(self.decode_batch, int) or self.decode_batch < 1:
            raise InvalidInput(f"decode_batch must be an integer >= 1, got {self.decode_batch!r}")

    @property
    def prefill_method(self) -> str:
        if self.throughput is not None and self.throughput.prefill_tokens_per_s:
            return f"measured {self.throughput.prefill_tokens_per_s:,.0f} tokens/s"
        return f"FLOP estimate, MFU {self.mfu:.2f}"

    @property
    def decode_method(self) -> str:
        if self.throughput is not None and self.throughput.decode_tokens_per_s:
            return f"measured {self.throughput.decode_tokens_per_s:,.0f} tokens/s, batch {self.decode_batch}"
        return f"memory-bound estimate, MBU {self.mbu:.2f}, batch {self.decode_batch}"

    def _need_flops(self) -> tuple[float, float]:
        if not self.model.num_params or self.gpu.peak_tflops <= 0:
            raise InvalidInput(
                f"no measured throughput for GPU {self.gpu.name!r} / model {self.model.name!r} and no FLOP estimate "
                "possible (needs the model's parameter count and the GPU's peak_tflops): give --prefill-tps, "
                "or --params")
        return float(self.model.num_params), self.gpu.peak_tflops * 1e12


def _tokens(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise InvalidInput(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def prefill_flops(model: ModelShape, n_new: float, n_past: float = 0) -> float:
    """FLOPs to prefill ``n_new`` tokens that follow ``n_past`` cached tokens."""
    n, m = _tokens("n_new", n_new), _tokens("n_past", n_past)
    params = float(model.num_params or 0.0)
    return 2.0 * params * n + 4.0 * model.num_layers * model.q_dim * (n * m + n * (n + 1) / 2)


def prefill_seconds(compute: Compute, n_new: float, n_past: float = 0) -> float:
    """GPU seconds to prefill ``n_new`` tokens after ``n_past`` cached ones."""
    n = _tokens("n_new", n_new)
    _tokens("n_past", n_past)
    if compute.throughput is not None and compute.throughput.prefill_tokens_per_s:
        return n / compute.throughput.prefill_tokens_per_s
    _, peak = compute._need_flops()
    return prefill_flops(compute.model, n, n_past) / (peak * compute.mfu)


def decode_seconds(compute: Compute, n_out: float, n_past: float = 0) -> float:
    """GPU seconds charged to one request for generating ``n_out`` tokens after ``n_past`` tokens of KV."""
    n, m = _tokens("n_out", n_out), _tokens("n_past", n_past)
    if n == 0:
        return 0.0
    tp = compute.throughput
    if tp is not None and tp.decode_tokens_per_s:
        return n / tp.decode_tokens_per_s / compute.decode_batch
    params, peak = compute._need_flops()
    if compute.gpu.mem_bandwidth_gbps <= 0:
        raise InvalidInput(f"GPU {compute.gpu.name!r} has no mem_bandwidth_gbps for the decode estimate; "
                             "give --decode-tps")
    weights = params * _WEIGHT_BYTES_PER_PARAM / compute.decode_batch
    kv_avg = compute.model.kv_bytes_per_token * (m + n / 2)
    memory_s = (weights + kv_avg) / (compute.gpu.mem_bandwidth_gbps * 1e9 * compute.mbu)
    compute_s = 2.0 * params / (peak * compute.mfu)
    return n * max(memory_s, compute_s)


def load_seconds(tier: TierOffer, stored_bytes: float) -> float:
    """Seconds to fetch ``stored_bytes`` from ``tier`` into the GPU: latency + size / bandwidth."""
    size = _tokens("stored_bytes", stored_bytes)
    return tier.latency_s + size / (tier.bandwidth_gbps * 1e9)
