"""The vLLM connector in a real vLLM engine (the CPU build, in ``.venv-engines``) with a real KDN cluster.

Two engine starts share one KDN controller and node:

1. engine 1 (vLLM's own prefix cache on, KDN loads off) prefills P = a prefix of whole chunks + one token and
   stores P's chunks into KDN; then it serves A (= the prefix + suffix A) and B (= the prefix + suffix B), both of
   which reuse exactly P's prefix blocks from vLLM's own cache: the reference outputs;
2. engine 2 (a restart, vLLM's prefix cache off: every reuse goes through the connector) serves B and then A:
   both load the prefix from KDN (hit tokens reported, bytes moved, vLLM reports the tokens as cached so it
   computes only the rest) and must generate exactly the reference greedy tokens.

Both engines compute the same suffix tokens over the same prefix KV bytes (those of P's prefill), so the outputs
must be bit-identical: any byte KDN got wrong, or any block it put in the wrong place, shows. (A full prefill is
not a valid reference: its attention splits the work differently, and bf16 rounding then flips near-ties of the
greedy choice on some CPUs.)
"""

from __future__ import annotations

import json

import pytest

from tests.cluster import Cluster
from tests.connectors._engine_models import engines_missing, run_vllm, smollm2_folder

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

CHUNK = 256
PREFIX_TOKENS = 4 * CHUNK  # whole chunks, a multiple of vLLM's block size


@pytest.fixture(scope="module")
def engine_env(tmp_path_factory):
    reason = engines_missing("vllm")
    if reason:
        pytest.skip(reason)
    try:
        model = smollm2_folder()
    except (FileNotFoundError, ImportError) as exc:
        pytest.skip(f"real model unavailable: {exc}")
    root = tmp_path_factory.mktemp("vllm-engine")
    cluster = Cluster(root)
    cluster.start_controller()
    cluster.start_node("node-a")
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
        text = " ".join(f"Item {i} of the ledger records a payment of {i * 7 % 97} dollars." for i in range(400))
    prefix = tok(text)["input_ids"][:PREFIX_TOKENS]
    p = prefix + tok(" Note")["input_ids"][:1]
    a = prefix + tok(" In summary, the main point of this speech is")["input_ids"]
    b = prefix + tok(" The next topic the president discussed was")["input_ids"]
    assert a[PREFIX_TOKENS] != b[PREFIX_TOKENS] != p[PREFIX_TOKENS] != a[PREFIX_TOKENS]
    return p, a, b


def events(path, role=None, event=None) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    return [r for r in rows if (role is None or r["role"] == role) and (event is None or r["event"] == event)]


def test_prefix_loaded_from_kdn_after_restart_gives_identical_greedy_output(engine_env):
    model, cluster, root = engine_env
    p, a, b = prompts(model)
    stats = root / "stats.jsonl"
    kv = {"kv_connector": "KDNConnector", "kv_connector_module_path": "connectors.vllm.connector",
          "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
          "kv_connector_extra_config": {"client": {"controller": cluster.address, "tenant": "vllm-test",
                                                   "chunk_size": CHUNK}, "stats_path": str(stats)}}
    expected_hit = (len(a) - 1) // CHUNK * CHUNK  # whole chunks of the shared prefix
    assert expected_hit == PREFIX_TOKENS == (len(b) - 1) // CHUNK * CHUNK == len(p) // CHUNK * CHUNK

    first = run_vllm({"model": str(model), "kv_transfer_config": kv, "enable_prefix_caching": True, "requests": [
        {"name": "p", "prompt_token_ids": p, "max_tokens": 1, "kv_transfer_params": {"kdn_load": False},
         "wait_events": {"path": str(stats), "event": "store", "count": 1}},
        {"name": "a", "prompt_token_ids": a, "max_tokens": 24,
         "kv_transfer_params": {"kdn_load": False, "kdn_store": False}},
        {"name": "b", "prompt_token_ids": b, "max_tokens": 24,
         "kv_transfer_params": {"kdn_load": False, "kdn_store": False}}]}, root, "engine1")
    ref_p, ref_a, ref_b = first["results"]
    assert ref_p["events_arrived"] and ref_p["num_cached_tokens"] == 0
    # The references reuse exactly P's prefix blocks (vLLM's own cache), the split engine 2 gets from KDN.
    assert ref_a["num_cached_tokens"] == expected_hit and ref_b["num_cached_tokens"] == expected_hit
    assert events(stats, "worker", "load") == []
    stored = events(stats, "worker", "store")
    assert [(s["stored"], s["failed"], s["tokens"]) for s in stored] == [(len(p) // CHUNK, 0, len(p) // CHUNK * CHUNK)]

    second = run_vllm({"model": str(model), "kv_transfer_config": kv, "requests": [
        {"name": "b", "prompt_token_ids": b, "max_tokens": 24},
        {"name": "a", "prompt_token_ids": a, "max_tokens": 24}]}, root, "engine2")
    got_b, got_a = second["results"]
    lookups = events(stats, "scheduler", "lookup")
    loads = events(stats, "worker", "load")
    assert len(lookups) >= 2 and all(x["hit_tokens"] == expected_hit for x in lookups)
    assert [x["tokens"] for x in loads] == [expected_hit, expected_hit]
    assert all(x["bytes"] > 0 and x["chunks"] == expected_hit // CHUNK for x in loads)
    # vLLM counts the loaded tokens as cached: it computed only the rest of each prompt.
    assert got_b["num_cached_tokens"] == expected_hit and got_a["num_cached_tokens"] == expected_hit
    assert got_b["token_ids"] == ref_b["token_ids"], (got_b["text"], ref_b["text"])
    assert got_a["token_ids"] == ref_a["token_ids"], (got_a["text"], ref_a["text"])
    print(f"\nprefill+1 token: engine1 A {ref_a['seconds']:.2f}s B {ref_b['seconds']:.2f}s; "
          f"engine2 (KDN) B {got_b['seconds']:.2f}s A {got_a['seconds']:.2f}s; loads {loads}")
