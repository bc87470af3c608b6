"""Interleaved rANS over many independent streams, vectorized in numpy across streams and lanes.

Bitstream contract (shared by the CPU path and future GPU kernels; both must produce identical bytes):

- ``PROB_BITS = 12``: every table's frequencies are positive integers summing to ``M = 4096``; symbol ``i``
  occupies slots ``[cum[i], cum[i] + freq[i])``.
- State ``x`` is 32-bit, kept in ``[L, 2**32)`` with ``L = 2**16``; renormalization moves one 16-bit word.
- A stream of ``n`` symbols has ``LANES = 32`` lanes: symbol ``i`` belongs to lane ``i % 32`` and step ``i // 32``.
- Decoding step ``j`` (``j = 0 .. ceil(n/32)-1``), for each lane ``l`` with ``32*j + l < n`` in increasing ``l``::

      slot = x & (M-1); s = symbol owning slot; x = freq[s] * (x >> 12) + slot - cum[s]
      if x < L: x = (x << 16) | next_word()          # words read in order from the stream's word array

  So the words of one step are consumed by its renormalizing lanes in lane order, steps in order.
- The encoder runs steps backwards (and lanes backwards inside a step), emitting ``x & 0xFFFF`` and shifting when
  ``x >= freq[s] << (32 - PROB_BITS)``, then ``x = ((x // freq[s]) << 12) + x % freq[s] + cum[s]``; it starts every
  lane at ``x = L``. Its word list, reversed, is the stream's word array; its final states are the decoder's
  initial states.
- A decoder ends with every lane back at ``L`` and every word consumed; anything else means corruption.

Each symbol is coded with its own table (``tables[s, i]`` selects one of the prepared tables), so one stream may
mix tables, e.g. one per channel class.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from codec.errors import CorruptStream, InvalidInput

__all__ = ["PROB_BITS", "LANES", "RansTables", "normalize_freqs", "encode_streams", "decode_streams"]

PROB_BITS = 12
M = 1 << PROB_BITS
LANES = 32
_L = 1 << 16
_MASK = M - 1


def normalize_freqs(counts: np.ndarray, total: int = M) -> np.ndarray:
    """Integer frequencies summing to ``total``, every symbol at least 1, close to ``counts`` (deterministic)."""
    counts = np.asarray(counts, dtype=np.float64)
    n = counts.size
    if n == 0 or n > total:
        raise InvalidInput(f"alphabet of {n} symbols does not fit {total} slots")
    p = counts / counts.sum() if counts.sum() > 0 else np.full(n, 1.0 / n)
    freq = np.maximum(1, np.floor(p * (total - n)).astype(np.int64) + 1)
    diff = total - int(freq.sum())
    order = np.argsort(-p, kind="stable")
    i = 0
    while diff != 0:  # give/take slots starting from the most probable symbols
        k = order[i % n]
        if diff > 0:
            freq[k] += 1
            diff -= 1
        elif freq[k] > 1:
            freq[k] -= 1
            diff += 1
        i += 1
    return freq.astype(np.uint32)


@dataclass(frozen=True)
class RansTables:
    """A stack of tables ``[num_tables, alphabet]`` with derived cumulative and slot->symbol arrays."""

    freq: np.ndarray  # uint32 [T, A]
    cum: np.ndarray  # uint32 [T, A]
    slot_sym: np.ndarray  # uint16 [T, M]
    packed_decode: np.ndarray  # int64 [T * M]: symbol | freq << 16 | (slot - cum) << 32

    @classmethod
    def from_freqs(cls, freq: np.ndarray) -> RansTables:
        """Tables from frequencies ``[T, A]``; a zero frequency marks a symbol that cannot occur."""
        freq = np.ascontiguousarray(freq, dtype=np.uint32)
        if freq.ndim != 2 or freq.shape[1] > 1 << 16:
            raise InvalidInput("rANS tables must be a 2-D array with at most 65536 symbols")
        if np.any(freq.sum(axis=1) != M):
            raise InvalidInput(f"rANS table frequencies must sum to {M}")
        cum = np.zeros_like(freq)
        cum[:, 1:] = np.cumsum(freq, axis=1)[:, :-1]
        slot_sym = np.empty((freq.shape[0], M), dtype=np.uint16)
        sym_ids = np.arange(freq.shape[1], dtype=np.uint16)
        for t in range(freq.shape[0]):
            slot_sym[t] = np.repeat(sym_ids, freq[t])
        s = slot_sym.astype(np.int64)
        rows = np.arange(freq.shape[0])[:, None]
        bias = np.arange(M, dtype=np.int64)[None, :] - cum.astype(np.int64)[rows, s]
        packed = s | (freq.astype(np.int64)[rows, s] << 16) | (bias << 32)
        return cls(freq, cum, slot_sym, packed.reshape(-1))

    @property
    def alphabet(self) -> int:
        return self.freq.shape[1]


def _steps(n: int) -> int:
    return -(-n // LANES)


def _lane_major(a: np.ndarray, steps: int, fill: int = 0) -> np.ndarray:
    """``[S, n]`` -> ``[steps, S * LANES]`` (padded with ``fill``), so that one step is one contiguous row."""
    num_streams, n = a.shape
    out = np.empty((steps, num_streams, LANES), dtype=np.int64)
    full = n // LANES
    out[:full] = a[:, :full * LANES].reshape(num_streams, full, LANES).transpose(1, 0, 2)
    if full < steps:
        out[full] = fill
        out[full, :, :n - full * LANES] = a[:, full * LANES:]
    return out.reshape(steps, -1)


def encode_streams(symbols: np.ndarray, table_ids: np.ndarray, tables: RansTables) -> tuple[list[bytes], np.ndarray]:
    """Encode ``symbols[s, i]`` (all streams the same length) with ``tables[table_ids[s, i]]``.

    Returns each stream's word bytes (little-endian uint16, decoder order) and final states ``uint32 [S, LANES]``.
    """
    symbols = np.asarray(symbols)
    num_streams, n = symbols.shape
    if np.any(symbols < 0) or np.any(symbols >= tables.alphabet):
        raise InvalidInput("symbol outside its table's alphabet")
    steps = _steps(n)
    pad = steps * LANES - n
    flat = np.broadcast_to(table_ids, symbols.shape).astype(np.int64) * tables.alphabet + symbols
    f_sym = tables.freq.reshape(-1).astype(np.int64)[flat]
    if np.any(f_sym == 0):
        raise InvalidInput("symbol has zero frequency in its table")
    f_all = _lane_major(f_sym, steps, fill=1)
    c_all = _lane_major(tables.cum.reshape(-1).astype(np.int64)[flat], steps)
    x = np.full(num_streams * LANES, _L, dtype=np.int64)
    words = np.zeros(num_streams * steps * LANES + 1, dtype=np.int64)
    ptr = np.arange(num_streams, dtype=np.int64) * (steps * LANES)  # each stream's next write position
    start = ptr.copy()
    shift = 32 - PROB_BITS
    active = np.ones((num_streams, LANES), dtype=bool)
    if pad:
        last_active = active.copy()
        last_active[:, LANES - pad:] = False
    for j in range(steps - 1, -1, -1):
        f = f_all[j]
        need = x >= (f << shift)
        if pad and j == steps - 1:
            need &= last_active.reshape(-1)
        if need.any():
            n2 = need.reshape(num_streams, LANES)
            after = np.cumsum(n2[:, ::-1], axis=1)[:, ::-1] - n2  # emitting lanes go in decreasing lane order
            pos = (ptr[:, None] + after)[n2]
            words[pos] = x[need] & 0xFFFF
            ptr += n2.sum(axis=1)
            x = np.where(need, x >> 16, x)
        q, r = np.divmod(x, f)
        new = (q << PROB_BITS) + r + c_all[j]
        if pad and j == steps - 1:
            new = np.where(last_active.reshape(-1), new, x)
        x = new
    out = [words[start[s]:ptr[s]][::-1].astype("<u2").tobytes() for s in range(num_streams)]
    return out, x.reshape(num_streams, LANES).astype(np.uint32)


def decode_streams(words: list[np.ndarray], states: np.ndarray, n: int, table_ids: np.ndarray,
                   tables: RansTables) -> np.ndarray:
    """Decode ``n`` symbols per stream; inverse of :func:`encode_streams`. Raises CorruptStream on bad input."""
    num_streams = len(words)
    if states.shape != (num_streams, LANES):
        raise CorruptStream("rANS state table has the wrong shape")
    if num_streams == 0 or n == 0:
        return np.zeros((num_streams, n), dtype=np.int64)
    steps = _steps(n)
    pad = steps * LANES - n
    lengths = np.array([len(w) for w in words], dtype=np.int64)
    offsets = np.zeros(num_streams, dtype=np.int64)
    offsets[1:] = np.cumsum(lengths)[:-1]
    # LANES spare words: a corrupt stream may over-read by at most one step before the check below catches it
    flat_words = np.concatenate([np.asarray(w, dtype=np.int64) for w in words] + [np.zeros(LANES, np.int64)])
    x = states.astype(np.int64).reshape(-1)
    if np.any(x < _L):
        raise CorruptStream("rANS initial state below the lower bound")
    base = _lane_major(np.broadcast_to(table_ids, (num_streams, n)), steps) * M
    dec = tables.packed_decode
    out = np.empty((steps, num_streams * LANES), dtype=np.int64)
    rd = offsets.copy()
    end = offsets + lengths
    last_active = np.ones((num_streams, LANES), dtype=bool)
    last_active[:, LANES - pad:] = False
    last_active = last_active.reshape(-1)
    for j in range(steps):
        d = dec[base[j] + (x & _MASK)]
        out[j] = d
        xn = ((d >> 16) & 0x1FFF) * (x >> PROB_BITS) + (d >> 32)
        if pad and j == steps - 1:
            xn = np.where(last_active, xn, x)
        need = xn < _L
        if need.any():
            n2 = need.reshape(num_streams, LANES)
            pos = (rd[:, None] + np.cumsum(n2, axis=1) - 1)[n2]
            rd += n2.sum(axis=1)
            if np.any(rd > end):
                raise CorruptStream("rANS stream ended early (truncated or corrupt)")
            xn[need] = (xn[need] << 16) | flat_words[pos]
        x = xn
    if np.any(rd != end) or np.any(x != _L):
        raise CorruptStream("rANS streams did not end cleanly (corrupt or foreign bitstream)")
    sym = (out & 0xFFFF).reshape(steps, num_streams, LANES).transpose(1, 0, 2).reshape(num_streams, -1)
    return sym[:, :n]
