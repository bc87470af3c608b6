"""The streaming controller (kdn.client.streaming): level choice against throughput traces and deadlines, the
per-node throughput estimate, and storing at two levels / retrieving with a plan through a real cluster."""

from __future__ import annotations

import pytest
import torch

from kdn.client.streaming import ChunkOption, MultiLevelClient, ThroughputEstimator, choose_levels
from kdn.errors import InvalidRequest
from kdn.format.keys import ChunkSpan

LEVELS = ["raw", "cachegen-high", "cachegen-default", "cachegen-compact"]
RATIO = {"raw": 1.0, "cachegen-high": 3.5, "cachegen-default": 6.0, "cachegen-compact": 10.0}
RAW = 1_000_000  # raw KV bytes per chunk
TOKENS = 100  # tokens per chunk
NO_DECODE: dict[str, float] = {}


def options(n: int, levels=LEVELS, node: str = "a", start: int = 0) -> list[ChunkOption]:
    return [ChunkOption(ChunkSpan(i, start + i * TOKENS, start + (i + 1) * TOKENS), RAW,
                        {lv: int(RAW / RATIO[lv]) for lv in levels}, dict.fromkeys(levels, node))
            for i in range(n)]


def plan(opts, mbps: float | dict, tokens_per_s: float, decode=NO_DECODE, **kw):
    rates = mbps if isinstance(mbps, dict) else {"a": mbps}
    return choose_levels(opts, LEVELS, prefill_tokens_per_s=tokens_per_s, throughput=lambda n: rates[n] * 1e6,
                         decode_rates=decode, **kw)


def test_least_compressed_level_that_fits_the_deadline():
    # 4 chunks of 100 tokens at 1,000 tokens/s: the deadline is 0.4 s. At 100 MB/s raw takes 0.04 s: raw.
    opts = options(4)
    assert plan(opts, 100, 1000) == ["raw"] * 4
    # 5 MB/s: raw 0.8 s and high 0.229 s for the 4 chunks: high (the least compressed that fits 0.4 s); the slack
    # left before the last chunk (0.4 - 0.171 s) pays for it at raw (0.2 s).
    assert plan(opts, 5, 1000) == ["cachegen-high"] * 3 + ["raw"]
    # 2 MB/s: high 0.571 s misses; default 0.333 s fits (and the slack buys high for the last chunk).
    assert plan(opts, 2, 1000) == ["cachegen-default"] * 3 + ["cachegen-high"]
    # 1.1 MB/s: default 0.606 s misses; compact 0.364 s fits.
    assert plan(opts, 1.1, 1000) == ["cachegen-compact"] * 4
    # "speed" takes the fastest level whatever the slack.
    assert plan(opts, 100, 1000, objective="speed") == ["cachegen-compact"] * 4


def test_decode_time_counts():
    # A link fast enough for raw, but compressed levels decode at 10 MB/s (a CPU): raw is the only level that fits.
    opts = options(4)
    slow_decode = {"raw": 1e12, **dict.fromkeys(LEVELS[1:], 10e6)}
    assert plan(opts, 20, 1000, decode=slow_decode) == ["raw"] * 4
    # On a 2 MB/s link nothing fits (compact: 0.05 s transfer + 0.1 s decode per chunk > 0.1 s of prefill).
    assert plan(opts, 2, 1000, decode=slow_decode) == [None] * 4


def test_recompute_when_even_the_smallest_level_misses():
    opts = options(3)
    # 0.5 MB/s: compact takes 0.2 s per chunk against 0.1 s of prefill per chunk: recompute everything.
    assert plan(opts, 0.5, 1000) == [None] * 3
    # Chunks of a slow node after those of a fast one: load the fast ones, recompute from the first slow one on.
    mixed = options(2, node="fast") + options(2, node="slow", start=2 * TOKENS)
    assert plan(mixed, {"fast": 100, "slow": 0.5}, 1000) == ["raw", "raw", None, None]
    # A chunk stored at no level ends the plan too.
    gap = options(2) + [ChunkOption(ChunkSpan(2, 200, 300), RAW, {}, {})] + options(1, start=300)
    assert plan(gap, 100, 1000) == ["raw", "raw", None, None]


def test_replan_uses_the_time_already_spent():
    opts = options(4)
    assert plan(opts, 5, 1000)[0] == "cachegen-high"
    # Half the chunks loaded in 0.3 s of the 0.4 s: the rest goes more compact; after 0.35 s, compact.
    rest = opts[2:]
    assert plan(rest, 5, 1000, elapsed_s=0.3, done_tokens=200) == ["cachegen-default", "cachegen-high"]
    assert plan(rest, 5, 1000, elapsed_s=0.35, done_tokens=200) == ["cachegen-compact"] * 2
    # Already past the deadline: the time spent is sunk; loading the rest still beats prefilling it.
    assert plan(rest, 5, 1000, elapsed_s=0.5, done_tokens=200) == ["cachegen-compact"] * 2


def test_levels_a_chunk_lacks_are_skipped_and_no_deadline_means_best_quality():
    opts = options(2, levels=["cachegen-default", "cachegen-compact"])
    assert plan(opts, 100, 1000) == ["cachegen-default"] * 2
    assert plan(opts, 100, 0) == ["cachegen-default"] * 2  # no prefill rate: no deadline
    with pytest.raises(InvalidRequest):
        plan(opts, 100, 1000, objective="fastest")


def test_estimator_follows_a_slowdown_and_the_plan_follows_it():
    est = ThroughputEstimator(prior_bytes_per_s=100e6, alpha=0.5)
    assert est.estimate("a") == 100e6 and est.samples("a") == 0
    opts = options(4)

    def chosen():
        return choose_levels(opts, LEVELS, prefill_tokens_per_s=1000, throughput=est.estimate, decode_rates={})

    assert chosen() == ["raw"] * 4
    trace = [(1_000_000, 0.01)] * 3 + [(1_000_000, 2.0)] * 10  # 100 MB/s, then the link drops to 0.5 MB/s
    seen = []
    for nbytes, seconds in trace:
        est.observe("a", nbytes, seconds)
        seen.append(chosen()[0])
    assert seen[:3] == ["raw"] * 3
    assert "raw" not in seen[6:], "four slow transfers move the plan off raw"
    compressed = [LEVELS.index(lv) if lv else len(LEVELS) for lv in seen[3:]]
    assert compressed == sorted(compressed), "levels only get more compact while the link stays slow"
    assert seen[-1] is None, "at 0.5 MB/s even compact misses: recompute"
    assert est.estimate("a") < 2e6
    assert est.estimate("b") == 100e6, "other nodes keep the prior"
    est.observe("a", 0, 1.0)  # empty transfers carry no information
    assert est.samples("a") == len(trace)
    for _ in range(8):
        est.observe("a", 1_000_000, 0.01)
    assert chosen() == ["raw"] * 4, "and recovers when the link does"
    with pytest.raises(InvalidRequest):
        ThroughputEstimator(0)
    with pytest.raises(InvalidRequest):
        ThroughputEstimator(1e6, alpha=0)


CHUNK = 16


def kv_for(layout, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(layout.shape(n), generator=g).to(torch.bfloat16)


def test_store_at_two_levels_and_retrieve_with_a_plan(cluster, layout, tmp_path):
    from codec.profile import build_profile

    tokens = list(range(500, 500 + 6 * CHUNK))
    kv = kv_for(layout, len(tokens))
    profile = tmp_path / "tiny.profile"
    build_profile([kv_for(layout, 128, seed=1).float()], model_id=layout.model_id, chunk_tokens=CHUNK).save(profile)
    levels = ["raw", "cachegen-compact"]
    with MultiLevelClient(layout, levels=levels, controller=cluster.address, chunk_size=CHUNK,
                          codec_profile=str(profile), shared_memory=False, stream_wave_chunks=2) as client:
        # raw holds only the first 4 chunks, compact all 6.
        stored = client.store(tokens, kv, levels=["cachegen-compact"])
        assert stored["cachegen-compact"].result(60).stored == 6
        assert client.store(tokens[:4 * CHUNK], kv[:, :, :4 * CHUNK])["raw"].result(60).stored == 4
        opts = client.options(tokens)
        assert [o.span.end for o in opts] == [CHUNK * (i + 1) for i in range(6)]
        assert [sorted(o.sizes) for o in opts] == [sorted(levels)] * 4 + [["cachegen-compact"]] * 2
        assert all(o.sizes["cachegen-compact"] < o.sizes["raw"] / 2 for o in opts[:4]), "sizes from the controller"

        # No deadline: the least-compressed stored level of each chunk; the raw prefix is bit-identical.
        got = client.retrieve(tokens)
        assert got.levels == ["raw"] * 4 + ["cachegen-compact"] * 2 and got.num_tokens == len(tokens)
        assert got.waves == 3 and got.recompute_tokens == 0
        assert torch.equal(got.kv[:, :, :4 * CHUNK], kv[:, :, :4 * CHUNK])
        exact = kv[:, :, 4 * CHUNK:].float()
        tail = (got.kv[:, :, 4 * CHUNK:].float() - exact).norm() / exact.norm()
        assert 0 < tail < 0.6, f"compact is lossy but close (relative error {tail:.3f})"
        assert got.bytes == sum(o.sizes[lv] for o, lv in zip(opts, got.levels))
        assert client.estimator.samples(opts[0].nodes["raw"]) >= 1, "transfers feed the estimate"

        # A fixed level: every chunk there (the baseline the bench compares with).
        fixed = client.retrieve(tokens, level="cachegen-compact")
        assert fixed.levels == ["cachegen-compact"] * 6
        assert torch.equal(fixed.kv[:, :, 4 * CHUNK:], got.kv[:, :, 4 * CHUNK:])
        assert client.retrieve(tokens, level="raw").num_tokens == 4 * CHUNK

        # A deadline raw cannot meet (raw "decodes" at 1 byte/s here) but compact can (100 tokens/s of prefill:
        # 0.16 s per chunk, against about a millisecond to fetch a 1 KiB compact chunk): compact everywhere.
        client.config.prefill_tokens_per_s = 100.0
        rates = client.decode_rates_for("cpu")
        rates.update({"raw": 1.0, "cachegen-compact": 1e15})
        assert client.retrieve(tokens).levels == ["cachegen-compact"] * 6
        # A deadline nothing meets: everything is left to the engine's prefill.
        rates["cachegen-compact"] = 1.0
        none = client.retrieve(tokens)
        assert (none.num_tokens, none.kv, none.recompute_tokens) == (0, None, len(tokens))
        assert none.plans == [[None] * 6]

        # A prompt that diverges after 2 chunks loads only those; an unknown level is a clear error.
        assert client.retrieve(tokens[:2 * CHUNK] + [1] * 40, level="raw").num_tokens == 2 * CHUNK
        with pytest.raises(InvalidRequest):
            client.retrieve(tokens, level="lz4")


def test_calibrate_measures_decode_rates(layout):
    with MultiLevelClient(layout, levels=["raw", "lz4"], controller="", chunk_size=CHUNK) as client:
        rates = client.calibrate("cpu")
        assert set(rates) >= {"raw", "lz4"} and all(rates[lv] > 0 for lv in ("raw", "lz4"))
        assert client.options(list(range(64))) == [], "no controller: a miss"
    with pytest.raises(InvalidRequest):
        MultiLevelClient(layout, levels=["raw", "raw"], controller="")
