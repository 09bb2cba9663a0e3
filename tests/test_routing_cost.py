"""Routing and flushing in bulk: the statements they cost, and chunked routing giving the same result as one pass."""

import json
from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from events import router
from events.models import SeenEvent
from integrations import batcher
from integrations.models import BatchWindow, Delivery, Routing, WindowItem
from tests.factories import ConnectionFactory, FeedFactory, InboundBatchFactory

pytestmark = pytest.mark.django_db

KINDS = ("custom_event", "screen_view", "session_start", "crash_report", "commerce_event")


def ten_event_body(device: str) -> str:
    events = [
        {"event_type": KINDS[i % len(KINDS)], "data": {"source_message_id": f"{device}-{i}", "n": i}} for i in range(10)
    ]
    return json.dumps({"mpid": 7, "mp_deviceid": device, "environment": "production", "events": events})


def route_ten(feed, device):
    batch = InboundBatchFactory(feed=feed, body=ten_event_body(device))
    router.route_batch(batch.pk)
    return batch


# Statements of routing a 10-event batch to one connection. The test's own
# transaction turns routing's BEGIN and COMMIT into a savepoint and its release.
# One POST per event: savepoint, batch, connections, de-duplication, deliveries,
# routing row, batch update, release.
ROUTE_PER_EVENT = 8
# Send as Batch: the same, with the window opened (or locked) and its items inserted instead of deliveries.
ROUTE_SEND_AS_BATCH = 9
# Flushing due windows: savepoint, claim (UPDATE ... RETURNING), connections,
# newest batches, items, release, and one deliveries INSERT per window, made by
# delivery.create_deliveries.
FLUSH_FIXED = 6


def test_route_ten_events_one_post_per_event_statements(django_assert_num_queries):
    ConnectionFactory(send_as_batch=False)
    feed = FeedFactory()
    route_ten(feed, "warm-up")
    batch = InboundBatchFactory(feed=feed, body=ten_event_body("counted"))

    with django_assert_num_queries(ROUTE_PER_EVENT):
        router.route_batch(batch.pk)

    assert Delivery.objects.filter(batch=batch).count() == 10


def test_route_ten_events_send_as_batch_statements(django_assert_num_queries):
    ConnectionFactory(send_as_batch=True)
    feed = FeedFactory()
    route_ten(feed, "warm-up")
    new_device = InboundBatchFactory(feed=feed, body=ten_event_body("counted"))
    same_device = InboundBatchFactory(feed=feed, body=ten_event_body("counted").replace("-", "-again-"))

    with django_assert_num_queries(ROUTE_SEND_AS_BATCH):
        router.route_batch(new_device.pk)
    with django_assert_num_queries(ROUTE_SEND_AS_BATCH):
        router.route_batch(same_device.pk)

    assert WindowItem.objects.filter(window__device_key="mp_deviceid:counted|mpid:7").count() == 20


def close_windows():
    BatchWindow.objects.update(closes_at=timezone.now() - timedelta(seconds=1))


def test_flush_one_window_statements(django_assert_num_queries):
    ConnectionFactory(send_as_batch=True)
    route_ten(FeedFactory(), "one")
    window = BatchWindow.objects.get()
    close_windows()

    with django_assert_num_queries(FLUSH_FIXED + 1):
        (sent,) = batcher.flush_window(window.pk)

    assert sent.event_count == 10


def test_flush_ten_windows_statements(django_assert_num_queries):
    ConnectionFactory(send_as_batch=True)
    feed = FeedFactory()
    for device in range(10):
        route_ten(feed, f"device-{device}")
    close_windows()

    with django_assert_num_queries(FLUSH_FIXED + 10):
        assert batcher.flush_due_windows() == 10

    assert Delivery.objects.count() == 10
    assert not BatchWindow.objects.filter(status=BatchWindow.Status.OPEN).exists()


def test_flush_group_limit(monkeypatch):
    monkeypatch.setattr(batcher, "FLUSH_GROUP", 3)
    ConnectionFactory(send_as_batch=True)
    feed = FeedFactory()
    for device in range(7):
        route_ten(feed, f"device-{device}")
    close_windows()

    assert batcher.flush_due_windows(limit=5) == 5
    assert batcher.flush_due_windows() == 2
    assert Delivery.objects.count() == 7


def mixed_body(count: int) -> str:
    """A batch with repeats across chunks, filtered, unencodable and oversized events, and a consent change."""
    events: list[dict[str, Any]] = []
    for i in range(count):
        kind = KINDS[i % len(KINDS)]
        data: dict[str, Any] = {"source_message_id": f"m-{i % (count - 20)}", "n": i}
        if i < 8 or i % 97 == 0:
            data["padding"] = "x" * 3000
        events.append({"event_type": kind, "data": data})
    events[11]["data"]["text"] = "\ud83d"
    events.append({"event_type": "custom_event", "data": {"no_message_id": True}})
    body = {
        "mpid": 42,
        "mp_deviceid": "device-1",
        "environment": "production",
        "events": events,
        "system_notifications": [{"type": "gdpr_change"}, {"type": "other"}],
    }
    return json.dumps(body)


def delivery_rows(connection):
    rows = Delivery.objects.filter(connection=connection).values_list(
        "status", "payload", "event_count", "event_types", "last_error"
    )
    return sorted(rows, key=repr)


def snapshot(connection):
    """Return what routing stored for the connection, without ids, in an order that does not depend on chunks."""
    deliveries = delivery_rows(connection)
    routing = Routing.objects.values_list(
        "routed_count", "filtered_count", "duplicate_count", "failed_count", "filter_reasons"
    ).get(connection=connection)
    items = WindowItem.objects.filter(window__connection=connection).order_by("id")
    items = list(items.values_list("kind", "route_type", "body"))
    seen = SeenEvent.objects.filter(connection_id=connection.pk).count()
    return deliveries, routing, items, seen


@pytest.mark.parametrize("send_as_batch", [False, True])
@pytest.mark.parametrize(("events", "chunk"), [(1100, None), (60, 7)])
def test_chunked_routing_matches_one_pass(settings, monkeypatch, send_as_batch, events, chunk):
    settings.PORTAL = {**settings.PORTAL, "MAX_PAYLOAD_BYTES": 2500}
    body = mixed_body(events)
    options = {"send_as_batch": send_as_batch, "send_crash_events": False, "batch_window_seconds": 0}
    results = []
    for chunk_size in (10**6, chunk or router.CHUNK_SIZE):
        monkeypatch.setattr(router, "CHUNK_SIZE", chunk_size)
        connection = ConnectionFactory(**options)
        router.route_batch(InboundBatchFactory(body=body).pk)
        connection.active = False
        connection.save()
        results.append(snapshot(connection))

    one_pass, chunked = results
    assert chunked == one_pass
    deliveries, routing, items, _ = chunked
    routed, filtered, duplicates, failed, _ = routing
    assert routed + filtered + duplicates == events + 1 + 1
    # 20 events repeat an earlier one; the 4 of them that are crash reports are filtered first.
    assert duplicates == 16
    assert failed > 0
    if send_as_batch:
        assert len(items) == routed - failed
    else:
        assert sum(count for status, _, count, _, _ in deliveries) == routed


def test_chunked_flush_matches_one_pass(settings, monkeypatch):
    settings.PORTAL = {**settings.PORTAL, "MAX_PAYLOAD_BYTES": 2500}
    body = mixed_body(300)
    results = []
    for chunk_size, stream_above in ((10**6, 10**6), (7, 0)):
        monkeypatch.setattr(batcher, "CHUNK_SIZE", chunk_size)
        monkeypatch.setattr(batcher, "STREAM_ABOVE_ITEMS", stream_above)
        connection = ConnectionFactory(send_as_batch=True, send_crash_events=False, batch_window_seconds=0)
        feed = FeedFactory()
        router.route_batch(InboundBatchFactory(feed=feed, body=body).pk)
        router.route_batch(InboundBatchFactory(feed=feed, body=body.replace('"m-', '"again-')).pk)
        assert batcher.flush_due_windows() == 1
        connection.active = False
        connection.save()
        deliveries = delivery_rows(connection)
        results.append(deliveries)
        routed = sum(Routing.objects.filter(connection=connection).values_list("routed_count", flat=True))
        assert sum(count for _, _, count, _, _ in deliveries) == routed

    one_pass, chunked = results
    assert chunked == one_pass
    assert len([d for d in chunked if d[0] == Delivery.Status.PENDING]) > 10
