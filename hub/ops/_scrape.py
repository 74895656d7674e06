"""One `/metrics` and `/healthz` for a machine of workers: each worker's answers, fetched and merged by the parent."""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping

__all__ = ["SCRAPE_TIMEOUT", "fetch", "merge_health", "merge_metrics"]

log = logging.getLogger("hub.workers")

#: Longest wait for one worker's answer; a worker that takes longer counts as down for this scrape.
SCRAPE_TIMEOUT = 5.0


def fetch(port: int, path: str, timeout: float = SCRAPE_TIMEOUT) -> tuple[int, bytes] | None:
    """GET http://127.0.0.1:`port``path`: its status and body, or None when the worker cannot be reached."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as answer:
            return int(answer.status), bytes(answer.read())
    except urllib.error.HTTPError as exc:  # 503 from /healthz is an answer, not a failure
        return exc.code, exc.read()
    except (OSError, ValueError) as exc:
        log.warning("worker did not answer", extra={"kv": {"port": port, "path": path, "error": str(exc)}})
        return None


def merge_metrics(
    expositions: Mapping[int, str | None], restarts: Mapping[int, int], running: int
) -> tuple[bytes, str]:
    """One Prometheus exposition of every worker's (worker id -> its text, None: no answer), each sample labelled
    `worker`; plus the supervisor's `hub_workers`, `hub_worker_up` and `hub_worker_restarts`. And its content type.
    """
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
    from prometheus_client.exposition import choose_encoder
    from prometheus_client.metrics_core import Metric
    from prometheus_client.parser import text_string_to_metric_families
    from prometheus_client.registry import CollectorRegistry

    families: dict[str, Metric] = {}
    for worker, text in sorted(expositions.items()):
        for family in text_string_to_metric_families(text or ""):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            for sample in family.samples:
                merged.add_sample(sample.name, {**sample.labels, "worker": str(worker)}, sample.value)
    workers = GaugeMetricFamily("hub_workers", "Worker processes running.", value=running)
    up = GaugeMetricFamily("hub_worker_up", "1 if the worker answered this scrape, else 0.", labels=["worker"])
    restarted = CounterMetricFamily("hub_worker_restarts", "Times the worker was restarted.", labels=["worker"])
    for worker, text in sorted(expositions.items()):
        up.add_metric([str(worker)], 0 if text is None else 1)
        restarted.add_metric([str(worker)], restarts.get(worker, 0))

    class Collector:
        def collect(self) -> Iterable[Metric]:
            yield from families.values()
            yield from (workers, up, restarted)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector())
    encoder, content_type = choose_encoder("")
    return encoder(registry), content_type


def merge_health(answers: Mapping[int, tuple[int, bytes] | None]) -> tuple[int, str, bytes]:
    """200 if every worker answered `/healthz` with 200, else 503; the body holds each worker's answer by id."""
    doc: dict[str, object] = {}
    ok = bool(answers)
    for worker, answer in sorted(answers.items()):
        if answer is None:
            ok = False
            doc[str(worker)] = {"status": "unreachable"}
            continue
        status, body = answer
        ok = ok and status == 200
        doc[str(worker)] = _json(body)
    result = {"status": "ok" if ok else "unavailable", "workers": doc}
    return (200 if ok else 503), "application/json", json.dumps(result).encode()


def _json(body: bytes) -> object:
    try:
        return json.loads(body)
    except ValueError:
        return {"status": "bad answer"}
