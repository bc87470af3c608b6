"""The transfer scheduler (kdn/wire/schedule.py) and its benchmark (kdn/bench/schedule.py).

Deterministic: a manual clock drives the scores; the threaded tests only synchronize on the scheduler's state and
assert orders and counts, never durations.
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import json
import math
import threading
import time

import pytest

from kdn.bench.schedule import GOAL_MEAN, GOAL_P99, MiB, add_arguments, compare, run, simulate, trace
from kdn.errors import ConfigError, DeadlineExceeded, InvalidRequest
from kdn.wire.schedule import DEFAULT_AGING, TransferScheduler


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def drain(sched: TransferScheduler) -> list:
    order = []
    while (t := sched.next()) is not None:
        order.append(t.job_id)
        sched.done(t)
    return order


@pytest.mark.parametrize("aging", [0.0, DEFAULT_AGING, 1.0])
def test_srpt_orders_by_remaining_bytes(aging: float) -> None:
    sched = TransferScheduler("srpt", aging=aging, clock=Clock())
    for job, size in [("c", 500), ("a", 100), ("d", 900), ("b", 300), ("a2", 100)]:
        sched.submit(job, size)
    assert len(sched) == 5
    assert drain(sched) == ["a", "a2", "b", "c", "d"]  # equal sizes: arrival order
    assert len(sched) == 0 and sched.next() is None


def test_fifo_serves_in_arrival_order() -> None:
    clock = Clock()
    sched = TransferScheduler("fifo", clock=clock)
    for job, size in [("c", 500), ("a", 100), ("d", 900), ("b", 300)]:
        sched.submit(job, size)
        clock.now += 1.0
    first = sched.next()
    sched.update(first, 1)  # progress does not reorder FIFO
    assert sched.next() is first
    assert drain(sched) == ["c", "a", "d", "b"]


def test_score_is_seconds_of_transfer_minus_aged_wait() -> None:
    clock = Clock()
    sched = TransferScheduler("srpt", aging=0.5, throughput=1000.0, clock=clock)
    t = sched.submit("x", 4000)
    clock.now = 2.0
    assert sched.score(t) == pytest.approx(4.0 - 0.5 * 2.0)
    assert sched.score(t, now=6.0) == pytest.approx(4.0 - 3.0)
    assert TransferScheduler("fifo", clock=clock).score(t, now=6.0) == pytest.approx(-6.0)


def test_update_reorders_and_done_semantics() -> None:
    sched = TransferScheduler("srpt", aging=0.0, clock=Clock())
    big, mid = sched.submit("big", 1000), sched.submit("mid", 500)
    assert sched.next() is mid
    sched.update(big, 10)  # most of it went out: now the shortest
    assert sched.next() is big
    sched.update(big, 2000)  # re-requested: remaining may grow again
    assert sched.next() is mid
    assert sched.done(mid) is True and sched.done(mid) is False  # idempotent
    assert len(sched) == 1 and sched.next() is big
    with pytest.raises(InvalidRequest):
        sched.update(mid, 5)
    sched.update(big, 0)  # zero left stays in the queue until done
    assert sched.next() is big and sched.done(big)
    assert sched.next() is None and len(sched) == 0


def test_stale_heap_entries_are_dropped() -> None:
    sched = TransferScheduler("srpt", clock=Clock())
    others = [sched.submit(i, 10**9) for i in range(5)]
    t = sched.submit("streaming", 10**6)
    for left in range(10**6, 0, -1000):  # a thousand chunk updates, never reaching the heap's top
        sched.update(t, left)
        sched.update(others[0], 10**9 + left)
    assert len(sched._heap) <= 2 * len(sched) + 65
    assert sched.next() is t


def test_invalid_arguments() -> None:
    with pytest.raises(ConfigError):
        TransferScheduler("lifo")
    with pytest.raises(ConfigError):
        TransferScheduler(aging=-0.1)
    with pytest.raises(ConfigError):
        TransferScheduler(throughput=0)
    with pytest.raises(ConfigError):
        TransferScheduler(slots=0)
    sched = TransferScheduler()
    for bad in (-1, 1.5, "10"):
        with pytest.raises(InvalidRequest):
            sched.submit("x", bad)
    with pytest.raises(ConfigError):
        sched.set_throughput(-1.0)


def test_throughput_estimate_rescales_the_bytes_term() -> None:
    clock = Clock()
    sched = TransferScheduler("srpt", aging=1.0, throughput=100.0, clock=clock)
    old = sched.submit("old", 1000)
    clock.now = 1.0
    new = sched.submit("new", 100)
    assert sched.next() is new  # 100/100 + 1 = 2 s  <  1000/100 + 0 = 10 s
    sched.set_throughput(1000.0)
    assert sched.next() is old  # 1000/1000 + 0 = 1 s  <  100/1000 + 1 = 1.1 s


def test_aging_bound_old_large_job_beats_a_stream_of_small_ones() -> None:
    """Big job R bytes at t=0; a small job of s bytes arrives every dt and is served at once while it wins.

    Small job k (at k*dt) scores s/B + λ*k*dt against the big job's R/B (static keys), so it wins iff
    k*dt < (R - s)/(λ*B): the big job goes first at k* = ceil((R - s)/(λ*B*dt)), within the general bound of
    R/(λ*B) seconds after its submission (no job submitted later than that can overtake it).
    """
    B, R, s, dt, lam = 1000.0, 10_000, 100, 1.0, 0.5
    clock = Clock()
    sched = TransferScheduler("srpt", aging=lam, throughput=B, clock=clock)
    big = sched.submit("big", R)
    expected = math.ceil((R - s) / (lam * B * dt))
    for k in itertools.count():
        clock.now = k * dt
        sched.submit(("small", k), s)
        t = sched.next()
        if t is big:
            break
        assert t.job_id == ("small", k)
        sched.done(t)
    assert k == expected == 20
    assert clock.now <= R / (lam * B)
    # without aging the same stream starves it; FIFO serves it first
    sched = TransferScheduler("srpt", aging=0.0, throughput=B, clock=clock)
    big = sched.submit("big", R)
    for k in range(1000):
        sched.submit(k, s)
        assert sched.next() is not big
        sched.done(sched.next())
    sched = TransferScheduler("fifo", clock=clock)
    big = sched.submit("big", R)
    sched.submit("small", s)
    assert sched.next() is big


@pytest.mark.parametrize("aging", [DEFAULT_AGING, 0.5, 2.0])  # 0.5 and 2 fail if aging is ignored (pure SRPT)
def test_aging_bound_holds_for_every_job_of_a_trace(aging: float) -> None:
    """Completion under SRPT+aging <= FIFO's + (bytes submitted within r/(λ·B) after the job) / B, per job."""
    link, chunk = 1.25e9, 4 * MiB
    jobs = trace(1500, 0.9, link, seed=3)
    fifo = simulate(jobs, "fifo", 0.0, link, chunk)
    srpt = simulate(jobs, "srpt", aging, link, chunk)
    arrivals = [a for a, _ in jobs]
    prefix = list(itertools.accumulate((s for _, s in jobs), initial=0))
    for j, (a, r) in enumerate(jobs):
        end = bisect.bisect_right(arrivals, a + r / (aging * link))
        window = prefix[end] - prefix[j + 1]  # bytes of the jobs submitted in (a, a + r/(λB)]
        assert srpt[j] <= fifo[j] + window / link + 1e-6, j


def test_next_skips_jobs_that_hold_a_slot() -> None:
    sched = TransferScheduler("srpt", slots=2, clock=Clock())
    small, big = sched.submit("small", 10), sched.submit("big", 100)
    assert sched.acquire(small)
    assert sched.next() is big
    sched.release(small)
    assert sched.next() is small
    sched.release(small)  # not holding: no-op


def test_slot_timeout_and_done_frees_the_slot() -> None:
    sched = TransferScheduler(slots=1, clock=Clock())
    a, b = sched.submit("a", 10), sched.submit("b", 20)
    assert sched.acquire(a)
    with pytest.raises(InvalidRequest):
        sched.acquire(a)  # already holds one
    assert sched.acquire(b, timeout=0) is False
    with pytest.raises(DeadlineExceeded):
        with sched.slot(b, timeout=0):
            pass
    assert sched.waiting() == 0
    sched.done(a)  # finishing frees the slot
    with sched.slot(b, timeout=0):
        assert sched.next() is None
    with pytest.raises(InvalidRequest):
        sched.acquire(a)  # done


def test_done_while_waiting_for_a_slot_raises_in_the_waiter() -> None:
    sched = TransferScheduler(slots=1, clock=Clock())
    holder, waiter = sched.submit("holder", 1), sched.submit("waiter", 1)
    assert sched.acquire(holder)
    raised: list[BaseException] = []

    def wait() -> None:
        try:
            sched.acquire(waiter)
        except InvalidRequest as exc:
            raised.append(exc)
    th = threading.Thread(target=wait)
    th.start()
    _wait_for(lambda: sched.waiting() == 1, "the waiter blocks")
    sched.done(waiter)
    th.join()
    assert len(raised) == 1 and sched.waiting() == 0
    sched.done(holder)
    assert sched.acquire(sched.submit("next", 1), timeout=0)


def _wait_for(cond, what: str) -> None:
    for _ in range(100_000):  # synchronization only; pytest-timeout catches a hang
        if cond():
            return
        time.sleep(0.001)
    raise AssertionError(f"never reached: {what}")


@pytest.mark.parametrize("policy, expected", [("srpt", ["s", "m", "l"]), ("fifo", ["l", "s", "m"])])
def test_slot_goes_to_the_best_waiting_job(policy: str, expected: list[str]) -> None:
    clock = Clock()
    sched = TransferScheduler(policy, throughput=1.0, slots=1, clock=clock)  # bytes dominate the 1 s arrival gaps
    holder = sched.submit("holder", 1)
    assert sched.acquire(holder)
    order: list[str] = []
    threads = []
    for name, size in [("l", 300), ("s", 100), ("m", 200)]:
        ticket = sched.submit(name, size)
        clock.now += 1.0

        def work(t=ticket) -> None:
            with sched.slot(t):
                order.append(t.job_id)
            sched.done(t)
        threads.append(threading.Thread(target=work))
        threads[-1].start()
        n = len(threads)
        _wait_for(lambda n=n: sched.waiting() == n, "threads waiting for the slot")
    sched.done(holder)
    for th in threads:
        th.join()
    assert order == expected and len(sched) == 0


def test_thread_safety_smoke() -> None:
    sched = TransferScheduler("srpt", slots=2)
    lock = threading.Lock()
    state = {"in_slot": 0, "max": 0, "chunks": 0}
    errors: list[BaseException] = []

    def worker(w: int) -> None:
        try:
            for j in range(40):
                t = sched.submit((w, j), 3 * (1 + (w * 7 + j) % 5))
                while t.remaining:
                    with sched.slot(t):
                        with lock:
                            state["in_slot"] += 1
                            state["max"] = max(state["max"], state["in_slot"])
                        sched.next()  # readers interleave with the gate
                        with lock:
                            state["in_slot"] -= 1
                            state["chunks"] += 1
                    sched.update(t, t.remaining - min(3, t.remaining))
                assert sched.done(t)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    expected = sum(1 + (w * 7 + j) % 5 for w in range(8) for j in range(40))
    assert state["chunks"] == expected and 1 <= state["max"] <= 2
    assert len(sched) == 0 and sched.next() is None and sched.waiting() == 0


# -- the benchmark ---------------------------------------------------------------------------------------------
def test_trace_is_seeded_and_at_the_requested_load() -> None:
    link = 1.25e9
    jobs = trace(4000, 0.9, link, seed=7)
    assert jobs == trace(4000, 0.9, link, seed=7) and jobs != trace(4000, 0.9, link, seed=8)
    offered = sum(s for _, s in jobs) / (jobs[-1][0] * link)
    assert 0.8 < offered < 1.0
    assert all(MiB <= s <= 4096 * MiB for _, s in jobs)


def test_simulation_conserves_work() -> None:
    link, chunk = 1.25e9, 4 * MiB
    jobs = trace(800, 0.9, link, seed=1)
    finish = {p: max(a + c for (a, _), c in zip(jobs, simulate(jobs, p, 0.1, link, chunk))) for p in ("fifo", "srpt")}
    assert finish["fifo"] == pytest.approx(finish["srpt"], rel=1e-9)  # same busy periods, any order
    assert all(c >= s / link - 1e-12 for (_, s), c in zip(jobs, simulate(jobs, "srpt", 0.0, link, chunk)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_default_aging_meets_the_goal_on_a_short_trace(seed: int) -> None:
    link = 1.25e9
    rows = compare(trace(3000, 0.9, link, seed=seed), [DEFAULT_AGING], link, 4 * MiB)
    fifo, srpt = rows
    assert fifo["policy"] == "fifo" and fifo["goal"] == "baseline"
    assert srpt["policy"] == "srpt (default)" and srpt["goal"] == "met"
    assert srpt["mean_vs_fifo"] <= GOAL_MEAN and srpt["p99_vs_fifo"] <= GOAL_P99


def test_run_rows_and_json() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    result = run(parser.parse_args(["--jobs", "400", "--agings", "0,0.1,5"]))
    rows = result["rows"]
    assert [r["policy"] for r in rows] == ["fifo", "srpt", "srpt (default)", "srpt"]
    assert rows[0]["mean_vs_fifo"] == 1.0 and rows[0]["aging"] is None
    assert rows[1]["mean_ms"] <= rows[2]["mean_ms"] <= rows[3]["mean_ms"]  # more aging, closer to FIFO
    json.dumps(result, allow_nan=False)
