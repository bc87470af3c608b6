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

**Preemption between layers** (``policy="srjf-preemptive"``). A prefill-only pass that holds one layer's KV can
be paused at any layer boundary holding only its hidden states (:class:`connectors.hf.prefill_only.PrefillJob`).
The server then asks :meth:`PrefillScheduler.pick` before **every layer** and reports each layer with
:meth:`~PrefillScheduler.advance`. A job's remaining time is ``remaining_layers x predicted_s / num_layers`` (the
prediction spread evenly over the layers), and the job with the smallest ``remaining_s - λ · waiting_time`` runs
its next layer, so a short request that arrives while a long one computes overtakes it at the next boundary. The
aging rule and its bound are the same: a job's key can only fall while it runs (its remaining time falls), so a
request J with predicted time ``p`` is never preempted by a request submitted more than ``p / λ`` seconds after it,
nor does such a request run a single layer before J finishes. ``"srjf"`` and ``"fifo"`` stay run-to-completion
(``pick`` keeps returning the started job until it is done): the baselines.

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

__all__ = ["JCTModel", "PrefillRequest", "PrefillScheduler", "POLICIES", "PREEMPTIVE", "DEFAULT_AGING"]

POLICIES = ("srjf", "fifo", "srjf-preemptive")
PREEMPTIVE = ("srjf-preemptive",)
DEFAULT_LAYERS = 32
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
    num_layers: int = 1
    layers_done: int = 0
    """Layers run so far (``advance``); a started request is no longer recalibrated."""

    @property
    def remaining_s(self) -> float:
        """Predicted time of the layers still to run (the prediction spread evenly over the layers)."""
        return self.predicted_s * (self.num_layers - self.layers_done) / self.num_layers


class PrefillScheduler:
    """Orders prefill-only requests: ``"srjf"`` (smallest ``jct - aging * waited`` first), ``"fifo"`` (both run to
    completion) or ``"srjf-preemptive"`` (smallest ``remaining - aging * waited`` at every layer boundary of
    ``num_layers``-layer passes)."""

    def __init__(self, model: JCTModel | None = None, policy: str = "srjf", aging: float = DEFAULT_AGING,
                 clock: Callable[[], float] = time.monotonic, num_layers: int = DEFAULT_LAYERS) -> None:
        if policy not in POLICIES:
            raise ConfigError(f"unknown prefill scheduling policy {policy!r} (one of {', '.join(POLICIES)})")
        if num_layers < 1:
            raise ConfigError(f"num_layers must be >= 1, got {num_layers}")
        self.model = model or JCTModel()
        self.policy = policy
        self.preemptive = policy in PREEMPTIVE
        self.num_layers = num_layers
        self._sched = TransferScheduler("fifo" if policy == "fifo" else "srpt", aging=aging, throughput=_NS,
                                        clock=clock)
        self._clock = clock
        self._lock = threading.Lock()
        self._by_ticket: dict[int, PrefillRequest] = {}
        self._running: PrefillRequest | None = None  # run-to-completion: the started request

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
                                 ticket, self.num_layers)
            self._by_ticket[id(ticket)] = req
            return req

    def recalibrate(self, request: PrefillRequest, n_cached: int, cached_bytes: int) -> None:
        """Re-predict a waiting request after the cache changed (more or less of its prompt is cached now)."""
        predicted = self.model.predict(request.n_input, n_cached, cached_bytes)
        with self._lock:
            if id(request.ticket) not in self._by_ticket or request.layers_done:
                raise InvalidRequest(f"recalibrate of a request that is not waiting: {request.request_id!r}")
            request.n_cached, request.cached_bytes, request.predicted_s = n_cached, cached_bytes, predicted
            self._sched.update(request.ticket, _ns(predicted))

    def peek(self) -> PrefillRequest | None:
        with self._lock:
            t = self._sched.next()
            return None if t is None else self._by_ticket[id(t)]

    def pop(self) -> PrefillRequest | None:
        """Remove and return the request to run now, to completion (None when none waits; not preemptive)."""
        if self.preemptive:
            raise InvalidRequest("a preemptive scheduler is driven by pick() and advance(), not pop()")
        with self._lock:
            t = self._sched.next()
            if t is None:
                return None
            self._sched.done(t)
            return self._by_ticket.pop(id(t))

    def pick(self) -> PrefillRequest | None:
        """The request whose next layer runs now (None when none is left). Run-to-completion policies keep
        returning the started request until :meth:`advance` finishes it; ``srjf-preemptive`` re-decides at every
        layer boundary."""
        with self._lock:
            if self._running is not None:
                return self._running
            t = self._sched.next()
            if t is None:
                return None
            req = self._by_ticket[id(t)]
            if not self.preemptive:
                self._sched.done(t)
                del self._by_ticket[id(t)]
                self._running = req
            return req

    def advance(self, request: PrefillRequest, layers: int = 1) -> bool:
        """Report that ``layers`` more layers of ``request`` ran; True (and the request is gone) when it is
        done."""
        if layers < 1:
            raise InvalidRequest(f"layers must be >= 1, got {layers}")
        with self._lock:
            if request is not self._running and self._by_ticket.get(id(request.ticket)) is not request:
                raise InvalidRequest(f"advance of a request that is not queued: {request.request_id!r}")
            request.layers_done = min(request.num_layers, request.layers_done + layers)
            if request.layers_done < request.num_layers:
                if self.preemptive:
                    self._sched.update(request.ticket, _ns(request.remaining_s))
                return False
            if request is self._running:
                self._running = None
            else:
                self._by_ticket.pop(id(request.ticket))
                self._sched.done(request.ticket)
            return True

    def cancel(self, request: PrefillRequest) -> bool:
        with self._lock:
            if request is self._running:
                self._running = None
                return True
            if self._by_ticket.pop(id(request.ticket), None) is None:
                return False
            return self._sched.done(request.ticket)

    def score(self, request: PrefillRequest, now: float | None = None) -> float:
        """The request's ranking score in seconds (smaller runs first)."""
        return self._sched.score(request.ticket, now)

    def __len__(self) -> int:
        return len(self._sched) + (self._running is not None)


def _ns(seconds: float) -> int:
    return max(0, int(round(seconds * _NS)))
