"""Placement and fairness as pure functions: run-time learning, earliest finish, warm models, round-robin."""

from __future__ import annotations

import pytest

from comfybridge.fairqueue import FairQueue
from comfybridge.jobs import Job
from comfybridge.planner import Lane, RunTimes, plan_for


def test_run_times_learn_and_borrow() -> None:
    times = RunTimes(prior=5.0, alpha=0.5)
    assert times.estimate("sd", "gpu1") == 5.0  # nothing known: the prior
    times.observe("sd", "gpu1", 10.0)
    times.observe("sd", "gpu1", 20.0)
    assert times.estimate("sd", "gpu1") == 15.0  # EWMA
    times.observe("flux", "gpu1", 40.0)
    times.observe("flux", "gpu2", 20.0)
    # gpu2 ran flux in half gpu1's time, so its unseen "sd" is borrowed at half of gpu1's.
    assert times.estimate("sd", "gpu2") == pytest.approx(7.5)
    assert times.estimate("new", "gpu1") == pytest.approx(27.5)  # gpu1's typical job
    times.observe("flux", "gpu1", 10.0, warm=True)
    assert times.estimate("flux", "gpu1", warm=True) == 10.0  # models loaded: faster
    assert times.estimate("flux", "gpu1", warm=False) == 40.0
    assert times.estimate("flux", "gpu2", warm=True) == 20.0  # only a cold run known: borrowed


def estimate_table(table: dict[tuple[str, str], float]) -> object:
    return lambda workflow, backend, warm: table[(workflow, backend)]


def test_earliest_finish_and_idle_when_others_are_sooner() -> None:
    speeds = {("w", "fast"): 1.0, ("w", "slow"): 4.0}
    lanes = [Lane("fast", 0.0, None), Lane("slow", 0.0, None)]
    one = [("j1", "w", None)]
    assert plan_for("fast", iter(one), lanes, estimate_table(speeds), 0) == 0  # type: ignore[arg-type]
    assert plan_for("slow", iter(one), lanes, estimate_table(speeds), 0) is None  # the fast one finishes first
    many = [(f"j{i}", "w", None) for i in range(6)]
    # fast takes j0..j3 (done at 1, 2, 3, 4; the tie at 4 stays with the warm one); slow's turn is j4, done at 4.
    assert plan_for("slow", iter(many), lanes, estimate_table(speeds), 0) == 4  # type: ignore[arg-type]


def test_warm_backend_is_preferred_within_slack() -> None:
    costs = {("sd", "a"): 2.0, ("sd", "b"): 2.0}
    lanes = [Lane("a", 0.5, "sd"), Lane("b", 0.0, "flux")]
    job = [("j", "sd", None)]
    assert plan_for("a", iter(job), lanes, estimate_table(costs), warm_slack=1.0) == 0  # type: ignore[arg-type]
    assert plan_for("b", iter(job), lanes, estimate_table(costs), warm_slack=0.1) == 0  # type: ignore[arg-type]


def test_bound_jobs_go_to_their_backend() -> None:
    costs = {("w", "a"): 1.0, ("w", "b"): 1.0}
    lanes = [Lane("a", 0.0, None), Lane("b", 0.0, None)]
    jobs = [("j1", "w", "b"), ("j2", "w", "gone"), ("j3", "w", None)]
    assert plan_for("a", iter(jobs), lanes, estimate_table(costs), 0) == 2  # type: ignore[arg-type]
    assert plan_for("b", iter(jobs), lanes, estimate_table(costs), 0) == 0  # type: ignore[arg-type]


def make_job(client: str, seq: int) -> Job:
    return Job(client, "w", {"1": {"class_type": "X", "inputs": {}}}, seq)


def test_fair_queue_serves_clients_in_turn() -> None:
    queue = FairQueue()
    heavy = [make_job("heavy", i) for i in range(4)]
    light = [make_job("a", 10), make_job("b", 11)]
    for job in heavy + light:
        queue.push(job)
    assert [j.client_id for j in queue.order()] == ["heavy", "a", "b", "heavy", "heavy", "heavy"]
    queue.take(heavy[0])
    assert [j.client_id for j in queue.order()] == ["a", "b", "heavy", "heavy", "heavy"]
    retried = make_job("b", 1)
    queue.push_front(retried)
    assert next(queue.order()) is retried
    assert len(queue) == 6
    assert queue.remove(light[0])
    assert not queue.remove(light[0])
