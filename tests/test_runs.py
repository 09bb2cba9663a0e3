"""Runs that claim, send and record a connection's due deliveries in chunks, with the HTTP call replaced."""

from datetime import timedelta

import pytest
from django.core.cache import cache
from django.db import OperationalError
from django.db import connection as db_connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from integrations import delivery, protection, runs
from integrations.models import Delivery
from integrations.transport import Outcome
from tests.factories import ConnectionFactory

pytestmark = pytest.mark.django_db


class Recorder:
    """A replacement for `post_json` that returns the next status for each POST and records the delivery ids."""

    def __init__(self, *statuses, default=200):
        self.statuses = list(statuses)
        self.default = default
        self.delivery_ids = []

    def __call__(self, url, body, headers, **timeouts):
        self.delivery_ids.append(headers["X-Delivery-Id"])
        status = self.statuses.pop(0) if self.statuses else self.default
        return Outcome(status, 1)


@pytest.fixture(autouse=True)
def no_broker(monkeypatch):
    """Collect the runs and single deliveries that would be queued, instead of queueing them."""
    queued = {"runs": [], "deliveries": []}
    monkeypatch.setattr(runs, "start_run", lambda connection_id, countdown=0: queued["runs"].append(connection_id))
    monkeypatch.setattr(delivery, "_enqueue", lambda ids, countdown=None: queued["deliveries"].extend(ids))
    monkeypatch.setattr(runs, "_chunk_sizes", {})
    cache.clear()
    return queued


def waiting(connection, count):
    return [Delivery.objects.create(connection=connection, payload="{}", event_count=1) for _ in range(count)]


def test_run_delivers_every_due_delivery():
    connection = ConnectionFactory(concurrency_limit=1)
    items = waiting(connection, 30)
    send = Recorder()

    attempted = runs.run(connection.pk, send=send)

    assert attempted == 30
    assert send.delivery_ids == [str(item.uuid) for item in items]
    assert set(Delivery.objects.values_list("status", flat=True)) == {Delivery.Status.DELIVERED}
    assert set(Delivery.objects.values_list("attempt_count", flat=True)) == {1}
    assert set(Delivery.objects.values_list("claim_token", flat=True)) == {None}


def test_run_records_one_attempt_each():
    connection = ConnectionFactory()
    items = waiting(connection, 12)

    runs.run(connection.pk, send=Recorder())

    for item in items:
        attempt = item.attempts.get()
        assert attempt.number == 1
        assert attempt.status_code == 200
        assert attempt.error == ""


def test_fast_receiver_gets_growing_chunks(monkeypatch):
    connection = ConnectionFactory()
    waiting(connection, 40)
    sizes = []
    claim = runs.claim_chunk

    def counting_claim(conn, size):
        chunk, backlog = claim(conn, size)
        sizes.append(len(chunk))
        return chunk, backlog

    # A chunk of any pace then fits the target, so only the fourfold growth limit applies.
    monkeypatch.setattr(runs, "CHUNK_SECONDS", 1000.0)
    monkeypatch.setattr(runs, "claim_chunk", counting_claim)
    runs.run(connection.pk, send=Recorder())

    assert sizes[:3] == [1, 4, 16]
    assert sum(sizes) == 40


def test_next_run_starts_at_learned_size(monkeypatch):
    connection = ConnectionFactory()
    monkeypatch.setattr(runs, "CHUNK_SECONDS", 1000.0)
    waiting(connection, 5)
    runs.run(connection.pk, send=Recorder())
    waiting(connection, 30)
    sizes = []
    claim = runs.claim_chunk

    def counting_claim(conn, size):
        sizes.append(size)
        return claim(conn, size)

    monkeypatch.setattr(runs, "claim_chunk", counting_claim)
    runs.run(connection.pk, send=Recorder())

    assert sizes[0] == 16


def test_chunk_statements_do_not_grow_with_size():
    connection = ConnectionFactory()
    waiting(connection, 22)

    def statements_for(size):
        with CaptureQueriesContext(db_connection) as captured:
            chunk, _ = runs.claim_chunk(connection, size)
            runs.send_chunk(connection, chunk, Recorder())
        assert len(chunk) == size
        return len(captured)

    assert statements_for(2) == statements_for(20)


def test_failure_ends_chunk_and_gives_rest_back():
    connection = ConnectionFactory()
    first, failing, rest = waiting(connection, 3)
    chunk, _ = runs.claim_chunk(connection, 3)

    sent = runs.send_chunk(connection, chunk, Recorder(200, 503))

    assert len(sent) == 2
    first.refresh_from_db()
    failing.refresh_from_db()
    rest.refresh_from_db()
    assert first.status == Delivery.Status.DELIVERED
    assert failing.status == Delivery.Status.RETRY_SCHEDULED
    assert failing.attempt_count == 1
    assert rest.status == Delivery.Status.RETRY_SCHEDULED
    assert rest.attempt_count == 0
    assert rest.next_attempt_at <= timezone.now()
    assert not rest.attempts.exists()


def test_next_chunk_after_failure_is_one():
    connection = ConnectionFactory()
    waiting(connection, 3)
    chunk, _ = runs.claim_chunk(connection, 3)

    sent = runs.send_chunk(connection, chunk, Recorder(503))

    assert runs.next_chunk_size(sent, 0.001) == 1


def test_claims_count_against_concurrency_limit():
    connection = ConnectionFactory(concurrency_limit=1)
    busy, *_ = waiting(connection, 3)
    delivery.claim(busy.pk)

    chunk, backlog = runs.claim_chunk(connection, 2)

    assert chunk == []
    assert backlog is False


def test_one_claim_takes_several_deliveries():
    connection = ConnectionFactory(concurrency_limit=2)
    waiting(connection, 5)

    first, _ = runs.claim_chunk(connection, 3)
    second, _ = runs.claim_chunk(connection, 3)
    third, _ = runs.claim_chunk(connection, 3)

    assert len({item.claim_token for item in first}) == 1
    assert protection.claims_in_flight(connection.pk) == 2
    assert (len(first), len(second), len(third)) == (3, 2, 0)


def test_rate_limit_caps_chunk(no_broker):
    connection = ConnectionFactory(rate_limit_per_minute=3)
    waiting(connection, 5)

    chunk, _ = runs.claim_chunk(connection, 5)
    later, _ = runs.claim_chunk(connection, 5)

    assert len(chunk) == 3
    assert later == []
    assert no_broker["runs"] == [connection.pk]
    assert Delivery.objects.filter(status=Delivery.Status.PENDING).count() == 2


def test_rate_tokens_only_for_due_deliveries():
    connection = ConnectionFactory(rate_limit_per_minute=3)
    waiting(connection, 1)
    runs.claim_chunk(connection, 10)
    waiting(connection, 2)

    chunk, _ = runs.claim_chunk(connection, 10)

    assert len(chunk) == 2


def test_backlog_starts_second_run(no_broker):
    connection = ConnectionFactory(concurrency_limit=2)
    waiting(connection, 3)

    runs.run(connection.pk, send=Recorder())

    assert no_broker["runs"] == [connection.pk]


def test_backlog_spreads_within_limit_only(no_broker):
    connection = ConnectionFactory(concurrency_limit=1)
    waiting(connection, 3)

    runs.run(connection.pk, send=Recorder())

    assert no_broker["runs"] == []


def test_paused_connection_left_to_single_path():
    connection = ConnectionFactory(paused_at=timezone.now(), pause_reason="test", auto_resume=False)
    item, other = waiting(connection, 2)
    send = Recorder()

    attempted = runs.run(connection.pk, item.pk, send=send)

    assert attempted == 0
    assert send.delivery_ids == []
    item.refresh_from_db()
    other.refresh_from_db()
    assert item.status == Delivery.Status.RETRY_SCHEDULED
    assert other.status == Delivery.Status.PENDING


def test_held_connection_sends_nothing():
    connection = ConnectionFactory(hold_until=timezone.now() + timedelta(minutes=1))
    waiting(connection, 2)
    send = Recorder()

    assert runs.run(connection.pk, send=send) == 0
    assert send.delivery_ids == []


def test_lease_budget_stops_chunk(settings):
    settings.PORTAL = {**settings.PORTAL, "LEASE_SECONDS": 1.0, "TOTAL_TIMEOUT_SECONDS": 15.0}
    connection = ConnectionFactory()
    waiting(connection, 3)
    chunk, _ = runs.claim_chunk(connection, 3)

    sent = runs.send_chunk(connection, chunk, Recorder())

    assert len(sent) == 1
    assert Delivery.objects.filter(status=Delivery.Status.DELIVERED).count() == 1
    assert Delivery.objects.filter(status=Delivery.Status.RETRY_SCHEDULED, attempt_count=0).count() == 2


def test_claim_taken_back_keeps_sweeper_state():
    connection = ConnectionFactory()
    held, reclaimed = waiting(connection, 2)
    chunk, _ = runs.claim_chunk(connection, 2)
    Delivery.objects.filter(pk=reclaimed.pk).update(status=Delivery.Status.RETRY_SCHEDULED, claim_token=None)

    runs.send_chunk(connection, chunk, Recorder())

    held.refresh_from_db()
    reclaimed.refresh_from_db()
    assert held.status == Delivery.Status.DELIVERED
    assert reclaimed.status == Delivery.Status.RETRY_SCHEDULED


def test_future_retry_not_claimed():
    connection = ConnectionFactory()
    later = Delivery.objects.create(
        connection=connection,
        payload="{}",
        status=Delivery.Status.RETRY_SCHEDULED,
        next_attempt_at=timezone.now() + timedelta(hours=1),
    )
    send = Recorder()

    runs.run_for_delivery(later.pk, send=send)

    later.refresh_from_db()
    assert send.delivery_ids == []
    assert later.status == Delivery.Status.RETRY_SCHEDULED


class SendFailed(Exception):
    pass


def failing_on(call_number):
    """Return a send that returns 200 but raises on its `call_number`-th call."""
    calls = []

    def send(url, body, headers, **timeouts):
        calls.append(headers["X-Delivery-Id"])
        if len(calls) == call_number:
            raise SendFailed("connection reset by the test")
        return Outcome(200, 1)

    return send


def test_send_error_keeps_earlier_results():
    connection = ConnectionFactory()
    first, raised, unsent = waiting(connection, 3)
    chunk, _ = runs.claim_chunk(connection, 3)

    with pytest.raises(SendFailed):
        runs.send_chunk(connection, chunk, failing_on(2))

    first.refresh_from_db()
    raised.refresh_from_db()
    unsent.refresh_from_db()
    assert first.status == Delivery.Status.DELIVERED
    assert first.attempts.count() == 1
    assert raised.status == Delivery.Status.IN_FLIGHT
    assert unsent.status == Delivery.Status.RETRY_SCHEDULED
    assert unsent.attempt_count == 0


def test_record_error_gives_rest_back(monkeypatch):
    connection = ConnectionFactory()
    _, unsent = waiting(connection, 2)
    chunk, _ = runs.claim_chunk(connection, 2)

    def deadlock(*args, **kwargs):
        raise OperationalError("deadlock detected")

    monkeypatch.setattr(runs, "update_connection_health", deadlock)
    with pytest.raises(OperationalError):
        runs.send_chunk(connection, chunk, Recorder(503))

    unsent.refresh_from_db()
    assert unsent.status == Delivery.Status.RETRY_SCHEDULED
    assert unsent.attempt_count == 0


def test_rate_limit_queues_one_run(no_broker, monkeypatch):
    monkeypatch.setattr(runs, "CHUNK_SECONDS", 1000.0)
    connection = ConnectionFactory(rate_limit_per_minute=3, concurrency_limit=1)
    waiting(connection, 10)

    runs.run(connection.pk, send=Recorder())
    runs.run(connection.pk, send=Recorder())

    assert no_broker["runs"] == [connection.pk]
    assert Delivery.objects.filter(status=Delivery.Status.DELIVERED).count() == 3


def test_chunk_stops_when_rate_minute_ends(monkeypatch):
    monkeypatch.setattr(protection, "seconds_left_in_rate_window", lambda: 0.0)
    connection = ConnectionFactory()
    waiting(connection, 3)
    chunk, _ = runs.claim_chunk(connection, 3)

    sent = runs.send_chunk(connection, chunk, Recorder())

    assert len(sent) == 1
    assert Delivery.objects.filter(status=Delivery.Status.RETRY_SCHEDULED, attempt_count=0).count() == 2
