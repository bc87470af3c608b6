"""Which tokens to recompute: KV deviation scores and the per-layer selection schedule (CacheBlend §4.3).

Layer 0's K/V depend only on token embeddings and positions, so they never deviate from a full prefill; the first
layer where deviation shows is layer 1. *Single selection* (the reference code) picks the top ``ratio`` of context
tokens once, at layer 1. *Gradual filtering* (the paper) keeps a larger share ``start_ratio`` (2r) at layer 1 and
narrows linearly to ``ratio`` over the next ``steps - 1`` layers (by layer 3), ranked by K+V deviation (``kv``).
*kdn* (the default) is gradual filtering tuned on SmolLM2 RAG prompts: a wide first set (at least 60 % of the
context) narrowed over 16 layers, ranked by key *and* value deviation weighted by the attention the query tokens pay
to each token at that layer (``kv-attn``), plus each chunk's first token (an attention sink when the chunk is
computed alone) recomputed through every layer (:data:`DEFAULT_SINK`). Layer-1 deviation alone predicts poorly
which tokens matter (on those prompts selecting by it is worse than naive reuse); a deviating token the query does
not look at barely changes the answer, while one it looks at changes it a lot (see ``docs/blend.md``).

*lookahead* first runs a cheap *preview*: only the query tokens go through every layer on top of the reused (stale)
chunk KV, recording how much attention they pay to each context token per layer; the real blend then selects early
by that preview attention (aggregated over the preview's layers, :func:`preview_weight`), alone or times the
deviation (see ``docs/blend.md``).

Scores: ``value`` (the reference code), ``key``, ``kv`` (both, each normalized by its mean), and ``*-attn``: the
same times the query tokens' mean attention weight on the token (recomputed keys, softmax over the context).
With a preview (``lookahead``): ``look`` (the preview attention alone; no deviation needed, so it may select before
the layer is computed, even at layer 0) and ``*-look``: any of the above times the preview attention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kdn.errors import InvalidRequest

__all__ = ["METHODS", "SCORES", "DEFAULT_SCORE", "DEFAULT_SINK", "Schedule", "schedule", "deviation", "top_tokens",
           "preview_weight"]

METHODS = ("kdn", "gradual", "single", "lookahead")
SCORES = ("value", "key", "kv", "value-attn", "key-attn", "kv-attn", "look", "value-look", "key-look", "kv-look",
          "value-attn-look", "key-attn-look", "kv-attn-look")
#: The deviation score of each method when none is given.
DEFAULT_SCORE = {"kdn": "kv-attn", "gradual": "kv", "single": "value", "lookahead": "kv-look"}
#: Tokens at the start of every chunk recomputed through every layer, on top of the ratio, per method.
DEFAULT_SINK = {"kdn": 1, "lookahead": 1}


@dataclass(frozen=True)
class Schedule:
    """Selection layers and the share of context tokens kept after each."""

    ratios: dict[int, float]
    """``layer -> fraction of context tokens still recomputed after that layer's selection``."""
    first_layer: int

    def keep(self, layer: int, num_context: int) -> int | None:
        """How many context tokens to keep after ``layer`` (None when ``layer`` selects nothing)."""
        r = self.ratios.get(layer)
        return None if r is None else min(num_context, math.ceil(r * num_context - 1e-9))


def schedule(num_layers: int, ratio: float, method: str = "kdn", *, first_layer: int | None = None,
             start_ratio: float | None = None, steps: int | None = None) -> Schedule:
    """The selection schedule for a model of ``num_layers`` layers.

    ``gradual`` (the paper's gradual filtering): ``start_ratio`` (default ``min(1, 2 * ratio)``) at ``first_layer``,
    linearly down to ``ratio`` at ``first_layer + steps - 1`` (``steps`` default 3: layers 1-3), by K+V deviation.
    ``kdn``: the same with defaults ``start_ratio = max(0.6, 2 * ratio)`` and ``steps = 16``. ``single``:
    ``ratio`` at ``first_layer`` only. ``lookahead``: the
    same with defaults ``first_layer = 0``, ``start_ratio = 0.4`` and ``steps = 4``. ``first_layer`` (default 1)
    must be >= 1 (selecting at layer 0 by deviation is selecting at random), except for ``lookahead``, whose
    preview ranks tokens before layer 0.
    """
    if not 0.0 <= ratio <= 1.0:
        raise InvalidRequest(f"ratio must be in [0, 1], got {ratio}")
    if method not in METHODS:
        raise InvalidRequest(f"unknown blend method {method!r}; use one of {', '.join(METHODS)}")
    lowest = 0 if method == "lookahead" else 1  # the preview ranks tokens before any layer has run
    if first_layer is None:
        first_layer = lowest
    if not lowest <= first_layer < num_layers:
        raise InvalidRequest(f"first_layer must be in [{lowest}, {num_layers - 1}], got {first_layer}")
    if steps is None:
        steps = {"kdn": 16, "gradual": 3}.get(method, 4)
    if method == "single" or steps <= 1:
        return Schedule({first_layer: ratio}, first_layer)
    if start_ratio is None:
        start_ratio = {"kdn": max(0.6, 2.0 * ratio), "lookahead": 0.4}.get(method, 2.0 * ratio)
    start = max(ratio, min(1.0, start_ratio))
    last = min(num_layers - 1, first_layer + steps - 1)
    n = last - first_layer
    ratios = {first_layer + i: start + (ratio - start) * (i / n if n else 1.0) for i in range(n + 1)}
    return Schedule(ratios, first_layer)


def deviation(new_k: torch.Tensor, new_v: torch.Tensor, old_k: torch.Tensor, old_v: torch.Tensor,
              score: str = "value") -> torch.Tensor:
    """Per-token squared deviation ``[tokens]`` (float32) between recomputed and reused K/V ``[tokens, heads, dim]``.

    ``value`` (the reference code's rule), ``key``, or ``kv`` (both, each normalized by its mean so neither
    dominates by scale).
    """
    if score not in SCORES[:3]:
        raise InvalidRequest(f"unknown deviation score {score!r}; use one of {', '.join(SCORES[:3])}")
    dv = (new_v.float() - old_v.float()).pow(2).sum(dim=(-2, -1)) if score != "key" else None
    dk = (new_k.float() - old_k.float()).pow(2).sum(dim=(-2, -1)) if score != "value" else None
    if dk is None:
        return dv
    if dv is None:
        return dk
    return dv / dv.mean().clamp_min(1e-12) + dk / dk.mean().clamp_min(1e-12)


def top_tokens(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Local indices of the ``k`` highest scores, in ascending index order (an empty tensor when ``k <= 0``)."""
    if k <= 0:
        return torch.empty(0, dtype=torch.long, device=scores.device)
    if k >= scores.shape[0]:
        return torch.arange(scores.shape[0], device=scores.device)
    return torch.topk(scores, k, sorted=False).indices.sort().values


def preview_weight(look: torch.Tensor, layer: int = 0, *, reduce: str = "mean") -> torch.Tensor:
    """Per-context-token weight ``[N]`` from the preview's attention ``look [layers, N]``: the ``reduce`` (``mean``
    or ``max``) over layers ``layer`` and deeper."""
    part = look[min(layer, look.shape[0] - 1):]
    return part.amax(0) if reduce == "max" else part.mean(0)
