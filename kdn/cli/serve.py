"""Running KDN servers in this process: controller, node or both (the embedded default), with metrics,
a machine-readable ready line on stdout, and graceful shutdown on SIGINT/SIGTERM."""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading

from prometheus_client import CollectorRegistry

from kdn.config import KDNConfig
from kdn.metrics import serve_metrics

__all__ = ["run_servers"]

log = logging.getLogger(__name__)


def run_servers(config: KDNConfig, *, controller: bool, node: bool, stop_event: threading.Event | None = None) -> int:
    """Start the requested servers, print one JSON ready line, block until a signal (or ``stop_event``)."""
    from kdn.controller.servicer import Controller
    from kdn.node.servicer import StorageNode

    registry = CollectorRegistry()
    stop_event = stop_event or threading.Event()
    ctl = nd = None
    metrics_server = None
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop_event.set())
    try:
        if controller:
            ctl = Controller(config, registry).start()
            if node:
                config.node.controller = f"127.0.0.1:{ctl.port}" if config.controller.host in (
                    "0.0.0.0", "::", "") else ctl.address
        if node:
            nd = StorageNode(config, registry).start()
        host = config.node.host if node else config.controller.host
        metrics_server, metrics_port = serve_metrics(registry, host, config.metrics_port)
        ready = {"event": "ready", "controller": ctl.address if ctl else None,
                 "node": nd.address if nd else None, "bulk": nd.bulk_address if nd else None,
                 "node_id": nd.node_id if nd else None, "metrics": metrics_port, "data_dir": config.data_dir}
        print(json.dumps(ready), flush=True)
        while not stop_event.wait(0.5):
            pass
        log.info("shutting down")
        return 0
    finally:
        if nd is not None:
            nd.stop()
        if ctl is not None:
            ctl.stop()
        if metrics_server is not None:
            metrics_server.shutdown()
        sys.stdout.flush()
