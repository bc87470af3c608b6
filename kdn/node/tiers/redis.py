"""Redis tier: chunk objects as Redis strings on one server or a Redis Cluster.

Every object is one string at ``key_prefix + chunk key``; the chunk key starts with the tenant, so a tenant's
objects share the prefix ``key_prefix + tenant + "/"``. Writes are ``SET NX`` (first writer wins; objects are
immutable) with an optional ``PX`` TTL; batches go out as one pipeline (``MGET`` for gets on a single server;
redis-py's cluster pipeline splits a batch per node in cluster mode). No hash tags: keys spread over all slots.

Every object read is verified (header checksum, key, fingerprint and codec from the key, section checksums; with
the node's keyring the header MAC and keyed section digests, since Redis is shared infrastructure that is not
trusted with integrity); a foreign, forged or corrupt value is a miss, logged, deleted and reported (``on_drop``).
A Redis outage (connection refused, timeout, cluster down) makes gets miss and puts/contains/deletes answer
False, with one logged error per outage; nothing raises.

``capacity`` is this tier instance's budget: puts evict its least recently used objects (through ``on_evict``)
to stay within it. Redis may also drop objects on its own (TTL, ``maxmemory-policy``); the accounting is best
effort and learns of such losses on the next miss, delete or :meth:`RedisTier.keys` scan.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisClusterException, RedisError
from redis.retry import Retry

from kdn.errors import ConfigError
from kdn.node.tiers._remote import RemoteTier, is_chunk_key
from kdn.node.tiers.base import Buffer

__all__ = ["RedisTier", "RedisTierConfig"]

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Redis refuses strings above 512 MiB (``proto-max-bulk-len``).
MAX_VALUE_BYTES = 512 << 20
_SCAN_BATCH = 1000


@dataclass
class RedisTierConfig:
    url: str = "redis://127.0.0.1:6379/0"
    """``redis://[user:password@]host:port/db`` (``rediss://`` for TLS); in cluster mode any node of the cluster."""
    cluster: bool = False
    """Talk to a Redis Cluster (``redis.cluster.RedisCluster``); the db number must be 0."""
    key_prefix: str = "kdn:"
    """Prepended to every chunk key; give it to KDN alone (inventory scans everything under it)."""
    ttl_s: float = 0.0
    """Expire objects this many seconds after they were written (0: never; millisecond resolution)."""
    capacity: int = 4 << 30
    """Object bytes this tier instance keeps in Redis before evicting its least recently used ones."""
    socket_timeout_s: float = 2.0
    """Connect and per-command socket timeout; an outage turns into misses after about this long."""
    password: str = field(default="", repr=False)
    """Overrides a password in ``url``; empty uses the URL's (or none)."""

    def validate(self) -> None:
        if not self.url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError(f"tier redis.url must start with redis://, rediss:// or unix://, got {self.url!r}")
        if self.ttl_s < 0:
            raise ConfigError("tier redis.ttl_s must be >= 0")
        if self.socket_timeout_s <= 0:
            raise ConfigError("tier redis.socket_timeout_s must be > 0")
        if self.capacity <= 0:
            raise ConfigError("tier redis.capacity must be > 0")


class RedisTier(RemoteTier):
    """Chunk objects in Redis (single server or cluster); see the module docstring for semantics."""

    kind = "redis"
    durable = True
    config_class = RedisTierConfig
    max_object_bytes = MAX_VALUE_BYTES

    def __init__(self, config: RedisTierConfig) -> None:
        config.validate()
        super().__init__(config.capacity, log, f"redis tier ({'cluster' if config.cluster else 'server'})")
        self.config = config
        self._prefix = config.key_prefix
        self._ttl_ms = max(1, round(config.ttl_s * 1000)) if config.ttl_s > 0 else None
        self._client: Any = None
        self._client_lock = threading.Lock()
        self._closed = False

    @classmethod
    def from_config(cls, config: RedisTierConfig, data_dir: str) -> RedisTier:
        return cls(config)

    # -- plumbing --------------------------------------------------------------------------------------------
    def _redis(self) -> Any:
        """The client, created on first use (a cluster client connects when created)."""
        if self._client is not None:
            return self._client
        with self._client_lock:
            if self._closed:
                raise redis.exceptions.ConnectionError("redis tier is closed")
            if self._client is None:
                cfg = self.config
                kwargs: dict[str, Any] = {
                    "socket_timeout": cfg.socket_timeout_s,
                    "socket_connect_timeout": cfg.socket_timeout_s,
                    # One quick retry re-dials a pooled connection that died with a restarted server; more would
                    # only delay the miss during an outage.
                    "retry": Retry(ExponentialBackoff(cap=0.05, base=0.01), 1),
                }
                if cfg.password:
                    kwargs["password"] = cfg.password
                if cfg.cluster:
                    from redis.cluster import RedisCluster

                    self._client = RedisCluster.from_url(cfg.url, **kwargs)
                else:
                    self._client = redis.Redis.from_url(cfg.url, **kwargs)
            return self._client

    def _call(self, operation: str, fn: Callable[[Any], T], default: T) -> T:
        """Run ``fn(client)``; a Redis failure is logged (once per outage) and answers ``default``."""
        try:
            result = fn(self._redis())
        except (RedisError, RedisClusterException, OSError) as exc:
            self._outage.failed(operation, exc)
            return default
        self._outage.ok()
        return result

    def _pipeline(self, client: Any) -> Any:
        return client.pipeline() if self.config.cluster else client.pipeline(transaction=False)

    def _rk(self, key: str) -> str:
        return self._prefix + key

    def _each(self, operation: str, command: str, keys: Sequence[str]) -> list[Any] | None:
        """One pipelined ``command`` per key; None during an outage."""
        def run(client: Any) -> list[Any]:
            pipe = self._pipeline(client)
            for key in keys:
                getattr(pipe, command)(self._rk(key))
            return pipe.execute()

        return self._call(operation, run, None) if keys else []

    # -- Tier interface --------------------------------------------------------------------------------------
    def put_many(self, items: Sequence[tuple[str, Buffer]]) -> list[bool]:
        self._first_use()
        results, todo, known = self._admit(items)
        # Keys this instance already accounts are most likely present: check before shipping their bytes.
        recheck = [i for i in todo if known[i]]
        exists = self._each("put", "exists", [items[i][0] for i in recheck])
        if exists is None:
            self._budget.forget(items[i][0] for i in todo if not known[i])
            return results
        for i, n in zip(recheck, exists, strict=True):
            results[i] = bool(n)
        writes = [i for i in todo if not results[i]]

        def run(client: Any) -> list[Any]:
            pipe = self._pipeline(client)
            for i in writes:
                key, data = items[i]
                pipe.set(self._rk(key), memoryview(data).cast("B"), nx=True, px=self._ttl_ms)
            return pipe.execute(raise_on_error=False)

        replies = self._call("put", run, None) if writes else []
        if replies is None:
            self._budget.forget(items[i][0] for i in writes)
            return results
        errors = [(i, r) for i, r in zip(writes, replies, strict=True) if isinstance(r, Exception)]
        for i in writes:
            results[i] = True  # a reply of True: written; None: already there (NX)
        for i, _ in errors:
            results[i] = False
        if errors:
            self._budget.forget(items[i][0] for i, _ in errors)
            log.error("redis tier: %d of %d writes failed: %s", len(errors), len(writes), errors[0][1])
        return results

    def get_many(self, keys: Sequence[str]) -> list[Buffer | None]:
        self._first_use()
        if not keys or self.config.cluster:
            values = self._each("get", "get", keys)
        else:
            values = self._call("get", lambda client: client.mget([self._rk(k) for k in keys]), None)
        if values is None:
            return [None] * len(keys)
        # Absent now (TTL, maxmemory eviction, another client's delete): stop accounting them.
        self._budget.forget(k for k, v in zip(keys, values, strict=True) if v is None)
        return [None if v is None else self._checked(k, v) for k, v in zip(keys, values, strict=True)]

    def contains_many(self, keys: Sequence[str]) -> list[bool]:
        self._first_use()
        found = self._each("contains", "exists", keys)
        return [False] * len(keys) if found is None else [bool(n) for n in found]

    def delete_many(self, keys: Sequence[str]) -> list[bool]:
        self._first_use()
        deleted = self._each("delete", "delete", keys)
        if deleted is None:
            return [False] * len(keys)
        self._budget.forget(keys)
        return [bool(n) for n in deleted]

    def available(self) -> bool:
        """Redis answers PING (an outage is logged once, its end too)."""
        return bool(self._call("ping", lambda client: client.ping(), False))

    # -- RemoteTier hooks ------------------------------------------------------------------------------------
    def _list(self) -> list[tuple[str, int]] | None:
        """SCAN the prefix (every primary in cluster mode), then STRLEN each chunk key, pipelined."""
        pattern = _glob_escape(self._prefix) + "*"
        cut = len(self._prefix.encode())

        def run(client: Any) -> list[tuple[str, int]]:
            found: list[tuple[str, int]] = []
            batch: list[str] = []

            def flush() -> None:
                pipe = self._pipeline(client)
                for key in batch:
                    pipe.strlen(self._rk(key))
                found.extend((k, int(n)) for k, n in zip(batch, pipe.execute(), strict=True) if n)  # 0: gone
                batch.clear()

            for rk in client.scan_iter(match=pattern, count=_SCAN_BATCH):
                key = rk[cut:].decode("utf-8", "replace")
                if is_chunk_key(key):  # anything else under the prefix is not ours
                    batch.append(key)
                if len(batch) >= _SCAN_BATCH:
                    flush()
            if batch:
                flush()
            return found

        return self._call("scan", run, None)

    def _evict(self, victims: Sequence[tuple[str, int]]) -> None:
        with_data = self.on_evict is not None

        def run(client: Any) -> list[Any]:
            pipe = self._pipeline(client)
            for key, _ in victims:
                if with_data:
                    pipe.get(self._rk(key))
                pipe.delete(self._rk(key))
            return pipe.execute(raise_on_error=False)

        replies = self._call("evict", run, None)
        if replies is not None and with_data:
            for (key, _), data in zip(victims, replies[0::2], strict=True):
                if isinstance(data, bytes):
                    self._demote(key, data)

    def _remove(self, key: str) -> None:
        self._call("delete", lambda client: client.delete(self._rk(key)), 0)

    def close(self) -> None:
        with self._client_lock:
            self._closed = True
            client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except (RedisError, OSError):
                pass


def _glob_escape(text: str) -> str:
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in text)
