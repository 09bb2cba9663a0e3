"""No secret reaches a log record, an attempt record, a task argument or a page."""

import logging

import pytest

from events import router
from integrations import delivery
from integrations.models import Connection, Delivery, DeliveryAttempt
from tests.factories import ConnectionFactory, FeedFactory

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("allow_loopback")]

AUTHORIZATION = "Basic ZmFrZTpmYWtlLXBhc3M="
URL_TOKEN = "FAKE123"
WRONG_INBOUND = "WRONG-INBOUND-SECRET"
SECRETS = (AUTHORIZATION, "ZmFrZTpmYWtlLXBhc3M", URL_TOKEN, WRONG_INBOUND)


def stored_texts():
    """Every text the portal stored about deliveries and connections, apart from the encrypted fields."""
    for attempt in DeliveryAttempt.objects.all():
        yield attempt.error
        yield attempt.response_excerpt
    for item in Delivery.objects.all():
        yield item.last_error
    for connection in Connection.objects.all():
        yield connection.last_error
        yield connection.pause_reason


def test_no_secret_in_logs_or_records(client, caplog, monkeypatch):
    from integrations import tasks

    queued = []
    monkeypatch.setattr(tasks.deliver, "apply_async", lambda args, **options: queued.append((args, options)))
    caplog.set_level(logging.DEBUG)
    from integrations.standin import running_standin

    with running_standin(status=401) as standin:
        url = f"{standin.base_url}/inbound-event/v1/events/json/triggers?urlTokenId={URL_TOKEN}"
        ConnectionFactory(post_url=url, authorization=AUTHORIZATION, event_types=["custom_event"])
        feed = FeedFactory()
        rejected = client.post(
            "/api/v1/mparticle/", "{}", content_type="application/json", HTTP_AUTHORIZATION=f"Bearer {WRONG_INBOUND}"
        )
        accepted = client.post(
            "/api/v1/mparticle/",
            '{"events": [{"event_type": "custom_event", "data": {}}]}',
            content_type="application/json",
            HTTP_AUTHORIZATION=feed.plain_secret,
        )
        router.route_batch(accepted.json()["batch_id"])
        for item in Delivery.objects.all():
            delivery.deliver(item.pk)
        delivery.replay(Delivery.objects.all())
        delivery._enqueue(Delivery.objects.values_list("pk", flat=True))

    assert rejected.status_code == 401
    assert DeliveryAttempt.objects.get().status_code == 401
    assert Connection.objects.get().is_paused
    texts = [record.getMessage() for record in caplog.records] + [str(record.__dict__) for record in caplog.records]
    texts += list(stored_texts()) + [repr(call) for call in queued] + [rejected.content.decode()]
    for secret in SECRETS:
        leaks = [text for text in texts if secret in text]
        assert leaks == [], secret


def test_delivery_tasks_carry_ids_only(monkeypatch):
    from integrations import tasks

    queued = []
    monkeypatch.setattr(tasks.deliver, "apply_async", lambda args, **options: queued.append(args))
    connection = ConnectionFactory(authorization=AUTHORIZATION)
    item = Delivery.objects.create(connection=connection, payload="{}")

    delivery._enqueue([item.pk])

    assert queued == [(item.pk,)]


def test_no_secret_in_chunked_runs(client, caplog, monkeypatch, django_capture_on_commit_callbacks):
    from events import tasks as routing_tasks
    from integrations import runs
    from integrations import tasks as delivery_tasks

    queued = []
    for task in (delivery_tasks.deliver, delivery_tasks.send_due, routing_tasks.route_received):
        monkeypatch.setattr(task, "apply_async", lambda *args, **options: queued.append((args, options)))
    caplog.set_level(logging.DEBUG)
    from integrations.standin import running_standin

    with running_standin(status=503) as standin:
        url = f"{standin.base_url}/inbound-event/v1/events/json/triggers?urlTokenId={URL_TOKEN}"
        connection = ConnectionFactory(post_url=url, authorization=AUTHORIZATION, event_types=["custom_event"])
        feed = FeedFactory()
        with django_capture_on_commit_callbacks(execute=True):
            client.post(
                "/api/v1/mparticle/",
                '{"events": [{"event_type": "custom_event", "data": {}}, {"event_type": "custom_event", "data": {}}]}',
                content_type="application/json",
                HTTP_AUTHORIZATION=feed.plain_secret,
            )
            router.route_next()
            runs.run(connection.pk)

    assert DeliveryAttempt.objects.filter(status_code=503).exists()
    texts = [record.getMessage() for record in caplog.records] + [str(record.__dict__) for record in caplog.records]
    texts += list(stored_texts()) + [repr(call) for call in queued]
    for secret in SECRETS:
        leaks = [text for text in texts if secret in text]
        assert leaks == [], secret
