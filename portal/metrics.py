"""Prometheus metrics: the counters the code paths update, the state read at scrape time, and `GET /metrics`.

Counters and the latency histogram are updated where things happen, one
call each. With `PROMETHEUS_MULTIPROC_DIR` set, prometheus-client keeps
them in files in that folder, one set per process, and `/metrics` adds up
every file. The gunicorn workers and the Celery workers of a host must
therefore share the folder, which should be emptied when the host's
processes all start. Without the variable each process counts in memory,
and `/metrics` shows the web process that serves the request.

What can be read instead of counted (deliveries waiting, paused
connections, queue depths) is read from the database and the broker at
scrape time, so it is right whichever process serves the scrape.
"""

import hmac
import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import redis
from django.conf import settings
from django.db import DatabaseError
from django.db.models import Count
from django.http import HttpRequest, HttpResponse
from django.views.decorators.http import require_GET
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from events.event_types import route_type_of_event, route_type_of_notification
from integrations import shaping
from integrations.models import Connection, Delivery
from portal.conf import portal_setting

logger = logging.getLogger(__name__)

INBOUND_BATCHES = Counter(
    "portal_inbound_batches",
    "Inbound batches by feed and outcome: accepted, duplicate (a repeated source_request_id) or rejected.",
    ["feed", "outcome"],
)
EVENTS_ROUTED = Counter(
    "portal_events_routed",
    "Events and consent notifications routed to a connection, after de-duplication, by type.",
    ["connection", "event_type"],
)
EVENTS_FILTERED = Counter(
    "portal_events_filtered",
    "Events that a connection's routing, settings or filters kept from it, by type.",
    ["connection", "event_type"],
)
DELIVERY_ATTEMPTS = Counter(
    "portal_delivery_attempts",
    "Delivery attempts by connection and outcome: delivered, retry (scheduled again) or failed.",
    ["connection", "outcome"],
)
ATTEMPT_DURATION = Histogram(
    "portal_delivery_attempt_duration_seconds",
    "Duration of delivery attempts, by connection.",
    ["connection"],
    # The top bucket is the default total deadline of an attempt.
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, float("inf")),
)
BROKER_TIMEOUT_SECONDS = 2.0


def count_batch(feed: str, outcome: str) -> None:
    INBOUND_BATCHES.labels(feed, outcome).inc()


def count_filtered(connection: str, batch: Mapping[str, Any], routed: Sequence[shaping.ShapedEvent]) -> None:
    """Count the batch's events that shaping did not route to the connection, by type."""
    kept = {shaped.index for shaped in routed}
    for index, event in enumerate(shaping.batch_events(batch)):
        if index not in kept:
            event_type = event.get("event_type") if isinstance(event, Mapping) else None
            EVENTS_FILTERED.labels(connection, route_type_of_event(event_type)).inc()


def count_routed(connection: str, shaped: shaping.ShapedBatch) -> None:
    """Count the events and consent notifications routed to the connection, by type."""
    for event in shaped.events:
        EVENTS_ROUTED.labels(connection, event.route_type).inc()
    for notification in shaped.notifications:
        kind = notification.get("type") if isinstance(notification, Mapping) else None
        EVENTS_ROUTED.labels(connection, str(route_type_of_notification(kind))).inc()


def observe_attempt(connection: str, outcome: str, duration_ms: int) -> None:
    DELIVERY_ATTEMPTS.labels(connection, outcome).inc()
    ATTEMPT_DURATION.labels(connection).observe(duration_ms / 1000)


class _ProcessMetrics(Collector):
    """This process's own metrics, from prometheus-client's default registry."""

    def collect(self) -> Iterable[Metric]:
        return REGISTRY.collect()


class StateCollector(Collector):
    """Figures read at scrape time: deliveries waiting and paused connections, and queue depths.

    An unreachable database or broker leaves its figures out of the scrape
    instead of failing it.
    """

    def collect(self) -> Iterator[Metric]:
        yield from database_state()
        yield from broker_state()


def scrape_registry() -> CollectorRegistry:
    """Return a registry holding every process's counters (or this process's) and the scrape-time state."""
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]  # prometheus-client leaves it unannotated
    else:
        registry.register(_ProcessMetrics())
    registry.register(StateCollector())
    return registry


def database_state() -> list[Metric]:
    """Return the deliveries pending and awaiting a retry per connection, and the paused connections."""
    try:
        connections = list(Connection.objects.values_list("pk", "name", "paused_at"))
        waiting = list(
            Delivery.objects.filter(status__in=(Delivery.Status.PENDING, Delivery.Status.RETRY_SCHEDULED))
            .order_by()
            .values_list("connection_id", "status")
            .annotate(count=Count("pk"))
        )
    except DatabaseError:
        logger.warning("metrics.database_unavailable", exc_info=True)
        return []

    counts = {(connection_id, status): count for connection_id, status, count in waiting}
    pending = GaugeMetricFamily(
        "portal_deliveries_pending", "Deliveries waiting for their first attempt.", labels=["connection"]
    )
    retries = GaugeMetricFamily(
        "portal_retries_pending", "Deliveries waiting for a scheduled retry.", labels=["connection"]
    )
    for pk, name, _ in connections:
        pending.add_metric([name], counts.get((pk, Delivery.Status.PENDING), 0))
        retries.add_metric([name], counts.get((pk, Delivery.Status.RETRY_SCHEDULED), 0))
    paused = GaugeMetricFamily(
        "portal_connections_paused",
        "Connections paused by an operator, an authorization error or their circuit breaker.",
        value=sum(1 for _, _, paused_at in connections if paused_at is not None),
    )
    return [pending, retries, paused]


def broker_state() -> list[Metric]:
    depths = queue_depths()
    if not depths:
        return []
    family = GaugeMetricFamily("portal_queue_depth", "Tasks waiting in each Celery queue.", labels=["queue"])
    for queue, depth in depths.items():
        family.add_metric([queue], depth)
    return [family]


def queue_depths() -> dict[str, int]:
    """Return the tasks waiting per queue where the broker reports it cheaply: Redis and the filesystem broker.

    Other brokers, and an unreachable broker, give an empty dict.
    """
    names = [queue.name for queue in settings.CELERY_TASK_QUEUES]
    url: str = settings.CELERY_BROKER_URL
    try:
        if url.startswith(("redis://", "rediss://")):
            return _redis_depths(url, names)
        if url.startswith("filesystem://"):
            return _folder_depths(Path(str(settings.CELERY_BROKER_TRANSPORT_OPTIONS["data_folder_in"])), names)
    except (redis.RedisError, OSError):
        logger.warning("metrics.broker_unavailable", exc_info=True)
    return {}


def _redis_depths(url: str, names: Sequence[str]) -> dict[str, int]:
    # kombu keeps a Redis queue as a list under the queue's name. The portal
    # sets no task priorities, so no message waits under kombu's priority keys.
    client = redis.Redis.from_url(
        url, socket_connect_timeout=BROKER_TIMEOUT_SECONDS, socket_timeout=BROKER_TIMEOUT_SECONDS
    )
    try:
        with client.pipeline(transaction=False) as pipeline:
            for name in names:
                pipeline.llen(name)
            lengths = pipeline.execute()
    finally:
        client.close()
    return {name: int(length) for name, length in zip(names, lengths, strict=True)}


def _folder_depths(folder: Path, names: Sequence[str]) -> dict[str, int]:
    # Message files are named `<sequence>_<uuid>.<queue>.msg` (portal.filesystem_broker).
    depths = dict.fromkeys(names, 0)
    for entry in os.scandir(folder):
        queue = entry.name.partition(".")[2].removesuffix(".msg")
        if queue in depths and entry.name.endswith(".msg"):
            depths[queue] += 1
    return depths


@require_GET
def metrics_view(request: HttpRequest) -> HttpResponse:
    """Serve the metrics in Prometheus' text format; when PORTAL_METRICS_TOKEN is set, only to its bearer."""
    if not _authorized(request):
        response = HttpResponse("A bearer token is required.\n", status=401, content_type="text/plain")
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return response
    return HttpResponse(generate_latest(scrape_registry()), content_type=CONTENT_TYPE_LATEST)


def _authorized(request: HttpRequest) -> bool:
    token: str = portal_setting("METRICS_TOKEN")
    if not token:
        return True
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())
