"""Per-tenant quotas (``auth.quotas``) against a real controller and node: pins, bytes per tier, request rate.
Limits are RESOURCE_EXHAUSTED (``CapacityError``) or a refused put/move with a clear message; other tenants and
admins are not affected."""

from __future__ import annotations

from contextlib import closing

import pytest
import torch

from kdn.client.control import ControlClient
from kdn.client.transport import NodeClient
from kdn.errors import CapacityError
from kdn.format.chunk_codec import encode_chunk
from kdn.format.keys import prefix_keys
from kdn.format.layout import KVLayout
from kdn.node.quota import TierQuotas
from tests.cluster import Cluster

CHUNK = 16
LAYOUT = KVLayout("kdn-test/quota", num_layers=2, num_kv_heads=2, head_dim=16, dtype="bfloat16")
TOKENS = {"admin-secret": "@admin", "node-secret": "@node", "acme-secret": "acme", "globex-secret": "globex",
          "ratey-secret": "ratey"}


def _objects(tenant: str, n: int) -> list[tuple[str, bytes]]:
    tokens = list(range(n * CHUNK))
    kv = torch.randn(LAYOUT.shape(n * CHUNK), generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    out = []
    for span, key in prefix_keys(tokens, tenant, LAYOUT.fingerprint(), "raw", CHUNK):
        data = encode_chunk(kv[:, :, span.start:span.end], key=str(key), layout=LAYOUT, codec="raw", start=span.start)
        out.append((str(key), bytes(data)))
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    size = len(_objects("acme", 1)[0][1])
    quotas = (f"{{acme: {{pins: 2, bytes: {{memory: {int(2.5 * size)}, disk: {4 * size}}}}}, "
              "ratey: {requests_per_s: 1}}")
    yaml_tokens = "{" + ", ".join(f"'{k}': '{v}'" for k, v in TOKENS.items()) + "}"
    c = Cluster(tmp_path_factory.mktemp("quota"), common=["--set", f"auth.tokens={yaml_tokens}",
                                                          "--set", f"auth.quotas={quotas}"],
                admin_token="admin-secret")
    c.start_controller()
    node = c.start_node("node-a", tiers="[{kind: memory, capacity: 64MiB}, {kind: disk, capacity: 64MiB}]",
                        extra=["--set", "node.token=node-secret", "--set", "node.write_policy=write-back"])
    c.wait_nodes(1)
    yield {"cluster": c, "node": node.ready["node"], "size": size}
    c.close()


def test_byte_quota_sends_puts_down_the_tiers_then_refuses(world):
    items = _objects("acme", 6)
    with NodeClient(world["node"], token="acme-secret", transport="grpc") as acme:
        stored = [ok for ok, _ in acme.put_many_detailed(items)]
        # 2 fit the memory quota (2.5 objects), 4 the disk quota; nothing beyond
        assert stored == [True] * 6
        tiers = acme.contains_many([k for k, _ in items])
        assert tiers == ["memory"] * 2 + ["disk"] * 4
        more = _objects("acme", 7)[6:]
        ok, text = acme.put_many_detailed(more)[0]
        assert not ok and "quota" in text and "acme" in text
        # moving a disk object into the full memory tier is refused, for the tenant and for the controller (admin)
        assert acme.move_many([items[2][0]], "memory") == [False]
    with NodeClient(world["node"], token="admin-secret", transport="grpc") as admin:
        assert admin.move_many([items[3][0]], "memory") == [False]
        # after freeing memory, the move goes through
        assert admin.delete_many([items[0][0]]) == [True]
        assert admin.move_many([items[3][0]], "memory") == [True]
    with NodeClient(world["node"], token="globex-secret", transport="grpc") as globex:
        assert all(ok for ok, _ in globex.put_many_detailed(_objects("globex", 6)))  # no quota for globex


def test_pin_quota(world):
    keys = [k for k, _ in _objects("acme", 4)]
    with closing(ControlClient(world["cluster"].address, token="acme-secret")) as acme:
        assert acme.call("Pin", keys=keys[:2]).changed == 2
        assert acme.call("Pin", keys=keys[:2]).changed == 0  # already pinned: no new pins
        with pytest.raises(CapacityError, match="at most 2"):
            acme.call("Pin", keys=keys[2:3])
        assert acme.call("Unpin", keys=keys[:1]).changed == 1
        assert acme.call("Pin", keys=keys[2:3]).changed == 1
    with closing(ControlClient(world["cluster"].address, token="admin-secret")) as admin:
        assert admin.call("Pin", keys=keys[3:4]).changed == 1  # operators are not limited


def test_request_rate(world):
    """1 request/s: a burst of 20 calls is cut off (each call is far quicker than a second); others unaffected."""
    outcomes = []
    with closing(ControlClient(world["cluster"].address, token="ratey-secret")) as ratey:
        for _ in range(20):
            try:
                ratey.call("Lookup", keys=["ratey/x"])
                outcomes.append(True)
            except CapacityError as exc:
                assert "request rate" in str(exc)
                outcomes.append(False)
    assert outcomes[0] and not all(outcomes)
    with NodeClient(world["node"], token="ratey-secret", transport="grpc") as node:
        with pytest.raises(CapacityError):
            for _ in range(20):
                node.get_many(["ratey/x"])
    with closing(ControlClient(world["cluster"].address, token="globex-secret")) as globex:
        for _ in range(20):
            globex.call("Lookup", keys=["globex/x"])


def test_tier_quotas_account_events():
    """The node-side accounting follows adds, rewrites and removals."""
    from kdn.config import TenantQuota

    q = TierQuotas({"acme": TenantQuota(bytes={"memory": 100})})
    chain = [["memory", "disk"], ["disk"]]
    assert q.reserve_put("acme/a", 60, chain) == (0, ["memory"])
    q.changed([("acme/a", "memory", 60), ("acme/a", "disk", 60)], [])
    q.release("acme/a", 60, ["memory"])
    assert q.used("acme", "memory") == 60
    assert q.reserve_put("acme/b", 60, chain) == (1, [])  # memory full: to disk (unlimited)
    assert q.reserve_put("acme/a", 90, chain) == (0, ["memory"])  # a rewrite replaces its own bytes
    q.release("acme/a", 90, ["memory"])
    q.changed([], [("acme/a", "memory")])
    assert q.used("acme", "memory") == 0 and q.room_for_move("acme/a", "memory")
    assert q.reserve_put("globex/a", 10**9, chain) == (0, [])  # no quota for globex
