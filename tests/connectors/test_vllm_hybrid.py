"""The vLLM connector on a hybrid model (Gemma 3 270M: 15 sliding-window layers, W = 512, and 3 full-attention
layers) in the real vLLM CPU engine with its hybrid KV cache allocator on, through a real KDN controller and node.

vLLM gives the model six KV cache groups (one full-attention, five sliding-window, each with its own block table)
and frees a sliding group's blocks once they fall out of the window; the connector declares ``SupportsHMA`` and
stores full-attention layers per chunk and sliding layers only as the window before the prompt's last whole-chunk
boundary (``kdn.client.hybrid.HybridClient``).

As in ``test_vllm_engine.py``: engine 1 (vLLM's own prefix cache on, KDN loads off) prefills P = a 2,048-token
prefix + one token, stores it, and serves A and B (the prefix + different suffixes), which reuse P's prefix blocks
from vLLM's own cache: the references. Engine 2 (a restart, vLLM's prefix cache off) serves B and A, loading the
prefix from KDN, and must generate exactly the reference greedy tokens: both compute the suffixes over the same
prefix KV bytes (a full prefill is no valid reference: its attention splits the work differently and bf16
rounding flips near-ties). The bytes the node holds after the store are measured against a full-layer store.
"""

from __future__ import annotations

import json

import pytest

from tests.cluster import Cluster
from tests.connectors._engine_models import engines_missing, gemma3_folder, run_vllm

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

CHUNK = 256
W = 512
PREFIX_TOKENS = 8 * CHUNK  # 2,048 tokens: four windows long, so the sliding layers' savings show


@pytest.fixture(scope="module")
def engine_env(tmp_path_factory):
    reason = engines_missing("vllm")
    if reason:
        pytest.skip(reason)
    try:
        model = gemma3_folder()
    except (FileNotFoundError, ImportError) as exc:
        pytest.skip(f"real model unavailable: {exc}")
    root = tmp_path_factory.mktemp("vllm-hybrid")
    cluster = Cluster(root)
    cluster.start_controller()
    cluster.start_node("node-a", tiers="[{kind: memory, capacity: 1GiB}]")
    cluster.wait_nodes(1)
    yield model, cluster, root
    cluster.close()


def prompts(model) -> tuple[list[int], list[int], list[int]]:
    from transformers import AutoTokenizer

    from tests.models import sotu_text

    tok = AutoTokenizer.from_pretrained(model)
    try:
        text = sotu_text(100)
    except FileNotFoundError:
        text = " ".join(f"Item {i} of the ledger records a payment of {i * 7 % 97} dollars." for i in range(900))
    prefix = tok(text)["input_ids"][:PREFIX_TOKENS]
    assert len(prefix) == PREFIX_TOKENS
    p = prefix + tok(" Note", add_special_tokens=False)["input_ids"][:1]
    a = prefix + tok(" In summary, the main point of this speech is", add_special_tokens=False)["input_ids"]
    b = prefix + tok(" The next topic the president discussed was", add_special_tokens=False)["input_ids"]
    assert a[PREFIX_TOKENS] != b[PREFIX_TOKENS] != p[PREFIX_TOKENS] != a[PREFIX_TOKENS]
    return p, a, b


def events(path, role=None, event=None) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    return [r for r in rows if (role is None or r["role"] == role) and (event is None or r["event"] == event)]


def node_bytes(cluster: Cluster) -> int:
    """Bytes the node holds, all tiers (its own account)."""
    from kdn.client.transport import NodeClient

    total = 0
    for node in cluster.nodes:
        with NodeClient(node.ready["node"], tenant="vllm-hybrid", transport="grpc") as nc:
            total += sum(t.used_bytes for t in nc.stats().node.tiers)
    return total


def test_hybrid_prefix_loaded_from_kdn_gives_identical_greedy_output_and_stores_windows_only(engine_env):
    model, cluster, root = engine_env
    p, a, b = prompts(model)
    stats = root / "stats.jsonl"
    kv = {"kv_connector": "KDNConnector", "kv_connector_module_path": "connectors.vllm.connector",
          "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
          "kv_connector_extra_config": {"client": {"controller": cluster.address, "tenant": "vllm-hybrid",
                                                   "chunk_size": CHUNK, "codec": "raw"},
                                        "stats_path": str(stats)}}
    engine = {"model": str(model), "kv_transfer_config": kv, "max_model_len": 4096}
    expected_hit = PREFIX_TOKENS
    assert expected_hit == (len(a) - 1) // CHUNK * CHUNK == (len(b) - 1) // CHUNK * CHUNK == len(p) // CHUNK * CHUNK

    before = node_bytes(cluster)
    first = run_vllm({**engine, "enable_prefix_caching": True, "requests": [
        {"name": "p", "prompt_token_ids": p, "max_tokens": 1, "kv_transfer_params": {"kdn_load": False},
         "wait_events": {"path": str(stats), "event": "store", "count": 1}},
        {"name": "a", "prompt_token_ids": a, "max_tokens": 24,
         "kv_transfer_params": {"kdn_load": False, "kdn_store": False}},
        {"name": "b", "prompt_token_ids": b, "max_tokens": 24,
         "kv_transfer_params": {"kdn_load": False, "kdn_store": False}}]}, root, "engine1")
    log1 = (root / "engine1.log").read_text(errors="replace")
    assert "kv cache group sizes (128, 128, 128, 128, 128, 128)" in log1  # the hybrid allocator was on: 6 groups
    ref_p, ref_a, ref_b = first["results"]
    assert ref_p["events_arrived"] and ref_p["num_cached_tokens"] == 0
    assert ref_a["num_cached_tokens"] == expected_hit and ref_b["num_cached_tokens"] == expected_hit
    stored = events(stats, "worker", "store")
    assert [(s["stored"], s["failed"], s["tokens"]) for s in stored] == [(PREFIX_TOKENS // CHUNK, 0, PREFIX_TOKENS)]
    assert stored[0]["windows"] == [PREFIX_TOKENS]  # the sliding layers' window before the last chunk boundary

    # Bytes on the node: 3 full layers x 2,048 tokens + 15 sliding layers x the 512-token window (+ headers),
    # against 18 layers x 2,048 tokens for a full-layer store (bf16, 1 KV head x 256 dims, K and V).
    held = node_bytes(cluster) - before
    per_layer_token = 2 * 1 * 256 * 2
    full_layer_store = 18 * PREFIX_TOKENS * per_layer_token
    arithmetic = (3 * PREFIX_TOKENS + 15 * W) / (18 * PREFIX_TOKENS)  # 0.375
    ratio = held / full_layer_store
    assert ratio < 0.45 and abs(ratio - arithmetic) < 0.02, (held, ratio, arithmetic)

    second = run_vllm({**engine, "requests": [
        {"name": "b", "prompt_token_ids": b, "max_tokens": 24},
        {"name": "a", "prompt_token_ids": a, "max_tokens": 24}]}, root, "engine2")
    got_b, got_a = second["results"]
    lookups = events(stats, "scheduler", "lookup")
    loads = events(stats, "worker", "load")
    assert len(lookups) >= 2 and all(x["hit_tokens"] == expected_hit for x in lookups)
    assert [x["tokens"] for x in loads] == [expected_hit, expected_hit]
    # Each load moved the full layers' chunks and one window: well below a full-layer prefix.
    assert all(0 < x["bytes"] < 0.45 * full_layer_store for x in loads), loads
    assert got_b["num_cached_tokens"] == expected_hit and got_a["num_cached_tokens"] == expected_hit
    assert got_b["token_ids"] == ref_b["token_ids"], (got_b["text"], ref_b["text"])
    assert got_a["token_ids"] == ref_a["token_ids"], (got_a["text"], ref_a["text"])
    print(f"\nstored {held} B ({ratio:.1%} of a full-layer store); engine1 A {ref_a['seconds']:.2f}s "
          f"B {ref_b['seconds']:.2f}s; engine2 (KDN) B {got_b['seconds']:.2f}s A {got_a['seconds']:.2f}s; "
          f"loads {loads}")
