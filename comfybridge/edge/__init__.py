"""The HTTP edge: the contract's routes, the WebSocket hub, access control, OpenAPI, logs, metrics and
the playground. It turns requests into calls on the core's `Scheduler` and domain errors into JSON."""

__all__: list[str] = []
