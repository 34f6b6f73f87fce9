"""The application factory: settings in, a ready aiohttp Application out."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import fields

import aiohttp
from aiohttp import WSCloseCode, web

from .config import ConfigError, Settings
from .core.scheduler import Scheduler, SchedulerSettings
from .core.webhooks import Webhooks, secret_from, webhook_session
from .core.workflows import WorkflowStore
from .edge.access import AccessPolicy, KeyFileError, KeyRing, RateLimiter, caller_address
from .edge.appkeys import (
    ACCESS,
    BACKEND_URLS,
    CLUSTER,
    DATA_LOCK,
    HUB,
    JOURNAL,
    RELAY_SESSION,
    RESULTS,
    SCHEDULER,
    SESSION,
    SETTINGS,
    STATE,
    UPLOADS,
    WORKFLOWS,
)
from .edge.logs import request_middleware
from .edge.metrics import METRICS, Metrics
from .edge.operations import schedule_report
from .edge.relay import ClusterView, relay_middleware, relay_session
from .edge.replies import error_middleware
from .edge.routes import setup_routes
from .edge.ws import SocketHub, heartbeat
from .errors import StorageError, WorkflowConfigError
from .leadership import Leadership
from .store.counter import StateStore
from .store.datadir import DataDirLock, folder_mark
from .store.journal import JobStore, SqliteJournal
from .store.pgjournal import PgJournal
from .store.results import ResultStore
from .store.s3 import ObjectStoreError, S3Blobs
from .store.uploads import UploadLimits, UploadStore

__all__ = ["MB", "create_app"]

log = logging.getLogger(__name__)
MB = 1024 * 1024
LEADERSHIP = web.AppKey("leadership", Leadership)  # cluster mode only
HOLD_FOR_RECONNECT = 30.0  # seconds the frames of a recovered job's client wait for its socket


def create_app(
    settings: Settings, reload: Callable[[], Settings] | None = None, handle_signals: bool = False
) -> web.Application:
    """Load what must be valid before serving (workflows, state, the job journal); start the rest
    with the app.

    With `handle_signals` (the process's own app, not a test's), SIGTERM drains for `stop_grace` and
    SIGHUP reloads: `reload` re-reads the settings, to pick up a changed backend list without a restart.
    Raises WorkflowConfigError or StateError for a folder or file it cannot use, and DataDirLocked
    (having read and changed nothing) when another bridge holds the data folder; the journal (or the
    database) is opened as the app starts, and its JournalError comes out of the start.
    """
    policy = access_policy(settings)  # first: a bad key is one line, before anything is loaded or locked
    # In a cluster the bridges share the data folder; the database's lock says which one leads.
    shared = bool(settings.database)
    lock = DataDirLock.shared(settings.data_dir) if shared else DataDirLock.acquire(settings.data_dir, settings.own_url)
    try:
        workflows = WorkflowStore.load(settings.workflows)
        state = StateStore.load(settings.state_file)
        journal = journal_for(settings)
    except BaseException:
        lock.release()
        raise
    if isinstance(journal, SqliteJournal):
        journal.file.claim_folder = lock.retake  # a data folder deleted under it is locked again as it comes back
    elif isinstance(journal, PgJournal) and not settings.storage:
        journal.folder = folder_mark(settings.data_dir)  # the cluster's bridges must share the folder
    # Bodies are read by the handlers with their own limits (JSON small, uploads streamed); this
    # cap is for anything read whole, and it is checked on the bytes after any Content-Encoding.
    middlewares = [request_middleware, policy.cors_middleware(), error_middleware, policy.middleware()]
    view = ClusterView(settings.own_url) if shared else None
    if view is not None:
        # Before keys and rates: the leader applies them, so they hold for the whole cluster.
        policy.relayed_caller = view.caller_of
        middlewares.insert(3, relay_middleware(view, lambda request: caller_address(request, policy.trusted_proxies)))
    app = web.Application(
        middlewares=middlewares,
        client_max_size=int(settings.max_json_mb * MB),
        # Bodies come as sent: a JSON body is inflated by its handler within its limit, so the rest
        # of a refused compressed bomb is drained as the few bytes it is, never inflated.
        handler_args={"auto_decompress": False},
    )
    if policy.cors_origins:
        app.on_response_prepare.append(policy.cors_headers)
    if view is not None:
        app[CLUSTER] = view
    app[SETTINGS] = settings
    app[ACCESS] = policy
    app[DATA_LOCK] = lock
    app[WORKFLOWS] = workflows
    app[STATE] = state
    app[JOURNAL] = journal
    # With object storage, one client for the bucket: uploads under <prefix>uploads/, results under
    # <prefix>results/; nothing of either stays on this bridge's disk.
    bucket = S3Blobs(settings.storage, settings.s3_endpoint, settings.s3_timeout) if settings.storage else None
    app[UPLOADS] = UploadStore(
        settings.data_dir / "uploads",
        UploadLimits(
            max_file_bytes=int(settings.max_upload_mb * MB),
            max_request_bytes=int(settings.max_request_mb * MB),
            max_files=settings.max_upload_files,
            allowed_kinds=settings.allowed_media,
            max_frame_mp=settings.max_frame_mp,
            max_total_mp=settings.max_total_mp,
            max_video_mp=settings.max_video_mp,
        ),
        bucket.child("uploads") if bucket else None,
    )
    app[RESULTS] = ResultStore(
        bucket.child("results") if bucket else settings.data_dir / "results", int(settings.inline_result_kb * 1024)
    )
    app[HUB] = SocketHub()
    app[METRICS] = metrics = Metrics()
    if view is not None:
        metrics.watch_cluster(view.report)
    journal.on_commit = metrics.commit_done
    app[BACKEND_URLS] = list(settings.backends)
    app.cleanup_ctx.extend([_stores, _emulators, _http_session, _core, heartbeat])
    if handle_signals:
        app.cleanup_ctx.append(_signals(reload, policy))
    app.on_shutdown.extend([_stop_accepting, _close_sockets])
    app.on_cleanup.append(_release_data_dir)  # after every cleanup context: the journal is closed
    setup_routes(app)
    return app


async def _stores(app: web.Application) -> AsyncIterator[None]:
    blobs = app[RESULTS].blobs
    if isinstance(blobs, S3Blobs):
        await blobs.start()  # the bucket must answer: ObjectStoreError, one line, exit 2
    try:
        # Indexing the uploads earlier runs left walks the data folder: off the event loop.
        try:
            await app[UPLOADS].reload()
        except StorageError as exc:  # the bucket answered, then refused the listing: one line, exit 2
            raise ObjectStoreError(f"storage {app[SETTINGS].storage} cannot be used: {exc}") from None
        yield
    finally:
        if isinstance(blobs, S3Blobs):
            await blobs.close()


def journal_for(settings: Settings) -> JobStore:
    """The job store the settings name: PostgreSQL with --database, else the SQLite journal."""
    if settings.database:
        return PgJournal(settings.database, settings.own_url, settings.leader_timeout, settings.backends)
    return SqliteJournal(settings.journal_file, sync=settings.journal_sync)


def key_ring(settings: Settings, webhook_secret: str | None) -> KeyRing:
    """The API keys the settings name, for a bridge that signs webhooks with `webhook_secret` (none:
    it sends none). Raises KeyFileError for a key file it cannot use."""
    keys = KeyRing.load(settings.api_keys, settings.api_keys_file)
    if not webhook_secret and any(key.webhook for key in keys.keys):
        raise KeyFileError(f"API key file {settings.api_keys_file}: keys with a webhook need webhook_secret set")
    return keys


def access_policy(settings: Settings) -> AccessPolicy:
    """Keys, rates, proxies and CORS from the settings. Raises KeyFileError for a key file it cannot use."""
    burst, keys = settings.rate_burst, key_ring(settings, settings.webhook_secret)
    if settings.rate_limit and not keys.enabled:
        log.warning("rate_limit is per API key, and no keys are set: it limits nothing (ip_rate_limit is per address)")
    return AccessPolicy(
        keys=keys,
        key_rate=RateLimiter(settings.rate_limit, burst) if settings.rate_limit else None,
        ip_rate=RateLimiter(settings.ip_rate_limit, burst) if settings.ip_rate_limit else None,
        trusted_proxies=[ipaddress.ip_network(n, strict=False) for n in settings.trusted_proxies],
        cors_origins=frozenset(settings.cors_origins),
    )


async def _emulators(app: web.Application) -> AsyncIterator[None]:
    """With --emulate N: N built-in ComfyUI emulators on free loopback ports become the backends."""
    settings = app[SETTINGS]
    if not settings.emulate:
        yield
        return
    from .emulator import Emulator  # the one import of the test double, and only when it is asked for

    emulators = [
        Emulator(pace=settings.emulator_pace, dialect=settings.emulator_dialect) for _ in range(settings.emulate)
    ]
    for emulator in emulators:
        await emulator.start()
        log.info("started ComfyUI emulator at %s", emulator.url)
    app[BACKEND_URLS][:] = [e.url for e in emulators]
    yield
    for emulator in emulators:
        await emulator.stop()


async def _http_session(app: web.Application) -> AsyncIterator[None]:
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=32)
    async with aiohttp.ClientSession(connector=connector) as session:
        app[SESSION] = session
        yield


async def _core(app: web.Application) -> AsyncIterator[None]:
    """The scheduler, and the journal it writes: for the app's whole life on a single bridge; in a
    cluster, for each term this bridge leads."""
    settings = app[SETTINGS]
    # The scheduler's settings are the same-named subset of the bridge's.
    own = SchedulerSettings(**{f.name: getattr(settings, f.name) for f in fields(SchedulerSettings)})
    scheduler = Scheduler(
        own,
        app[BACKEND_URLS],
        app[SESSION],
        app[WORKFLOWS],
        app[UPLOADS],
        app[RESULTS],
        app[JOURNAL],
        app[STATE],
        app[HUB],
        app[METRICS],
    )
    app[SCHEDULER] = scheduler
    app[METRICS].watch(lambda: schedule_report(app), app[HUB].open_sockets)  # a follower's: none
    view, journal = app.get(CLUSTER), app[JOURNAL]
    if view is None or not isinstance(journal, PgJournal):
        async with _term(app, again=False):
            yield
        return
    await journal.connect()  # unreachable at start: JournalError, one line, exit 2
    view.secret = journal.relay_secret

    async def demoted() -> None:  # the sockets opened here belonged to the term: their clients reconnect
        await app[HUB].close_all(WSCloseCode.SERVICE_RESTART, b"the cluster's leader changed")

    leadership = app[LEADERSHIP] = Leadership(
        view, journal, lambda again: _term(app, again), settings.leader_timeout, demoted
    )
    scheduler.may_send = leadership.holds
    async with relay_session() as session:
        app[RELAY_SESSION] = session
        leadership.start()
        try:
            with contextlib.suppress(TimeoutError):  # so the first requests find a leader, or know of one
                await asyncio.wait_for(leadership.settled.wait(), 30)
            yield
        finally:
            await leadership.stop()
            await journal.close()


@contextlib.asynccontextmanager
async def _term(app: web.Application, again: bool) -> AsyncIterator[None]:
    """Leading: the journal open (its jobs recovered), the scheduler running; at the end every write
    lands, then the state file takes the final count. `again`: this process led before, and its
    scheduler and stores start afresh from the journal, as a new process would."""
    journal, state, scheduler = app[JOURNAL], app[STATE], app[SCHEDULER]
    rows = await journal.open(count_floor=state.generation_count)
    state.generation_count = journal.count
    try:
        if again:
            scheduler.reset()
            app[RESULTS].clear()
        if CLUSTER in app:  # other bridges may have stored uploads since
            await app[UPLOADS].reload()
        hooks_session = _webhooks(app, scheduler)
        # Sockets reconnect (relayed ones within a second or two): they hear what happened meanwhile,
        # which jobs ended (recovery says it again), and the frames of jobs accepted meanwhile.
        app[HUB].hold_all(HOLD_FOR_RECONNECT)
        try:
            await scheduler.start(rows)
            rows.clear()  # the jobs hold what they need now
            yield
        finally:
            await scheduler.close()
            if hooks_session is not None:  # after the scheduler: its tasks (deliveries too) are stopped
                await hooks_session.close()
    finally:
        await journal.close()
        state.generation_count = journal.count
        await state.save(promptly=True)


def _webhooks(app: web.Application, scheduler: Scheduler) -> aiohttp.ClientSession | None:
    """Job ends are told to webhooks once journaled; calls a previous run left unacknowledged resume."""
    settings, journal = app[SETTINGS], app[JOURNAL]
    if not settings.webhook_secret:
        if journal.deliveries:
            log.warning("%d webhook calls wait, but webhook_secret is not set: not sent", len(journal.deliveries))
        return None
    session = webhook_session(settings.webhook_allow_private)
    webhooks = Webhooks(
        secret_from(settings.webhook_secret),
        session,
        journal.delivered,
        settings.webhook_max_age,
        settings.webhook_allow_private,
    )
    scheduler.use_webhooks(webhooks, journal.deliveries)
    journal.deliveries = []
    return session


def _signals(
    reload: Callable[[], Settings] | None, policy: AccessPolicy
) -> Callable[[web.Application], AsyncIterator[None]]:
    """SIGTERM drains before it stops: /ready and new jobs answer 503 "stopping" for `stop_grace`
    seconds while everything else is served, so a load balancer takes the bridge out of rotation
    before its port closes (a second SIGTERM, or SIGINT, stops at once). SIGHUP re-reads the
    settings (the backend list, unless emulated; the API keys), and the workflow folder."""

    async def context(app: web.Application) -> AsyncIterator[None]:
        settings, scheduler = app[SETTINGS], app[SCHEDULER]
        loop = asyncio.get_running_loop()
        grace: list[asyncio.TimerHandle] = []
        exiting: list[bool] = []

        def stop_now() -> None:
            """Stop the server (aiohttp's graceful exit); only once, whatever signals follow."""
            for timer in grace:
                timer.cancel()
            if not exiting:
                exiting.append(True)
                raise web.GracefulExit()

        def terminate() -> None:
            leadership = app.get(LEADERSHIP)
            if leadership is not None:  # the next bridge leads at once; requests are relayed to it meanwhile
                leadership.stand_down()
            if scheduler.stopping or not settings.stop_grace:
                stop_now()  # a second SIGTERM: now (not the end of a term: a bridge that led gets its grace too)
                return
            scheduler.stop_accepting()
            log.info("SIGTERM: refusing new jobs (503 stopping); the bridge stops in %gs", settings.stop_grace)
            grace.append(loop.call_later(settings.stop_grace, stop_now))

        rereading = asyncio.Lock()  # one SIGHUP's reload at a time, in the order they came
        reloads: set[asyncio.Task[None]] = set()

        async def reread_files() -> None:
            # The files are read in a thread: a folder of many workflows, or one on a network disk,
            # must not hold every request meanwhile.
            async with rereading:
                try:
                    fresh = await asyncio.to_thread(reload) if reload is not None else settings
                except ConfigError as exc:
                    log.error("SIGHUP: settings not reloaded: %s", exc)
                    return
                later = _changed_for_restart(settings, fresh)
                if later:
                    log.warning("SIGHUP: changed %s, which take effect at a restart", ", ".join(later))
                if not settings.emulate:
                    log.info("SIGHUP: backends are now %s", ", ".join(fresh.backends))
                    scheduler.set_backends(list(fresh.backends), (dict(fresh.comfy_outputs), dict(fresh.comfy_inputs)))
                try:
                    _apply_keys(policy, await asyncio.to_thread(key_ring, fresh, settings.webhook_secret), fresh)
                except KeyFileError as exc:
                    log.error("SIGHUP: API keys not reloaded, the ones loaded before stay: %s", exc)
                try:
                    app[WORKFLOWS].replace_with(await asyncio.to_thread(WorkflowStore.load, fresh.workflows))
                except WorkflowConfigError as exc:
                    log.error("SIGHUP: workflows not reloaded, the ones loaded before stay: %s", exc)
                    return
                scheduler.workflows_reloaded()

        def reread() -> None:
            task = loop.create_task(reread_files())
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        loop.add_signal_handler(signal.SIGTERM, terminate)
        loop.add_signal_handler(signal.SIGINT, stop_now)
        loop.add_signal_handler(signal.SIGHUP, reread)
        yield
        for timer in grace:
            timer.cancel()
        for task in tuple(reloads):
            task.cancel()
        for number in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(number)
            # Stopping already: an impatient second Ctrl-C must not cut the clean-up short (the
            # journal's last writes) with a KeyboardInterrupt. SIGKILL remains for a hard stop.
            signal.signal(number, signal.SIG_IGN)

    return context


# What SIGHUP applies; every other setting is read at start-up only.
RELOADED = frozenset({"backends", "comfy_outputs", "comfy_inputs", "api_keys", "api_keys_file", "workflows"})


def _changed_for_restart(running: Settings, fresh: Settings) -> list[str]:
    """The settings changed since start-up that a reload does not apply (with emulators, the backends)."""
    applied = RELOADED - ({"backends", "comfy_outputs", "comfy_inputs"} if running.emulate else set())
    return [
        field.name
        for field in fields(running)
        if field.name not in applied and getattr(running, field.name) != getattr(fresh, field.name)
    ]


def _apply_keys(policy: AccessPolicy, keys: KeyRing, fresh: Settings) -> None:
    """A key revoked, added or changed applies to the next request. Every clientId is scoped by its
    key's name, so a reload that would hand a client's jobs and files to another key is refused:
    keys switched on or off, or a key of `api_keys` (named by its place) whose place another takes.
    (The running bridge's webhook secret decided whether keys may carry webhooks: a new one in the
    settings takes a restart.)"""
    if keys.enabled != policy.keys.enabled:
        log.error("SIGHUP: API keys not reloaded: switching keys on or off takes a restart (clientIds are per key)")
        return
    was = {key.name: key.secret for key in policy.keys.keys}
    placed = {f"key{index}" for index in range(1, len(fresh.api_keys) + 1)}
    moved = sorted(key.name for key in keys.keys if key.name in placed and was.get(key.name, key.secret) != key.secret)
    if moved:
        log.error(
            "SIGHUP: API keys not reloaded: %s of api_keys would be another key than before, and would take over "
            "its clients' jobs and files (keys of api_keys are named by their place): revoke a key by name in "
            "api_keys_file, or keep the places of the others", ", ".join(moved),
        )  # fmt: skip
        return
    policy.keys = keys
    if keys.enabled:
        log.info("SIGHUP: API keys are now %s", ", ".join(sorted(key.name for key in keys.keys)))


async def _stop_accepting(app: web.Application) -> None:
    """First thing on SIGTERM: refuse new jobs; with `drain`, let the jobs inside ComfyUI finish.
    Then requests still waiting for a job's end (`?wait=1`) are answered, before the server waits
    for its open requests."""
    settings, scheduler = app[SETTINGS], app[SCHEDULER]
    scheduler.stop_accepting()
    if settings.drain:
        log.info("draining: waiting up to %gs for jobs inside ComfyUI", settings.drain)
        await scheduler.drain(settings.drain)
    else:
        scheduler.stop_dispatching()
    scheduler.stop_waiting()


async def _close_sockets(app: web.Application) -> None:
    await app[HUB].close_all()
    view = app.get(CLUSTER)
    if view is not None:
        await view.close_sockets()


async def _release_data_dir(app: web.Application) -> None:
    app[DATA_LOCK].release()
