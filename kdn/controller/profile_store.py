"""The controller's codec profile store: opaque profile files by id and by layout fingerprint.

A profile is built once per model (``kdnctl codec profile``), uploaded once (``PutProfile``, admin) and registered
under the layout fingerprints it serves; clients fetch it with ``GetProfile`` (:mod:`kdn.client.profiles`). The
controller never decodes a profile: it checks the framing (:func:`kdn.format.profile.parse_profile`) and serves
the bytes.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from kdn.errors import InvalidRequest
from kdn.format.profile import parse_profile, profile_id, write_atomic

__all__ = ["ProfileStore"]

log = logging.getLogger(__name__)

FINGERPRINT_BYTES = 16


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
        """Check and store a profile (canonical bytes, as ``ModelProfile.to_bytes`` writes them); returns its id."""
        if any(len(f) != FINGERPRINT_BYTES for f in fingerprints):
            raise InvalidRequest(f"layout fingerprints are {FINGERPRINT_BYTES} bytes")
        canonical = bytes(data)
        parse_profile(canonical)  # raises InvalidRequest when malformed
        pid = profile_id(canonical)
        with self._lock:
            if self.directory is not None:
                (self.directory / "layouts").mkdir(parents=True, exist_ok=True)
                write_atomic(self.directory / f"{pid.hex()}.kdnp", canonical)
                for f in fingerprints:
                    write_atomic(self.directory / "layouts" / f.hex(), pid.hex().encode())
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
