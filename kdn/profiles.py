"""Codec model profiles on the control plane: the controller's store and the client's fetch-and-cache.

A profile (:mod:`codec._profile_format`) is built once per model (``kdnctl codec profile``), uploaded once to the
controller (``PutProfile``, admin), and registered under the layout fingerprints it serves. A client whose codec
needs a profile and has no local file asks the controller for the one of its layout (``GetProfile``), checks that
the bytes hash to the id the controller named, and caches the file on disk, so later starts only ask whether the
id changed.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

from codec._profile_format import ModelProfile, profile_id
from kdn.errors import InvalidRequest, KDNError, Unavailable

__all__ = ["ProfileStore", "fetch_profile", "default_profile_cache"]

log = logging.getLogger(__name__)

FINGERPRINT_BYTES = 16


def default_profile_cache() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "kdn", "profiles")


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class ProfileStore:
    """Profiles by id and by layout fingerprint; persisted under ``directory`` when given, else in memory only.

    Files: ``<id hex>.kdnp`` (the canonical profile bytes) and ``layouts/<fingerprint hex>`` (an id hex).
    """

    def __init__(self, directory: str | Path | None = None) -> None:
        self.directory = Path(directory) if directory else None
        self._profiles: dict[bytes, bytes] = {}
        self._layouts: dict[bytes, bytes] = {}
        self._lock = threading.Lock()
        if self.directory is not None and self.directory.is_dir():
            self._load()

    def _load(self) -> None:
        for path in self.directory.glob("*.kdnp"):
            data = path.read_bytes()
            pid = profile_id(data)
            if pid.hex() != path.stem:
                log.warning("profile file %s does not match its id; ignored", path)
                continue
            self._profiles[pid] = data
        layouts = self.directory / "layouts"
        for path in layouts.iterdir() if layouts.is_dir() else []:
            try:
                fingerprint, pid = bytes.fromhex(path.name), bytes.fromhex(path.read_text().strip())
            except ValueError:
                continue
            if pid in self._profiles:
                self._layouts[fingerprint] = pid
        if self._profiles:
            log.info("loaded %d codec profile(s) for %d layout(s) from %s", len(self._profiles), len(self._layouts),
                     self.directory)

    def put(self, data: bytes, fingerprints: list[bytes]) -> bytes:
        """Validate and store a profile (re-serialized canonically); returns its id."""
        if any(len(f) != FINGERPRINT_BYTES for f in fingerprints):
            raise InvalidRequest(f"layout fingerprints are {FINGERPRINT_BYTES} bytes")
        canonical = ModelProfile.from_bytes(data).to_bytes()  # raises InvalidRequest when malformed
        pid = profile_id(canonical)
        with self._lock:
            if self.directory is not None:
                (self.directory / "layouts").mkdir(parents=True, exist_ok=True)
                _atomic_write(self.directory / f"{pid.hex()}.kdnp", canonical)
                for f in fingerprints:
                    _atomic_write(self.directory / "layouts" / f.hex(), pid.hex().encode())
            self._profiles[pid] = canonical
            for f in fingerprints:
                self._layouts[f] = pid
        log.info("stored codec profile %s for %d layout(s)", pid.hex(), len(fingerprints))
        return pid

    def get(self, pid: bytes = b"", fingerprint: bytes = b"") -> tuple[bytes, bytes] | None:
        """``(id, bytes)`` by id, else by layout fingerprint; None when unknown."""
        with self._lock:
            if not pid:
                pid = self._layouts.get(fingerprint, b"")
            data = self._profiles.get(pid)
        return (pid, data) if data is not None else None


def _cached(path: Path) -> tuple[bytes, bytes] | None:
    """``(id, bytes)`` of a cached profile file whose content matches the id in its name."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    pid = profile_id(data)
    return (pid, data) if path.stem.endswith(pid.hex()) else None


def fetch_profile(get: Callable[..., object], fingerprint: bytes, cache_dir: str | Path) -> ModelProfile:
    """The profile for a layout: ask the controller (``get(GetProfileRequest)``), else use the disk cache.

    The cache file is ``<cache_dir>/<fingerprint hex>-<id hex>.kdnp``. The controller is asked with the cached id, so an
    unchanged profile is not sent again. The bytes received must hash to the id the controller named.
    Raises :class:`Unavailable` when neither the controller nor the cache has one.
    """
    from kdn.v1 import control_pb2

    cache = Path(cache_dir)
    prefix = f"{fingerprint.hex()}-"
    cached = None
    for path in sorted(cache.glob(f"{prefix}*.kdnp")) if cache.is_dir() else []:
        cached = _cached(path) or cached
    try:
        reply = get(control_pb2.GetProfileRequest(fingerprint=fingerprint, have_id=cached[0] if cached else b""))
    except KDNError as exc:
        if cached is None:
            raise Unavailable(f"no codec profile cached for layout {fingerprint.hex()} and the controller is "
                              f"unreachable ({exc}); set client.codec_profile to a profile file") from exc
        log.warning("controller unreachable (%s); using cached codec profile %s", exc, cached[0].hex())
        return ModelProfile.from_bytes(cached[1])
    if not reply.found and cached is not None:
        log.warning("the controller has no codec profile for layout %s; using cached profile %s", fingerprint.hex(),
                    cached[0].hex())
        return ModelProfile.from_bytes(cached[1])
    if not reply.found:
        raise InvalidRequest(f"the controller has no codec profile for layout {fingerprint.hex()}: build and "
                             "upload one with `kdnctl codec profile --model PATH --upload`")
    if cached is not None and reply.profile_id == cached[0] and not reply.profile:
        return ModelProfile.from_bytes(cached[1])
    if profile_id(reply.profile) != reply.profile_id:
        raise InvalidRequest(f"codec profile from the controller does not match its id {reply.profile_id.hex()}")
    profile = ModelProfile.from_bytes(reply.profile)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        for path in cache.glob(f"{prefix}*.kdnp"):
            path.unlink(missing_ok=True)
        _atomic_write(cache / f"{prefix}{reply.profile_id.hex()}.kdnp", bytes(reply.profile))
    except OSError as exc:
        log.warning("could not cache codec profile in %s: %s", cache, exc)
    log.info("fetched codec profile %s for layout %s", reply.profile_id.hex(), fingerprint.hex())
    return profile
