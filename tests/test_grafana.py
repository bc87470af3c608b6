"""deploy/grafana/kdn-dashboard.json queries only series that KDN's processes really export.

The series names and label names come from the metric classes of :mod:`kdn.metrics` registered on fresh
registries (what the controller, the nodes and the client register), never from a list kept here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import CollectorRegistry

from kdn.metrics import ClientMetrics, ControllerMetrics, NodeMetrics

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "kdn-dashboard.json"
# Sample-name suffixes prometheus_client exposes per metric type.
SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count", "_created"),
            "summary": ("", "_sum", "_count", "_created"), "info": ("_info",)}
TARGET_LABELS = {"instance", "job"}  # added by Prometheus to every scraped series
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset"}
IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def exported_series() -> dict[str, set[str]]:
    """Exposed sample name -> label names allowed in its selector."""
    registry = CollectorRegistry()
    NodeMetrics(registry)
    ControllerMetrics(registry)
    ClientMetrics(registry)
    out: dict[str, set[str]] = {}
    for name, collector in registry._names_to_collectors.items():
        labels = set(getattr(collector, "_labelnames", ()))
        kind = getattr(collector, "_type", "")
        base = name
        for suffix in SUFFIXES.get(kind, ()):
            if suffix and base.endswith(suffix):
                base = base[: -len(suffix)]
        for suffix in SUFFIXES.get(kind, ("",)):
            out[base + suffix] = labels | TARGET_LABELS | ({"le"} if suffix == "_bucket" else set())
    return out


def series_in(expr: str) -> list[tuple[str, set[str]]]:
    """``(series name, label names matched)`` of every selector in a PromQL expression."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    found = []
    for m in re.finditer(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*\{([^}]*)\}", expr):
        found.append((m.group(1), set(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)", m.group(2)))))
    bare = re.sub(r"\{[^}]*\}", " ", expr)
    bare = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", bare)
    bare = re.sub(r"\[[^\]]*\]", " ", bare)  # range selectors ([5m], [$__rate_interval])
    bare = re.sub(r"(?<![A-Za-z0-9_:])\d+(?:\.\d+)?(?:[eE][-+]?\d+)?", " ", bare)  # numbers (1e-9)
    for m in IDENT.finditer(bare):
        word = m.group(0)
        if bare[m.end():].lstrip().startswith("(") or word in KEYWORDS:
            continue  # a function call or an operator keyword
        if word not in {name for name, _ in found}:
            found.append((word, set()))
    return found


def _exprs() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"]))
    return out


def test_every_query_uses_only_exported_series_and_labels():
    exported = exported_series()
    exprs = _exprs()
    assert len(exprs) >= 10
    for title, expr in exprs:
        used = series_in(expr)
        assert used, (title, expr)
        for name, labels in used:
            assert name in exported, f"{title}: {name!r} is not exported by KDN ({expr})"
            assert labels <= exported[name], f"{title}: {name} has no label(s) {labels - exported[name]}"


def test_the_dashboard_covers_hit_rate_tiers_latency_and_evictions():
    text = " ".join(expr for _, expr in _exprs())
    assert 'kdn_controller_lookup_keys_total{result="hit"}' in text  # hit rate
    assert "kdn_node_tier_used_bytes" in text and "kdn_node_tier_capacity_bytes" in text  # bytes per tier
    assert "histogram_quantile" in text and "kdn_controller_lookup_seconds_bucket" in text  # latency histograms
    assert "kdn_controller_placement_actions_total" in text  # evictions (by action)


def test_the_checker_rejects_unknown_series_and_labels():
    exported = exported_series()
    assert "kdn_node_requests_total" in exported and "kdn_node_requests" not in exported
    used = dict(series_in('sum by (tier) (rate(kdn_nope_total{tier="x"}[5m])) / kdn_node_tier_used_bytes > 1e-9'))
    assert set(used) == {"kdn_nope_total", "kdn_node_tier_used_bytes"}
    assert used["kdn_nope_total"] == {"tier"}
    assert {"tier"} <= exported["kdn_node_tier_used_bytes"] and "tier" not in exported["kdn_controller_lookups_total"]
