"""SGLang HiCache pages <-> KDN chunk objects: page formats, keys, and keyed object I/O (no SGLang import).

A *flat page* is what SGLang's host pool hands a storage backend (``get_data_page(index, flat=True)``): the KV of
``page_size`` tokens for every layer, flattened in the pool's layout order:

=====================  ==========================================  (``L`` layers, ``P`` page tokens, ``H`` heads)
host pool layout        flat page order
=====================  ==========================================
``layer_first``         ``[2, L, P, H, D]``
``page_first``          ``[2, P, L, H, D]``
``page_first_direct``   ``[2, 1, L, P, H, D]``
``page_head``           ``[2, 1, H, P, L, D]``
=====================  ==========================================

Each page becomes one KDN chunk object in KDN's ``[L, 2, P, H, D]`` convention (so every KDN codec applies),
stored under a key derived from SGLang's page hash. That hash chains all tokens of the sequence up to the page
end (``sha256(prior_hash || page tokens)``), so the key is a *prefix* key in KDN's terms: the KV is only valid
at that position. It is scoped by tenant and layout fingerprint like every KDN key, and every read is verified
(checksums, key, fingerprint, codec) before it reaches SGLang's host memory.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence

import torch

from kdn import DIGEST_BYTES, ChunkKey, KeyKind
from kdn.client import KDNClient
from kdn.errors import KDNError

__all__ = ["PAGE_ORDERS", "flat_to_kv", "kv_to_flat", "page_key", "PageStore"]

log = logging.getLogger(__name__)

#: Flat page order per host pool layout, as dimension names; ``1`` is a unit page axis.
PAGE_ORDERS: dict[str, tuple[str, ...]] = {
    "layer_first": ("kv", "L", "P", "H", "D"),
    "page_first": ("kv", "P", "L", "H", "D"),
    "page_first_direct": ("kv", "1", "L", "P", "H", "D"),
    "page_head": ("kv", "1", "H", "P", "L", "D"),
}
_KDN_ORDER = ("L", "kv", "P", "H", "D")


def _dims(order: tuple[str, ...], L: int, P: int, H: int, D: int) -> list[int]:  # noqa: N803
    sizes = {"kv": 2, "1": 1, "L": L, "P": P, "H": H, "D": D}
    return [sizes[name] for name in order]


def flat_to_kv(page: torch.Tensor, layout: str, L: int, P: int, H: int, D: int) -> torch.Tensor:  # noqa: N803
    """A flat page in host-pool ``layout`` order -> contiguous ``[L, 2, P, H, D]``."""
    order = PAGE_ORDERS[layout]
    named = [n for n in order if n != "1"]
    view = page.reshape(_dims(order, L, P, H, D)).reshape(_dims(tuple(named), L, P, H, D))
    return view.permute(*[named.index(n) for n in _KDN_ORDER]).contiguous()


def kv_to_flat(kv: torch.Tensor, layout: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """``[L, 2, P, H, D]`` -> a flat page in host-pool ``layout`` order (written into ``out`` if given)."""
    order = [n for n in PAGE_ORDERS[layout] if n != "1"]
    flat = kv.permute(*[_KDN_ORDER.index(n) for n in order]).contiguous().flatten()
    if out is None:
        return flat
    out.copy_(flat.to(out.dtype))
    return out


def page_key(sglang_hash: str, tenant: str, fingerprint: bytes, codec: str) -> ChunkKey:
    """The KDN key of the page SGLang names ``sglang_hash`` (tenant- and layout-scoped, like every KDN key)."""
    h = hashlib.blake2b(digest_size=DIGEST_BYTES, person=b"kdn-sglang-v1")
    h.update(tenant.encode() + b"\0" + fingerprint + b"\0" + sglang_hash.encode())
    return ChunkKey(tenant, fingerprint, codec, KeyKind.PREFIX, h.digest())


class PageStore:
    """Batch put/get/exists of whole-page chunk objects by key, over one :class:`KDNClient`'s keyed methods.

    ``KDNClient`` addresses prompts by token prefixes; SGLang names pages by its own hashes, so pages go through
    ``locate``/``get_chunks``/``put_chunks``. Remote failures never raise: they read as misses.
    """

    def __init__(self, client: KDNClient) -> None:
        self.client = client

    def leading_hits(self, keys: Sequence[ChunkKey]) -> int:
        """How many of ``keys``, from the first, are stored."""
        try:
            found = self.client.locate(keys, prefix=True, probe=True)
        except KDNError as exc:
            log.warning("KDN exists failed: %s", exc)
            return 0
        return next((i for i, nodes in enumerate(found) if not nodes), len(keys))

    def get(self, keys: Sequence[ChunkKey]) -> list[torch.Tensor | None]:
        """Fetch, verify and decode each page (``[L, 2, P, H, D]``), ``None`` where missing or damaged."""
        return self.client.get_chunks(keys)

    def put(self, keys: Sequence[ChunkKey], pages: Sequence[torch.Tensor]) -> list[bool]:
        """Store pages (``[L, 2, P, H, D]`` each) not already stored; True per page that is stored afterwards."""
        return self.client.put_chunks([(key, page, 0) for key, page in zip(keys, pages)])
