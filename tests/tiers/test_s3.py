"""The S3 tier against moto's S3 server over HTTP: conformance plus ranged reads, multipart and outages."""

from __future__ import annotations

import logging
import random
import subprocess
import sys
import uuid

import pytest

pytest.importorskip("boto3")

from kdn.errors import InvalidRequest  # noqa: E402
from kdn.format.chunk import build_object, parse_header  # noqa: E402
from kdn.node.tiers.s3 import S3Tier, S3TierConfig  # noqa: E402
from tests.servers import moto_server, start_moto, stop  # noqa: E402, F401
from tests.tiers.conformance import (  # noqa: E402
    FINGERPRINT,
    TierConformance,
    make_key,
    make_object,
)

LOGGER = "kdn.node.tiers.s3"
BUCKET = "kdn-test"


def s3_config(endpoint: str, **fields) -> S3TierConfig:
    fields.setdefault("key_prefix", f"kdntest/{uuid.uuid4().hex}/")
    fields.setdefault("capacity", 1 << 20)
    return S3TierConfig(bucket=BUCKET, endpoint_url=endpoint, region="us-east-1", access_key_id="testing",
                        secret_access_key="testing", create_bucket=True, addressing_style="path", max_attempts=1,
                        connect_timeout_s=1.0, read_timeout_s=5.0, **fields)


def raw_put(tier: S3Tier, key: str, data: bytes) -> None:
    tier._s3().put_object(Bucket=BUCKET, Key=tier.config.key_prefix + key, Body=data)


class TestS3Tier(TierConformance):
    @pytest.fixture(autouse=True)
    def _server(self, moto_server):  # noqa: F811
        self.endpoint = moto_server.url

    def make_tier(self, capacity, tmp_path):
        return S3Tier(s3_config(self.endpoint, capacity=capacity))

    def corrupt(self, tier, key):
        data = bytearray(tier.get(key))
        data[-1] ^= 0xFF
        raw_put(tier, key, bytes(data))

    def reopen(self, tier):
        tier.close()
        return S3Tier(tier.config)


@pytest.fixture
def tier(moto_server):  # noqa: F811
    tier = S3Tier(s3_config(moto_server.url, capacity=1 << 30, multipart_threshold_bytes=6 << 20,
                            multipart_part_bytes=5 << 20))
    yield tier
    tier.close()


def _layered_object(key: str, sections: int = 4, size: int = 20_000) -> bytes:
    rng = random.Random(key)
    return build_object(codec="raw", key=key, fingerprint=FINGERPRINT, num_tokens=16, start=0, num_layers=sections,
                        sections=[(i, i + 1, rng.randbytes(size + i)) for i in range(sections)])


def _record_ranges(tier: S3Tier) -> list[str | None]:
    ranges: list[str | None] = []

    def record(request, **_):
        value = request.headers.get("Range")
        ranges.append(value.decode() if isinstance(value, bytes) else value)

    tier._s3().meta.events.register("before-send.s3.GetObject", record)
    return ranges


def test_ranged_get_of_one_layer_group(tier):
    key = make_key("layers")
    full = _layered_object(key)
    assert tier.put(key, full)
    header = parse_header(full)
    ranges = _record_ranges(tier)
    read = tier.get_sections(key, 2, 3)
    assert read is not None and read.header == header
    [(section, data)] = read.sections
    assert (section.layer_start, section.layer_end) == (2, 3)
    assert data == full[section.offset:section.offset + section.length]
    assert ranges and all(r is not None for r in ranges)  # never the whole object
    fetched = sum(int(r.split("-")[1]) - int(r.split("=")[1].split("-")[0]) + 1 for r in ranges)
    assert fetched < section.length + 2 * tier.config.header_prefetch_bytes < len(full)
    # Several layers come back as one contiguous span, each section verified.
    read = tier.get_sections(key, 1, 4)
    assert [bytes(d) for _, d in read.sections] == [full[s.offset:s.offset + s.length] for s in header.sections[1:]]
    assert tier.get_range(key, 10, 5) == full[10:15]
    assert tier.get_sections(make_key("absent"), 0, 1) is None
    with pytest.raises(InvalidRequest):
        tier.get_sections(key, 2, 2)


def test_ranged_get_rejects_corrupt_section_and_foreign_header(tier, caplog):
    key, other = make_key("c"), make_key("other")
    data = bytearray(_layered_object(key))
    header = parse_header(bytes(data))
    data[header.sections[1].offset + 5] ^= 1
    raw_put(tier, key, bytes(data))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert tier.get_sections(key, 0, 1) is not None  # section 0 is intact
        assert tier.get_sections(key, 1, 2) is None  # section 1 fails its checksum; the object is dropped
    assert "checksum" in caplog.text and not tier.contains(key)
    raw_put(tier, key, _layered_object(other))  # another key's object under this key
    assert tier.get_sections(key, 0, 1) is None and tier.get(key) is None


def test_multipart_upload_above_threshold(tier):
    big, small = make_key("big"), make_key("small")
    big_obj = make_object(big, 13 << 20)  # > 6 MiB threshold: 3 parts of 5 MiB
    small_obj = make_object(small, 1 << 20)
    assert tier.put_many([(big, big_obj), (small, small_obj)]) == [True, True]
    s3 = tier._s3()
    etag = s3.head_object(Bucket=BUCKET, Key=tier.config.key_prefix + big)["ETag"]
    assert etag.strip('"').endswith("-3")  # a multipart object's ETag counts its parts
    assert "-" not in s3.head_object(Bucket=BUCKET, Key=tier.config.key_prefix + small)["ETag"]
    assert bytes(tier.get(big)) == big_obj
    assert tier.put(big, big_obj)  # already there: first writer wins
    assert not s3.list_multipart_uploads(Bucket=BUCKET).get("Uploads")


def test_conditional_write_keeps_first_object(tier):
    key = make_key("first")
    first = make_object(key)
    raw_put(tier, key, first)
    other = S3Tier(tier.config)  # knows nothing of the key, so it does not HEAD first
    assert other.put(key, make_object(key, 5000))
    assert bytes(other.get(key)) == first
    other.close()


def test_foreign_object_is_a_miss(tier, caplog):
    a, b = make_key("a"), make_key("b")
    raw_put(tier, a, make_object(b))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert tier.get(a) is None
    assert "another key" in caplog.text and not tier.contains(a)


def test_keys_are_prefixed_by_tenant(tier):
    acme, beta = make_key(1, tenant="acme"), make_key(1, tenant="beta")
    tier.put_many([(acme, make_object(acme)), (beta, make_object(beta))])
    listed = tier._s3().list_objects_v2(Bucket=BUCKET, Prefix=tier.config.key_prefix + "acme/")["Contents"]
    assert [o["Key"] for o in listed] == [tier.config.key_prefix + acme]
    raw_put(tier, "not-a-chunk", b"x")
    assert sorted(tier.keys()) == sorted((k, len(make_object(k))) for k in (acme, beta))


def test_registry_and_config():
    from kdn.config import TierSpec
    from kdn.errors import ConfigError
    from kdn.node.tiers import tier_class

    assert tier_class("s3") is S3Tier
    spec = TierSpec.parse({"kind": "s3", "bucket": "b", "capacity": "2TiB", "multipart_threshold_bytes": "32MiB"})
    assert spec.config.capacity == 2 << 40 and spec.config.multipart_threshold_bytes == 32 << 20
    for bad in ({"multipart_part_bytes": "1MiB"}, {"access_key_id": "x"}, {"addressing_style": "odd"}):
        with pytest.raises(ConfigError):
            TierSpec.parse({"kind": "s3", **bad})
    assert "hush" not in repr(S3TierConfig(access_key_id="a", secret_access_key="hush"))


def test_import_kdn_does_not_import_boto3():
    code = ("import sys, kdn, kdn.node.tiers, kdn.config; "
            "assert 'boto3' not in sys.modules and 'botocore' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_server_stopped_gives_misses(tmp_path, caplog):
    proc, endpoint = start_moto(tmp_path)
    tier = None
    try:
        tier = S3Tier(s3_config(endpoint))
        keys = [make_key(i) for i in range(3)]
        assert tier.put_many([(k, make_object(k)) for k in keys[:2]]) == [True, True]
        stop(proc)
        with caplog.at_level(logging.ERROR, logger=LOGGER):
            assert tier.get_many(keys) == [None] * 3
            assert tier.put(keys[2], make_object(keys[2])) is False
            assert tier.contains_many(keys[:2]) == [False, False]
            assert tier.delete(keys[0]) is False
            assert tier.get_sections(keys[0], 0, 1) is None
            assert list(tier.keys()) == []
        errors = [r for r in caplog.records if r.levelno == logging.ERROR and r.name == LOGGER]
        assert errors and "failed" in errors[0].getMessage()
        assert tier.used_bytes <= tier.capacity_bytes
    finally:
        if tier is not None:
            tier.close()
        stop(proc)
