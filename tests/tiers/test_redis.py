"""The Redis tier against a real redis-server (single and a 3-node cluster): conformance plus Redis specifics."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
import uuid

import pytest

pytest.importorskip("redis")

import redis  # noqa: E402

from kdn.node.tiers.redis import RedisTier, RedisTierConfig  # noqa: E402
from tests.servers import redis_cluster, redis_server, require, start_redis, stop  # noqa: E402, F401
from tests.tiers.conformance import TierConformance, make_key, make_object, object_size  # noqa: E402

LOGGER = "kdn.node.tiers.redis"


def _raw_client(config: RedisTierConfig):
    if config.cluster:
        from redis.cluster import RedisCluster

        return RedisCluster.from_url(config.url)
    return redis.Redis.from_url(config.url)


class _RedisSuite(TierConformance):
    cluster = False

    def config(self, capacity: int, **fields) -> RedisTierConfig:
        return RedisTierConfig(url=self.url, cluster=self.cluster, key_prefix=f"kdntest:{uuid.uuid4().hex}:",
                               capacity=capacity, socket_timeout_s=1.0, **fields)

    def make_tier(self, capacity, tmp_path):
        return RedisTier(self.config(capacity))

    def corrupt(self, tier, key):
        client = _raw_client(tier.config)
        rk = tier.config.key_prefix + key
        data = bytearray(client.get(rk))
        data[-1] ^= 0xFF
        client.set(rk, bytes(data))
        client.close()

    def reopen(self, tier):
        tier.close()
        return RedisTier(tier.config)


class TestRedisTier(_RedisSuite):
    @pytest.fixture(autouse=True)
    def _server(self, redis_server):  # noqa: F811
        self.url = redis_server.url


class TestRedisClusterTier(_RedisSuite):
    cluster = True

    @pytest.fixture(autouse=True)
    def _server(self, redis_cluster):  # noqa: F811
        self.url = redis_cluster.url

    def test_keys_spread_over_nodes(self, tier):
        keys = [make_key(i) for i in range(30)]
        assert tier.put_many([(k, make_object(k, 200)) for k in keys]) == [True] * 30
        client = _raw_client(tier.config)
        nodes = {client.get_node_from_key(tier.config.key_prefix + k).name for k in keys}
        client.close()
        assert len(nodes) == 3  # no hash tag: a tenant's keys spread over every primary
        assert sorted(tier.keys()) == sorted((k, object_size(200)) for k in keys)


# -- Redis specifics (single server) -------------------------------------------------------------------------
@pytest.fixture
def url(redis_server):  # noqa: F811
    return redis_server.url


def _tier(url: str, **fields) -> RedisTier:
    fields.setdefault("key_prefix", f"kdntest:{uuid.uuid4().hex}:")
    fields.setdefault("capacity", 1 << 20)
    fields.setdefault("socket_timeout_s", 1.0)
    return RedisTier(RedisTierConfig(url=url, **fields))


def test_ttl_expiry(url):
    tier = _tier(url, ttl_s=0.3)
    key = make_key("ttl")
    assert tier.put(key, make_object(key))
    assert bytes(tier.get(key)) == make_object(key)
    client = redis.Redis.from_url(url)
    assert 0 < client.pttl(tier.config.key_prefix + key) <= 300
    time.sleep(0.45)
    assert tier.get(key) is None and tier.used_bytes == 0
    assert client.exists(tier.config.key_prefix + key) == 0
    tier.close()


def test_keys_are_prefixed_by_tenant(url):
    tier = _tier(url)
    acme = [make_key(i, tenant="acme") for i in range(3)]
    beta = [make_key(i, tenant="beta") for i in range(2)]
    assert tier.put_many([(k, make_object(k)) for k in acme + beta]) == [True] * 5
    client = redis.Redis.from_url(url)
    prefix = tier.config.key_prefix
    stored = {k.decode() for k in client.scan_iter(match=prefix + "*")}
    assert stored == {prefix + k for k in acme + beta}
    assert {k.decode() for k in client.scan_iter(match=prefix + "acme/*")} == {prefix + k for k in acme}
    assert acme[0] != make_key(0, tenant="beta")  # the same prompt chunk gives another key per tenant
    tier.close()


def test_foreign_object_is_a_miss(url, caplog):
    tier = _tier(url)
    a, b = make_key("a"), make_key("b")
    client = redis.Redis.from_url(url)
    client.set(tier.config.key_prefix + a, make_object(b))  # another key's (valid) object under a's name
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert tier.get(a) is None
    assert "another key" in caplog.text
    assert client.exists(tier.config.key_prefix + a) == 0  # dropped
    assert tier.put(a, make_object(a)) and bytes(tier.get(a)) == make_object(a)
    tier.close()


def test_foreign_keys_under_prefix_are_not_inventoried(url):
    tier = _tier(url)
    client = redis.Redis.from_url(url)
    client.set(tier.config.key_prefix + "controller:state", b"x")
    key = make_key(1)
    tier.put(key, make_object(key))
    assert list(tier.keys()) == [(key, object_size())]
    tier.close()


def test_registry_and_config():
    from kdn.config import TierSpec
    from kdn.errors import ConfigError
    from kdn.node.tiers import tier_class

    assert tier_class("redis") is RedisTier
    spec = TierSpec.parse({"kind": "redis", "url": "redis://h:1/0", "capacity": "2GiB", "ttl_s": "60"})
    assert spec.config.capacity == 2 << 30 and spec.config.ttl_s == 60.0
    with pytest.raises(ConfigError):
        TierSpec.parse({"kind": "redis", "url": "http://h:1"})
    assert "secret" not in repr(RedisTierConfig(password="secret"))


def test_import_kdn_does_not_import_redis():
    code = "import sys, kdn, kdn.node.tiers, kdn.config; assert 'redis' not in sys.modules, 'redis imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_server_killed_then_restarted(tmp_path, caplog):
    require("redis-server")
    proc, url = start_redis(tmp_path)
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    keys = [make_key(i) for i in range(4)]
    tier = None
    try:
        tier = _tier(url, socket_timeout_s=0.5)
        assert tier.put_many([(k, make_object(k)) for k in keys[:2]]) == [True, True]
        proc.kill()
        proc.wait()
        with caplog.at_level(logging.ERROR, logger=LOGGER):
            start = time.monotonic()
            assert tier.get_many(keys) == [None] * 4
            assert tier.put_many([(k, make_object(k)) for k in keys[2:]]) == [False, False]
            assert tier.contains_many(keys[:2]) == [False, False]
            assert tier.delete_many(keys[:1]) == [False]
            assert list(tier.keys()) == []
            assert time.monotonic() - start < 5
        errors = [r for r in caplog.records if r.levelno == logging.ERROR and r.name == LOGGER]
        assert errors and "failed" in errors[0].getMessage()
        assert tier.used_bytes <= tier.capacity_bytes

        proc, _ = start_redis(tmp_path, port=port)  # same port, empty (no persistence)
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            assert tier.get(keys[0]) is None
            assert tier.put_many([(k, make_object(k)) for k in keys]) == [True] * 4
        assert [bytes(b) for b in tier.get_many(keys)] == [make_object(k) for k in keys]
        assert "reachable again" in caplog.text
        assert sorted(tier.keys()) == sorted((k, object_size()) for k in keys)
        assert tier.used_bytes == 4 * object_size()
    finally:
        if tier is not None:
            tier.close()
        stop(proc)
