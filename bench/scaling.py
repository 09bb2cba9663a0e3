"""Timings of routing and flushing at growing sizes, taken in this process against the benchmark's database and broker.

`route_times` stores a batch of n events and times `events.router.route_batch`
on it, as a worker runs it, including queueing the delivery tasks.
`flush_times` times `integrations.batcher.flush_due_windows` with a number of
open windows that are not yet due beside a fixed number that are. Call both
with Django set up and no Celery worker running: the queued tasks are purged
afterwards, not delivered.
"""

import time
import uuid
from datetime import timedelta

from django.db import connection as db
from django.utils import timezone

from bench.batches import BatchTemplate
from events import router
from events.models import Feed, InboundBatch
from integrations import batcher, jsontext, shaping
from integrations.models import BatchWindow, Connection, WindowItem
from portal.celery import app

ITEMS_PER_DUE_WINDOW = 10


def store(feed: Feed, body: bytes) -> InboundBatch:
    text = body.decode("utf-8")
    return InboundBatch.objects.create(feed=feed, source_request_id=str(uuid.uuid4()), body=text, body_bytes=len(body))


def route_times(feed: Feed, sizes: tuple[int, ...], rounds: int) -> dict[int, list[float]]:
    """Return, per batch size, the seconds `route_batch` took in each round (after one untimed warm-up)."""
    times: dict[int, list[float]] = {}
    for size in sizes:
        template = BatchTemplate(size)
        router.route_batch(store(feed, template.render("scaling-warm-up")).pk)
        times[size] = []
        for number in range(rounds):
            batch = store(feed, template.render(f"scaling-{size}-{number}"))
            started = time.perf_counter()
            router.route_batch(batch.pk)
            times[size].append(time.perf_counter() - started)
        app.control.purge()
    return times


def add_idle_windows(connection: Connection, first: int, last: int) -> None:
    """Open windows for devices `first` to `last` that close in a day, with one INSERT."""
    with db.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {BatchWindow._meta.db_table} (connection_id, device_key, status, opened_at, closes_at) "
            "SELECT %s, 'idle-' || g, 'open', now(), now() + interval '1 day' FROM generate_series(%s, %s) g",
            [connection.pk, first, last],
        )
        cursor.execute(f"ANALYZE {BatchWindow._meta.db_table}")


def add_due_windows(connection: Connection, feed: Feed, count: int) -> None:
    """Open `count` windows that closed a second ago, each holding ITEMS_PER_DUE_WINDOW events of one batch."""
    body = BatchTemplate(ITEMS_PER_DUE_WINDOW).render("due")
    batch = store(feed, body)
    events = shaping.batch_events(jsontext.parse(body.decode("utf-8")))
    closed = timezone.now() - timedelta(seconds=1)
    windows = BatchWindow.objects.bulk_create(
        BatchWindow(connection=connection, device_key=f"due-{uuid.uuid4()}", closes_at=closed) for _ in range(count)
    )
    WindowItem.objects.bulk_create(
        WindowItem(
            window=window,
            batch=batch,
            kind=WindowItem.Kind.EVENT,
            route_type=event["event_type"],
            body=jsontext.encode(event).decode("utf-8"),
        )
        for window in windows
        for event in events
    )


def flush_times(
    connection: Connection, feed: Feed, open_counts: tuple[int, ...], due: int, rounds: int
) -> dict[int, list[float]]:
    """Return, per number of idle open windows, the seconds a flush run of `due` due windows took in each round."""
    times: dict[int, list[float]] = {}
    idle = 0
    for count in open_counts:
        add_idle_windows(connection, idle + 1, count)
        idle = count
        times[count] = []
        for _ in range(rounds):
            add_due_windows(connection, feed, due)
            started = time.perf_counter()
            flushed = batcher.flush_due_windows()
            times[count].append(time.perf_counter() - started)
            assert flushed == due, f"flushed {flushed} windows, expected {due}"
        app.control.purge()
    return times
