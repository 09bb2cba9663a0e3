"""Routing woken after batches are stored: one task for many batches, oldest batch first."""

import logging
import time

import pytest

from events import router, tasks, wakeup
from events.models import InboundBatch
from portal.logging import RequestIdFilter
from tests.factories import ConnectionFactory, FeedFactory, InboundBatchFactory

pytestmark = pytest.mark.django_db

BODY = '{"events": [{"event_type": "custom_event", "data": {"event_name": "tap"}}]}'


def test_wakes_close_together_publish_once(monkeypatch, settings):
    settings.PORTAL = {**settings.PORTAL, "ROUTING_WAKE_SECONDS": 0.3}
    published = []
    monkeypatch.setattr(wakeup, "publish_wakeup", lambda: published.append(time.monotonic()))
    waker = wakeup.RoutingWakeup()

    waker.wake()
    time.sleep(0.1)
    for _ in range(50):
        waker.wake()
    time.sleep(0.6)

    assert len(published) == 2
    assert published[1] - published[0] >= 0.3


def test_wake_after_quiet_publishes_again(monkeypatch, settings):
    settings.PORTAL = {**settings.PORTAL, "ROUTING_WAKE_SECONDS": 0.0}
    published = []
    monkeypatch.setattr(wakeup, "publish_wakeup", lambda: published.append(1))
    waker = wakeup.RoutingWakeup()

    waker.wake()
    time.sleep(0.1)
    waker.wake()
    time.sleep(0.1)

    assert published == [1, 1]


def test_route_next_takes_oldest_first():
    ConnectionFactory()
    feed = FeedFactory()
    first = InboundBatchFactory(feed=feed, body=BODY)
    second = InboundBatchFactory(feed=feed, body=BODY)

    assert router.route_next() == first.pk
    assert router.route_next() == second.pk
    assert router.route_next() is None


def test_route_next_leaves_failed_batch_to_sweeper():
    failed_before = InboundBatchFactory(body=BODY, routing_attempts=1)

    assert router.route_next() is None
    failed_before.refresh_from_db()
    assert failed_before.status == InboundBatch.Status.RECEIVED


def test_route_next_counts_a_raising_run(monkeypatch):
    batch = InboundBatchFactory(body=BODY)

    def broken(batch):
        raise RuntimeError("database went away")

    monkeypatch.setattr(router, "_route_locked", broken)
    with pytest.raises(RuntimeError):
        router.route_next()

    batch.refresh_from_db()
    assert batch.routing_attempts == 1
    assert batch.status == InboundBatch.Status.RECEIVED
    assert "database went away" in batch.error


def test_route_received_routes_every_batch():
    ConnectionFactory()
    feed = FeedFactory()
    batches = [InboundBatchFactory(feed=feed, body=BODY) for _ in range(5)]

    tasks.route_received()

    statuses = set(InboundBatch.objects.filter(pk__in=[b.pk for b in batches]).values_list("status", flat=True))
    assert statuses == {InboundBatch.Status.ROUTED}


def test_swept_batch_logs_its_request_id(caplog):
    caplog.handler.addFilter(RequestIdFilter())
    caplog.set_level(logging.INFO, logger="events.router")
    batch = InboundBatchFactory(body=BODY, request_id="req-0044", routing_attempts=1)

    tasks.route_batch(batch.pk)

    [record] = [r for r in caplog.records if r.getMessage() == "router.routed"]
    assert (record.batch_id, record.request_id) == (batch.pk, "req-0044")
