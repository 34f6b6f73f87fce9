"""The core: jobs, clients, the fair queue and placement, the per-backend workers, following ComfyUI,
failover and recovery. Knows nothing of HTTP: the edge calls `Scheduler`, the stores keep its state."""

from .scheduler import Fetch, Notifier, Scheduler, SchedulerSettings

__all__ = ["Fetch", "Notifier", "Scheduler", "SchedulerSettings"]
