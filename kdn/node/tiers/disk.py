"""Local disk tier: one file per chunk object, crash-safe writes, index rebuilt and verified at start.

Layout: ``<path>/<xx>/<name>.kdn`` where ``name`` is the hex blake2b-160 of the key and ``xx`` its first two hex
digits (256 subdirectories). The key itself is read back from the object's header, so a rebuild needs no side
index; a file whose header key does not hash to its name is foreign and dropped.

Writes follow reliability rule 3: unique temp file ``.tmp-*`` in the target directory -> write -> fsync -> rename
-> fsync directory -> acknowledge. Only renamed files are ever indexed; temp files left by a crash are deleted at
start. ``fsync: never`` survives a killed process (the page cache outlives it) but not power loss. A filesystem
that fills up before ``capacity`` does (ENOSPC) fails the write (not acknowledged, temp file removed, logged once
per episode) and makes :meth:`DiskTier.available` false (node readiness) until a write succeeds again.

Every get verifies the whole object (header, key, fingerprint, codec, length and section checksums; with the node's
keyring its MAC and keyed digests); a failure is a miss, the file is dropped with a warning and ``on_drop`` tells the
node. The start-up check is the same (payloads only with ``verify_on_start``). Files are opened with ``O_NOFOLLOW``
and ``O_NONBLOCK`` and their size is checked (``fstat``) before a byte is read: a symlink, FIFO, device or a file
larger than the tier or ``max_object_bytes`` (e.g. a sparse 2 GiB file) is skipped with a warning at start and a
miss on a live read. A directory is owned by one tier at a time (an exclusive ``flock`` on ``.lock``).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import itertools
import logging
import os
import stat
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kdn.errors import ConfigError, CorruptObject
from kdn.format.chunk import ChunkHeader, header_length, parse_header, verify_object
from kdn.node.tiers._remote import OutageLog, expected_fields
from kdn.node.tiers.base import Buffer, Tier

if TYPE_CHECKING:
    from kdn.format.mac import Keyring

__all__ = ["DiskTier", "DiskTierConfig"]

log = logging.getLogger(__name__)

_SUFFIX = ".kdn"
_TMP_PREFIX = ".tmp-"
_FANOUT = [f"{i:02x}" for i in range(256)]
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
MIN_FREE_BYTES = 64 << 10
"""Below this much free space on its filesystem the disk tier reports itself unavailable (node readiness)."""
_HEAD_BYTES = 28  # the fixed part of a chunk header (magic .. checksum): enough to learn the header length


@dataclass
class DiskTierConfig:
    capacity: int = 10 << 30
    """Bytes of chunk objects kept on disk."""
    path: str = ""
    """Directory of the objects; defaults to ``<data_dir>/disk``."""
    fsync: str = "always"
    """``always`` (fsync file and directory before acknowledging) or ``never`` (unsafe on power loss)."""
    verify_on_start: bool = True
    """Check every object's payload checksums while rebuilding the index (False: header and size only; faster
    start on large disks, payloads are still verified on every read)."""

    def validate(self) -> None:
        if self.fsync not in ("always", "never"):
            raise ConfigError(f"tier disk.fsync must be 'always' or 'never', got {self.fsync!r}")


def _file_name(key: str) -> str:
    return hashlib.blake2b(key.encode(), digest_size=20, person=b"kdn-disk-v1").hexdigest() + _SUFFIX


class DiskTier(Tier):
    """Chunk objects in files under ``path``; an in-memory LRU index of key -> size."""

    kind = "disk"
    durable = True
    config_class = DiskTierConfig

    def __init__(self, path: str, capacity: int, fsync: str = "always", verify_on_start: bool = True, *,
                 keyring: Keyring | None = None, max_object_bytes: int = 0) -> None:
        super().__init__()
        DiskTierConfig(capacity, path, fsync).validate()
        self.path = os.path.abspath(path)
        self._capacity = int(capacity)
        self.keyring = keyring
        self.max_object_bytes = min(int(max_object_bytes or capacity), int(capacity))
        self._fsync_on = fsync == "always"
        self._index: OrderedDict[str, tuple[int, int]] = OrderedDict()  # key -> (size, generation)
        self._busy: set[str] = set()  # keys whose file is being written or removed (never in the index)
        self._used = 0  # indexed bytes + bytes reserved by writes in flight
        self._gen = itertools.count(1)
        self._short_of = 0  # size of the last write that found the filesystem full (0: none since a success)
        self._full_log = OutageLog(log, f"disk tier {self.path} (filesystem full)")
        self._cond = threading.Condition()
        os.makedirs(self.path, mode=0o700, exist_ok=True)
        self._lock_fd = os.open(os.path.join(self.path, ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self._lock_fd)
            raise ConfigError(f"disk tier directory {self.path} is in use by another tier") from exc
        self._rebuild(verify_on_start)

    @classmethod
    def from_config(cls, config: DiskTierConfig, data_dir: str, *, keyring: Keyring | None = None,
                    max_object_bytes: int = 0) -> DiskTier:
        return cls(config.path or os.path.join(data_dir, "disk"), config.capacity, config.fsync,
                   config.verify_on_start, keyring=keyring, max_object_bytes=max_object_bytes)

    @property
    def capacity_bytes(self) -> int:
        return self._capacity

    @property
    def used_bytes(self) -> int:
        """Indexed object bytes plus bytes reserved by writes in flight."""
        return self._used

    def available(self) -> bool:
        """The directory is writable and its filesystem has room: at least ``MIN_FREE_BYTES``, and at least the
        size of the last write that failed for want of space (ENOSPC / EDQUOT), until a write succeeds again."""
        try:
            st = os.statvfs(self.path)
        except OSError:
            return False
        return (os.access(self.path, os.W_OK | os.X_OK)
                and st.f_bavail * st.f_frsize >= max(MIN_FREE_BYTES, self._short_of))

    def close(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1

    # -- file I/O seams (tests replace these to inject short writes, ENOSPC, EIO) --
    def _write(self, fd: int, data: memoryview) -> int:
        return os.write(fd, data)

    def _fsync(self, fd: int) -> None:
        if self._fsync_on:
            os.fsync(fd)

    def _file(self, key: str) -> tuple[str, str]:
        name = _file_name(key)
        return os.path.join(self.path, name[:2]), name

    def _fsync_dir(self, directory: str) -> None:
        if self._fsync_on:
            fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _open_checked(self, path: str) -> tuple[int, int]:
        """``(fd, size)`` of a regular file no larger than an object may be (nothing read yet); raises
        :class:`CorruptObject` for a symlink, FIFO, device or oversized file."""
        try:
            fd = os.open(path, _OPEN_FLAGS)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise CorruptObject("a symlink, not a regular file") from None
            raise
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise CorruptObject("not a regular file")
            if st.st_size > self.max_object_bytes:
                raise CorruptObject(f"file of {st.st_size} bytes is larger than any object of this tier "
                                    f"({self.max_object_bytes})")
        except BaseException:
            os.close(fd)
            raise
        return fd, st.st_size

    @staticmethod
    def _read_exact(fd: int, n: int) -> bytearray:
        buf = bytearray(n)
        view = memoryview(buf)
        pos = 0
        while pos < n:
            got = os.readv(fd, [view[pos:]])
            if got <= 0:
                raise CorruptObject(f"file ended after {pos} of {n} bytes")
            pos += got
        return buf

    def _read_verified(self, key: str, path: str, size: int | None = None) -> bytearray:
        fd, st_size = self._open_checked(path)
        try:
            if size is not None and st_size != size:
                raise CorruptObject(f"file is {st_size} bytes, index says {size}")
            data = self._read_exact(fd, st_size)
        finally:
            os.close(fd)
        verify_object(data, key=key, check_payload=True, keyring=self.keyring, **expected_fields(key))
        return data

    def _check_at_start(self, path: str, name: str, check_payload: bool) -> tuple[ChunkHeader, int]:
        """The header and size of the object file at ``path``, checked as a get would (payload with
        ``check_payload``); the header is read and checked before the payload."""
        fd, st_size = self._open_checked(path)
        try:
            head = self._read_exact(fd, min(st_size, _HEAD_BYTES))
            header_len = header_length(head)
            if header_len > st_size:
                raise CorruptObject(f"file of {st_size} bytes is shorter than its header ({header_len})")
            header = parse_header(head + self._read_exact(fd, header_len - len(head)), self.keyring)
            if st_size != header.total_len:
                raise CorruptObject(f"file is {st_size} bytes, header says {header.total_len}")
            if _file_name(header.key) != name:
                raise CorruptObject("header key does not match the file name (foreign object)")
            expected = expected_fields(header.key)
            if not expected:
                raise CorruptObject("header key is not a chunk key")
            if check_payload:
                os.lseek(fd, 0, os.SEEK_SET)
                data = self._read_exact(fd, st_size)
                header = verify_object(data, key=header.key, keyring=self.keyring, **expected)
            elif header.fingerprint != expected["fingerprint"] or header.codec != expected["codec"]:
                raise CorruptObject("object's fingerprint or codec is not its key's (foreign object)")
        finally:
            os.close(fd)
        return header, st_size

    def _write_file(self, key: str, data: memoryview) -> None:
        directory, name = self._file(key)
        final = os.path.join(directory, name)
        tmp = os.path.join(directory, f"{_TMP_PREFIX}{os.getpid()}-{next(self._gen)}-{name}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            try:
                view = memoryview(data)
                while view:
                    n = self._write(fd, view)
                    if n <= 0:
                        raise OSError(errno.EIO, "write made no progress")
                    view = view[n:]
                self._fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, final)
            self._fsync_dir(directory)
        except BaseException:
            _unlink(tmp)
            _unlink(final)  # renamed but not durable: never leave an unacknowledged object behind
            raise

    # -- index maintenance --
    def _rebuild(self, check_payload: bool) -> None:
        found: list[tuple[float, str, int]] = []
        for sub in _FANOUT:
            directory = os.path.join(self.path, sub)
            os.makedirs(directory, mode=0o700, exist_ok=True)
            with os.scandir(directory) as entries:
                files = list(entries)
            for entry in files:
                if entry.name.startswith(_TMP_PREFIX):
                    _unlink(entry.path)
                elif entry.name.endswith(_SUFFIX):
                    try:
                        regular = entry.is_file(follow_symlinks=False)
                    except OSError:
                        regular = False
                    if not regular:
                        log.warning("disk tier: skipping %s at start: not a regular file", entry.path)
                        continue
                    try:
                        header, size = self._check_at_start(entry.path, entry.name, check_payload)
                        found.append((entry.stat(follow_symlinks=False).st_mtime, header.key, size))
                    except (CorruptObject, OSError) as exc:
                        log.warning("disk tier: dropping %s at start: %s", entry.path, exc)
                        _unlink(entry.path)
        self._fsync_dir(self.path)
        self._fsync_dir(os.path.dirname(self.path))
        found.sort()
        for _mtime, key, size in found:
            self._index[key] = (size, next(self._gen))
            self._used += size
        while self._used > self._capacity:
            key, (size, _) = self._index.popitem(last=False)
            self._used -= size
            _unlink(os.path.join(*self._file(key)))
        log.info("disk tier %s: %d objects, %d bytes", self.path, len(self._index), self._used)

    def _remove(self, victims: list[tuple[str, int]], *, evict: bool) -> None:
        """Unlink files of keys already taken out of the index and marked busy; hand evictions to ``on_evict``."""
        handoff = []
        for key, size in victims:
            path = os.path.join(*self._file(key))
            if evict and self.on_evict is not None:
                try:
                    handoff.append((key, self._read_verified(key, path, size)))
                except (CorruptObject, OSError) as exc:
                    log.warning("disk tier: evicted object %s unreadable, dropped: %s", key, exc)
            _unlink(path)
        with self._cond:
            self._busy.difference_update(k for k, _ in victims)
            self._cond.notify_all()
        for key, data in handoff:
            self._evicted(key, data)

    # -- Tier interface --
    def put_many(self, items: Sequence[tuple[str, Buffer]]) -> list[bool]:
        return [self._put(key, data) for key, data in items]

    def _put(self, key: str, data: Buffer) -> bool:
        view = memoryview(data).cast("B")
        size = len(view)
        if size > self._capacity:
            return False
        try:
            verify_object(view, key=key, check_payload=False)
        except CorruptObject as exc:
            log.warning("disk tier: refusing to store %s: %s", key, exc)
            return False
        victims: list[tuple[str, int]] = []
        with self._cond:
            while key in self._busy:
                self._cond.wait()
            if key in self._index:
                self._index.move_to_end(key)
                return True
            while self._used + size > self._capacity and self._index:
                old, (old_size, _) = self._index.popitem(last=False)
                self._used -= old_size
                self._busy.add(old)
                victims.append((old, old_size))
            fits = self._used + size <= self._capacity  # may fail while other writes hold reservations
            if fits:
                self._used += size
                self._busy.add(key)
        self._remove(victims, evict=True)
        if not fits:
            return False
        ok = False
        try:
            self._write_file(key, view)
            ok = True
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                self._short_of = size + 4096  # the object and its directory entry
                self._full_log.failed("write", exc)
            else:
                log.error("disk tier: write of %s failed: %s", key, exc)
        finally:
            if ok and self._short_of:
                self._short_of = 0
                self._full_log.ok()
            with self._cond:
                self._busy.discard(key)
                if ok:
                    self._index[key] = (size, next(self._gen))
                else:
                    self._used -= size
                self._cond.notify_all()
        return ok

    def get_many(self, keys: Sequence[str]) -> list[Buffer | None]:
        return [self._get(key) for key in keys]

    def _get(self, key: str) -> bytes | None:
        with self._cond:
            entry = self._index.get(key)
            if entry is None:
                return None
            self._index.move_to_end(key)
        size, gen = entry
        path = os.path.join(*self._file(key))
        try:
            return self._read_verified(key, path, size)
        except (CorruptObject, OSError) as exc:
            error = exc
        with self._cond:  # drop it unless the key was removed (and maybe rewritten) meanwhile
            if self._index.get(key, (0, -1))[1] != gen:
                return None
            log.warning("disk tier: dropping %s (%s): %s", key, path, error)
            del self._index[key]
            self._used -= size
            self._busy.add(key)
        self._remove([(key, size)], evict=False)
        self._dropped(key)
        return None

    def contains_many(self, keys: Sequence[str]) -> list[bool]:
        with self._cond:
            return [key in self._index for key in keys]

    def delete_many(self, keys: Sequence[str]) -> list[bool]:
        out = []
        for key in keys:
            with self._cond:
                entry = self._index.pop(key, None)
                if entry is not None:
                    self._used -= entry[0]
                    self._busy.add(key)
            if entry is not None:
                self._remove([(key, entry[0])], evict=False)
            out.append(entry is not None)
        return out

    def keys(self) -> Iterator[tuple[str, int]]:
        with self._cond:
            snapshot = [(k, size) for k, (size, _) in self._index.items()]
        return iter(snapshot)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.error("disk tier: cannot remove %s: %s", path, exc)
