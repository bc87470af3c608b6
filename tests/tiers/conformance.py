"""The one conformance suite that every tier passes (see ``kdn/node/tiers/base.py`` for the contract it checks).

Adding a backend is a small subclass in ``tests/tiers/test_<kind>.py``::

    from tests.tiers.conformance import TierConformance

    class TestRedisTier(TierConformance):
        @pytest.fixture(autouse=True)
        def _server(self, redis_server):          # autouse fixtures run before the suite's own fixtures
            self.url = redis_server.url

        def make_tier(self, capacity, tmp_path):  # required: a fresh, empty tier of `capacity` bytes
            return RedisTier(self.url, capacity=capacity, prefix=uuid.uuid4().hex)

        def corrupt(self, tier, key):             # optional: damage the stored bytes behind the tier's back
            ...

        def reopen(self, tier):                   # optional (durable tiers): close `tier`, return a new instance
            ...                                   # over the same storage

Tests needing a hook that a subclass does not define are skipped. Set ``lru_exact = False`` when the backend
evicts approximately (the capacity bound is still checked). Every tier made through the ``tiers`` fixture is
checked after the test (``used_bytes`` equals the sum of ``keys()`` sizes and stays within capacity) and closed.
"""

from __future__ import annotations

import hashlib
import random
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from kdn.format.chunk import build_object
from kdn.format.keys import ChunkKey, KeyKind
from kdn.node.tiers.base import Tier

__all__ = ["TierConformance", "make_key", "make_object", "object_size", "CAPACITY"]

FINGERPRINT = bytes(range(16))
PAYLOAD = 4000  # payload bytes of a standard test object
CAPACITY = 1 << 20


def make_key(i: int | str, tenant: str = "t0") -> str:
    digest = hashlib.blake2b(str(i).encode(), digest_size=20).digest()
    return str(ChunkKey(tenant, FINGERPRINT, "raw", KeyKind.PREFIX, digest))


def make_object(key: str, payload: int = PAYLOAD) -> bytes:
    """A valid chunk object whose bytes are a function of ``key`` (two sections of random bytes)."""
    rng = random.Random(key)
    half = payload // 2
    sections = [(0, 1, rng.randbytes(half)), (1, 2, rng.randbytes(payload - half))]
    return build_object(codec="raw", key=key, fingerprint=FINGERPRINT, num_tokens=16, start=0, num_layers=2,
                        sections=sections)


def object_size(payload: int = PAYLOAD) -> int:
    return len(make_object(make_key(0), payload))


class _Tiers:
    """Factory of tiers for one test; tracks them so they are checked and closed afterwards."""

    def __init__(self, suite: TierConformance, tmp_path: Path) -> None:
        self.suite, self.tmp_path, self.open = suite, tmp_path, []

    def __call__(self, capacity: int = CAPACITY) -> Tier:
        tier = self.suite.make_tier(capacity, self.tmp_path)
        self.open.append(tier)
        return tier

    def reopen(self, tier: Tier) -> Tier:
        self.open.remove(tier)
        new = self.suite.reopen(tier)
        self.open.append(new)
        return new

    def finish(self) -> None:
        for tier in self.open:
            assert tier.used_bytes == sum(size for _, size in tier.keys())
            assert tier.used_bytes <= tier.capacity_bytes
            tier.close()


class TierConformance:
    """Base class of every tier's test class (named ``Test<Backend>``); not collected by itself."""

    corrupt: Callable[[Tier, str], None] | None = None
    reopen: Callable[[Tier], Tier] | None = None
    lru_exact: bool = True

    def make_tier(self, capacity: int, tmp_path: Path) -> Tier:
        raise NotImplementedError

    @pytest.fixture
    def tiers(self, tmp_path):
        factory = _Tiers(self, tmp_path)
        yield factory
        factory.finish()

    @pytest.fixture
    def tier(self, tiers) -> Tier:
        return tiers()

    def _need(self, hook: str) -> None:
        if getattr(self, hook) is None:
            pytest.skip(f"backend defines no {hook}() hook")

    # -- round trips and batch semantics --
    def test_empty(self, tier):
        assert tier.used_bytes == 0 and tier.capacity_bytes == CAPACITY
        assert tier.put_many([]) == [] and tier.get_many([]) == []
        assert tier.contains_many([]) == [] and tier.delete_many([]) == []
        assert list(tier.keys()) == [] and tier.get(make_key(0)) is None

    @pytest.mark.parametrize("codec", ["raw", "lz4"])
    def test_round_trip_encoded_chunk(self, tier, codec):
        torch = pytest.importorskip("torch")
        from kdn.format.chunk_codec import decode_chunk, encode_chunk
        from kdn.format.layout import KVLayout

        layout = KVLayout(model_id="conformance", num_layers=3, num_kv_heads=2, head_dim=8, dtype="float32")
        kv = torch.randn(layout.shape(16), generator=torch.Generator().manual_seed(0))
        key = str(ChunkKey("t0", layout.fingerprint(), codec, KeyKind.PREFIX, b"\1" * 20))
        data = encode_chunk(kv, key=key, layout=layout, codec=codec)
        assert tier.put(key, data) is True
        got = tier.get(key)
        assert bytes(got) == data
        from codec import get_codec

        assert torch.equal(decode_chunk(got, key=key, layout=layout, codec=get_codec(codec, layout)), kv)

    def test_batch_round_trip(self, tier):
        keys = [make_key(i) for i in range(10)]
        objs = [make_object(k, PAYLOAD + 97 * i) for i, k in enumerate(keys)]
        assert tier.put_many(list(zip(keys, objs, strict=True))) == [True] * 10
        assert [bytes(b) for b in tier.get_many(keys)] == objs
        assert tier.used_bytes == sum(map(len, objs))
        assert sorted(tier.keys()) == sorted(zip(keys, map(len, objs), strict=True))

    def test_buffer_types_accepted(self, tier):
        keys = [make_key(i) for i in range(3)]
        objs = [make_object(k) for k in keys]
        assert tier.put_many([(keys[0], objs[0]), (keys[1], bytearray(objs[1])), (keys[2], memoryview(objs[2]))])
        assert [bytes(b) for b in tier.get_many(keys)] == objs

    def test_get_many_mixed_hits_keeps_order(self, tier):
        present = [make_key(i) for i in range(0, 10, 2)]
        tier.put_many([(k, make_object(k)) for k in present])
        asked = [make_key(i) for i in (9, 0, 1, 4, 8, 3, 2)]
        got = tier.get_many(asked)
        assert [None if g is None else bytes(g) for g in got] == [
            make_object(k) if k in present else None for k in asked]
        assert tier.contains_many(asked) == [k in present for k in asked]

    def test_duplicate_keys_in_one_batch(self, tier):
        a, b = make_key("a"), make_key("b")
        assert tier.put_many([(a, make_object(a)), (b, make_object(b)), (a, make_object(a))]) == [True] * 3
        assert tier.used_bytes == 2 * object_size()
        assert [bytes(x) for x in tier.get_many([a, b, a])] == [make_object(a), make_object(b), make_object(a)]
        assert tier.delete_many([a, a]) == [True, False]

    def test_put_existing_key_is_idempotent(self, tier):
        key = make_key(1)
        assert tier.put(key, make_object(key)) and tier.put(key, make_object(key))
        assert tier.used_bytes == object_size() and len(list(tier.keys())) == 1
        assert bytes(tier.get(key)) == make_object(key)

    def test_delete_and_contains(self, tier):
        a, b = make_key("a"), make_key("b")
        tier.put_many([(a, make_object(a)), (b, make_object(b))])
        assert tier.contains_many([a, b, make_key("c")]) == [True, True, False]
        assert tier.delete_many([a, make_key("c")]) == [True, False]
        assert tier.get(a) is None and not tier.contains(a) and tier.contains(b)
        assert tier.used_bytes == object_size()
        assert tier.put(a, make_object(a)) and bytes(tier.get(a)) == make_object(a)

    # -- capacity and eviction --
    def test_lru_eviction_calls_on_evict(self, tiers):
        tier = tiers(3 * object_size() + 10)
        evicted: list[tuple[str, bytes]] = []
        tier.on_evict = lambda key, data: evicted.append((key, bytes(data)))
        a, b, c, d = (make_key(x) for x in "abcd")
        tier.put_many([(k, make_object(k)) for k in (a, b, c)])
        assert evicted == [] and tier.used_bytes == 3 * object_size()
        assert tier.get(a) is not None  # a becomes most recent; b is now least recent
        assert tier.put(d, make_object(d))
        assert tier.used_bytes <= tier.capacity_bytes and len(evicted) == 1
        key, data = evicted[0]
        assert data == make_object(key) and not tier.contains(key)
        if self.lru_exact:
            assert key == b and tier.contains_many([a, c, d]) == [True, True, True]

    def test_eviction_without_callback(self, tiers):
        tier = tiers(2 * object_size())
        keys = [make_key(i) for i in range(5)]
        assert tier.put_many([(k, make_object(k)) for k in keys]) == [True] * 5
        assert tier.used_bytes == 2 * object_size()
        if self.lru_exact:
            assert tier.contains_many(keys) == [False, False, False, True, True]

    def test_oversize_object_refused(self, tiers):
        tier = tiers(object_size() - 1)
        key = make_key(0)
        assert tier.put_many([(key, make_object(key))]) == [False]
        assert tier.get(key) is None and tier.used_bytes == 0

    def test_usage_never_exceeds_capacity(self, tiers):
        rng = random.Random(7)
        tier = tiers(5 * object_size())
        for i in range(60):
            key = make_key(rng.randrange(20))
            tier.put(key, make_object(key, PAYLOAD + rng.randrange(0, 3000)))
            assert tier.used_bytes <= tier.capacity_bytes
            if i % 7 == 0:
                tier.delete(make_key(rng.randrange(20)))
        assert tier.used_bytes == sum(size for _, size in tier.keys())

    def test_concurrent_access(self, tiers):
        """8 threads put/get/delete over a tiny tier: no wrong bytes, exact accounting, capacity bound held."""
        pool = [make_key(i) for i in range(24)]
        expected = {k: make_object(k, PAYLOAD + 101 * i) for i, k in enumerate(pool)}
        tier = tiers(6 * object_size(PAYLOAD + 101 * 23))
        errors: list[str] = []
        tier.on_evict = lambda key, data: None if bytes(data) == expected[key] else errors.append(f"evict {key}")

        def worker(seed: int) -> None:
            rng = random.Random(seed)
            try:
                for _ in range(150):
                    batch = rng.sample(pool, rng.randint(1, 4))
                    op = rng.random()
                    if op < 0.4:
                        tier.put_many([(k, expected[k]) for k in batch])
                    elif op < 0.8:
                        for k, got in zip(batch, tier.get_many(batch), strict=True):
                            if got is not None and bytes(got) != expected[k]:
                                errors.append(f"wrong bytes for {k}")
                    elif op < 0.9:
                        tier.delete_many(batch)
                    else:
                        tier.contains_many(batch)
                    if tier.used_bytes > tier.capacity_bytes:
                        errors.append(f"used {tier.used_bytes} > capacity")
            except Exception as exc:  # reported below
                errors.append(repr(exc))

        threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in threads)
        assert errors == []
        resident = dict(tier.keys())
        assert tier.used_bytes == sum(resident.values()) <= tier.capacity_bytes
        assert {k: len(expected[k]) for k in resident} == resident
        assert [bytes(b) for b in tier.get_many(list(resident))] == [expected[k] for k in resident]

    # -- optional hooks --
    def test_corrupt_object_is_a_miss(self, tier):
        self._need("corrupt")
        a, b = make_key("a"), make_key("b")
        tier.put_many([(a, make_object(a)), (b, make_object(b))])
        self.corrupt(tier, a)
        got = tier.get_many([a, b])
        assert got[0] is None and bytes(got[1]) == make_object(b)
        assert tier.get(a) is None and not tier.contains(a)
        assert tier.used_bytes == object_size()
        assert tier.put(a, make_object(a)) and bytes(tier.get(a)) == make_object(a)

    def test_reopen_keeps_objects(self, tiers):
        self._need("reopen")
        tier = tiers()
        keys = [make_key(i) for i in range(6)]
        objs = [make_object(k, PAYLOAD + 13 * i) for i, k in enumerate(keys)]
        tier.put_many(list(zip(keys, objs, strict=True)))
        tier.delete(keys[0])
        tier = tiers.reopen(tier)
        assert tier.get(keys[0]) is None
        assert [bytes(b) for b in tier.get_many(keys[1:])] == objs[1:]
        assert tier.used_bytes == sum(map(len, objs[1:]))

    def test_reopen_empty(self, tiers):
        self._need("reopen")
        tier = tiers.reopen(tiers())
        assert tier.used_bytes == 0 and list(tier.keys()) == []
