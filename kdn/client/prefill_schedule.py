"""Which prefill-only request runs next: shortest predicted completion first with aging (default) or FIFO.

A prefill-only request (one output token, PrefillOnly arXiv 2505.07203) has a completion time that is known before
it starts: its output length is fixed, so the job is the prefill of its **uncached** tokens plus the delivery of its
cached prefix from KDN (whose size the lookup tells). :class:`JCTModel` predicts that time; it is fitted from
measured prefills (:meth:`JCTModel.fit`; the paper fits ``n_input - n_cached`` linearly, r = 0.987). We add the
attention term, which grows with the context each computed token attends to::

    compute_s  = base_s + per_token_s * s + per_pair_s * s * (n_cached + (s + 1) / 2)     # s = uncached tokens
    delivery_s = 0 if nothing is cached, else rtt_s + cached_bytes / bytes_per_s
    jct        = compute_s + delivery_s

(with ``overlap=True``, for layer-major delivery, a hit costs ``rtt_s + max(compute_s, transfer)`` instead.)

:class:`PrefillScheduler` orders requests by the paper's score ``jct - λ · waiting_time`` and runs each to
completion (a prefill is not preempted). It is the :class:`~kdn.wire.schedule.TransferScheduler` with the job's
predicted nanoseconds as its "bytes" and 1e9 of them per second as its "throughput", so the transfer scheduler's
starvation bound carries over unchanged: a request J with predicted time ``p`` can only be overtaken by requests
submitted within ``p / λ`` seconds after it (``tests/test_prefill_only_schedule.py`` checks it on a trace). λ is
dimensionless here (seconds of priority per second waited); the paper's λ = 500 *tokens* per second equals
``500 * per_token_s`` in these units (0.05 at 10K tokens/s). ``recalibrate`` re-predicts a waiting request when
the cache changes (the paper's continuous JCT calibration), e.g. after a request that shares its prefix stored it.

Thread-safe; the standard library only.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

from kdn.errors import ConfigError, InvalidRequest
from kdn.wire.schedule import Ticket, TransferScheduler

__all__ = ["JCTModel", "PrefillRequest", "PrefillScheduler", "POLICIES", "DEFAULT_AGING"]

POLICIES = ("srjf", "fifo")
DEFAULT_AGING = 0.1
_NS = 1e9


@dataclass(frozen=True)
class JCTModel:
    """Predicted completion time (seconds) of a one-token request from its token counts and cached bytes."""

    per_token_s: float = 1e-4
    """Linear (projection, MLP) cost of one computed token."""
    per_pair_s: float = 0.0
    """Attention cost of one (computed token, context token) pair."""
    base_s: float = 0.0
    """Fixed cost of any request (the lm head, launch overhead)."""
    rtt_s: float = 0.0
    """Fixed cost of a KDN delivery (lookup, first bytes)."""
    bytes_per_s: float = math.inf
    """Delivery rate of cached KV (the client's measured link rate)."""
    overlap: bool = False
    """Delivery overlaps the compute (layer-major delivery: layer ``i`` arrives while earlier layers compute), so
    a hit costs ``rtt_s + max(compute, transfer)`` instead of their sum."""

    def __post_init__(self) -> None:
        if min(self.per_token_s, self.per_pair_s, self.base_s, self.rtt_s) < 0 or not self.bytes_per_s > 0:
            raise ConfigError(f"JCT model terms must be >= 0 and bytes_per_s > 0: {self}")

    def compute_s(self, n_input: int, n_cached: int = 0) -> float:
        """The prefill of the ``n_input - n_cached`` uncached tokens on top of ``n_cached`` cached ones."""
        if n_input < 0 or not 0 <= n_cached <= n_input:
            raise InvalidRequest(f"need 0 <= n_cached <= n_input, got {n_cached}, {n_input}")
        s = n_input - n_cached
        return self.base_s + self.per_token_s * s + self.per_pair_s * s * (n_cached + (s + 1) / 2)

    def delivery_s(self, cached_bytes: int) -> float:
        return 0.0 if cached_bytes <= 0 else self.rtt_s + cached_bytes / self.bytes_per_s

    def predict(self, n_input: int, n_cached: int = 0, cached_bytes: int = 0) -> float:
        compute = self.compute_s(n_input, n_cached)
        if self.overlap and cached_bytes > 0:
            return self.rtt_s + max(compute, cached_bytes / self.bytes_per_s)
        return compute + self.delivery_s(cached_bytes)

    @classmethod
    def fit(cls, samples: Sequence[tuple[int, int, float]], **delivery: float) -> JCTModel:
        """Least squares over measured ``(n_input, n_cached, seconds)`` prefills (non-negative terms: a term that
        fits negative is dropped and the rest refitted). ``delivery`` sets ``rtt_s`` / ``bytes_per_s``."""
        if len(samples) < 3:
            raise InvalidRequest(f"fitting a JCT model needs >= 3 samples, got {len(samples)}")
        rows = []
        for n, c, t in samples:
            s = n - c
            rows.append(((1.0, float(s), s * (c + (s + 1) / 2)), float(t)))
        active = [0, 1, 2]
        while True:
            coef = _lstsq([[x[i] for i in active] for x, _ in rows], [y for _, y in rows])
            if coef is None or all(v >= 0 for v in coef) or len(active) == 1:
                break
            active.pop(min(range(len(active)), key=lambda k: coef[k]))
        terms = [0.0, 0.0, 0.0]
        for i, v in zip(active, coef or [0.0] * len(active)):
            terms[i] = max(0.0, v)
        return cls(per_token_s=terms[1], per_pair_s=terms[2], base_s=terms[0], **delivery)


def _lstsq(x: list[list[float]], y: list[float]) -> list[float] | None:
    """Normal equations with Gaussian elimination (k <= 3 unknowns); None when singular."""
    k = len(x[0])
    # scale columns so the pair term (~1e7) and the constant (1) are comparable
    scale = [max(abs(r[j]) for r in x) or 1.0 for j in range(k)]
    a = [[sum(r[i] / scale[i] * r[j] / scale[j] for r in x) for j in range(k)] +
         [sum(r[i] / scale[i] * v for r, v in zip(x, y))] for i in range(k)]
    for col in range(k):
        piv = max(range(col, k), key=lambda r: abs(a[r][col]))
        if abs(a[piv][col]) < 1e-12:
            return None
        a[col], a[piv] = a[piv], a[col]
        for r in range(k):
            if r != col:
                f = a[r][col] / a[col][col]
                a[r] = [u - f * w for u, w in zip(a[r], a[col])]
    return [a[i][k] / a[i][i] / scale[i] for i in range(k)]


@dataclass(eq=False)
class PrefillRequest:
    """A queued request (read-only; change it through the scheduler)."""

    request_id: Hashable
    n_input: int
    n_cached: int
    cached_bytes: int
    predicted_s: float
    submitted: float
    payload: object = None
    ticket: Ticket = field(repr=False, default=None)  # type: ignore[assignment]


class PrefillScheduler:
    """Orders prefill-only requests: ``"srjf"`` (smallest ``jct - aging * waited`` first) or ``"fifo"``."""

    def __init__(self, model: JCTModel | None = None, policy: str = "srjf", aging: float = DEFAULT_AGING,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if policy not in POLICIES:
            raise ConfigError(f"unknown prefill scheduling policy {policy!r} (one of {', '.join(POLICIES)})")
        self.model = model or JCTModel()
        self.policy = policy
        self._sched = TransferScheduler("srpt" if policy == "srjf" else "fifo", aging=aging, throughput=_NS,
                                        clock=clock)
        self._clock = clock
        self._lock = threading.Lock()
        self._by_ticket: dict[int, PrefillRequest] = {}

    @property
    def aging(self) -> float:
        return self._sched.aging

    def submit(self, request_id: Hashable, n_input: int, n_cached: int = 0, cached_bytes: int = 0,
               payload: object = None) -> PrefillRequest:
        """Queue a request; ``n_cached`` / ``cached_bytes`` come from the KDN lookup of its prompt."""
        predicted = self.model.predict(n_input, n_cached, cached_bytes)
        with self._lock:
            ticket = self._sched.submit(request_id, _ns(predicted))
            req = PrefillRequest(request_id, n_input, n_cached, cached_bytes, predicted, ticket.submitted, payload,
                                 ticket)
            self._by_ticket[id(ticket)] = req
            return req

    def recalibrate(self, request: PrefillRequest, n_cached: int, cached_bytes: int) -> None:
        """Re-predict a waiting request after the cache changed (more or less of its prompt is cached now)."""
        predicted = self.model.predict(request.n_input, n_cached, cached_bytes)
        with self._lock:
            if id(request.ticket) not in self._by_ticket:
                raise InvalidRequest(f"recalibrate of a request that is not waiting: {request.request_id!r}")
            request.n_cached, request.cached_bytes, request.predicted_s = n_cached, cached_bytes, predicted
            self._sched.update(request.ticket, _ns(predicted))

    def peek(self) -> PrefillRequest | None:
        with self._lock:
            t = self._sched.next()
            return None if t is None else self._by_ticket[id(t)]

    def pop(self) -> PrefillRequest | None:
        """Remove and return the request to run now (None when none waits)."""
        with self._lock:
            t = self._sched.next()
            if t is None:
                return None
            self._sched.done(t)
            return self._by_ticket.pop(id(t))

    def cancel(self, request: PrefillRequest) -> bool:
        with self._lock:
            if self._by_ticket.pop(id(request.ticket), None) is None:
                return False
            return self._sched.done(request.ticket)

    def score(self, request: PrefillRequest, now: float | None = None) -> float:
        """The request's ranking score in seconds (smaller runs first)."""
        return self._sched.score(request.ticket, now)

    def __len__(self) -> int:
        return len(self._sched)


def _ns(seconds: float) -> int:
    return max(0, int(round(seconds * _NS)))
