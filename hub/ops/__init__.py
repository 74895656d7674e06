"""Operations: the hub's own figures, as Prometheus /metrics and hub_* points, and /healthz on a small HTTP listener."""

from hub.ops._http import Route, serve_http
from hub.ops._metrics import COMMANDS_MEASUREMENT, ERRORS_MEASUREMENT, HUB_MEASUREMENT, HubMetrics, health

__all__ = [
    "COMMANDS_MEASUREMENT",
    "ERRORS_MEASUREMENT",
    "HUB_MEASUREMENT",
    "HubMetrics",
    "Route",
    "health",
    "serve_http",
]
