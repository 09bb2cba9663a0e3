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


# A BaseException ends the thread on purpose here, and pytest warns about it.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
@pytest.mark.parametrize("failure", [KeyError("ROUTING_WAKE_SECONDS"), BaseException("not an Exception")])
def test_thread_survives_a_failure(monkeypatch, settings, failure):
    settings.PORTAL = {**settings.PORTAL, "ROUTING_WAKE_SECONDS": 0.0}
    published = []

    def publish():
        published.append(1)
        if len(published) == 1:
            raise failure

    monkeypatch.setattr(wakeup, "publish_wakeup", publish)
    monkeypatch.setattr(wakeup, "FALLBACK_PAUSE_SECONDS", 0.0)
    waker = wakeup.RoutingWakeup()

    waker.wake()
    time.sleep(0.2)
    waker.wake()
    time.sleep(0.2)

    assert published == [1, 1]


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


def test_route_next_records_a_raising_run(monkeypatch):
    batch = InboundBatchFactory(body=BODY)

    def broken(batch, **kwargs):
        raise RuntimeError("database went away")

    monkeypatch.setattr(router, "_route_locked", broken)
    assert router.route_next() == batch.pk

    batch.refresh_from_db()
    assert batch.routing_attempts == 1
    assert batch.status == InboundBatch.Status.RECEIVED
    assert "database went away" in batch.error


def test_routed_batch_takes_its_count_back():
    ConnectionFactory()
    batch = InboundBatchFactory(body=BODY)

    router.route_next()

    batch.refresh_from_db()
    assert batch.status == InboundBatch.Status.ROUTED
    assert batch.routing_attempts == 0


def test_run_that_kills_the_worker_is_counted(monkeypatch):
    poisoned = InboundBatchFactory(body=BODY)

    class WorkerKilled(BaseException):
        """Stands in for the process dying in the middle of routing."""

    def die(batch, **kwargs):
        raise WorkerKilled

    monkeypatch.setattr(router, "_route_locked", die)
    with pytest.raises(WorkerKilled):
        router.route_next()

    poisoned.refresh_from_db()
    assert poisoned.routing_attempts == 1
    assert router.route_next() is None


def test_route_received_goes_on_after_a_failure(monkeypatch):
    ConnectionFactory()
    feed = FeedFactory()
    poisoned = InboundBatchFactory(feed=feed, body=BODY)
    others = [InboundBatchFactory(feed=feed, body=BODY) for _ in range(3)]
    route = router._route_locked

    def route_all_but_poisoned(batch, **kwargs):
        if batch.pk == poisoned.pk:
            raise RuntimeError("poison")
        route(batch, **kwargs)

    monkeypatch.setattr(router, "_route_locked", route_all_but_poisoned)
    tasks.route_received()

    statuses = set(InboundBatch.objects.filter(pk__in=[b.pk for b in others]).values_list("status", flat=True))
    assert statuses == {InboundBatch.Status.ROUTED}
    poisoned.refresh_from_db()
    assert poisoned.status == InboundBatch.Status.RECEIVED


@pytest.mark.parametrize("path", ["woken", "swept"])
def test_failed_run_logs_request_id(monkeypatch, caplog, path):
    caplog.handler.addFilter(RequestIdFilter())
    caplog.set_level(logging.INFO, logger="events.router")
    batch = InboundBatchFactory(body=BODY, request_id="req-0099", routing_attempts=0 if path == "woken" else 1)

    def broken(batch, **kwargs):
        raise RuntimeError("database went away")

    monkeypatch.setattr(router, "_route_locked", broken)
    if path == "woken":
        router.route_next()
    else:
        with pytest.raises(RuntimeError):
            tasks.route_batch(batch.pk)

    [record] = [r for r in caplog.records if r.getMessage() == "router.run_failed"]
    assert record.request_id == "req-0099"


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


def test_failed_start_still_answers(client, monkeypatch, django_capture_on_commit_callbacks):
    from events import views

    def cannot_start():
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(views.routing_wakeup, "wake", cannot_start)
    feed = FeedFactory()

    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(
            "/api/v1/mparticle/", BODY, content_type="application/json", HTTP_AUTHORIZATION=feed.plain_secret
        )

    assert response.status_code == 202
    assert InboundBatch.objects.filter(pk=response.json()["batch_id"]).exists()


def test_enqueue_goes_on_after_publish_failure(monkeypatch):
    from integrations import delivery
    from integrations import tasks as delivery_tasks

    calls = []

    def broker_hiccup(*args, **kwargs):
        calls.append(args)
        raise ConnectionError("broker hiccup")

    monkeypatch.setattr(delivery_tasks.deliver, "apply_async", broker_hiccup)

    delivery._enqueue([1, 2])

    assert len(calls) == 2
