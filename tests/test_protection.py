"""Pauses, probes, the circuit breaker, rate limit, concurrency cap and replay."""

from datetime import timedelta

import pytest
from django.core.cache import cache
from django.utils import timezone

from integrations import delivery, protection
from integrations.models import Connection, Delivery
from integrations.transport import Outcome
from tests.factories import ConnectionFactory

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def no_broker(monkeypatch):
    queued = []
    monkeypatch.setattr(delivery, "_enqueue", lambda ids, countdown=None: queued.extend(ids))
    cache.clear()
    return queued


def answer(*outcomes):
    remaining = list(outcomes)
    calls = []

    def send(url, body, headers, **timeouts):
        calls.append(headers)
        return remaining.pop(0)

    send.calls = calls
    return send


def make_delivery(connection=None, **fields):
    return Delivery.objects.create(connection=connection or ConnectionFactory(), payload="{}", event_count=1, **fields)


def reload(instance):
    instance.refresh_from_db()
    return instance


@pytest.mark.parametrize("status", [401, 403, 404, 410])
def test_auth_failure_pauses_connection(status):
    item = make_delivery()

    delivery.deliver(item.pk, send=answer(Outcome(status, 1)))

    connection = reload(item.connection)
    assert connection.is_paused
    assert f"({status})" in connection.pause_reason
    assert not connection.auto_resume
    assert reload(item).status == Delivery.Status.RETRY_SCHEDULED


def test_paused_connection_holds_deliveries():
    item = make_delivery()
    protection.pause(item.connection, "maintenance", auto_resume=False)
    send = answer()

    delivery.deliver(item.pk, send=send)

    item = reload(item)
    assert send.calls == []
    assert item.status == Delivery.Status.RETRY_SCHEDULED
    assert item.attempt_count == 0
    assert item.next_attempt_at > timezone.now() + timedelta(days=300)


def test_resume_makes_waiting_due(no_broker):
    item = make_delivery()
    protection.pause(item.connection, "maintenance", auto_resume=False)
    delivery.deliver(item.pk, send=answer())

    protection.resume(reload(item.connection), reason="operator")

    assert not reload(item.connection).is_paused
    assert reload(item).next_attempt_at <= timezone.now()
    assert item.pk in no_broker


def test_429_holds_whole_connection():
    connection = ConnectionFactory()
    first, second = make_delivery(connection), make_delivery(connection)

    delivery.deliver(first.pk, send=answer(Outcome(429, 1, retry_after="120")))
    send = answer()
    delivery.deliver(second.pk, send=send)

    assert send.calls == []
    assert reload(connection).hold_until > timezone.now() + timedelta(seconds=100)
    assert reload(second).next_attempt_at >= reload(connection).hold_until


def test_rate_limit_postpones_beyond_limit():
    connection = ConnectionFactory(rate_limit_per_minute=2)
    items = [make_delivery(connection) for _ in range(3)]
    send = answer(Outcome(200, 1), Outcome(200, 1))

    for item in items:
        delivery.deliver(item.pk, send=send)

    assert len(send.calls) == 2
    assert reload(items[2]).status == Delivery.Status.RETRY_SCHEDULED
    assert reload(items[2]).attempt_count == 0


def test_rate_limit_shared_by_brand():
    url = "https://sjc1.qualtrics.com/inbound-event/v1/events/json/triggers?contextId=SV_1&userId=UR_1&brandId=acme&triggerId=OC_%d"
    first = ConnectionFactory(post_url=url % 1, rate_limit_per_minute=1)
    second = ConnectionFactory(post_url=url % 2, rate_limit_per_minute=1)
    send = answer(Outcome(200, 1))

    delivery.deliver(make_delivery(first).pk, send=send)
    delivery.deliver(make_delivery(second).pk, send=send)

    assert len(send.calls) == 1
    assert first.rate_limit_key == second.rate_limit_key == "acme@sjc1.qualtrics.com"


def test_concurrency_cap_postpones():
    connection = ConnectionFactory(concurrency_limit=1)
    busy, waiting = make_delivery(connection), make_delivery(connection)
    delivery.claim(busy.pk)
    send = answer()

    delivery.deliver(waiting.pk, send=send)

    assert send.calls == []
    assert reload(waiting).status == Delivery.Status.RETRY_SCHEDULED


def test_breaker_pauses_after_failures():
    connection = ConnectionFactory(breaker_min_attempts=4, breaker_failure_ratio=0.5)
    for _ in range(4):
        delivery.deliver(make_delivery(connection).pk, send=answer(Outcome(503, 1)))

    connection = reload(connection)
    assert connection.is_paused
    assert connection.auto_resume
    assert "recent attempts failed" in connection.pause_reason


def test_breaker_probe_resumes_on_success():
    connection = ConnectionFactory()
    protection.pause(connection, "tripped", auto_resume=True)
    Connection.objects.filter(pk=connection.pk).update(hold_until=timezone.now() - timedelta(seconds=1))
    probe, other = make_delivery(connection), make_delivery(connection)
    send = answer(Outcome(200, 1))

    delivery.deliver(probe.pk, send=send)

    assert len(send.calls) == 1
    assert not reload(connection).is_paused
    assert reload(probe).status == Delivery.Status.DELIVERED
    assert reload(other).next_attempt_at <= timezone.now()


def test_breaker_allows_one_probe():
    connection = ConnectionFactory()
    protection.pause(connection, "tripped", auto_resume=True)
    Connection.objects.filter(pk=connection.pk).update(hold_until=timezone.now() - timedelta(seconds=1))
    first, second = make_delivery(connection), make_delivery(connection)
    delivery.claim(first.pk)
    assert protection.admit(reload(connection), first, timezone.now()) is None

    assert protection.admit(reload(connection), second, timezone.now()) is not None


def test_failed_probe_keeps_pause():
    connection = ConnectionFactory()
    protection.pause(connection, "tripped", auto_resume=True)
    Connection.objects.filter(pk=connection.pk).update(hold_until=timezone.now() - timedelta(seconds=1))
    probe = make_delivery(connection)

    delivery.deliver(probe.pk, send=answer(Outcome(503, 1)))

    assert reload(connection).is_paused
    assert reload(connection).hold_until > timezone.now()


def test_max_age_fails_delivery():
    connection = ConnectionFactory(max_age_seconds=60)
    item = make_delivery(connection)
    Delivery.objects.filter(pk=item.pk).update(created_at=timezone.now() - timedelta(seconds=59))

    delivery.deliver(item.pk, send=answer(Outcome(503, 1)))

    item = reload(item)
    assert item.status == Delivery.Status.FAILED
    assert "expired" in item.last_error


def test_replay_all_matching_filter(no_broker):
    connection, other = ConnectionFactory(), ConnectionFactory()
    failed = [make_delivery(connection, status="failed", attempt_count=15) for _ in range(3)]
    make_delivery(other, status="failed")
    make_delivery(connection, status="delivered")

    count = delivery.replay(Delivery.objects.filter(connection=connection))

    assert count == 3
    for item in failed:
        item = reload(item)
        assert item.status == Delivery.Status.PENDING
        assert item.attempts_before_replay == 15
    assert Delivery.objects.filter(connection=other, status="failed").count() == 1


def test_replayed_delivery_gets_fresh_budget(no_broker):
    item = make_delivery(ConnectionFactory(max_attempts=2), status="failed", attempt_count=2)
    delivery.replay(Delivery.objects.filter(pk=item.pk))

    delivery.deliver(item.pk, send=answer(Outcome(503, 1)))

    item = reload(item)
    assert item.status == Delivery.Status.RETRY_SCHEDULED
    assert item.attempts.get().number == 3


def test_last_racer_wakes_connection(no_broker):
    connection = ConnectionFactory(concurrency_limit=1)
    first, second = make_delivery(connection), make_delivery(connection)
    first, second = delivery.claim(first.pk), delivery.claim(second.pk)
    now = timezone.now()

    delivery.step_back(first, now, now)
    queued_after_first = list(no_broker)
    delivery.step_back(second, now, now)

    assert queued_after_first == []
    assert no_broker == [first.pk]
