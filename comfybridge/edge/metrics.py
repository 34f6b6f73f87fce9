"""Prometheus metrics: what the bridge counts as it works, and what it reports when scraped.

One registry per application (so tests can run several). Counters and histograms are fed by the
core through the `JobObserver` methods; gauges (queue depth, backends, sockets) are read from the
scheduler at scrape time, never kept up to date by hand."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["METRICS", "Metrics"]

# Jobs last from a fraction of a second (small images) to many minutes (video).
JOB_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
FAST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class Metrics:
    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.accepted = Counter(
            "comfybridge_jobs_accepted", "Jobs accepted (journaled).", ["workflow"], registry=registry
        )
        self.ended = Counter(
            "comfybridge_jobs_ended", "Jobs ended, by outcome (done, failed, cancelled).",
            ["workflow", "outcome"], registry=registry,
        )  # fmt: skip
        self.wait = Histogram(
            "comfybridge_job_wait_seconds", "From acceptance to the start inside ComfyUI.",
            ["workflow", "backend"], buckets=JOB_BUCKETS, registry=registry,
        )  # fmt: skip
        self.run = Histogram(
            "comfybridge_job_run_seconds", "From execution_start to ComfyUI's end of the prompt.",
            ["workflow", "backend"], buckets=JOB_BUCKETS, registry=registry,
        )  # fmt: skip
        self.busy = Counter(
            "comfybridge_backend_busy_seconds", "Seconds a backend spent running the bridge's prompts; "
            "rate() of it is the backend's busy fraction.", ["backend"], registry=registry,
        )  # fmt: skip
        self.idle_gap = Histogram(
            "comfybridge_backend_idle_gap_seconds", "Time a backend sat idle between two prompts while the "
            "next one was already handed to it.", ["backend"], buckets=FAST_BUCKETS, registry=registry,
        )  # fmt: skip
        self.requests = Histogram(
            "comfybridge_request_duration_seconds", "HTTP requests by route, method and status "
            "(a WebSocket: its whole life).", ["route", "method", "status"], buckets=FAST_BUCKETS,
            registry=registry,
        )  # fmt: skip
        self.commits = Histogram(
            "comfybridge_journal_commit_seconds", "Journal commits (one fsync each; a group commit holds "
            "many writes).", buckets=FAST_BUCKETS, registry=registry,
        )  # fmt: skip
        self.relayed = Counter(
            "comfybridge_relayed", "Cluster mode: requests and sockets this bridge passed on to the leader.",
            ["kind"], registry=registry,
        )  # fmt: skip
        self._last_end: dict[str, float] = {}  # backend -> monotonic time its last prompt ended

    def watch(self, report: Callable[[], dict[str, Any]], sockets: Callable[[], int]) -> None:
        """Gauges read at scrape time from the scheduler's health report and the socket hub."""
        self.registry.register(_LiveGauges(report, sockets))

    def watch_cluster(self, report: Callable[[], dict[str, Any]]) -> None:
        """Cluster mode: whether this bridge leads, and the leader's generation, read at scrape time."""
        self.registry.register(_ClusterGauges(report))

    # fed by the core ------------------------------------------------------------------------------
    def job_accepted(self, workflow: str) -> None:
        self.accepted.labels(workflow).inc()

    def job_started(self, workflow: str, backend: str, waited: float | None, handed_over: float | None) -> None:
        """`waited`: None for a start that is not the job's first (it runs again), or whose wait is not known."""
        if waited is not None:
            self.wait.labels(workflow, backend).observe(waited)
        now = time.monotonic()
        last = self._last_end.get(backend)
        if last is not None and handed_over is not None and handed_over <= last:
            self.idle_gap.labels(backend).observe(max(0.0, now - last))

    def job_finished(self, workflow: str, backend: str, ran: float) -> None:
        self._last_end[backend] = time.monotonic()
        self.run.labels(workflow, backend).observe(ran)
        self.busy.labels(backend).inc(ran)

    def job_ended(self, workflow: str, outcome: str) -> None:
        self.ended.labels(workflow, outcome).inc()

    def request_done(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).observe(seconds)

    def commit_done(self, seconds: float) -> None:
        """Called from the journal's writer thread (prometheus_client is thread-safe)."""
        self.commits.observe(seconds)


class _LiveGauges(Collector):
    def __init__(self, report: Callable[[], dict[str, Any]], sockets: Callable[[], int]) -> None:
        self.report = report
        self.sockets = sockets

    def collect(self) -> Iterator[Metric]:
        report = self.report()
        queued = GaugeMetricFamily("comfybridge_queue_depth", "Jobs waiting in the bridge's own queue.")
        queued.add_metric([], report.get("queued", 0))  # (none on a bridge of a cluster that does not lead)
        yield queued
        sockets = GaugeMetricFamily("comfybridge_open_sockets", "Open client WebSockets.")
        sockets.add_metric([], self.sockets())
        yield sockets
        up = GaugeMetricFamily("comfybridge_backend_up", "1 if the backend takes work now.", labels=["backend"])
        stuck = GaugeMetricFamily(
            "comfybridge_backend_stuck", "1 if the backend's prompt shows no progress at all (no work sent there).",
            labels=["backend"],
        )  # fmt: skip
        inflight = GaugeMetricFamily(
            "comfybridge_backend_in_flight", "Prompts the bridge has inside this backend.", labels=["backend"]
        )
        speed = GaugeMetricFamily(
            "comfybridge_backend_relative_speed", "Learned speed against the other backends (1: average).",
            labels=["backend"],
        )  # fmt: skip
        for backend in report["backends"]:
            up.add_metric([backend["url"]], 1.0 if backend["state"] == "up" else 0.0)
            stuck.add_metric([backend["url"]], 1.0 if backend["state"] == "stuck" else 0.0)
            inflight.add_metric([backend["url"]], backend["in_flight"])
            if backend["relative_speed"] is not None:
                speed.add_metric([backend["url"]], backend["relative_speed"])
        yield up
        yield stuck
        yield inflight
        yield speed


class _ClusterGauges(Collector):
    def __init__(self, report: Callable[[], dict[str, Any]]) -> None:
        self.report = report

    def collect(self) -> Iterator[Metric]:
        report = self.report()
        leads = GaugeMetricFamily("comfybridge_cluster_leader", "1 if this bridge leads its cluster now.")
        leads.add_metric([], 1.0 if report["role"] == "leader" else 0.0)
        yield leads
        generation = GaugeMetricFamily(
            "comfybridge_cluster_generation", "The leader's generation: it rises at every change of leader."
        )
        generation.add_metric([], report["generation"])
        yield generation
        lease = GaugeMetricFamily(
            "comfybridge_cluster_lease_seconds",
            "On the leader: seconds it may still send prompts without another answer from the database "
            "(renewed each second; 0 when it is about to stop leading).",
        )
        if "lease_expires_in" in report:
            lease.add_metric([], report["lease_expires_in"])
        yield lease


METRICS = web.AppKey("metrics", Metrics)
