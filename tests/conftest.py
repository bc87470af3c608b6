"""Shared fixtures: real KDN clusters (controller + nodes as subprocesses) and small layouts."""

from __future__ import annotations

import pytest

from kdn.layout import KVLayout
from tests.cluster import Cluster

LAYOUT = KVLayout("kdn-test/tiny-llama", num_layers=4, num_kv_heads=2, head_dim=16, dtype="bfloat16")


@pytest.fixture
def layout() -> KVLayout:
    return LAYOUT


@pytest.fixture
def cluster(tmp_path):
    """A controller and two memory-tier nodes."""
    c = Cluster(tmp_path)
    c.start_controller()
    c.start_node("node-a")
    c.start_node("node-b")
    c.wait_nodes(2)
    yield c
    c.close()
