"""The disk tier: the shared conformance suite plus crash safety, damaged files and I/O errors."""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from kdn.config import TierSpec
from kdn.errors import ConfigError
from kdn.node.tiers import build_tier
from kdn.node.tiers.disk import DiskTier, DiskTierConfig
from tests.tiers._disk_writer import writer_object
from tests.tiers.conformance import TierConformance, make_key, make_object, object_size

REPO = Path(__file__).resolve().parents[2]


def obj_path(tier: DiskTier, key: str) -> str:
    return os.path.join(*tier._file(key))


def flip_byte(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x40]))


def all_files(root: str) -> list[str]:
    return sorted(os.path.join(d, n) for d, _, names in os.walk(root) for n in names if n != ".lock")


class TestDiskTier(TierConformance):
    def make_tier(self, capacity, tmp_path):
        return DiskTier(tempfile.mkdtemp(dir=tmp_path), capacity)

    def corrupt(self, tier, key):
        flip_byte(obj_path(tier, key), os.path.getsize(obj_path(tier, key)) - 10)  # a payload byte

    def reopen(self, tier):
        tier.close()
        return DiskTier(tier.path, tier.capacity_bytes)


@pytest.fixture
def disk(tmp_path):
    opened: list[DiskTier] = []

    def open_tier(capacity: int = 1 << 20, **kwargs) -> DiskTier:
        for t in opened:
            t.close()
        opened.append(DiskTier(str(tmp_path / "disk"), capacity, **kwargs))
        return opened[-1]

    yield open_tier
    for t in opened:
        t.close()


def put_objects(tier: DiskTier, n: int) -> list[str]:
    keys = [make_key(i) for i in range(n)]
    assert tier.put_many([(k, make_object(k)) for k in keys]) == [True] * n
    return keys


def test_files_are_named_by_key_hash(disk):
    tier = disk()
    (key,) = put_objects(tier, 1)
    (path,) = all_files(tier.path)
    assert path == obj_path(tier, key) and "/" not in os.path.basename(path) and "t0" not in path
    assert os.stat(path).st_mode & 0o777 == 0o600


def test_restart_rebuilds_index(disk):
    keys = put_objects(disk(), 5)
    tier = disk()
    assert sorted(tier.keys()) == sorted((k, object_size()) for k in keys)
    assert [bytes(b) for b in tier.get_many(keys)] == [make_object(k) for k in keys]


def test_damaged_files_dropped_at_restart(disk):
    tier = disk()
    keys = put_objects(tier, 6)
    paths = [obj_path(tier, k) for k in keys]
    os.truncate(paths[0], object_size() // 2)        # torn file
    flip_byte(paths[1], 40)                          # header bit flip
    flip_byte(paths[2], object_size() - 1)           # payload bit flip
    os.replace(paths[5], paths[3])                   # foreign header: key 5's object under key 3's name
    with open(paths[4], "ab") as f:                  # appended junk
        f.write(b"junk")
    tier = disk()
    assert list(tier.keys()) == [] and tier.used_bytes == 0
    assert all_files(tier.path) == []


def test_header_only_start_still_verifies_payload_on_read(disk):
    tier = disk()
    keys = put_objects(tier, 2)
    flip_byte(obj_path(tier, keys[0]), object_size() - 1)
    tier = disk(verify_on_start=False)
    assert tier.contains(keys[0])  # header is intact, so the fast scan keeps it ...
    assert tier.get(keys[0]) is None and not tier.contains(keys[0])  # ... and the read rejects it
    assert bytes(tier.get(keys[1])) == make_object(keys[1]) and tier.used_bytes == object_size()


@pytest.mark.parametrize("damage", ["truncate", "bitflip", "foreign", "vanished"])
def test_damaged_file_is_a_miss_on_read(disk, damage):
    tier = disk()
    a, b = put_objects(tier, 2)
    path = obj_path(tier, a)
    if damage == "truncate":
        os.truncate(path, 100)
    elif damage == "bitflip":
        flip_byte(path, object_size() // 2)
    elif damage == "foreign":
        with open(obj_path(tier, b), "rb") as src, open(path, "wb") as dst:
            dst.write(src.read())
    else:
        os.unlink(path)
    assert tier.get_many([a, b])[0] is None
    assert not tier.contains(a) and not os.path.exists(path) and tier.used_bytes == object_size()
    assert bytes(tier.get(b)) == make_object(b)


def test_leftover_temp_files_removed_at_start(disk):
    tier = disk()
    (key,) = put_objects(tier, 1)
    sub = os.path.dirname(obj_path(tier, key))
    tmp = os.path.join(sub, ".tmp-999-1-" + os.path.basename(obj_path(tier, key)))
    with open(tmp, "wb") as f:
        f.write(make_object(key)[:1000])
    other = os.path.join(tier.path, "README")
    Path(other).write_text("not ours")
    tier = disk()
    assert not os.path.exists(tmp) and os.path.exists(other)
    assert bytes(tier.get(key)) == make_object(key)


def test_restart_over_capacity_keeps_newest(disk):
    tier = disk()
    keys = put_objects(tier, 4)
    now = time.time()
    for i, key in enumerate(keys):
        os.utime(obj_path(tier, key), (now - 100 + i, now - 100 + i))
    tier = disk(capacity=2 * object_size())
    assert tier.contains_many(keys) == [False, False, True, True]
    assert tier.used_bytes == 2 * object_size() and len(all_files(tier.path)) == 2


def test_put_refuses_invalid_objects(disk):
    tier = disk()
    a, b = make_key("a"), make_key("b")
    assert tier.put_many([(a, b"not a chunk object" * 20), (a, make_object(b)), (a, make_object(a)[:-1])]) == [
        False, False, False]
    assert tier.used_bytes == 0 and all_files(tier.path) == []


@pytest.mark.parametrize("fault", ["enospc_write", "eio_fsync", "no_progress"])
def test_io_errors_are_never_acknowledged(disk, fault):
    tier = disk()
    a, b = make_key("a"), make_key("b")

    def failing_write(fd, data):
        if fault == "no_progress":
            return 0
        raise OSError(errno.ENOSPC, "No space left on device")

    def failing_fsync(fd):
        raise OSError(errno.EIO, "I/O error")

    if fault == "eio_fsync":
        tier._fsync = failing_fsync
    else:
        tier._write = failing_write
    assert tier.put_many([(a, make_object(a)), (b, make_object(b))]) == [False, False]
    assert tier.get(a) is None and tier.used_bytes == 0 and all_files(tier.path) == []
    del tier.__dict__["_fsync" if fault == "eio_fsync" else "_write"]
    assert tier.put(a, make_object(a)) and bytes(tier.get(a)) == make_object(a)


def test_directory_fsync_failure_drops_renamed_file(disk):
    tier = disk()
    key = make_key("a")

    def failing_dir_fsync(directory):
        raise OSError(errno.EIO, "I/O error")

    tier._fsync_dir = failing_dir_fsync
    assert tier.put(key, make_object(key)) is False
    assert all_files(tier.path) == [] and tier.used_bytes == 0


def test_short_writes_are_completed(disk):
    tier = disk()
    tier._write = lambda fd, data: os.write(fd, data[:777])
    (key,) = put_objects(tier, 1)
    tier = disk()
    assert bytes(tier.get(key)) == make_object(key)


def test_fsync_never_round_trip(disk):
    keys = put_objects(disk(fsync="never"), 3)
    assert [bytes(b) for b in disk(fsync="never").get_many(keys)] == [make_object(k) for k in keys]


def test_one_tier_per_directory(disk, tmp_path):
    disk()
    with pytest.raises(ConfigError, match="in use"):
        DiskTier(str(tmp_path / "disk"), 1 << 20)


def test_config_and_registry(tmp_path):
    spec = TierSpec.parse({"kind": "disk", "capacity": "2MiB", "fsync": "never"})
    assert spec.config == DiskTierConfig(capacity=2 << 20, path="", fsync="never")
    tier = build_tier("disk", spec.config, str(tmp_path))
    try:
        assert isinstance(tier, DiskTier) and tier.path == str(tmp_path / "disk") and tier.capacity_bytes == 2 << 20
        assert tier.kind == "disk" and tier.durable
    finally:
        tier.close()
    with pytest.raises(ConfigError, match="fsync"):
        TierSpec.parse({"kind": "disk", "fsync": "sometimes"})


@pytest.mark.timeout(60)
@pytest.mark.parametrize("seed", range(5))
def test_kill9_mid_write_loses_no_acknowledged_object(tmp_path, seed):
    """A writer process is SIGKILLed at a seeded moment; every acknowledged put survives, nothing torn is served."""
    rng = random.Random(seed)
    path = str(tmp_path / "disk")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "tests.tiers._disk_writer", path, str(seed)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, text=True)
    acked: list[str] = []
    try:
        target = rng.randint(3, 25)
        while len(acked) < target:
            line = proc.stdout.readline()
            assert line, "writer exited early"
            acked.append(line.rstrip("\n"))
        time.sleep(rng.uniform(0, 0.03))
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        rest = proc.stdout.read()
        proc.wait()
    acked += [line for line in rest.split("\n")[:-1]]  # complete lines only
    assert proc.returncode == -signal.SIGKILL

    expected = dict(writer_object(seed, i) for i in range(len(acked) + 2))
    tier = DiskTier(path, 1 << 40)
    try:
        assert not [f for f in all_files(path) if os.path.basename(f).startswith(".tmp-")]
        resident = dict(tier.keys())
        assert set(acked) <= set(resident) <= set(expected)
        assert len(all_files(path)) == len(resident)
        for key in resident:  # acknowledged or not, whatever is indexed is complete and exact
            assert bytes(tier.get(key)) == expected[key]
    finally:
        tier.close()
