"""Placement and fairness as pure functions: run-time learning, earliest finish, warm models, round-robin."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from comfybridge.core.fairqueue import FairQueue
from comfybridge.core.jobs import Job
from comfybridge.core.planner import Lane, RunTimes, plan_for


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
    # A workflow no one has run: the typical job anywhere (25 s), scaled by each backend's speed.
    assert times.estimate("new", "gpu1") == pytest.approx(50.0)
    assert times.estimate("new", "gpu2") == pytest.approx(12.5)
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


def test_a_clients_backend_is_preferred_only_while_it_is_not_slower() -> None:
    costs = {("w", "a"): 1.0, ("w", "b"): 1.0}
    idle = [Lane("a", 0.0, None), Lane("b", 0.0, None)]
    jobs = [("j1", "w", "b"), ("j2", "w", "gone"), ("j3", "w", None)]
    assert plan_for("b", iter(jobs), idle, estimate_table(costs), 0) == 0  # type: ignore[arg-type]
    assert plan_for("a", iter(jobs), idle, estimate_table(costs), 0) == 1  # type: ignore[arg-type]
    # The client's backend is busy for 3 s and the other is idle: its next job does not wait there.
    busy = [Lane("a", 0.0, None), Lane("b", 3.0, None)]
    same_client = [("j1", "w", "b"), ("j2", "w", "b")]
    assert plan_for("a", iter(same_client), busy, estimate_table(costs), 0) == 0  # type: ignore[arg-type]
    # ... unless the slack says a little wait for the client's backend is worth it.
    assert plan_for("b", iter(same_client), busy, estimate_table(costs), 4.0) == 0  # type: ignore[arg-type]


def make_job(client: str, seq: int) -> Job:
    return Job(client, "w", b'{"1": {"class_type": "X", "inputs": {}}}', seq)


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


def test_a_backend_with_no_history_is_average_not_slow() -> None:
    """After short jobs on A, a workflow neither has run is estimated alike on A and on the new B,
    so two such jobs go one to each instead of queueing on A."""
    times = RunTimes(prior=5.0)
    for _ in range(3):
        times.observe("short", "A", 1.0)
    assert times.estimate("new", "A") == times.estimate("new", "B") == 1.0
    lanes = [Lane("A", 0.0, "short"), Lane("B", 0.0, None)]
    two = [("j1", "new", None), ("j2", "new", None)]
    assert plan_for("A", iter(two), lanes, times.estimate, 0.05) == 0
    assert plan_for("B", iter(two), lanes, times.estimate, 0.05) == 1


def test_ties_go_to_the_backend_free_sooner_not_to_the_one_asking() -> None:
    costs = {("w", "a"): 3.0, ("w", "b"): 1.0}
    lanes = [Lane("a", 0.0, None), Lane("b", 2.0, None)]  # both would finish at 3.0
    one = [("j", "w", None)]
    assert plan_for("b", iter(one), lanes, estimate_table(costs), 0) is None  # type: ignore[arg-type]
    assert plan_for("a", iter(one), lanes, estimate_table(costs), 0) == 0  # type: ignore[arg-type]


names = st.sampled_from(["a", "b", "c", "d"])


@settings(max_examples=400, deadline=None)
@given(
    backends=st.dictionaries(names, st.floats(min_value=0.5, max_value=4.0), min_size=1, max_size=4),
    busy=st.dictionaries(names, st.floats(min_value=0.0, max_value=20.0)),
    jobs=st.lists(st.tuples(st.sampled_from(["w1", "w2", "w3"]), st.none() | names), min_size=1, max_size=12),
    base=st.dictionaries(st.sampled_from(["w1", "w2", "w3"]), st.floats(min_value=0.1, max_value=10.0)),
)
def test_placement_properties(
    backends: dict[str, float], busy: dict[str, float], jobs: list[tuple[str, str | None]], base: dict[str, float]
) -> None:
    """Over random backends (speeds), work already on them, learned tables and queues: a job leaves
    its client's backend only for one that finishes it sooner; an idle backend never waits while a
    job would finish no later on it; and each backend takes the first job placement gives it."""

    def estimate(workflow: str, backend: str, warm: bool) -> float:
        return base.get(workflow, 5.0) * backends[backend]

    lanes = [Lane(name, busy.get(name, 0.0), None) for name in backends]
    waiting = [(f"j{i}", workflow, bound) for i, (workflow, bound) in enumerate(jobs)]
    picks = {name: plan_for(name, iter(waiting), lanes, estimate, 0.0) for name in backends}
    workflow, preferred = waiting[0][1], waiting[0][2]
    finish = {name: busy.get(name, 0.0) + estimate(workflow, name, False) for name in backends}
    for name, index in picks.items():
        if index == 0 and preferred in backends and name != preferred:
            assert finish[name] < finish[preferred]  # it left its client's backend for a sooner finish
    idle = [name for name in backends if busy.get(name, 0.0) == 0.0]
    best = min(finish.values())
    fastest_idle = [n for n in idle if finish[n] < best + 1e-9]
    if fastest_idle and preferred not in backends:
        # An idle backend is the fastest place for the first job: one such backend takes it now.
        assert 0 in [picks[n] for n in fastest_idle]
    # Work-conserving, affinity or not: if every backend is idle, some backend starts the first job.
    if all(busy.get(n, 0.0) == 0.0 for n in backends):
        assert 0 in picks.values()


def test_run_times_kept_and_taken_back_skip_what_is_malformed() -> None:
    learned = RunTimes()
    learned.observe("wf", "a", 2.0)
    learned.observe("wf", "b", 4.0, warm=True)
    again = RunTimes()
    assert again.restore(learned.dumps()) == 2
    assert again.estimate("wf", "a") == 2.0
    assert again.estimate("wf", "b", warm=True) == 4.0
    damaged = (
        '[["wf", "a", false, 2.0], ["wf", "b"], ["wf", "c", "no", 1], ["wf", "d", true, -1], 7, ["x", "y", true, 1e99]]'
    )
    assert RunTimes().restore(damaged) == 1
    for text in ("", "{", '{"a": 1}', "null"):
        assert RunTimes().restore(text) == 0
