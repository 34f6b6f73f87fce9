"""The HTTP edge: the contract's routes, and the middleware that turns every error into JSON."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator
from typing import Any

import orjson
from aiohttp import BodyPartReader, hdrs, web
from aiohttp.http_exceptions import HttpProcessingError

from ..core.clients import unscoped
from ..core.jobs import JobState
from ..core.scheduler import Fetch, Scheduler
from ..core.webhooks import check_public, check_url
from ..errors import BadInput, Conflict, Gone, NoBackend, NotFound
from ..store.media import content_type_for
from ..store.results import JobResult
from ..store.uploads import IncomingFile
from . import openapi
from .access import KEY, client_id_of, query_value
from .appkeys import HUB, SCHEDULER, SETTINGS, WORKFLOWS
from .bodies import BodyDeadline, expect_continue, expect_nothing, json_body, part_chunks, refuse_early
from .delivery import ResultLost, confirmed_later, links_reply, received, write_base64, write_multipart
from .operations import docs, health, metrics, playground, playground_file, ready
from .replies import json_response
from .ws import websocket_handler

__all__ = ["setup_routes"]


WEBHOOK_KEY = "_webhook"
NOT_SEEN = "The client ID has not been submitted to the server before. It is not recognized. / {}"
NO_CONTENT = "No contents with that client id / {}"


def _allowed(request: web.Request, alias: str) -> None:
    key = request.get(KEY)
    if key is not None:
        key.check_workflow(alias)


def _aliases(request: web.Request) -> list[str]:
    """The workflows the caller may use."""
    key = request.get(KEY)
    aliases = request.app[WORKFLOWS].aliases()
    if key is not None and key.workflows is not None:
        aliases = [alias for alias in aliases if alias in key.workflows]
    return aliases


async def workflow_list(request: web.Request) -> web.Response:
    """The aliases, as the contract has it; `?detail=1`: the catalogue (description, thumbnail, inputs)."""
    aliases = _aliases(request)
    if not _flag(request, "detail"):
        return json_response(aliases)
    store, root = request.app[WORKFLOWS], request.app[SETTINGS].root_path
    body = store.view(
        ("catalogue", *aliases), lambda: orjson.dumps([store.get(alias).catalogue_entry(root) for alias in aliases])
    )
    return web.Response(body=body, content_type="application/json")


async def workflow_thumbnail(request: web.Request) -> web.StreamResponse:
    workflow = request.app[WORKFLOWS].get(query_value(request, "workflow"))
    _allowed(request, workflow.alias)
    if workflow.thumbnail is None:
        raise NotFound(f"Workflow {workflow.alias!r} has no thumbnail.")
    headers = {"Cache-Control": "max-age=300", "Content-Type": content_type_for(workflow.thumbnail.name)}
    if hdrs.RANGE in request.headers:
        # Ignored (RFC 9110 allows it): aiohttp's file answer turns a malformed one into an empty 416.
        return web.Response(body=await asyncio.to_thread(workflow.thumbnail.read_bytes), headers=headers)
    return web.FileResponse(workflow.thumbnail, headers=headers)


async def openapi_json(request: web.Request) -> web.Response:
    store, aliases, settings = request.app[WORKFLOWS], _aliases(request), request.app[SETTINGS]
    root, webhooks = settings.root_path, bool(settings.webhook_secret)
    body = store.view(("openapi", *aliases), lambda: orjson.dumps(openapi.document(store, aliases, root, webhooks)))
    return web.Response(body=body, content_type="application/json")


async def workflow_info(request: web.Request) -> web.Response:
    workflow = request.app[WORKFLOWS].get(query_value(request, "workflow"))
    _allowed(request, workflow.alias)
    return json_response(workflow.describe_inputs())


async def upload(request: web.Request) -> web.Response:
    client_id = client_id_of(request, required=False)
    refuse_early(request)
    scheduler = request.app[SCHEDULER]
    deadline = BodyDeadline(request.app[SETTINGS].body_timeout)

    async def parts() -> AsyncIterator[IncomingFile]:
        reader = await request.multipart()
        while (part := await deadline.read(reader.next())) is not None:
            if not isinstance(part, BodyPartReader):
                raise BadInput("Nested multipart bodies are not supported.")
            yield IncomingFile(part.name or "", part.filename, part_chunks(part, deadline))

    try:
        key = request.get(KEY)
        names = await scheduler.store_uploads(client_id, parts(), key.name if key is not None else None)
    except ValueError as exc:  # what aiohttp's multipart reader says of a malformed body
        raise BadInput(f"Malformed multipart body: {exc}") from None
    except HttpProcessingError as exc:  # a part header it cannot parse
        raise BadInput(f"Malformed multipart body: {exc.message.splitlines()[0]}") from None
    return json_response(names)


async def generate(request: web.Request) -> web.StreamResponse:
    client_id = client_id_of(request)
    assert client_id is not None
    wait, res_type = _waiting(request)
    body = await json_body(request)
    if not isinstance(body, dict):
        raise BadInput('The body must be a JSON object, e.g. {"workflow": "text-to-image"}.')
    _allowed(request, request.app[WORKFLOWS].get(body.get("workflow")).alias)
    webhook = await _webhook(request, body.pop(WEBHOOK_KEY, None))
    scheduler = request.app[SCHEDULER]
    job, position = await scheduler.submit(client_id, body, webhook, wait=wait)
    if not wait:
        return json_response({"detail": f"queued / {position}", "job_id": job.id})
    # The synchronous form: one request for the whole job, as wrappers of one ComfyUI offer it. The
    # socket, /execution-info and webhooks still hear of the job as ever.
    fetched = await scheduler.ended(job)
    if job.state is not JobState.DONE:
        return json_response({"status": "error", "detail": job.error or "error", "job_id": job.id}, 502)
    if not any(result.files for result in fetched):  # no output, or fetched meanwhile by /history
        if fetched:
            scheduler.results_fetched(client_id, fetched)  # nothing to send: handed over all the same
        return web.Response(status=204, headers={"X-Detail": f"Job {job.id} has no results left to hand over."})
    return await _deliver(request, scheduler, client_id, fetched, res_type)


def _waiting(request: web.Request) -> tuple[bool, str]:
    """`?wait=` and `?resType=` (used only with it, but a bad one is refused all the same, as
    anywhere): checked before the body is read (or promised)."""
    wait, res_type = _flag(request, "wait"), _res_type(request)
    return wait, res_type if wait else ""


def _flag(request: web.Request, name: str) -> bool:
    value = (query_value(request, name) or "").lower()
    if value not in FLAGS:
        raise BadInput(f"{name} must be 1, true, 0 or false; got {value[:40]!r}.")
    return FLAGS[value]


async def _webhook(request: web.Request, asked: Any) -> str | None:
    """Where to tell of the job's end: the request's `_webhook` (a key no workflow input can have:
    inputs are `node/input`; it must be public unless `webhook_allow_private`), else its API key's
    (the operator's choice), else nowhere."""
    key = request.get(KEY)
    settings = request.app[SETTINGS]
    url = check_url(asked) if asked is not None else key.webhook if key is not None else None
    if url is not None and not settings.webhook_secret:
        raise BadInput("This bridge sends no webhooks: it has no webhook_secret to sign them with.")
    if asked is not None and not settings.webhook_allow_private:
        await check_public(url or "")
    return url


async def execution_info(request: web.Request) -> web.Response:
    client_id = client_id_of(request)
    assert client_id is not None
    return json_response(request.app[SCHEDULER].status_of(client_id))


async def generation_count(request: web.Request) -> web.Response:
    return json_response(request.app[SCHEDULER].generation_count)


async def free(request: web.Request) -> web.Response:
    client_id = client_id_of(request, required=False)
    if not await request.app[SCHEDULER].free(client_id):
        raise NoBackend("No ComfyUI backend is up to free its memory; try again shortly.")
    return json_response({"detail": f"server memory free now / {unscoped(client_id) if client_id else 'ALL'}"})


async def interrupt(request: web.Request) -> web.Response:
    client_id = client_id_of(request)
    assert client_id is not None
    await request.app[SCHEDULER].interrupt(client_id)
    return json_response({"detail": f"interrupted that clientId will be ignored. / {unscoped(client_id)}"})


RES_TYPES = frozenset({"", "base64", "url"})  # "": multipart, the seed's default
FLAGS = {"": False, "0": False, "false": False, "1": True, "true": True}


def _res_type(request: web.Request) -> str:
    """How results are to be handed over, checked before anything is: a typo must not cost them."""
    res_type = query_value(request, "resType") or ""
    if res_type not in RES_TYPES:
        raise BadInput(f"resType must be base64 or url, or left out for multipart; got {res_type[:40]!r}.")
    if res_type == "url" and not request.app[SCHEDULER].result_store.links:
        raise BadInput(
            "resType=url needs results kept in object storage (--storage s3://...); this bridge keeps them on "
            "its disk: fetch them as multipart, or with resType=base64."
        )
    return res_type


async def history(request: web.Request) -> web.StreamResponse:
    """Stream every finished result of the client, then forget them once the response is complete."""
    client_id = client_id_of(request)
    assert client_id is not None
    scheduler = request.app[SCHEDULER]
    res_type = _res_type(request)
    found, fetched = scheduler.claim_results(client_id)
    if found is Fetch.UNKNOWN:
        return web.Response(status=204, headers={"X-Detail": NOT_SEEN.format(unscoped(client_id))})
    if found is Fetch.BUSY:
        raise Conflict(
            "The results of this clientId are being fetched by another request right now; "
            "try again once that one has finished (they are forgotten only once it completes)."
        )
    if found is Fetch.NOTHING:
        return web.Response(status=204, headers={"X-Detail": NO_CONTENT.format(unscoped(client_id))})
    return await _deliver(request, scheduler, client_id, fetched, res_type)


async def _deliver(
    request: web.Request, scheduler: Scheduler, client_id: str, fetched: list[JobResult], res_type: str
) -> web.StreamResponse:
    """Send results reserved for this request, and forget them once sent whole; released if not."""
    files = [(result.job_id, f) for result in fetched for f in result.files]
    try:
        damaged = await scheduler.result_store.damaged(files, linked=res_type == "url")
    except BaseException:
        scheduler.release_results(fetched)
        raise
    if damaged:
        raise _lost(scheduler, client_id, fetched, damaged, "removed or cut short on the bridge's disk")
    if res_type == "url":
        ttl = request.app[SETTINGS].link_ttl
        try:
            links = await links_reply(scheduler.result_store, files, ttl)
            await links.prepare(request)  # sent here: a caller gone meanwhile must not cost the results
            await links.write_eof()
        except BaseException:
            scheduler.release_results(fetched)
            raise
        scheduler.results_fetched(client_id, fetched, keep_for=ttl)  # the objects outlive their links
        return links
    try:
        if res_type == "base64":
            response = await write_base64(request, scheduler.result_store, files)
        else:
            response = await write_multipart(request, scheduler.result_store, files)
    except ResultLost as exc:  # once the answer has begun, error_middleware cuts it off
        raise _lost(scheduler, client_id, fetched, {exc.job_id}, str(exc)) from None
    except BaseException:
        scheduler.release_results(fetched)
        raise

    if not confirmed_later(response):  # (one burst: written is as good as received)
        scheduler.results_fetched(client_id, fetched)
        return response

    async def settle() -> None:  # decided even if the request's task is cancelled as the client goes
        if await received(request, response):
            scheduler.results_fetched(client_id, fetched)
        else:  # the connection ended before its last bytes arrived: they can be fetched again
            scheduler.release_results(fetched)

    supervisor = request.app[HUB].supervisor  # (an edge's task: held, and given its time at a stop)
    if supervisor.accepting:
        await asyncio.shield(supervisor.spawn(settle(), "hand over results"))
    else:
        await settle()
    return response


def _lost(scheduler: Scheduler, client_id: str, fetched: list[JobResult], jobs: set[str], why: str) -> Gone:
    """Results whose files other hands removed or cut short are forgotten, so that they do not fail
    every fetch; the others can be fetched again at once."""
    scheduler.release_results([r for r in fetched if r.job_id not in jobs])
    scheduler.results_lost(client_id, [r for r in fetched if r.job_id in jobs], why)
    return Gone(
        f"The results of job {', '.join(sorted(jobs))} are lost ({why}); they are forgotten. "
        "Fetch again for the other results."
    )


def setup_routes(app: web.Application) -> None:
    # HEAD only where a GET changes nothing: /history hands results over (and forgets them).
    app.router.add_get("/ws", websocket_handler, allow_head=False)
    app.router.add_get("/workflow-list", workflow_list)
    app.router.add_get("/workflow-info", workflow_info)
    app.router.add_get("/workflow-thumbnail", workflow_thumbnail)
    app.router.add_post("/upload", upload, expect_handler=expect_continue)
    app.router.add_post(
        "/generate-based-workflow", generate, expect_handler=functools.partial(expect_continue, checks=_waiting)
    )
    app.router.add_get("/history", history, allow_head=False)
    app.router.add_get("/execution-info", execution_info)
    app.router.add_get("/generation-count", generation_count)
    app.router.add_post("/free", free, expect_handler=expect_nothing)
    app.router.add_post("/interrupt", interrupt, expect_handler=expect_nothing)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/ready", ready)
    app.router.add_get("/openapi.json", openapi_json)
    app.router.add_get("/playground", playground)
    app.router.add_get("/playground/", playground)
    app.router.add_get("/playground/{name}", playground_file)
    app.router.add_get("/docs", docs)
    app.router.add_get("/docs/", docs)
