"""Routing stored batches to connections, and the Send as Batch windows."""

import json
from datetime import timedelta

import pytest
from django.utils import timezone

from events import router
from events.models import InboundBatch
from integrations import batcher
from integrations.models import BatchWindow, Delivery, Routing
from tests.factories import ConnectionFactory, FeedFactory, InboundBatchFactory

pytestmark = pytest.mark.django_db


def make_batch(feed=None, **fields):
    body = {
        "environment": "production",
        "mp_deviceid": "device-1",
        "events": [
            {"event_type": "custom_event", "data": {"event_name": "Survey Eligible"}},
            {"event_type": "screen_view", "data": {"screen_name": "Home"}},
            {"event_type": "crash_report", "data": {}},
        ],
        **fields,
    }
    return InboundBatchFactory(feed=feed or FeedFactory(), body=json.dumps(body))


def test_routes_by_event_type():
    custom = ConnectionFactory(event_types=["custom_event"])
    screens = ConnectionFactory(event_types=["screen_view", "crash_report"])
    batch = make_batch()

    router.route_batch(batch.pk)

    assert Delivery.objects.get(connection=custom).event_types == ["custom_event"]
    assert sorted(Delivery.objects.filter(connection=screens).values_list("event_types", flat=True)) == [
        ["crash_report"],
        ["screen_view"],
    ]


def test_routing_counts_filtered_with_reason():
    connection = ConnectionFactory(event_types=["custom_event", "crash_report"], send_crash_events=False)
    batch = make_batch()

    router.route_batch(batch.pk)

    routing = Routing.objects.get(connection=connection)
    assert routing.routed_count == 1
    assert routing.filtered_count == 2
    assert routing.filter_reasons == {"event type screen_view not routed": 1, "send_crash_events is off": 1}


def test_inactive_connection_gets_nothing():
    ConnectionFactory(event_types=["custom_event"], active=False)

    router.route_batch(make_batch().pk)

    assert Delivery.objects.count() == 0


def test_connection_limited_to_other_feed():
    feed, other = FeedFactory(), FeedFactory()
    connection = ConnectionFactory(event_types=["custom_event"])
    connection.feeds.set([other])

    router.route_batch(make_batch(feed).pk)

    assert Delivery.objects.count() == 0


def test_batch_routed_once():
    ConnectionFactory(event_types=["custom_event"])
    batch = make_batch()

    assert router.route_batch(batch.pk) is True
    assert router.route_batch(batch.pk) is False

    assert Delivery.objects.count() == 1
    batch.refresh_from_db()
    assert batch.status == InboundBatch.Status.ROUTED
    assert batch.event_count == 3


def test_lone_surrogate_fails_only_its_event():
    connection = ConnectionFactory(event_types=["custom_event"])
    body = (
        '{"events": [{"event_type": "custom_event", "data": {"event_name": "\\ud83d"}},'
        ' {"event_type": "custom_event", "data": {"event_name": "Checkout \\ud83c\\udf54"}}]}'
    )
    batch = InboundBatchFactory(body=body)

    router.route_batch(batch.pk)

    failed = Delivery.objects.get(connection=connection, status=Delivery.Status.FAILED)
    sent = Delivery.objects.get(connection=connection, status=Delivery.Status.PENDING)
    assert "not representable as UTF-8 JSON" in failed.last_error
    assert "Checkout 🍔" in sent.payload
    assert Routing.objects.get().failed_count == 1


def test_oversized_event_failed_as_too_large(settings):
    settings.PORTAL = {**settings.PORTAL, "MAX_PAYLOAD_BYTES": 400}
    connection = ConnectionFactory(event_types=["custom_event"])
    big = json.dumps({"event_type": "custom_event", "data": {"pad": "x" * 500}})
    small = json.dumps({"event_type": "custom_event", "data": {}})
    batch = InboundBatchFactory(body=f'{{"events": [{big}, {small}]}}')

    router.route_batch(batch.pk)

    failed = Delivery.objects.get(connection=connection, status=Delivery.Status.FAILED)
    assert failed.last_error.startswith("too large")
    assert failed.payload == ""
    assert Delivery.objects.filter(status=Delivery.Status.PENDING).count() == 1


def test_eventless_batch_sent_when_enabled():
    connection = ConnectionFactory(event_types=["custom_event"])
    batch = InboundBatchFactory(body='{"mpid": 1, "events": []}')

    router.route_batch(batch.pk)

    assert json.loads(Delivery.objects.get(connection=connection).payload) == {"mpid": 1, "events": []}


def test_eventless_batch_dropped_when_disabled():
    ConnectionFactory(event_types=["custom_event"], send_batches_without_events=False)

    router.route_batch(InboundBatchFactory(body='{"mpid": 1, "events": []}').pk)

    assert Delivery.objects.count() == 0
    assert Routing.objects.get().filter_reasons == {"send_batches_without_events is off": 1}


def test_batch_mode_collects_per_device():
    connection = ConnectionFactory(event_types=["custom_event"], send_as_batch=True)

    router.route_batch(make_batch().pk)
    router.route_batch(make_batch().pk)
    router.route_batch(make_batch(mp_deviceid="device-2").pk)

    windows = BatchWindow.objects.filter(connection=connection)
    assert sorted(windows.values_list("device_key", flat=True)) == ["mp_deviceid:device-1", "mp_deviceid:device-2"]
    assert Delivery.objects.count() == 0


def test_window_flushed_once():
    ConnectionFactory(event_types=["custom_event"], send_as_batch=True)
    router.route_batch(make_batch().pk)
    window = BatchWindow.objects.get()

    first = batcher.flush_window(window.pk)
    second = batcher.flush_window(window.pk)

    assert len(first) == 1
    assert second == []


def test_flush_waits_for_window_close():
    ConnectionFactory(event_types=["custom_event"], send_as_batch=True, batch_window_seconds=600)
    router.route_batch(make_batch().pk)

    assert batcher.flush_due_windows() == 0

    BatchWindow.objects.update(closes_at=timezone.now())
    assert batcher.flush_due_windows() == 1


def test_flushed_batch_uses_newest_envelope():
    ConnectionFactory(event_types=["custom_event", "screen_view"], send_as_batch=True)
    router.route_batch(make_batch(batch_id=1).pk)
    router.route_batch(make_batch(batch_id=2).pk)

    (sent,) = batcher.flush_window(BatchWindow.objects.get().pk)

    payload = json.loads(sent.payload)
    assert payload["batch_id"] == 2
    assert [event["event_type"] for event in payload["events"]] == ["custom_event", "screen_view"] * 2
    assert sent.event_count == 4


def test_event_after_flush_opens_new_window():
    ConnectionFactory(event_types=["custom_event"], send_as_batch=True)
    router.route_batch(make_batch().pk)
    batcher.flush_window(BatchWindow.objects.get().pk)

    router.route_batch(make_batch().pk)

    assert BatchWindow.objects.filter(status=BatchWindow.Status.OPEN).count() == 1
    assert BatchWindow.objects.count() == 2


def test_consent_notification_routed():
    connection = ConnectionFactory(event_types=["gdpr_change"])
    body = {
        "events": [{"event_type": "custom_event", "data": {}}],
        "system_notifications": [{"type": "gdpr_change", "purpose": "marketing"}, {"type": "other_note"}],
    }
    router.route_batch(InboundBatchFactory(body=json.dumps(body)).pk)

    payload = json.loads(Delivery.objects.get(connection=connection).payload)
    assert payload["events"] == []
    assert payload["system_notifications"] == body["system_notifications"]


def test_consent_notification_removed_when_unrouted():
    connection = ConnectionFactory(event_types=["custom_event"])
    body = {
        "events": [{"event_type": "custom_event", "data": {}}],
        "system_notifications": [{"type": "gdpr_change"}],
    }
    router.route_batch(InboundBatchFactory(body=json.dumps(body)).pk)

    assert json.loads(Delivery.objects.get(connection=connection).payload)["system_notifications"] == []


def resent(batch_id, request_id, message_id="m-1", mpid=42):
    body = {
        "source_request_id": request_id,
        "batch_id": batch_id,
        "mpid": mpid,
        "events": [{"event_type": "custom_event", "data": {"source_message_id": message_id, "event_id": batch_id}}],
    }
    return InboundBatchFactory(body=json.dumps(body))


def test_resent_event_is_duplicate():
    connection = ConnectionFactory(event_types=["custom_event"])

    router.route_batch(resent(1, "r-1").pk)
    repeat = resent(2, "r-2")
    router.route_batch(repeat.pk)

    assert Delivery.objects.filter(connection=connection).count() == 1
    second = Routing.objects.get(batch=repeat)
    assert second.duplicate_count == 1
    assert second.routed_count == 0


def test_duplicate_key_is_per_connection():
    ConnectionFactory(event_types=["custom_event"])
    router.route_batch(resent(1, "r-1").pk)
    ConnectionFactory(event_types=["custom_event"])

    router.route_batch(resent(2, "r-2").pk)

    assert Delivery.objects.count() == 2


def test_event_without_message_id_never_duplicate():
    ConnectionFactory(event_types=["custom_event"])
    body = json.dumps({"mpid": 42, "events": [{"event_type": "custom_event", "data": {"event_name": "x"}}]})

    router.route_batch(InboundBatchFactory(body=body).pk)
    router.route_batch(InboundBatchFactory(body=body).pk)

    assert Delivery.objects.count() == 2


def test_duplicate_after_window_is_sent(settings):
    from events.models import SeenEvent

    ConnectionFactory(event_types=["custom_event"])
    router.route_batch(resent(1, "r-1").pk)
    expired = timezone.now() - timedelta(seconds=settings.PORTAL["EVENT_DEDUP_SECONDS"] + 1)
    SeenEvent.objects.update(seen_at=expired)

    router.route_batch(resent(2, "r-2").pk)

    assert Delivery.objects.count() == 2


ACCOUNTING_BODIES = {
    "events and consent": {
        "mp_deviceid": "d",
        "events": [{"event_type": "custom_event", "data": {}}, {"event_type": "screen_view", "data": {}}],
        "system_notifications": [{"type": "gdpr_change"}, {"type": "ccpa_change"}],
    },
    "consent only": {"mp_deviceid": "d", "events": [], "system_notifications": [{"type": "gdpr_change"}]},
    "no events": {"mp_deviceid": "d", "events": []},
}


@pytest.mark.parametrize("as_batch", [False, True])
@pytest.mark.parametrize("case", sorted(ACCOUNTING_BODIES))
def test_routed_equals_delivery_counts(case, as_batch):
    connection = ConnectionFactory(send_as_batch=as_batch, batch_window_seconds=0)
    batch = InboundBatchFactory(body=json.dumps(ACCOUNTING_BODIES[case]))

    router.route_batch(batch.pk)
    batcher.flush_due_windows()

    routing = Routing.objects.get(connection=connection)
    counted = sum(Delivery.objects.filter(connection=connection).values_list("event_count", flat=True))
    assert routing.routed_count > 0
    assert counted == routing.routed_count


def test_window_keeps_arrival_order():
    from integrations.models import WindowItem

    ConnectionFactory(event_types=["custom_event"], send_as_batch=True)
    first = make_batch(events=[{"event_type": "custom_event", "data": {"event_name": "first"}}])
    second = make_batch(events=[{"event_type": "custom_event", "data": {"event_name": "second"}}])
    router.route_batch(second.pk)
    router.route_batch(first.pk)
    assert list(WindowItem.objects.order_by("pk").values_list("batch_id", flat=True)) == [second.pk, first.pk]

    (sent,) = batcher.flush_window(BatchWindow.objects.get().pk)

    names = [event["data"]["event_name"] for event in json.loads(sent.payload)["events"]]
    assert names == ["first", "second"]


def test_received_equals_routed_filtered_duplicate():
    connection = ConnectionFactory(event_types=["custom_event", "crash_report"], send_crash_events=False)
    router.route_batch(resent(1, "r-1", message_id="seen").pk)
    events = [
        {"event_type": "custom_event", "data": {"source_message_id": "seen"}},
        {"event_type": "custom_event", "data": {"source_message_id": "new"}},
        {"event_type": "crash_report", "data": {}},
        {"event_type": "screen_view", "data": {}},
    ]
    batch = InboundBatchFactory(body=json.dumps({"mpid": 42, "events": events}))

    router.route_batch(batch.pk)

    routing = Routing.objects.get(batch=batch, connection=connection)
    assert (routing.routed_count, routing.filtered_count, routing.duplicate_count) == (1, 2, 1)
    assert routing.routed_count + routing.filtered_count + routing.duplicate_count == len(events)


def test_failing_batch_gives_up_after_attempts(monkeypatch):
    from events import tasks

    batch = make_batch()
    monkeypatch.setattr(router, "connections_for", lambda batch: 1 / 0)

    for _ in range(router.MAX_ROUTING_ATTEMPTS):
        with pytest.raises(ZeroDivisionError):
            tasks.route_batch(batch.pk)

    batch.refresh_from_db()
    assert batch.status == InboundBatch.Status.FAILED
    assert batch.routing_attempts == router.MAX_ROUTING_ATTEMPTS
    assert batch.error == "routing failed: ZeroDivisionError: division by zero"


def test_bad_envelope_keeps_window_events():
    ConnectionFactory(event_types=["custom_event"], send_as_batch=True)
    router.route_batch(make_batch(events=[{"event_type": "custom_event", "data": {"event_name": "clean"}}]).pk)
    bad = InboundBatchFactory(
        feed=FeedFactory(),
        body='{"mp_deviceid": "device-1", "user_attributes": {"nick": "\\ud83d"}, "events": []}',
    )
    router.route_batch(bad.pk)

    (sent,) = batcher.flush_window(BatchWindow.objects.get().pk)

    assert sent.status == Delivery.Status.PENDING
    payload = json.loads(sent.payload)
    assert payload["user_attributes"] == {"nick": "\ufffd"}
    assert payload["events"][0]["data"]["event_name"] == "clean"
