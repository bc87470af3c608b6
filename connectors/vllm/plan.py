"""Scheduler-side bookkeeping of the vLLM connector: which tokens each request loads from and stores into KDN.

Pure Python over plain values (no vLLM import), so it is tested without an engine. All counts are
block-aligned: KDN chunks hold whole vLLM blocks (``chunk_size % block_size == 0``), loads cover whole chunks and
always leave at least one prompt token for the engine to compute (it needs logits), and only whole chunks of
the prompt are stored.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

__all__ = ["LoadSpec", "SaveSpec", "StepPlan", "SchedulerPlanner", "BlockIds"]

#: A request's block ids: one list (one KV cache group) or one list per group (vLLM's hybrid allocator).
BlockIds = Sequence[int] | Sequence[Sequence[int]]

log = logging.getLogger(__name__)


@dataclass
class LoadSpec:
    """Load tokens ``[start, end)`` of ``token_ids`` (the prefix to look up) into the request's blocks."""

    req_id: str
    token_ids: list[int]
    block_ids: list[int]
    start: int
    end: int
    group_block_ids: list[list[int]] = field(default_factory=list)
    """Every KV cache group's block ids for tokens ``[0, end)`` when there are several groups (``block_ids`` is
    group 0's); a sliding-window group's blocks before its window are vLLM's null block."""
    background: bool = False
    """An asynchronous load (vLLM's ``load_kv_async``): the request waits outside the forward until the worker
    reports it finished or failed (``failed_recving``); no layer waits for it."""


@dataclass
class SaveSpec:
    """Store the KV of ``token_ids`` (whole chunks), read from the request's first blocks."""

    req_id: str
    token_ids: list[int]
    block_ids: list[int]
    group_block_ids: list[list[int]] = field(default_factory=list)
    """As :attr:`LoadSpec.group_block_ids`, for tokens ``[0, len(token_ids))``."""


@dataclass
class StepPlan:
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)


@dataclass
class _Request:
    prompt: list[int]
    blocks: list[list[int]] = field(default_factory=list)
    """Block ids per KV cache group."""
    load: bool = True
    store: bool = True
    local: int = 0
    """Tokens vLLM had computed locally (its own prefix cache) when KDN was asked."""
    hit: int = 0
    """End of the prefix KDN supplies (0: none)."""
    pending_load: bool = False
    saved: bool = False
    load_failed: bool = False
    """An asynchronous load of this request failed: it is not loaded from KDN again (vLLM recomputes it)."""
    load_blocks: list[list[int]] = field(default_factory=list)
    """Blocks of this request's KDN load per group (to map reported load failures back to tokens)."""


class SchedulerPlanner:
    """Turns vLLM scheduler callbacks into per-step :class:`StepPlan`s.

    ``lookup(tokens) -> hit_tokens`` is the KDN lookup (whole chunks only). ``num_groups`` is the number of KV
    cache groups (several with vLLM's hybrid allocator: block ids then come as one list per group, and specs carry
    :attr:`LoadSpec.group_block_ids`). ``async_loads``: loads are asynchronous (see :attr:`LoadSpec.background`;
    the connector uses them with several groups, where vLLM 0.32 takes load failures only per request). Not
    thread-safe: vLLM's scheduler calls it from one thread.
    """

    def __init__(self, lookup: Callable[[list[int]], int], *, block_size: int, chunk_size: int,
                 load: bool = True, store: bool = True, on_event: Callable[[dict], None] | None = None,
                 num_groups: int = 1, async_loads: bool = False) -> None:
        if num_groups < 1:
            raise ValueError(f"num_groups must be >= 1, got {num_groups}")
        self.lookup = lookup
        self.block_size = block_size
        self.chunk_size = chunk_size
        self.num_groups = num_groups
        self.async_loads = async_loads
        self._queued: list[LoadSpec] = []
        self.load = load
        self.store = store
        self.on_event = on_event or (lambda event: None)
        self.requests: dict[str, _Request] = {}

    def _groups(self, block_ids: BlockIds | None) -> list[list[int]]:
        """``block_ids`` as one list per group (a flat list is the single group's)."""
        if not block_ids:
            return [[] for _ in range(self.num_groups)]
        first = block_ids[0]
        groups = [list(g) for g in block_ids] if isinstance(first, (list, tuple)) else [list(block_ids)]
        if len(groups) != self.num_groups:
            raise ValueError(f"block ids for {len(groups)} KV cache groups, the planner has {self.num_groups}")
        return groups

    def _spec_groups(self, groups: list[list[int]], nblocks: int) -> tuple[list[int], list[list[int]]]:
        cut = [g[:nblocks] for g in groups]
        return cut[0], (cut if self.num_groups > 1 else [])

    def _flags(self, params: dict | None) -> tuple[bool, bool]:
        params = params or {}
        return bool(params.get("kdn_load", self.load)), bool(params.get("kdn_store", self.store))

    def num_new_matched_tokens(self, req_id: str, prompt: list[int] | None, num_computed: int,
                               params: dict | None = None) -> int:
        """Tokens beyond ``num_computed`` that KDN can supply (a multiple of the chunk size, or 0)."""
        if not prompt:
            return 0
        load, store = self._flags(params)
        state = self.requests.get(req_id)
        if state is None or state.prompt != list(prompt):
            state = self.requests[req_id] = _Request(list(prompt))
        state.load, state.store, state.local, state.hit = load, store, num_computed, 0
        usable = (len(prompt) - 1) // self.chunk_size * self.chunk_size  # leave >= 1 token to compute
        if not load or state.load_failed or usable <= num_computed:
            return 0
        try:
            hit = self.lookup(list(prompt[:usable]))
        except Exception as exc:  # noqa: BLE001 - a lookup failure is a miss, never an engine error
            log.warning("KDN lookup failed for %s: %s", req_id, exc)
            hit = 0
        hit = min(hit, usable) // self.chunk_size * self.chunk_size
        self.on_event({"event": "lookup", "req": req_id, "prompt_tokens": len(prompt), "local_tokens": num_computed,
                       "hit_tokens": hit, "load_tokens": max(0, hit - num_computed)})
        if hit <= num_computed:
            return 0
        state.hit = hit
        return hit - num_computed

    def after_alloc(self, req_id: str, num_external_tokens: int, block_ids: BlockIds | None = None) -> None:
        """vLLM allocated the request's blocks (``block_ids``: all of them, needed for asynchronous loads)."""
        state = self.requests.get(req_id)
        if state is not None:
            state.pending_load = num_external_tokens > 0 and state.hit > 0
            if num_external_tokens <= 0:
                state.hit = 0
            if state.pending_load and self.async_loads:  # planned now: the request is not scheduled until loaded
                state.pending_load = False
                state.blocks = self._groups(block_ids)
                self._queued.append(self._load_spec(req_id, state, background=True))

    def _load_spec(self, req_id: str, state: _Request, *, background: bool = False) -> LoadSpec:
        start = state.local // self.block_size * self.block_size
        blocks, groups = self._spec_groups(state.blocks, state.hit // self.block_size)
        state.load_blocks = groups or [blocks]
        return LoadSpec(req_id, state.prompt[:state.hit], blocks, start, state.hit, groups, background)

    def build(self, new_reqs: Iterable[tuple[str, list[int] | None, list[int], int]],
              cached_reqs: Iterable[tuple[str, list[int] | None, bool, int]],
              num_scheduled: dict[str, int]) -> StepPlan:
        """One step's plan.

        ``new_reqs``: ``(req_id, prompt, block_ids, num_computed)``; ``cached_reqs``: ``(req_id, new_block_ids,
        resumed, num_computed)`` (a resumed request's ``new_block_ids`` is its whole list); block ids are one list
        or one list per KV cache group;
        ``num_scheduled``: tokens each request computes this step.
        """
        plan = StepPlan(loads=self._queued)
        self._queued = []
        touched: list[tuple[str, int]] = []
        for req_id, prompt, block_ids, computed in new_reqs:
            state = self.requests.get(req_id)
            if state is None:
                state = self.requests[req_id] = _Request(list(prompt or []), load=False, store=self._flags(None)[1])
            state.blocks = self._groups(block_ids)
            if state.pending_load:
                state.pending_load = False
                plan.loads.append(self._load_spec(req_id, state))
            touched.append((req_id, computed))
        for req_id, new_blocks, resumed, computed in cached_reqs:
            state = self.requests.get(req_id)
            if state is None:
                continue
            if resumed:
                state.blocks = self._groups(new_blocks)
                state.saved = False
            elif new_blocks:
                for blocks, new in zip(state.blocks, self._groups(new_blocks)):
                    blocks.extend(new)
            touched.append((req_id, computed))
        for req_id, computed in touched:
            state = self.requests[req_id]
            done = computed + num_scheduled.get(req_id, 0)
            if state.saved or not state.store or not state.prompt or done < len(state.prompt):
                continue
            state.saved = True
            end = len(state.prompt) // self.chunk_size * self.chunk_size
            if end <= state.hit or end == 0:
                continue  # every whole chunk came from KDN
            nblocks = end // self.block_size
            have = min(len(g) for g in state.blocks)
            if have < nblocks:
                log.warning("request %s has %d blocks, %d needed to store; skipped", req_id, have, nblocks)
                continue
            plan.saves.append(SaveSpec(req_id, state.prompt[:end], *self._spec_groups(state.blocks, nblocks)))
        return plan

    def load_failed(self, block_ids: set[int]) -> list[str]:
        """The workers could not load ``block_ids`` (vLLM recomputes them): a request whose load lost blocks
        counts as hit only up to its first lost block, so the freshly computed KV is stored again. Returns the
        affected request ids."""
        affected = []
        for req_id, state in self.requests.items():
            lost = [i for g in state.load_blocks for i, b in enumerate(g) if b in block_ids]
            if not lost:
                continue
            state.hit = min(state.hit, min(lost) * self.block_size) // self.chunk_size * self.chunk_size
            state.saved = False
            state.load_blocks = []
            affected.append(req_id)
            self.on_event({"event": "load_failed", "req": req_id, "valid_tokens": state.hit})
        return affected

    def loads_failed(self, req_ids: Iterable[str]) -> list[str]:
        """Asynchronous loads of ``req_ids`` failed (vLLM recomputes those requests from token 0): they are not
        loaded from KDN again, and their freshly computed chunks are stored. Returns the affected request ids."""
        affected = []
        for req_id in req_ids:
            state = self.requests.get(req_id)
            if state is None:
                continue
            state.hit, state.saved, state.load_blocks, state.load_failed = 0, False, [], True
            affected.append(req_id)
            self.on_event({"event": "load_failed", "req": req_id, "valid_tokens": 0})
        return affected

    def finished(self, req_id: str) -> None:
        self.requests.pop(req_id, None)
