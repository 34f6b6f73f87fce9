"""Domain errors the core raises; each carries the HTTP status the edge answers it with."""

__all__ = [
    "BadInput",
    "BridgeError",
    "Conflict",
    "Forbidden",
    "Gone",
    "NoBackend",
    "NoLeader",
    "NotFound",
    "RateLimited",
    "Relayed",
    "RequestTimeout",
    "ShuttingDown",
    "StorageError",
    "StorageFull",
    "StorageUnavailable",
    "TooLarge",
    "TooManyJobs",
    "Unauthorized",
    "UnknownClient",
    "UnknownWorkflow",
    "UnsupportedMedia",
    "WorkflowConfigError",
]


class BridgeError(Exception):
    """Anything the client did or asked that the bridge refuses; the message is the client's `detail`.

    `status` is the HTTP status it is answered with: a subclass says its own, so the edge never
    depends on the order of a list."""

    status = 400

    @property
    def detail(self) -> str:
        return str(self)


class BadInput(BridgeError):
    """Malformed or invalid input (400)."""


class UnknownWorkflow(BadInput):
    pass


class UnknownClient(BadInput):
    pass


class NotFound(BridgeError):
    """Something the request names does not exist (404)."""

    status = 404


class Conflict(BridgeError):
    """What the request asks for is being done by another request right now (409)."""

    status = 409


class Gone(BridgeError):
    """What the request names existed and is lost for good (410)."""

    status = 410


class RequestTimeout(BridgeError):
    """A request body that did not arrive in time (408)."""

    status = 408


class TooLarge(BridgeError):
    """An upload over the configured size (413)."""

    status = 413


class UnsupportedMedia(BridgeError):
    """An upload whose content is not an allowed media type, or a body of the wrong type (415)."""

    status = 415


class TooManyJobs(BridgeError):
    """A client over its limit of jobs in line (429, with Retry-After: when one ends is not known,
    so a second, as the contract's every 429 carries one)."""

    status = 429

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RateLimited(TooManyJobs):
    """A caller over a rate or count limit (429, with Retry-After)."""


class Unauthorized(BridgeError):
    """No API key, or a wrong one, where keys are required (401)."""

    status = 401


class Forbidden(BridgeError):
    """A valid caller asking for what its key does not allow (403)."""

    status = 403


class StorageError(BridgeError):
    """The bridge's own storage failed a write: never the client's fault."""

    status = 503


class StorageFull(StorageError):
    """The bridge's disk cannot take the write that accepting the request needs (507)."""

    status = 507


class StorageUnavailable(StorageError):
    """The bridge cannot use its data folder (read-only, no permission, its journal gone) or its
    database (503; with Retry-After where the trouble is likely to pass, e.g. a database restarting)."""

    def __init__(self, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class NoBackend(BridgeError):
    """No healthy ComfyUI backend can take the work (503, with Retry-After: the bridge tries each
    lost backend again at least this often)."""

    status = 503
    retry_after = 5


class ShuttingDown(NoBackend):
    """The bridge is stopping and accepts no new work (503)."""


class NoLeader(NoBackend):
    """Cluster mode: no bridge leads right now (one died, or the database is away), so none can take
    the request yet (503, with Retry-After)."""

    retry_after = 1


class Relayed(BridgeError):
    """A refusal the leading bridge gave a request this bridge passed on, told as it was."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.headers = headers or {}  # what the leader's answer said beside it (Retry-After, WWW-Authenticate)


class WorkflowConfigError(Exception):
    """A workflow folder or file the bridge cannot serve; raised at start-up, names the culprit."""
