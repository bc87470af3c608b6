"""S3 tier: chunk objects in a bucket of any S3-compatible store (AWS S3, MinIO, Ceph RGW, moto, ...).

Every object is one S3 object at ``key_prefix + chunk key`` (``kdn/<tenant>/<fingerprint>/<codec>/p<digest>``).
Batches run in parallel on a thread pool. Writes are conditional (``If-None-Match: *``: first writer wins; objects
are immutable), and objects at or above ``multipart_threshold_bytes`` go up as a multipart upload whose parts are
sent in parallel. Full gets are verified like every durable tier's (checksums, key, fingerprint, codec; with the
node's keyring the MAC and keyed digests: the bucket is not trusted with integrity); :meth:`S3Tier.get_sections`
fetches just the header and the sections of a layer range with ranged GETs, pinned to one object version with
``If-Match``, and verifies what it fetched the same way. A bad object is a miss, deleted and reported
(``on_drop``).

A missing object (404) is a miss. An outage (connection refused, timeouts, 5xx, auth errors) makes gets miss and
puts/contains/deletes answer False, with one logged error per outage; nothing raises.

``capacity`` is this tier instance's budget: puts evict its least recently used objects (through ``on_evict``).
The accounting is rebuilt from a listing on first use (oldest objects count as least recent).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from kdn.errors import ConfigError, CorruptObject, InvalidRequest
from kdn.format.chunk import ChunkHeader, Section, header_length, parse_header, verify_section
from kdn.node.tiers._remote import RemoteTier, expected_fields, is_chunk_key
from kdn.node.tiers.base import Buffer

__all__ = ["S3Tier", "S3TierConfig", "SectionRead"]

log = logging.getLogger(__name__)
T = TypeVar("T")
MIN_PART_BYTES = 5 << 20  # S3's smallest part (all but the last)
_MISSING = {"404", "NoSuchKey", "NotFound"}
_CONFLICT = {"412", "PreconditionFailed", "409", "ConditionalRequestConflict"}


@dataclass
class S3TierConfig:
    bucket: str = "kdn"
    endpoint_url: str = ""
    """e.g. ``http://127.0.0.1:9000`` for MinIO; empty: AWS S3 of ``region``."""
    region: str = "us-east-1"
    access_key_id: str = ""
    """With ``secret_access_key`` (and ``session_token``): explicit credentials; empty: the standard AWS chain
    (environment, ``profile``/shared config, container or instance role)."""
    secret_access_key: str = field(default="", repr=False)
    session_token: str = field(default="", repr=False)
    profile: str = ""
    """Named profile of the shared AWS config, when credentials are not given here."""
    key_prefix: str = "kdn/"
    """Prepended to every chunk key; give it to KDN alone (inventory lists everything under it)."""
    capacity: int = 1 << 40
    """Object bytes this tier instance keeps before evicting its least recently used ones."""
    create_bucket: bool = False
    """Create the bucket on first use if it does not exist."""
    addressing_style: str = "auto"
    """``auto``, ``path`` (most self-hosted stores) or ``virtual``."""
    max_pool_connections: int = 32
    """HTTP connections kept to the endpoint."""
    parallel_requests: int = 16
    """Objects (or multipart parts) transferred at once within one batch."""
    multipart_threshold_bytes: int = 64 << 20
    """Objects of at least this size are uploaded in parts."""
    multipart_part_bytes: int = 16 << 20
    """Size of each part (at least 5 MiB)."""
    conditional_writes: bool = True
    """Send ``If-None-Match: *`` so an existing object is never overwritten; turn off for stores that reject it."""
    header_prefetch_bytes: int = 4096
    """First ranged read of :meth:`S3Tier.get_sections`; covers typical headers in one request."""
    connect_timeout_s: float = 2.0
    read_timeout_s: float = 30.0
    max_attempts: int = 2
    """Attempts per request, first included (botocore ``standard`` retry mode)."""

    def validate(self) -> None:
        if not self.bucket:
            raise ConfigError("tier s3.bucket must be set")
        if self.addressing_style not in ("auto", "path", "virtual"):
            raise ConfigError("tier s3.addressing_style must be auto, path or virtual")
        if self.multipart_part_bytes < MIN_PART_BYTES:
            raise ConfigError(f"tier s3.multipart_part_bytes must be at least {MIN_PART_BYTES} (5 MiB)")
        if self.multipart_threshold_bytes < 1 or self.header_prefetch_bytes < 28 or self.capacity <= 0:
            raise ConfigError("tier s3: multipart_threshold_bytes, header_prefetch_bytes (>= 28) and capacity "
                              "must be positive")
        if min(self.max_pool_connections, self.parallel_requests, self.max_attempts) < 1:
            raise ConfigError("tier s3: max_pool_connections, parallel_requests and max_attempts must be >= 1")
        if bool(self.access_key_id) != bool(self.secret_access_key):
            raise ConfigError("tier s3: set both access_key_id and secret_access_key, or neither")


@dataclass(frozen=True)
class SectionRead:
    """The verified header of an object and the verified bytes of the sections a layer range needs (read-only
    views into one downloaded buffer; ``Section.offset`` stays relative to the whole object)."""

    header: ChunkHeader
    sections: list[tuple[Section, memoryview]]


class _Miss(Exception):
    """The object is absent or changed under us (not an outage)."""


class S3Tier(RemoteTier):
    """Chunk objects in an S3 bucket; see the module docstring for semantics."""

    kind = "s3"
    durable = True
    config_class = S3TierConfig

    def __init__(self, config: S3TierConfig) -> None:
        config.validate()
        super().__init__(config.capacity, log, "s3 tier")
        self.config = config
        self._prefix = config.key_prefix
        self._lock = threading.Lock()
        self._client: Any = None
        self._pool: ThreadPoolExecutor | None = None
        self._part_pool: ThreadPoolExecutor | None = None
        self._closed = False

    @classmethod
    def from_config(cls, config: S3TierConfig, data_dir: str) -> S3Tier:
        return cls(config)

    # -- plumbing --------------------------------------------------------------------------------------------
    def _s3(self) -> Any:
        if self._client is not None:
            return self._client
        with self._lock:
            if self._closed:
                raise InvalidRequest("s3 tier is closed")
            if self._client is None:
                import boto3
                from botocore.config import Config

                cfg = self.config
                session = boto3.session.Session(
                    aws_access_key_id=cfg.access_key_id or None, aws_secret_access_key=cfg.secret_access_key or None,
                    aws_session_token=cfg.session_token or None, profile_name=cfg.profile or None,
                    region_name=cfg.region or None)
                self._client = session.client("s3", endpoint_url=cfg.endpoint_url or None, config=Config(
                    max_pool_connections=cfg.max_pool_connections, connect_timeout=cfg.connect_timeout_s,
                    read_timeout=cfg.read_timeout_s, retries={"max_attempts": cfg.max_attempts, "mode": "standard"},
                    s3={"addressing_style": cfg.addressing_style},
                    # Objects carry their own checksums; extra CRCs cost CPU and confuse some S3-compatible stores.
                    request_checksum_calculation="when_required", response_checksum_validation="when_required"))
            return self._client

    def _map(self, fn: Callable[[T], Any], args: Sequence[T], parts: bool = False) -> list[Any]:
        """``fn`` over ``args`` on the request pool (or the part pool, for the parts of one upload)."""
        pool = None
        if len(args) > 1:
            with self._lock:
                attr = "_part_pool" if parts else "_pool"
                pool = getattr(self, attr)
                if pool is None and not self._closed:  # closed: run inline; each call fails inside its guard
                    pool = ThreadPoolExecutor(self.config.parallel_requests, thread_name_prefix=f"kdn-s3{attr}")
                    setattr(self, attr, pool)
        return list(pool.map(fn, args)) if pool is not None else [fn(a) for a in args]

    def _guard(self, operation: str, fn: Callable[[], T], default: T) -> T:
        """Run one request; 404 answers ``default`` quietly, an outage answers it with a logged error."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            result = fn()
        except _Miss:
            return default
        except ClientError as exc:
            if _code(exc) in _MISSING:
                self._outage.ok()
                return default
            self._outage.failed(operation, exc)
            return default
        except (BotoCoreError, OSError, InvalidRequest) as exc:
            self._outage.failed(operation, exc)
            return default
        self._outage.ok()
        return result

    def _rk(self, key: str) -> str:
        return self._prefix + key

    def _inventory(self) -> list[tuple[str, int]] | None:
        if self.config.create_bucket and not self._guard("create bucket", self._ensure_bucket, False):
            return None
        return super()._inventory()

    def _ensure_bucket(self) -> bool:
        from botocore.exceptions import ClientError

        s3, cfg = self._s3(), self.config
        try:
            s3.head_bucket(Bucket=cfg.bucket)
            return True
        except ClientError as exc:
            if _code(exc) not in _MISSING | {"NoSuchBucket"}:
                raise
        kwargs: dict[str, Any] = {"Bucket": cfg.bucket}
        if cfg.region and cfg.region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": cfg.region}
        try:
            s3.create_bucket(**kwargs)
            log.info("s3 tier: created bucket %r", cfg.bucket)
        except ClientError as exc:
            if _code(exc) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise
        return True

    def _exists(self, key: str) -> bool:
        return self._guard("head", lambda: bool(self._s3().head_object(Bucket=self.config.bucket,
                                                                        Key=self._rk(key))), False)

    def _remove(self, key: str) -> None:
        self._guard("delete", lambda: self._s3().delete_object(Bucket=self.config.bucket, Key=self._rk(key)), None)

    def _download(self, key: str) -> bytes | None:
        return self._guard("get", lambda: self._s3().get_object(Bucket=self.config.bucket,
                                                                Key=self._rk(key))["Body"].read(), None)

    # -- Tier interface --------------------------------------------------------------------------------------
    def put_many(self, items: Sequence[tuple[str, Buffer]]) -> list[bool]:
        self._first_use()
        results, todo, known = self._admit(items)

        def put_one(i: int) -> bool:
            key, data = items[i]
            # A key this instance accounts is most likely present: check before shipping its bytes.
            return (known[i] and self._exists(key)) or self._guard("put", lambda: self._upload(key, data), False)

        for i, ok in zip(todo, self._map(put_one, todo), strict=True):
            results[i] = ok
            if not ok:
                self._budget.forget([items[i][0]])
        return results

    def _upload(self, key: str, data: Buffer) -> bool:
        from botocore.exceptions import ClientError

        cond = {"IfNoneMatch": "*"} if self.config.conditional_writes else {}
        view = memoryview(data).cast("B")
        try:
            if len(view) >= self.config.multipart_threshold_bytes:
                self._upload_parts(self._rk(key), view, cond)
            else:
                self._s3().put_object(Bucket=self.config.bucket, Key=self._rk(key), Body=bytes(view),
                                      ContentType="application/octet-stream", **cond)
        except ClientError as exc:
            if _code(exc) not in _CONFLICT:
                raise
        return True  # written, or already there (first writer wins)

    def _upload_parts(self, rk: str, view: memoryview, cond: dict[str, str]) -> None:
        s3, bucket, step = self._s3(), self.config.bucket, self.config.multipart_part_bytes
        upload_id = s3.create_multipart_upload(Bucket=bucket, Key=rk, ContentType="application/octet-stream")[
            "UploadId"]
        try:
            def part(n: int) -> dict[str, Any]:
                body = bytes(view[n * step:(n + 1) * step])
                etag = s3.upload_part(Bucket=bucket, Key=rk, UploadId=upload_id, PartNumber=n + 1, Body=body)["ETag"]
                return {"PartNumber": n + 1, "ETag": etag}

            parts = self._map(part, list(range(-(-len(view) // step))), parts=True)
            s3.complete_multipart_upload(Bucket=bucket, Key=rk, UploadId=upload_id,
                                         MultipartUpload={"Parts": parts}, **cond)
        except BaseException:
            self._guard("abort upload", lambda: s3.abort_multipart_upload(Bucket=bucket, Key=rk,
                                                                          UploadId=upload_id), None)
            raise

    def get_many(self, keys: Sequence[str]) -> list[Buffer | None]:
        self._first_use()

        def get_one(key: str) -> bytes | None:
            data = self._download(key)
            return None if data is None else self._checked(key, data)

        return self._map(get_one, keys)

    def contains_many(self, keys: Sequence[str]) -> list[bool]:
        self._first_use()
        return self._map(self._exists, keys)

    def delete_many(self, keys: Sequence[str]) -> list[bool]:
        self._first_use()
        def delete_one(key: str) -> bool:
            if not self._exists(key):
                return False
            return self._guard("delete", lambda: self._s3().delete_object(Bucket=self.config.bucket,
                                                                          Key=self._rk(key)) is not None, False)

        unique = list(dict.fromkeys(keys))
        held = dict(zip(unique, self._map(delete_one, unique), strict=True))
        self._budget.forget(k for k in unique if held[k])
        out = []
        for key in keys:  # a key repeated in the batch was held only the first time
            out.append(held[key])
            held[key] = False
        return out

    def available(self) -> bool:
        """The bucket answers HEAD (an outage is logged once, its end too; a missing bucket is unavailable)."""
        self._first_use()
        return bool(self._guard("head bucket", lambda: self._s3().head_bucket(Bucket=self.config.bucket)
                                is not None, False))

    # -- RemoteTier hooks ------------------------------------------------------------------------------------
    def _list(self) -> list[tuple[str, int]] | None:
        """ListObjectsV2 under the prefix; the oldest objects count as least recently used."""
        def listing() -> list[tuple[str, int]]:
            found = []
            pages = self._s3().get_paginator("list_objects_v2").paginate(Bucket=self.config.bucket,
                                                                         Prefix=self._prefix)
            for page in pages:
                for obj in page.get("Contents", ()):
                    key = obj["Key"][len(self._prefix):]
                    if is_chunk_key(key):  # anything else under the prefix is not ours
                        found.append((obj["LastModified"], key, int(obj["Size"])))
            return [(key, size) for _, key, size in sorted(found)]

        return self._guard("list", listing, None)

    def _evict(self, victims: Sequence[tuple[str, int]]) -> None:
        def evict_one(key: str) -> None:
            if self.on_evict is not None and (data := self._download(key)) is not None:
                self._demote(key, data)
            self._remove(key)

        self._map(evict_one, [key for key, _ in victims])

    # -- ranged reads ----------------------------------------------------------------------------------------
    def get_range(self, key: str, start: int, length: int) -> bytes | None:
        """Bytes ``[start, start + length)`` of the stored object (fewer at its end), unverified; None on a miss."""
        if start < 0 or length <= 0:
            raise InvalidRequest(f"invalid range start={start} length={length}")
        out = self._guard("ranged get", lambda: self._range(key, start, length)[0], None)
        return out

    def _range(self, key: str, start: int, length: int, etag: str | None = None) -> tuple[bytes, str]:
        from botocore.exceptions import ClientError

        kwargs = {"IfMatch": etag} if etag else {}
        try:
            resp = self._s3().get_object(Bucket=self.config.bucket, Key=self._rk(key),
                                         Range=f"bytes={start}-{start + length - 1}", **kwargs)
        except ClientError as exc:
            if _code(exc) in _CONFLICT:  # replaced between our reads: not this object any more
                log.info("s3 tier: object under %r changed during a ranged read; miss", key)
                raise _Miss from exc
            if _code(exc) in ("416", "InvalidRange"):
                raise _Miss from exc
            raise
        return resp["Body"].read(), resp["ETag"]

    def get_sections(self, key: str, layer_start: int, layer_end: int) -> SectionRead | None:
        """Fetch only the header and the sections overlapping layers ``[layer_start, layer_end)``, each verified
        against its checksum (with the keyring: the header MAC and each section's keyed digest); None on a miss, a
        corrupt or forged object (which is dropped) or an outage."""
        if not 0 <= layer_start < layer_end:
            raise InvalidRequest(f"invalid layer range [{layer_start}, {layer_end})")
        self._first_use()
        try:
            out = self._guard("ranged get", lambda: self._read_sections(key, layer_start, layer_end), None)
        except CorruptObject as exc:
            log.warning("s3 tier: dropping bad object under %r: %s", key, exc)
            self._budget.forget([key])
            self._remove(key)
            self._dropped(key)
            return None
        if out is not None:
            self._budget.touch(key)
        return out

    def _read_sections(self, key: str, layer_start: int, layer_end: int) -> SectionRead:
        prefetch = self.config.header_prefetch_bytes
        head, etag = self._range(key, 0, prefetch)
        hlen = header_length(head[:28])
        if hlen > len(head):
            if len(head) < prefetch:
                raise CorruptObject("chunk object truncated inside its header")
            head += self._range(key, len(head), hlen - len(head), etag)[0]
        header = parse_header(head, self.keyring)
        expected = {"key": key, **expected_fields(key)}
        actual = {"key": header.key, "fingerprint": header.fingerprint, "codec": header.codec}
        if any(actual[name] != value for name, value in expected.items()):
            raise CorruptObject("object carries another key, fingerprint or codec (misdirected or foreign object)")
        wanted = header.sections_for(layer_start, layer_end)
        if not wanted:
            return SectionRead(header, [])
        begin, end = wanted[0].offset, wanted[-1].offset + wanted[-1].length
        if end <= len(head):
            span, base = head, 0
        else:
            span, base = self._range(key, begin, end - begin, etag)[0], begin
        return SectionRead(header, [(s, verify_section(span, dataclasses.replace(s, offset=s.offset - base),
                                                       self.keyring)) for s in wanted])

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pools, self._pool, self._part_pool = (self._pool, self._part_pool), None, None
            client, self._client = self._client, None
        for pool in pools:
            if pool is not None:
                pool.shutdown(wait=True)
        if client is not None:
            client.close()


def _code(exc: Any) -> str:
    return str(exc.response.get("Error", {}).get("Code", "")) or str(
        exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
