"""CacheBlend for KDN: reuse content-keyed chunk KV at any position with selective recompute.

:func:`rerotate` / :func:`shift_kv` move stored keys to new positions; :func:`blend` runs the selective-recompute
forward (the ``kdn`` rule by default, the paper's gradual filtering or the reference's single selection);
:func:`choose_ratio` picks the recompute ratio from load and prefill times; :func:`connectors.hf.warm.warm` (and
``kdnctl warm``) stores a corpus's chunks. The Hugging Face call is :func:`connectors.hf.blend.blend_generate`.
See ``docs/blend.md``.
"""

from kdn.blend.blend import BlendResult, blend, concat_chunks
from kdn.blend.ratio import MIN_RATIO, choose_ratio, load_seconds, prefill_seconds
from kdn.blend.rope import rerotate, rope_inv_freq, shift_kv
from kdn.blend.select import METHODS, SCORES, Schedule, deviation, schedule, top_tokens

__all__ = ["BlendResult", "blend", "concat_chunks", "rerotate", "rope_inv_freq", "shift_kv", "METHODS", "SCORES",
           "Schedule", "deviation", "schedule", "top_tokens", "MIN_RATIO", "choose_ratio", "load_seconds",
           "prefill_seconds"]
