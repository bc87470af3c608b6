"""Roles and tenant isolation over every RPC of both gRPC planes (enumerated from the proto descriptors, so a new
RPC fails here until it is classified), the bulk channel and shared memory, with real tokens of two tenants, a
storage node's token and an admin token against a real controller and node.

- no or a wrong token: UNAUTHENTICATED, everywhere;
- a node token: only RegisterNode / Heartbeat / ReportInventory (of its own node id); everything else is
  PERMISSION_DENIED, data included;
- a tenant token: no node or operator RPC (PERMISSION_DENIED); on another tenant's keys every call answers exactly
  as for an absent key and changes nothing;
- admin: every call.
"""

from __future__ import annotations

import json

import grpc
import pytest
import torch
from google.protobuf.json_format import MessageToDict

from kdn.client import KDNClient
from kdn.client.transport import NodeClient
from kdn.errors import AuthError
from kdn.format.layout import KVLayout
from kdn.v1 import common_pb2, control_pb2, data_pb2
from kdn.wire.auth import call_metadata, token_digest
from kdn.wire.rpc import make_channel
from tests.cluster import Cluster

CHUNK = 16
LAYOUT = KVLayout("kdn-test/roles", num_layers=2, num_kv_heads=2, head_dim=16, dtype="bfloat16")
TOKENS = {"admin-secret": "@admin", "node-a-secret": "@node:node-a", "acme-secret": "acme",
          token_digest("globex-secret"): "globex"}  # a digest entry: the servers never see globex's token
CALLERS = {"acme": "acme-secret", "node": "node-a-secret", "admin": "admin-secret", "none": "", "wrong": "nope"}
TIERS = "[{kind: memory, capacity: 64MiB}, {kind: disk, capacity: 64MiB}]"

# Who may make each call: "node" (storage nodes and admins), "data" (tenants, scoped to their keys, and admins),
# "admin" (operators only). Every RPC of both services must be listed.
POLICY = {
    ("Control", "RegisterNode"): "node", ("Control", "Heartbeat"): "node", ("Control", "ReportInventory"): "node",
    ("Control", "Lookup"): "data", ("Control", "Place"): "data", ("Control", "Evict"): "data",
    ("Control", "Pin"): "data", ("Control", "Unpin"): "data", ("Control", "Stats"): "data",
    ("Control", "ListNodes"): "data", ("Control", "ListKeys"): "data", ("Control", "Explain"): "data",
    ("Control", "PutProfile"): "admin", ("Control", "GetProfile"): "data",
    ("Control", "DrainNode"): "admin", ("Control", "RemoveNode"): "admin", ("Data", "Replicate"): "node",
    ("Data", "Put"): "data", ("Data", "Get"): "data", ("Data", "Contains"): "data", ("Data", "Delete"): "data",
    ("Data", "Stats"): "admin", ("Data", "Move"): "data", ("Data", "ReportBad"): "data",
}
ALLOWED = {"node": {"node", "admin"}, "data": {"acme", "admin"}, "admin": {"admin"}}
# Calls that name keys: for these a tenant's reply about another tenant's key must equal that for an absent one.
KEYED = [m for m, who in POLICY.items() if who == "data" and m[1] not in ("Stats", "ListNodes", "GetProfile")]
SERVICES = {"Control": control_pb2, "Data": data_pb2}


def _methods():
    for service, module in SERVICES.items():
        for method in module.DESCRIPTOR.services_by_name[service].methods:
            yield service, method


def kv_for(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(LAYOUT.shape(n), generator=g).to(torch.bfloat16)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A controller and node-a with tokens; acme and globex each store a 2-chunk prompt."""
    yaml_tokens = "{" + ", ".join(f"'{k}': '{v}'" for k, v in TOKENS.items()) + "}"
    c = Cluster(tmp_path_factory.mktemp("roles"), common=["--set", f"auth.tokens={yaml_tokens}"],
                admin_token="admin-secret")
    c.start_controller()
    node = c.start_node("node-a", tiers=TIERS, extra=["--set", "node.token=node-a-secret",
                                                      "--set", "node.write_policy=write-back"])
    c.wait_nodes(1)
    prompt = list(range(2 * CHUNK))
    out = {"cluster": c, "node": node.ready["node"], "bulk": node.ready["bulk"], "prompt": prompt}
    for tenant, token, seed in (("acme", "acme-secret", 1), ("globex", "globex-secret", 2)):
        kv = kv_for(len(prompt), seed)
        with KDNClient(LAYOUT, controller=c.address, chunk_size=CHUNK, tenant=tenant, token=token) as client:
            assert client.store(prompt, kv).result(30).stored == 2
            out[tenant] = {"keys": [str(k) for _, k in client.keys(prompt)], "kv": kv}
            out[tenant]["absent"] = [str(k) for _, k in client.keys(list(range(500, 500 + 2 * CHUNK)))]
    yield out
    c.close()


def _call(world, service: str, method, request, token: str):
    """``("OK", reply)`` or ``(status code name, details)`` of one real call."""
    module = SERVICES[service]
    address = world["cluster"].address if service == "Control" else world["node"]
    path = f"/kdn.v1.{service}/{method.name}"
    req_cls, rep_cls = getattr(module, method.input_type.name), getattr(module, method.output_type.name)
    kw = {"request_serializer": req_cls.SerializeToString, "response_deserializer": rep_cls.FromString}
    md = call_metadata(token)
    with make_channel(address) as channel:
        try:
            if method.client_streaming:
                reply = channel.stream_unary(path, **kw)(iter(request), timeout=10, metadata=md)
            elif method.server_streaming:
                reply = list(channel.unary_stream(path, **kw)(request, timeout=10, metadata=md))
            else:
                reply = channel.unary_unary(path, **kw)(request, timeout=10, metadata=md)
        except grpc.RpcError as exc:
            return exc.code().name, exc.details()
    return "OK", reply


def _request(service: str, name: str, key: str):
    """A request for ``service.name`` about ``key``; node calls name node-a but fail validation after the
    role check (no address, epoch 0), so the matrix changes no registration."""
    c, d = control_pb2, data_pb2
    table = {
        ("Control", "RegisterNode"): lambda: c.RegisterNodeRequest(node=common_pb2.NodeInfo(node_id="node-a")),
        ("Control", "Heartbeat"): lambda: c.HeartbeatRequest(node_id="node-a", epoch=0),
        ("Control", "ReportInventory"): lambda: c.InventoryReport(node_id="node-a", epoch=0),
        ("Control", "Lookup"): lambda: c.LookupRequest(keys=[key]),
        ("Control", "Place"): lambda: c.PlaceRequest(keys=[key], sizes=[1000]),
        ("Control", "Evict"): lambda: c.EvictRequest(keys=[key]),
        ("Control", "Pin"): lambda: c.PinRequest(keys=[key]),
        ("Control", "Unpin"): lambda: c.PinRequest(keys=[key]),
        ("Control", "Stats"): lambda: c.ControllerStatsRequest(),
        ("Control", "ListNodes"): lambda: c.ListNodesRequest(),
        ("Control", "ListKeys"): lambda: c.ListKeysRequest(prefix=key),
        ("Control", "Explain"): lambda: c.ExplainRequest(keys=[key]),
        ("Control", "PutProfile"): lambda: c.PutProfileRequest(),
        ("Control", "GetProfile"): lambda: c.GetProfileRequest(fingerprint=LAYOUT.fingerprint()),
        ("Data", "Put"): lambda: [d.PutFrame(key=key, total_size=8, offset=0, data=b"notakdn!")],
        ("Data", "Replicate"): lambda: [d.PutFrame(key=key, total_size=8, offset=0, data=b"notakdn!")],
        ("Control", "DrainNode"): lambda: c.DrainNodeRequest(node_id="no-such-node"),
        ("Control", "RemoveNode"): lambda: c.RemoveNodeRequest(node_id="no-such-node"),
        ("Data", "Get"): lambda: d.GetRequest(keys=[key]),
        ("Data", "Contains"): lambda: d.KeysRequest(keys=[key]),
        ("Data", "Delete"): lambda: d.KeysRequest(keys=[key]),
        ("Data", "Stats"): lambda: d.NodeStatsRequest(),
        ("Data", "Move"): lambda: d.MoveRequest(keys=[key], tier="disk"),
        ("Data", "ReportBad"): lambda: d.KeysRequest(keys=[key]),
    }
    return table[(service, name)]()


def test_every_rpc_of_both_planes_has_a_policy():
    listed = {(service, m.name) for service, m in _methods()}
    assert listed == set(POLICY), f"classify new RPCs in POLICY: {sorted(listed ^ set(POLICY))}"


@pytest.mark.parametrize("caller", sorted(CALLERS))
def test_role_matrix(world, caller):
    """Every RPC x every caller: unauthenticated, denied or allowed exactly as the policy says."""
    token = CALLERS[caller]
    outcomes = {}
    for service, method in _methods():
        key = world["acme"]["absent"][0]  # allowed callers act on an absent key: the matrix destroys nothing
        code, _ = _call(world, service, method, _request(service, method.name, key), token)
        outcomes[(service, method.name)] = code
    for rpc, code in outcomes.items():
        if caller in ("none", "wrong"):
            assert code == "UNAUTHENTICATED", (rpc, code)
        elif caller in ALLOWED[POLICY[rpc]]:
            assert code not in ("UNAUTHENTICATED", "PERMISSION_DENIED"), (rpc, code)
        else:
            assert code == "PERMISSION_DENIED", (rpc, code)


def _normal(outcome, *keys: str) -> str:
    code, reply = outcome
    if code == "OK":
        reply = [MessageToDict(r) for r in reply] if isinstance(reply, list) else MessageToDict(reply)
    text = json.dumps([code, reply], sort_keys=True)
    for key in keys:
        text = text.replace(key, "KEY")
    return text


@pytest.mark.parametrize("rpc", KEYED, ids=[f"{s}.{m}" for s, m in KEYED])
def test_other_tenants_keys_look_absent_and_stay_untouched(world, rpc):
    service, name = rpc
    method = next(m for s, m in _methods() if (s, m.name) == rpc)
    present, absent = world["globex"]["keys"][0], world["globex"]["absent"][0]
    on_present = _call(world, service, method, _request(service, name, present), "acme-secret")
    on_absent = _call(world, service, method, _request(service, name, absent), "acme-secret")
    assert _normal(on_present, present) == _normal(on_absent, absent)
    # ...and changed nothing: globex still has every chunk, unpinned, in the tier it was stored in
    with NodeClient(world["node"], token="admin-secret", transport="grpc") as admin:
        assert admin.contains_many(world["globex"]["keys"]) == ["memory", "memory"]
    code, listed = _call(world, "Control", _method("Control", "ListKeys"),
                         control_pb2.ListKeysRequest(prefix="globex/"), "admin-secret")
    assert code == "OK" and sorted(k.key for k in listed.keys) == sorted(world["globex"]["keys"])
    assert not any(k.pinned for k in listed.keys)
    with KDNClient(LAYOUT, controller=world["cluster"].address, chunk_size=CHUNK, tenant="globex",
                   token="globex-secret") as globex:
        got = globex.retrieve(world["prompt"])
        assert got.num_tokens == len(world["prompt"]) and torch.equal(got.kv, world["globex"]["kv"])


def _method(service: str, name: str):
    return next(m for s, m in _methods() if (s, m.name) == (service, name))


def test_stats_and_list_nodes_are_tenant_scoped(world):
    admin_stats = _call(world, "Control", _method("Control", "Stats"), control_pb2.ControllerStatsRequest(),
                        "admin-secret")[1]
    acme_stats = _call(world, "Control", _method("Control", "Stats"), control_pb2.ControllerStatsRequest(),
                       "acme-secret")[1]
    listed = _call(world, "Control", _method("Control", "ListKeys"), control_pb2.ListKeysRequest(prefix="acme/"),
                   "admin-secret")[1]
    acme_bytes = sum(k.size for k in listed.keys)
    assert acme_stats.keys == 2 and acme_stats.bytes == acme_bytes
    assert admin_stats.keys >= 4 and admin_stats.bytes > acme_bytes
    nodes = _call(world, "Control", _method("Control", "ListNodes"), control_pb2.ListNodesRequest(),
                  "acme-secret")[1].nodes
    assert [n.node_id for n in nodes] == ["node-a"] and nodes[0].address == world["node"]
    assert nodes[0].objects == 2
    held = sum(loc.size for k in listed.keys for loc in k.locations)
    assert sum(t.used_bytes for t in nodes[0].tiers) == held
    all_nodes = _call(world, "Control", _method("Control", "ListNodes"), control_pb2.ListNodesRequest(),
                      "admin-secret")[1].nodes
    assert all_nodes[0].objects >= 4


def test_node_token_is_bound_to_its_node(world):
    other = control_pb2.RegisterNodeRequest(node=common_pb2.NodeInfo(node_id="node-b", address="127.0.0.1:1"))
    code, details = _call(world, "Control", _method("Control", "RegisterNode"), other, "node-a-secret")
    assert code == "PERMISSION_DENIED" and "node-a" in details


@pytest.mark.parametrize("shared_memory", [False, True], ids=["bulk", "shm"])
def test_bulk_channel_and_shared_memory_enforce_roles(world, shared_memory):
    present = world["globex"]["keys"]
    with NodeClient(world["node"], world["bulk"], token="node-a-secret", shared_memory=shared_memory) as node:
        with pytest.raises(AuthError):
            node.get_many(present)
    with NodeClient(world["node"], world["bulk"], tenant="globex", token="acme-secret",
                    shared_memory=shared_memory) as acme:
        assert acme.get_many(present) == [None, None]
        assert acme.get_many(world["acme"]["keys"])[0] is not None
        ok, text = acme.put_many_detailed([(present[0], b"x" * 64)])[0]
        assert not ok and "tenant" in text
    with NodeClient(world["node"], world["bulk"], tenant="globex", token="globex-secret",
                    shared_memory=shared_memory) as globex:
        assert all(b is not None for b in globex.get_many(present))
