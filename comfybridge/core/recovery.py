"""Start-up recovery: every job the journal holds goes back where it was, before the bridge serves.

Waiting jobs rejoin the fair queue in acceptance order; jobs handed to a backend wait there to be
reconciled by prompt_id when its event socket connects (adopted, collected, or sent again), and move
elsewhere if it stays away; finished jobs' results stay fetchable and their clients known."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from .clients import CLOSED, Status, about_job, status_message, unscoped
from .jobs import ENDED, Job, JobState
from .shared import Core, open_status

__all__ = ["missing_results", "recover"]

log = logging.getLogger(__name__)


@dataclass
class Recovered:
    waiting: int = 0
    handed_over: int = 0
    finished: int = 0


async def missing_results(core: Core, rows: list[dict[str, Any]]) -> set[str]:
    """Ids of finished jobs whose result files are no longer in the store."""
    done = {
        row["id"]: core.results.files_from(row["id"], row["results"])
        for row in rows
        if row["state"] == JobState.DONE.value and row["results"] is not None
    }
    return await core.results.missing(done) if done else set()


def recover(core: Core, rows: list[dict[str, Any]], gone: set[str]) -> Recovered:
    """Rebuild the bridge's memory from the journal's rows (in acceptance order)."""
    summary = Recovered()
    ended: list[tuple[Job, Status]] = []  # with results not fetched yet, or failed: their endings, in order
    orphaned: list[Job] = []  # handed to a backend no longer configured, in acceptance order
    for row in rows:
        job = Job.restore(row, core.journal)
        if job.id in gone:
            log.warning("job %s client %s: its result files are gone; forgetting it", job.id, job.client_id)
            continue
        client = core.clients.touch(job.client_id)
        if job.state in ENDED:
            summary.finished += 1
            if job.state is JobState.DONE:
                files = core.results.files_from(job.id, job.results or [])
                job.results = None  # the result store holds them now
                core.results.add(job.id, job.client_id, job.seq, files, created=job.ended_at)
                ending = about_job(CLOSED, job.id, 0)
            else:
                ending = about_job(status_message("error", job.error or "error"), job.id, 0)
            core.set_status(client, ending)
            ended.append((job, ending))
            continue
        core.opened(job)
        backend = core.backends.get(job.backend or "")
        if job.state is JobState.WAITING:
            job.started_unseen = job.retries > 0  # a run lost by an earlier process may have started
            summary.waiting += 1
            core.queue.push(job)
        elif backend is None:
            log.warning(
                "job %s client %s: its backend %s is gone; sending it again", job.id, job.client_id, job.backend
            )
            summary.waiting += 1
            orphaned.append(job)
        else:
            summary.handed_over += 1
            job.resumed = True  # what the last process told its client is not known: it will say so
            job.started_unseen = True
            core.hand_over(backend, job)
    for job in reversed(orphaned):  # each goes to the head of the queue: the earliest must end up first
        core.send_again(job)
    seqs = {job.id: job.seq for client in core.clients for job in client.jobs.values()}
    for job, _ in ended:
        # The last process may have ended it durably and died before its ending went out (or held
        # it for a socket that was away): said again, in its place among the client's jobs (after
        # the endings of earlier ones still open, before any frame of later ones). A `closed` heard
        # twice asks for a fetch the client owes anyway (its results are still here); an `error`
        # heard twice says again what its job id already said.
        # Untold until said (every one of them before any is said), so that `jobs_left` counts them
        # and an `error` closes no socket before the endings said after it.
        client = core.clients.require(job.client_id)
        client.untold.insert(sum(1 for other in client.untold if seqs.get(other, 0) < job.seq), job.id)
        seqs[job.id] = job.seq
    for job, ending in ended:
        core.tell_ending_again(core.clients.require(job.client_id), ending)
    for client in core.clients:
        if client.jobs:
            core.set_status(client, open_status(client))
    for owner in core.uploads.owners():
        if unscoped(owner):  # not a key's pool of uploads made without a clientId
            core.clients.touch(owner)
    return summary
