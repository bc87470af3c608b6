"""A TCP fault proxy on loopback for delivery tests: forwards a node's stream and, on demand, stalls, drops or
corrupts what the node sends back.

``FaultProxy(target_port)`` listens on a free 127.0.0.1 port and forwards every connection to the target. The
``mode`` applies to bytes flowing from the target to the client, after ``after_bytes`` bytes of each connection:

- ``pass``: forward everything;
- ``stall``: stop forwarding (the connection stays open; the client sees silence, as from a hung node);
- ``drop``: close both sides;
- ``corrupt``: flip one byte, then forward the rest.

Threads only; every socket is closed by ``close()``.
"""

from __future__ import annotations

import socket
import threading

__all__ = ["FaultProxy"]

MODES = ("pass", "stall", "drop", "corrupt")


class FaultProxy:
    def __init__(self, target_port: int, *, mode: str = "pass", after_bytes: int = 0, port: int = 0) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        self.target = ("127.0.0.1", target_port)
        self.mode, self.after_bytes = mode, after_bytes
        self.listener = socket.create_server(("127.0.0.1", port))
        self.port = self.listener.getsockname()[1]
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        self._stop = threading.Event()
        self.faults = 0
        """Connections the fault was applied to."""
        threading.Thread(target=self._accept, name="faultproxy-accept", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                if self._closed:
                    return
                continue
            upstream.settimeout(None)
            with self._lock:
                self._socks += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, faulty: bool) -> None:
        seen, faulted = 0, False
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                if faulty and not faulted and self.mode != "pass" and seen + len(data) > self.after_bytes:
                    faulted = True
                    with self._lock:
                        self.faults += 1
                    cut = max(0, self.after_bytes - seen)
                    if self.mode == "stall":
                        dst.sendall(data[:cut])
                        self._stop.wait()  # hold the connection open, forward nothing more
                        break
                    if self.mode == "drop":
                        dst.sendall(data[:cut])
                        break
                    if self.mode == "corrupt":
                        data = bytearray(data)
                        data[cut] ^= 0x40
                        data = bytes(data)
                seen += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._closed = True
        self._stop.set()
        try:
            self.listener.close()
        except OSError:
            pass
        with self._lock:
            socks, self._socks = self._socks, []
        for sock in socks:
            try:
                sock.close()
            except OSError:
                pass

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
