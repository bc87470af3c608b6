"""The prefill-only request scheduler (``kdn.client.prefill_schedule``): JCT prediction and fitting, SRJF and FIFO
order, recalibration, and the aging (starvation) bound, all on a simulated clock (no timing)."""

from __future__ import annotations

import random

import pytest

from kdn.client.prefill_schedule import JCTModel, PrefillScheduler
from kdn.errors import ConfigError, InvalidRequest

MODEL = JCTModel(per_token_s=1e-3, per_pair_s=1e-7, base_s=0.01, rtt_s=0.002, bytes_per_s=1e9)


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_prediction_counts_only_uncached_tokens_plus_delivery():
    full = MODEL.predict(4000)
    hit = MODEL.predict(4000, 3000, cached_bytes=3000 * 100_000)
    assert full == pytest.approx(0.01 + 4.0 + 1e-7 * 4000 * 2000.5)
    s = 1000
    assert hit == pytest.approx(0.01 + 1e-3 * s + 1e-7 * s * (3000 + (s + 1) / 2) + 0.002 + 0.3)
    assert MODEL.delivery_s(0) == 0.0 and hit < full
    over = JCTModel(per_token_s=1e-4, rtt_s=0.002, bytes_per_s=1e9, overlap=True)
    assert over.predict(4000, 3000, 3000 * 100_000) == pytest.approx(0.002 + 0.3)  # transfer > 0.1 s compute
    assert over.predict(4000, 3000, 3000 * 100) == pytest.approx(0.002 + 0.1)  # compute > transfer
    with pytest.raises(InvalidRequest):
        MODEL.predict(100, 200)
    with pytest.raises(ConfigError):
        JCTModel(per_token_s=-1)


def test_fit_recovers_the_terms_and_drops_negative_ones():
    truth = JCTModel(per_token_s=2e-4, per_pair_s=3e-8, base_s=0.005)
    samples = [(n, c, truth.compute_s(n, c)) for n in (256, 512, 1024, 2048, 4096) for c in (0, n // 2)]
    fit = JCTModel.fit(samples, bytes_per_s=5e8)
    assert fit.per_token_s == pytest.approx(2e-4, rel=1e-6)
    assert fit.per_pair_s == pytest.approx(3e-8, rel=1e-6)
    assert fit.base_s == pytest.approx(0.005, rel=1e-6) and fit.bytes_per_s == 5e8
    # purely linear data with a negative intercept: the intercept is dropped, not fitted below zero
    lin = JCTModel.fit([(n, 0, 1e-3 * n - 0.05) for n in (100, 200, 400, 800)])
    assert lin.base_s == 0.0 and lin.per_token_s > 0 and lin.predict(100) >= 0
    with pytest.raises(InvalidRequest):
        JCTModel.fit([(1, 0, 1.0)])


def test_srjf_runs_the_shortest_predicted_job_first_and_fifo_in_arrival_order():
    for policy, want in (("srjf", ["hit", "c", "a", "b"]), ("fifo", ["a", "b", "c", "hit"])):
        clock = Clock()
        sched = PrefillScheduler(MODEL, policy=policy, aging=0.1, clock=clock)
        for rid, n, cached in (("a", 2000, 0), ("b", 8000, 0), ("c", 300, 0), ("hit", 8000, 7936)):
            sched.submit(rid, n, cached, cached_bytes=cached * 1000)
            clock.t += 0.001
        # 8000 tokens with 7936 cached is 64 to compute plus a delivery: shorter work than even the 300-token miss
        assert [sched.pop().request_id for _ in range(4)] == want
        assert sched.pop() is None and len(sched) == 0


def test_recalibration_promotes_a_request_whose_prefix_became_cached():
    clock = Clock()
    sched = PrefillScheduler(MODEL, clock=clock)
    a = sched.submit("a", 6000)
    sched.submit("b", 3000)
    assert sched.peek().request_id == "b"
    sched.recalibrate(a, 5952, 5952 * 1000)  # another request stored a's prefix meanwhile
    assert a.predicted_s < 1.0 and sched.pop() is a
    assert sched.cancel(a) is False
    with pytest.raises(InvalidRequest):
        sched.recalibrate(a, 0, 0)
    with pytest.raises(ConfigError):
        PrefillScheduler(MODEL, policy="lifo")


def _serve(trace, aging):
    """Run-to-completion single server; returns (start order, submit time of each id, predicted time of each)."""
    clock = Clock()
    sched = PrefillScheduler(MODEL, aging=aging, clock=clock)
    order, submitted, predicted = [], {}, {}
    i, now = 0, 0.0
    while i < len(trace) or len(sched):
        if not len(sched):
            now = max(now, trace[i][0])
        while i < len(trace) and trace[i][0] <= now:
            clock.t = trace[i][0]
            req = sched.submit(i, trace[i][1])
            submitted[i], predicted[i] = req.submitted, req.predicted_s
            i += 1
        clock.t = now
        req = sched.pop()
        order.append(req.request_id)
        now += req.predicted_s
    return order, submitted, predicted


def _overtaken_from_beyond_the_window(order, submitted, predicted, aging):
    """Pairs (J, K): K was submitted more than predicted(J)/aging after J and still started before J."""
    pos = {rid: k for k, rid in enumerate(order)}
    bad = []
    for j in order:
        window = predicted[j] / aging if aging else float("inf")
        for k in order[:pos[j]]:
            if submitted[k] > submitted[j] + window:
                bad.append((j, k))
    return bad


def test_aging_bounds_how_long_after_a_request_others_may_overtake_it():
    rng = random.Random(3)
    t, trace = 0.0, []
    for _ in range(400):  # heavy-tailed lengths at ~0.95 load: a long prompt would starve under pure SRJF
        n = int(256 / (1 - rng.random() * (1 - (256 / 16384) ** 1.1)) ** (1 / 1.1))
        t += rng.expovariate(0.95 / 1.1)
        trace.append((t, n))
    for aging in (0.05, 0.1, 0.5):
        order, submitted, predicted = _serve(trace, aging)
        assert sorted(order) == list(range(len(trace)))
        assert _overtaken_from_beyond_the_window(order, submitted, predicted, aging) == []
    # the check has teeth: without aging, later arrivals overtake long requests from far outside the window
    order, submitted, predicted = _serve(trace, 0.0)
    assert _overtaken_from_beyond_the_window(order, submitted, predicted, 0.1)


# -- preemption between layers ----------------------------------------------------------------------------------
LAYERS = 10


def _serve_layers(trace, policy, aging, layers=LAYERS):
    """A server that asks ``pick()`` before every layer. Returns per-layer run log [(id, time)], submit times,
    predicted times and finish times; ``trace`` is [(arrival, n_input)]."""
    clock = Clock()
    sched = PrefillScheduler(MODEL, policy=policy, aging=aging, clock=clock, num_layers=layers)
    log, submitted, predicted, finished = [], {}, {}, {}
    i, now = 0, 0.0
    while i < len(trace) or len(sched):
        if not len(sched):
            now = max(now, trace[i][0])
        while i < len(trace) and trace[i][0] <= now:
            clock.t = trace[i][0]
            req = sched.submit(i, trace[i][1])
            submitted[i], predicted[i] = req.submitted, req.predicted_s
            i += 1
        clock.t = now
        req = sched.pick()
        log.append((req.request_id, now))
        now += req.predicted_s / layers
        if sched.advance(req):
            finished[req.request_id] = now
    return log, submitted, predicted, finished


def test_preemptive_srjf_switches_to_a_shorter_arrival_at_the_next_layer_boundary():
    long_s = MODEL.predict(8000)
    trace = [(0.0, 8000), (0.35 * long_s, 300), (0.36 * long_s, 2000)]
    log, _, predicted, finished = _serve_layers(trace, "srjf-preemptive", 0.1)
    runs = [rid for rid, _ in log]
    # the long job runs its first 4 layers (boundaries at 0, .1, .2, .3 of it), then the 300-token job arrives at
    # .35 and takes the boundary at .4, then the 2000-token one; the long job resumes with its 6 layers left
    assert runs == [0] * 4 + [1] * LAYERS + [2] * LAYERS + [0] * 6
    assert finished[1] == pytest.approx(0.4 * long_s + predicted[1])
    # run to completion (the baselines): the short ones wait for the whole long job
    for policy, order in (("srjf", [0, 1, 2]), ("fifo", [0, 1, 2])):
        log, *_ = _serve_layers(trace, policy, 0.1)
        assert [rid for k, (rid, _) in enumerate(log) if k % LAYERS == 0] == order
    # a job that is shorter in *remaining* time is not preempted: 9 of 10 layers of a 2000-token job done
    # (0.2 s left) beats a newly arrived 300-token job (0.32 s)
    log, *_ = _serve_layers([(0.0, 2000), (0.9 * MODEL.predict(2000) - 1e-9, 300)], "srjf-preemptive", 0.0)
    assert [rid for rid, _ in log] == [0] * LAYERS + [1] * LAYERS


def test_preemptive_bookkeeping_and_errors():
    clock = Clock()
    sched = PrefillScheduler(MODEL, policy="srjf-preemptive", clock=clock, num_layers=4)
    a = sched.submit("a", 4000)
    assert sched.pick() is a and not sched.advance(a, 3)
    assert a.layers_done == 3 and a.remaining_s == pytest.approx(a.predicted_s / 4)
    with pytest.raises(InvalidRequest):
        sched.recalibrate(a, 3000, 0)  # started: its prefix is already being computed
    with pytest.raises(InvalidRequest):
        sched.pop()
    with pytest.raises(InvalidRequest):
        sched.advance(a, 0)
    assert sched.advance(a, 5) and len(sched) == 0 and sched.pick() is None
    with pytest.raises(InvalidRequest):
        sched.advance(a)  # finished
    with pytest.raises(ConfigError):
        PrefillScheduler(MODEL, num_layers=0)
    rtc = PrefillScheduler(MODEL, policy="srjf", clock=clock, num_layers=4)
    x = rtc.submit("x", 4000)
    assert rtc.pick() is x and len(rtc) == 1
    rtc.submit("y", 100)
    assert rtc.pick() is x  # run to completion: the started job keeps the server
    assert rtc.cancel(x) and rtc.pick().request_id == "y"


def _trace(seed, count=300, load=0.95):
    rng = random.Random(seed)
    t, out = 0.0, []
    mean = 1.1
    for _ in range(count):
        n = int(256 / (1 - rng.random() * (1 - (256 / 16384) ** 1.1)) ** (1 / 1.1))
        t += rng.expovariate(load / mean)
        out.append((t, n))
    return out


def test_preemptive_aging_bound_no_layer_of_a_much_later_request_runs_before_a_job_finishes():
    trace = _trace(5)

    def violations(log, submitted, predicted, finished, aging):
        bad = 0
        for rid, at in log:
            for j, done in finished.items():  # j unfinished at `at`, and rid submitted beyond j's window
                if submitted[j] <= at < done and j != rid and submitted[rid] > submitted[j] + predicted[j] / aging:
                    bad += 1
        return bad

    for aging in (0.05, 0.1, 0.5):
        log, submitted, predicted, finished = _serve_layers(trace, "srjf-preemptive", aging)
        assert sorted(finished) == list(range(len(trace)))
        assert violations(log, submitted, predicted, finished, aging) == 0
    # teeth: without aging, later short jobs run layers while long jobs from far earlier wait
    log, submitted, predicted, finished = _serve_layers(trace, "srjf-preemptive", 0.0)
    assert violations(log, submitted, predicted, finished, 0.1) > 0


def test_preemption_cuts_the_mean_completion_time_against_run_to_completion():
    trace = _trace(7)
    mean = {}
    for policy in ("fifo", "srjf", "srjf-preemptive"):
        _, submitted, _, finished = _serve_layers(trace, policy, 0.1)
        mean[policy] = sum(finished[i] - submitted[i] for i in finished) / len(finished)
    assert mean["srjf-preemptive"] < mean["srjf"] < mean["fifo"]
