"""Cluster mode (`--database`): which bridge of a cluster leads, and what leading starts and stops.

The bridge holding the database's lock leads: it runs the scheduler over every backend, exactly as a
single bridge does, so the fair queue, earliest-finish placement and pipelining are the cluster's. The
others relay requests to it and wait for the lock. When the leader dies, its session ends, its lock
is free, and the first bridge to take it recovers the journal as a restart does: prompts already in
ComfyUI are adopted by prompt_id, never sent twice.

A leader stops leading when it learns the lock is no longer its own, or when it cannot reach the
database for `leader_timeout` seconds: well before PostgreSQL ends its silent session (`keepalives`)
and another bridge can take over, it has closed its ComfyUI sockets and sends nothing more.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager

from .edge.relay import ClusterView
from .store.pgjournal import Leader, PgJournal

__all__ = ["HEARTBEAT", "Leadership"]

log = logging.getLogger(__name__)

HEARTBEAT = 1.0  # seconds between a leader's round trips to the database
RETRY = 2.0  # seconds before campaigning again after a term that could not start


class Leadership:
    """Campaign, lead for as long as the lock is this bridge's, stand down, campaign again.

    `term()` is what leading is: entered once the lock is taken (journal open, scheduler started),
    left when leading ends (scheduler closed, journal closed: the lock goes with its session)."""

    def __init__(
        self,
        view: ClusterView,
        journal: PgJournal,
        term: Callable[[bool], AbstractAsyncContextManager[None]],
        timeout: float,
        demoted: Callable[[], Awaitable[None]],
    ) -> None:
        self.view = view
        self.journal = journal
        self.term = term  # term(again): again is True from the second term of this process on
        self.timeout = timeout
        self.demoted = demoted  # after a term ends: close what belonged to it (local clients' sockets)
        self.terms = 0
        self.settled = asyncio.Event()  # the first campaign ended: this bridge leads, or knows it follows
        self._stand_down = asyncio.Event()  # SIGTERM: hand over at once, and lead no more
        self._stop = asyncio.Event()  # the bridge stops
        self._task: asyncio.Task[None] | None = None
        self._handing_over: asyncio.Future[None] | None = None
        self._answered = -math.inf  # monotonic time of the database's last answer during a term
        self._checked = 0  # the leader generation whose backends were compared with this bridge's

    def _renewed(self, asked_at: float | None = None) -> None:
        """The database answered a round trip begun at `asked_at` (monotonic; default now). The lease
        runs from when it was asked, not answered: an answer read late (the process was paused
        with it waiting in its socket) renews nothing that the pause used up."""
        now = time.monotonic()
        self._answered = now if asked_at is None else asked_at
        self.view.lease_until = time.time() - (now - self._answered) + self.timeout

    def holds(self) -> bool:
        """The database answered this term's leader within `timeout`: it may still send prompts. Past
        that it is about to stop leading, and well before PostgreSQL frees its lock (`keepalives`)."""
        return time.monotonic() - self._answered < self.timeout

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    def stand_down(self) -> None:
        """SIGTERM: stop leading at once (another bridge takes over within a second) and never lead
        again; meanwhile requests are relayed to the new leader. A leader with no other bridge of its
        cluster there to take over (a lone bridge on PostgreSQL) has nobody to relay to: it leads on
        through its grace, serving as a single bridge does, and its stop ends the term."""
        if self.view.role != "leader":
            self._stand_down.set()
        elif self._handing_over is None:
            self._handing_over = asyncio.ensure_future(self._hand_over())

    async def _hand_over(self) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                others = await self.journal.others()
        except Exception:  # not known (the database away): hand over, as it would be anyway
            others = 1
        if others:
            self._stand_down.set()
        else:
            log.info("no other bridge of the cluster is there to take over: this one leads until it stops")

    async def stop(self) -> None:
        """The bridge stops: a term under way ends as a stop does (its jobs stay journaled)."""
        if self._handing_over is not None:
            self._handing_over.cancel()
        self._stand_down.set()
        self._stop.set()
        if self._task is not None:
            await self._task

    def _follow(self, leader: Leader | None) -> None:
        if self.view.role != "stepping down":
            self.view.role = "follower"
        self.settled.set()
        if leader is not None and leader.generation != self._checked and leader.url != self.view.own_url:
            self._checked = leader.generation
            own = self.journal.backends
            if set(leader.backends) != set(own):
                log.warning(
                    "the leading bridge %s schedules over %s, this one's backends are %s: should this bridge "
                    "lead, it would use its own (give every bridge of a cluster the same --backends)",
                    leader.url, ", ".join(leader.backends) or "none", ", ".join(own) or "none",
                )  # fmt: skip
            if leader.folder and self.journal.folder and leader.folder != self.journal.folder:
                log.warning(
                    "the leading bridge %s keeps uploads and results in another data folder than this one's "
                    "--data-dir: should this bridge lead, it would not find them (give every bridge of a cluster "
                    "the same --data-dir: one host, or a network filesystem; or --storage)",
                    leader.url,
                )
        # No leader known (none, or the database away): the generation stays the last one seen, as on a
        # dashboard it must: it only ever rises.
        self.view.follow(leader.url if leader else None, leader.generation if leader else self.view.generation)

    async def _run(self) -> None:
        url = self.view.own_url
        while True:
            if self._stand_down.is_set():
                self.view.role = "stepping down"
                await _race(self.journal.campaign(url, self._follow, contend=False), self._stop)
                return
            if await _race(self.journal.campaign(url, self._follow), self._stand_down):
                await self._lead()
            else:
                await self.journal.close()  # a lock won just as the campaign was called off

    async def _lead(self) -> None:
        journal, view = self.journal, self.view
        leader = journal.leader
        assert leader is not None
        log.info("this bridge leads the cluster now (generation %d)", leader.generation)
        again, self.terms = self.terms > 0, self.terms + 1
        self._renewed()  # the lock was just won
        # The term's start (the journal loaded, stores listed, backends connected) may take a while:
        # its session must not look frozen to the followers meanwhile (DEPOSE_FROZEN).
        starting = asyncio.ensure_future(self._heartbeats())
        try:
            async with self.term(again):
                starting.cancel()
                view.role = "leader"
                view.follow(view.own_url, leader.generation)
                self.settled.set()
                await self._hold()
                # Not leading from now on, while the term still closes (results landing, the journal
                # flushed): requests are relayed, /health says so, nothing is refused as "stopping".
                self._no_longer_leading(leader)
        except Exception:
            log.exception("the term as leader failed; campaigning again in %gs", RETRY)
            await _race(asyncio.sleep(RETRY), self._stand_down)
        finally:
            starting.cancel()
            self.settled.set()
            self._no_longer_leading(leader)
            await journal.close()  # the lock goes with its session, if the term left it
            await self.demoted()

    def _no_longer_leading(self, leader: Leader) -> None:
        view = self.view
        if view.role == "leader":
            view.role = "follower"
        view.lease_until = None
        view.follow(None, leader.generation)

    async def _beat(self) -> None:
        """One round trip to the database, within `timeout`; its answer renews the lease."""
        asked_at = time.monotonic()
        async with asyncio.timeout(self.timeout):
            await self.journal.heartbeat()
        self._renewed(asked_at)

    async def _heartbeats(self) -> None:
        """A round trip every HEARTBEAT while a term starts (once the journal is open for writes)."""
        while True:
            await asyncio.sleep(HEARTBEAT)
            with contextlib.suppress(Exception):  # not open yet, or the database away: `_hold` judges
                await self._beat()

    async def _hold(self) -> None:
        """Until the lock is lost, the database stays away for `timeout`, or the bridge stands down."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stand_down.wait(), HEARTBEAT)
                return
            reason = self.journal.lost()
            if reason is not None:
                log.error("this bridge stops leading: its database %s", reason)
                return
            try:
                await self._beat()
            except Exception as exc:  # whatever failed, the database did not answer
                log.warning("the database did not answer the leader's heartbeat: %s", exc)
            silent = time.monotonic() - self._answered
            if silent >= self.timeout:
                log.error(
                    "this bridge stops leading: the database has not answered for %.0fs (prompts inside ComfyUI "
                    "run on; the next leader adopts them)",
                    silent,
                )
                return


async def _race(work: Awaitable[object], event: asyncio.Event) -> bool:
    """Await `work` until `event` is set: True if the work finished first."""
    task = asyncio.ensure_future(work)
    stop = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait((task, stop), return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.cancel()
    if task.done():
        task.result()
        return True
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return False
