"""Round trips per unit of work: the SQL statements and Redis calls of each step, counted in this process.

On a machine where the web server, the workers, PostgreSQL and Redis share
two cores, every round trip is a switch to another process and back, so
these counts explain much of each step's cost. They are exact and do not
vary with load, unlike the timings.

SQL statements include BEGIN, COMMIT and savepoints. A Redis call is one
request written to a Redis connection (a pipeline counts once). Steps run
with Django set up, the stand-in listening and no Celery worker running,
so that this process alone carries out the work it queues.
"""

import statistics
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.db import connection as db
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from redis.connection import AbstractConnection

from bench.batches import BatchTemplate
from bench.scaling import store
from events import router
from events.models import Feed
from integrations import batcher, delivery, runs
from integrations.models import BatchWindow, Delivery
from integrations.transport import post_json
from portal.celery import app

REPEATS = 7


@dataclass
class RoundTrips:
    step: str
    sql: int = 0
    redis: int = 0
    cpu_ms: float = 0.0


@contextmanager
def counting(counts: RoundTrips) -> Iterator[None]:
    """Count the SQL statements and Redis calls made by this process inside the block."""
    original: Callable[..., None] = AbstractConnection.send_packed_command

    def counted(self: AbstractConnection, command: Any, check_health: bool = True) -> None:
        counts.redis += 1
        original(self, command, check_health)

    AbstractConnection.send_packed_command = counted  # type: ignore[method-assign]
    try:
        with CaptureQueriesContext(db) as queries:
            yield
    finally:
        AbstractConnection.send_packed_command = original  # type: ignore[method-assign]
    counts.sql = len(queries.captured_queries)


def measure(step: str, prepare: Callable[[], Callable[[], object]]) -> RoundTrips:
    """Count one run of a step, then time the CPU of REPEATS more; `prepare` sets up one run and returns it.

    The first run is a warm-up (connections opened, caches filled), as in a
    worker that has been running. CPU is this thread's time, so it leaves
    out the waits and the database's and Redis' own work.
    """
    prepare()()
    counts = RoundTrips(step)
    run = prepare()
    with counting(counts):
        run()
    cpu = []
    for _ in range(REPEATS):
        run = prepare()
        started = time.thread_time()
        run()
        cpu.append((time.thread_time() - started) * 1000)
    counts.cpu_ms = statistics.median(cpu)
    return counts


def inbound_post(secret: str) -> RoundTrips:
    """Measure one accepted POST to the inbound endpoint, as a web worker serves it (middleware included)."""
    client = Client()

    def prepare() -> Callable[[], object]:
        body = BatchTemplate(10).render("anatomy-inbound")

        def run() -> None:
            response = client.post(
                "/api/v1/mparticle/", data=body, content_type="application/json", HTTP_AUTHORIZATION=f"Bearer {secret}"
            )
            assert response.status_code == 202, response.content

        return run

    return measure("inbound POST of a 10-event batch (web worker)", prepare)


def routing(feed: Feed, label: str) -> RoundTrips:
    """Measure routing one 10-event batch to the one active connection, queueing its deliveries or window items."""

    def prepare() -> Callable[[], object]:
        batch = store(feed, BatchTemplate(10).render(f"anatomy-{uuid.uuid4()}"))
        return lambda: router.route_batch(batch.pk)

    return measure(f"route a 10-event batch ({label})", prepare)


def one_delivery() -> RoundTrips:
    """Measure one successful attempt of a pending delivery, POST to the stand-in included."""

    def prepare() -> Callable[[], object]:
        pending = Delivery.objects.filter(status=Delivery.Status.PENDING).order_by("pk").first()
        assert pending is not None, "no pending delivery to attempt"
        return lambda: delivery.deliver(pending.pk)

    return measure("deliver one event (one attempt, POST included)", prepare)


def delivery_chunk(size: int = 10) -> RoundTrips:
    """Measure one claim of `size` pending deliveries and their attempts, as a run makes them, POSTs included."""

    def prepare() -> Callable[[], object]:
        model = Delivery.objects.select_related("connection").order_by("pk").first()
        assert model is not None, "no delivery to copy"
        connection = model.connection
        Delivery.objects.filter(connection=connection, status=Delivery.Status.PENDING).update(
            status=Delivery.Status.CANCELLED
        )
        copies = [Delivery(connection=connection, payload=model.payload, event_count=1) for _ in range(size)]
        Delivery.objects.bulk_create(copies)

        def run() -> None:
            chunk, _ = runs.claim_chunk(connection, size)
            assert len(chunk) == size, f"claimed {len(chunk)} of {size}"
            runs.send_chunk(connection, chunk, post_json)

        return run

    return measure(f"deliver a chunk of {size} events (one claim, {size} POSTs)", prepare)


def one_flush() -> RoundTrips:
    """Measure flushing one due window of 10 events into one delivery."""

    def prepare() -> Callable[[], object]:
        window = BatchWindow.objects.filter(status=BatchWindow.Status.OPEN).order_by("pk").first()
        assert window is not None, "no open window to flush"
        BatchWindow.objects.filter(pk=window.pk).update(closes_at=timezone.now() - timedelta(seconds=1))
        return lambda: batcher.flush_window(window.pk)

    return measure("flush one window of 10 events", prepare)


def count_all(feed: Feed, secret: str, activate: Callable[[str], None]) -> list[RoundTrips]:
    """Measure every step; `activate(name)` makes the named benchmark connection the only active one."""
    activate("per event")
    steps = [inbound_post(secret), routing(feed, "one POST per event"), one_delivery(), delivery_chunk()]
    activate("send as batch")
    steps.append(routing(feed, "Send as Batch"))
    # Each batch routed there came from a new device and opened a window of 10 events.
    steps.append(one_flush())
    app.control.purge()
    return steps
