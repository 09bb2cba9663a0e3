"""Delivery claims, attempt records and the sweeper, with the HTTP call replaced."""

from datetime import timedelta

import pytest
from django.utils import timezone

from integrations import delivery
from integrations.models import Connection, Delivery
from integrations.transport import Outcome
from tests.factories import ConnectionFactory

pytestmark = pytest.mark.django_db


class Recorder:
    """A replacement for `post_json` that returns queued outcomes and records each call."""

    def __init__(self, *outcomes):
        self.outcomes = list(outcomes)
        self.calls = []

    def __call__(self, url, body, headers, **timeouts):
        self.calls.append({"url": url, "body": body, "headers": headers, **timeouts})
        return self.outcomes.pop(0)


@pytest.fixture
def pending():
    return Delivery.objects.create(connection=ConnectionFactory(), payload='{"events":[]}', event_count=1)


def test_delivered_on_200(pending):
    send = Recorder(Outcome(200, 12, response_excerpt="ok"))

    delivery.deliver(pending.pk, send=send)

    pending.refresh_from_db()
    assert pending.status == Delivery.Status.DELIVERED
    assert pending.delivered_at is not None
    attempt = pending.attempts.get()
    assert (attempt.number, attempt.status_code, attempt.duration_ms) == (1, 200, 12)


def test_headers_carry_auth_and_id(pending):
    send = Recorder(Outcome(200, 1))

    delivery.deliver(pending.pk, send=send)

    headers = send.calls[0]["headers"]
    assert headers["Authorization"] == pending.connection.authorization
    assert headers["X-Delivery-Id"] == str(pending.uuid)


def test_delivered_delivery_not_sent_again(pending):
    send = Recorder(Outcome(200, 1))

    delivery.deliver(pending.pk, send=send)
    delivery.deliver(pending.pk, send=send)

    assert len(send.calls) == 1


def test_in_flight_delivery_not_claimed(pending):
    assert delivery.claim(pending.pk) is not None

    assert delivery.claim(pending.pk) is None


def test_retry_scheduled_on_503(pending):
    delivery.deliver(pending.pk, send=Recorder(Outcome(503, 1)))

    pending.refresh_from_db()
    assert pending.status == Delivery.Status.RETRY_SCHEDULED
    assert pending.next_attempt_at > timezone.now()
    assert pending.last_error == "HTTP 503"


def test_retry_not_claimed_before_due(pending):
    delivery.deliver(pending.pk, send=Recorder(Outcome(503, 1)))
    send = Recorder(Outcome(200, 1))

    delivery.deliver(pending.pk, send=send)

    assert send.calls == []


def test_failed_on_400_without_retry(pending):
    delivery.deliver(pending.pk, send=Recorder(Outcome(400, 1)))

    pending.refresh_from_db()
    assert pending.status == Delivery.Status.FAILED
    assert pending.next_attempt_at is None
    pending.connection.refresh_from_db()
    assert pending.connection.last_error == "HTTP 400"


def test_fails_after_max_attempts(pending):
    Connection.objects.filter(pk=pending.connection_id).update(max_attempts=2)
    delivery.deliver(pending.pk, send=Recorder(Outcome(503, 1)))
    Delivery.objects.filter(pk=pending.pk).update(next_attempt_at=timezone.now())

    delivery.deliver(pending.pk, send=Recorder(Outcome(503, 1)))

    pending.refresh_from_db()
    assert pending.status == Delivery.Status.FAILED
    assert "gave up after 2 attempts" in pending.last_error
    assert pending.attempts.count() == 2


def test_secret_redacted_from_excerpt(pending):
    echo = f"bad token {pending.connection.authorization}"

    delivery.deliver(pending.pk, send=Recorder(Outcome(401, 1, response_excerpt=echo)))

    excerpt = pending.attempts.get().response_excerpt
    assert pending.connection.authorization not in excerpt


def test_sweeper_requeues_expired_lease(pending, monkeypatch):
    queued = []
    monkeypatch.setattr(delivery, "_enqueue", lambda ids, countdown=None: queued.extend(ids))
    delivery.claim(pending.pk)
    Delivery.objects.filter(pk=pending.pk).update(lease_expires_at=timezone.now() - timedelta(seconds=1))

    delivery.sweep()

    pending.refresh_from_db()
    assert pending.status == Delivery.Status.RETRY_SCHEDULED
    assert queued == [pending.pk]


def test_sweeper_fails_expired_last_attempt(pending, monkeypatch):
    Connection.objects.filter(pk=pending.connection_id).update(max_attempts=1)
    monkeypatch.setattr(delivery, "_enqueue", lambda ids, countdown=None: None)
    delivery.claim(pending.pk)
    Delivery.objects.filter(pk=pending.pk).update(lease_expires_at=timezone.now() - timedelta(seconds=1))

    delivery.sweep()

    pending.refresh_from_db()
    assert pending.status == Delivery.Status.FAILED
    assert pending.last_error == delivery.LOST_ATTEMPT
    assert pending.attempts.get().error == delivery.LOST_ATTEMPT


def test_sweeper_requeues_due_retry_only(pending, monkeypatch):
    queued = []
    monkeypatch.setattr(delivery, "_enqueue", lambda ids, countdown=None: queued.extend(ids))
    later = Delivery.objects.create(
        connection=pending.connection,
        payload="{}",
        status="retry_scheduled",
        next_attempt_at=timezone.now() + timedelta(hours=1),
    )
    due = Delivery.objects.create(
        connection=pending.connection,
        payload="{}",
        status="retry_scheduled",
        next_attempt_at=timezone.now() - timedelta(seconds=1),
    )

    delivery.sweep()

    assert due.pk in queued
    assert later.pk not in queued
    assert pending.pk not in queued


def test_late_result_of_lost_lease_ignored(pending):
    claimed = delivery.claim(pending.pk)
    Delivery.objects.filter(pk=pending.pk).update(status="retry_scheduled", next_attempt_at=timezone.now())
    second = delivery.claim(pending.pk)
    decision = delivery.retry_policy.decide(Outcome(200, 1), 2, delivery.policy_for(pending.connection))
    delivery.record_attempt(second, Outcome(200, 1), timezone.now(), decision)

    stale = delivery.retry_policy.decide(Outcome(503, 1), 1, delivery.policy_for(pending.connection))
    delivery.record_attempt(claimed, Outcome(503, 1), timezone.now(), stale)

    pending.refresh_from_db()
    assert pending.status == Delivery.Status.DELIVERED
    assert pending.attempts.count() == 2


def test_sweeper_records_lost_attempt(pending, monkeypatch):
    monkeypatch.setattr(delivery, "_enqueue", lambda ids, countdown=None: None)
    delivery.claim(pending.pk)
    Delivery.objects.filter(pk=pending.pk).update(lease_expires_at=timezone.now() - timedelta(seconds=1))

    delivery.sweep()

    attempt = pending.attempts.get()
    assert attempt.number == 1
    assert attempt.error == delivery.LOST_ATTEMPT


def test_sweeper_expires_old_deliveries(pending, monkeypatch):
    monkeypatch.setattr(delivery, "_enqueue", lambda ids, countdown=None: None)
    Connection.objects.filter(pk=pending.connection_id).update(max_age_seconds=60)
    Delivery.objects.filter(pk=pending.pk).update(created_at=timezone.now() - timedelta(seconds=61))

    delivery.sweep()

    pending.refresh_from_db()
    assert pending.status == Delivery.Status.FAILED
    assert pending.last_error.startswith("expired")


def test_sweeper_fills_free_slots_only(monkeypatch):
    queued = []
    monkeypatch.setattr(delivery, "_enqueue", lambda ids, countdown=None: queued.extend(ids))
    connection = ConnectionFactory(concurrency_limit=2)
    due = timezone.now() - timedelta(seconds=1)
    items = [
        Delivery.objects.create(connection=connection, payload="{}", status="retry_scheduled", next_attempt_at=due)
        for _ in range(5)
    ]
    delivery.claim(items[0].pk)

    assert delivery.sweep() == 1
    assert queued == [items[1].pk]


def test_large_batch_queues_one_task_per_connection(monkeypatch, django_capture_on_commit_callbacks):
    queued = []
    monkeypatch.setattr(delivery, "_enqueue", lambda ids, countdown=None: queued.extend(ids))
    first, second = ConnectionFactory(concurrency_limit=3), ConnectionFactory()
    items = [Delivery.objects.create(connection=first, payload="{}") for _ in range(10)]
    items += [Delivery.objects.create(connection=second, payload="{}") for _ in range(10)]

    with django_capture_on_commit_callbacks(execute=True):
        delivery.enqueue_after_commit(items)

    assert queued == [items[0].pk, items[10].pk]


def test_finished_attempt_queues_next(pending, monkeypatch):
    queued = []
    monkeypatch.setattr(delivery, "_enqueue", lambda ids, countdown=None: queued.extend(ids))
    waiting = Delivery.objects.create(connection=pending.connection, payload="{}")

    delivery.deliver(pending.pk, send=Recorder(Outcome(200, 1)))

    assert queued == [waiting.pk]


def test_redact_masks_echoed_token():
    connection = ConnectionFactory(
        post_url="https://iad1.qualtrics.com/inbound-event/v1/events/json/triggers?urlTokenId=8c4e1f2a-6b3d-4e5f-9a7b-1c2d3e4f5a6b"
    )

    text = delivery.redact("got /x?urlTokenId=8c4e1f2a-6b3d-4e5f-9a7b-1c2d3e4f5a6b", connection)

    assert "8c4e1f2a-6b3d-4e5f-9a7b" not in text
