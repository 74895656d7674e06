"""Operations: the hub's own figures, as Prometheus /metrics and hub_* points, and /healthz (served by hub.web);
the supervisor of `hub serve --workers N` (`_workers`), whose /metrics merges its workers' (`_scrape`)."""

from hub.ops._metrics import COMMANDS_MEASUREMENT, ERRORS_MEASUREMENT, HUB_MEASUREMENT, HubMetrics, health
from hub.ops._scrape import merge_health, merge_metrics
from hub.ops._workers import WorkerCommand, Workers, WorkersError, run_workers, supervise

__all__ = [
    "COMMANDS_MEASUREMENT",
    "ERRORS_MEASUREMENT",
    "HUB_MEASUREMENT",
    "HubMetrics",
    "WorkerCommand",
    "Workers",
    "WorkersError",
    "health",
    "merge_health",
    "merge_metrics",
    "run_workers",
    "supervise",
]
