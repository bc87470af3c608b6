"""Running KDN servers in this process: controller, node or both (the embedded default), with metrics,
a machine-readable ready line on stdout, and graceful shutdown on SIGINT/SIGTERM.

Safe defaults (docs/security.md): without ``auth.tokens`` every caller is admin, so open mode binds loopback only;
a non-loopback bind without tokens refuses to start unless ``--insecure`` (``auth.insecure: true``) is given, and
then a warning is logged every minute for as long as it runs."""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time

from prometheus_client import CollectorRegistry

from kdn.config import KDNConfig
from kdn.errors import ConfigError
from kdn.metrics import serve_metrics
from kdn.wire.auth import is_loopback

__all__ = ["run_servers", "check_safe_bind", "InsecureWarning"]

log = logging.getLogger(__name__)

INSECURE_WARNING_INTERVAL_S = 60.0


def check_safe_bind(config: KDNConfig, *, controller: bool, node: bool) -> bool:
    """Refuse (``ConfigError``) to serve without tokens on a non-loopback address unless ``auth.insecure``;
    returns whether this process runs insecurely (open mode reachable from other hosts)."""
    hosts = ([config.controller.host] if controller else []) + ([config.node.host] if node else [])
    exposed = sorted({h for h in hosts if not is_loopback(h)})
    if not exposed:
        return False
    if config.auth.tokens:
        if not config.tls.cert:
            log.warning("serving on %s without TLS: bearer tokens and KV bytes cross the network in plaintext "
                        "(set tls.cert/tls.key/tls.ca; `kdnctl gen-secrets DIR` writes them)", ", ".join(exposed))
        return False
    if not config.auth.insecure:
        raise ConfigError(f"refusing to serve on {', '.join(exposed)} without auth tokens: every caller would be "
                          "admin of every tenant. Set auth.tokens_file (`kdnctl gen-secrets DIR` writes one), bind "
                          "127.0.0.1, or pass --insecure (auth.insecure: true) to run open anyway")
    return True


class InsecureWarning:
    """Logs the open-mode warning now and then every ``interval_s`` (call :meth:`tick` periodically)."""

    def __init__(self, interval_s: float = INSECURE_WARNING_INTERVAL_S, clock=time.monotonic) -> None:
        self.interval_s = interval_s
        self.clock = clock
        self.last = -float("inf")
        self.count = 0

    def tick(self) -> bool:
        now = self.clock()
        if now - self.last < self.interval_s:
            return False
        self.last = now
        self.count += 1
        log.warning("INSECURE: serving without auth tokens on a non-loopback address (--insecure): anyone who can "
                    "reach these ports is admin of every tenant")
        return True


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
    insecure = InsecureWarning() if check_safe_bind(config, controller=controller, node=node) else None
    try:
        if insecure is not None:
            insecure.tick()
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
            if insecure is not None:
                insecure.tick()
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
