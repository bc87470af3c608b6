"""Prometheus metrics of KDN processes: one registry per process, one HTTP endpoint."""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

__all__ = ["NodeMetrics", "ControllerMetrics", "ClientMetrics", "serve_metrics"]

log = logging.getLogger(__name__)


def serve_metrics(registry: CollectorRegistry, host: str, port: int):
    """Serve ``/metrics`` on ``host:port`` (0 picks a free port, negative disables); returns (server, port)."""
    if port < 0:
        return None, -1
    server, _thread = start_http_server(port, addr=host, registry=registry)
    bound = server.server_port
    log.info("metrics on http://%s:%d/metrics", host, bound)
    return server, bound


class NodeMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter("kdn_node_requests", "Data-plane requests", ["op", "transport"], registry=registry)
        self.objects = Counter("kdn_node_objects", "Objects handled", ["op", "result"], registry=registry)
        self.bytes = Counter("kdn_node_bytes", "Object bytes moved", ["direction"], registry=registry)
        self.corrupt = Counter("kdn_node_corrupt_objects", "Objects rejected or dropped as corrupt",
                               registry=registry)
        self.tier_used = Gauge("kdn_node_tier_used_bytes", "Bytes held per tier", ["tier"], registry=registry)
        self.tier_capacity = Gauge("kdn_node_tier_capacity_bytes", "Capacity per tier", ["tier"], registry=registry)
        self.controller_up = Gauge("kdn_node_controller_connected", "1 while the controller answers",
                                   registry=registry)


class ControllerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.lookups = Counter("kdn_controller_lookups", "Lookup calls", registry=registry)
        self.lookup_keys = Counter("kdn_controller_lookup_keys", "Keys looked up", ["result"], registry=registry)
        self.nodes = Gauge("kdn_controller_nodes", "Registered nodes", ["state"], registry=registry)
        self.index_keys = Gauge("kdn_controller_index_keys", "Keys in the global index", registry=registry)
        self.lookup_seconds = Histogram("kdn_controller_lookup_seconds", "Lookup call latency in the controller",
                                        buckets=(1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1),
                                        registry=registry)
        self.placement_actions = Counter("kdn_controller_placement_actions", "Placement pass actions on objects",
                                         ["action"], registry=registry)
        self.evicted_keys = Counter("kdn_controller_evicted_keys", "Keys evicted everywhere by Evict calls",
                                    registry=registry)
        self.drain_copies = Counter("kdn_controller_drain_copies", "Copies ordered off draining nodes",
                                    registry=registry)


class ClientMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        registry = registry or CollectorRegistry()
        self.registry = registry
        self.hit_tokens = Counter("kdn_client_hit_tokens", "Tokens served from KDN", registry=registry)
        self.lookup_tokens = Counter("kdn_client_lookup_tokens", "Tokens looked up", registry=registry)
        self.fetch_seconds = Histogram("kdn_client_fetch_seconds", "Retrieve latency", registry=registry)
        self.store_dropped = Counter("kdn_client_store_dropped", "Store jobs dropped (queue full or error)",
                                     registry=registry)
        self.stored_chunks = Counter("kdn_client_stored_chunks", "Chunks stored", registry=registry)
        self.fallbacks = Counter("kdn_client_fallbacks", "Chunks treated as a miss after an error", ["reason"],
                                 registry=registry)
