"""The committed gRPC stubs in kdn/v1 must match proto/ (regenerate with scripts/gen_proto.sh)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_committed_stubs_are_fresh(tmp_path):
    subprocess.run(["bash", str(REPO / "scripts" / "gen_proto.sh"), str(tmp_path)], check=True,
                   env={**os.environ, "PYTHON": sys.executable}, cwd=REPO)
    generated = sorted(p.relative_to(tmp_path) for p in (tmp_path / "kdn" / "v1").glob("*.py*"))
    assert generated, "protoc produced nothing"
    for rel in generated:
        committed = REPO / rel
        assert committed.exists(), f"{rel} is not committed; run scripts/gen_proto.sh"
        assert committed.read_bytes() == (tmp_path / rel).read_bytes(), f"{rel} is stale; run scripts/gen_proto.sh"


def test_every_rpc_is_served():
    from kdn.controller.servicer import ControlServicer
    from kdn.node.servicer import DataServicer
    from kdn.v1 import control_pb2, data_pb2

    for module, servicer in ((control_pb2, ControlServicer), (data_pb2, DataServicer)):
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                assert method.name in vars(servicer), f"{service.name}.{method.name} has no implementation"
