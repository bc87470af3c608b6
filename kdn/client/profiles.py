"""The client's fetch-and-cache of codec model profiles.

A client whose codec needs a profile and has no local file asks the controller for the one of its layout
(``GetProfile``, :mod:`kdn.controller.profile_store`), checks that the bytes hash to the id the controller named,
and caches the file on disk, so later starts only ask whether the id changed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from codec._profile_format import ModelProfile
from kdn.errors import InvalidRequest, KDNError, Unavailable
from kdn.format.chunk_codec import codec_errors
from kdn.format.profile import profile_id, write_atomic

__all__ = ["fetch_profile", "default_profile_cache"]

log = logging.getLogger(__name__)

def default_profile_cache() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "kdn", "profiles")


def _load(data: bytes) -> ModelProfile:
    with codec_errors():
        return ModelProfile.from_bytes(data)


def _cached(path: Path) -> tuple[bytes, bytes] | None:
    """``(id, bytes)`` of a cached profile file whose content matches the id in its name."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    pid = profile_id(data)
    return (pid, data) if path.stem.endswith(pid.hex()) else None


def fetch_profile(get: Callable[..., object], fingerprint: bytes, cache_dir: str | Path) -> ModelProfile:
    """The profile for a layout: ask the controller (``get(**GetProfileRequest fields)``), else use the disk cache.

    The cache file is ``<cache_dir>/<fingerprint hex>-<id hex>.kdnp``. The controller is asked with the cached id, so an
    unchanged profile is not sent again. The bytes received must hash to the id the controller named.
    Raises :class:`Unavailable` when neither the controller nor the cache has one.
    """
    cache = Path(cache_dir)
    prefix = f"{fingerprint.hex()}-"
    cached = None
    for path in sorted(cache.glob(f"{prefix}*.kdnp")) if cache.is_dir() else []:
        cached = _cached(path) or cached
    try:
        reply = get(fingerprint=fingerprint, have_id=cached[0] if cached else b"")
    except KDNError as exc:
        if cached is None:
            raise Unavailable(f"no codec profile cached for layout {fingerprint.hex()} and the controller is "
                              f"unreachable ({exc}); set client.codec_profile to a profile file") from exc
        log.warning("controller unreachable (%s); using cached codec profile %s", exc, cached[0].hex())
        return _load(cached[1])
    if not reply.found and cached is not None:
        log.warning("the controller has no codec profile for layout %s; using cached profile %s", fingerprint.hex(),
                    cached[0].hex())
        return _load(cached[1])
    if not reply.found:
        raise InvalidRequest(f"the controller has no codec profile for layout {fingerprint.hex()}: build and "
                             "upload one with `kdnctl codec profile --model PATH --upload`")
    if cached is not None and reply.profile_id == cached[0] and not reply.profile:
        return _load(cached[1])
    if profile_id(reply.profile) != reply.profile_id:
        raise InvalidRequest(f"codec profile from the controller does not match its id {reply.profile_id.hex()}")
    profile = _load(reply.profile)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        for path in cache.glob(f"{prefix}*.kdnp"):
            path.unlink(missing_ok=True)
        write_atomic(cache / f"{prefix}{reply.profile_id.hex()}.kdnp", bytes(reply.profile))
    except OSError as exc:
        log.warning("could not cache codec profile in %s: %s", cache, exc)
    log.info("fetched codec profile %s for layout %s", reply.profile_id.hex(), fingerprint.hex())
    return profile
