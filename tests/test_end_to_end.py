"""The whole path on real components: the inbound endpoint, a Celery worker and beat as
separate processes on the configured broker and database (Redis and PostgreSQL in CI),
and the Qualtrics stand-in on loopback."""

import json

import pytest

from integrations.models import Delivery
from tests.conftest import wait_for
from tests.factories import ConnectionFactory, FeedFactory

pytestmark = pytest.mark.services

BATCH = (
    '{"source_request_id": "e2e-%(n)s", "environment": "production", "mpid": -8602161397754364123,'
    ' "mp_deviceid": "%(device)s", "user_identities": [{"identity_type": "email", "identity": "a@example.com"}],'
    ' "events": ['
    '{"event_type": "custom_event", "data": {"event_name": "Survey Eligible", "source_message_id": "m-%(n)s-1",'
    ' "custom_attributes": {"score": 9, "ratio": 0.10, "city": "Z\\u00fcrich"}}},'
    '{"event_type": "screen_view", "data": {"screen_name": "Checkout", "source_message_id": "m-%(n)s-2"}},'
    '{"event_type": "session_start", "data": {"source_message_id": "m-%(n)s-3"}}'
    "]}"
)


def post_batch(client, feed, n: int, device: str = "device-1"):
    body = BATCH % {"n": n, "device": device}
    return client.post(
        "/api/v1/mparticle/", body, content_type="application/json", HTTP_AUTHORIZATION=feed.plain_secret
    )


def statuses() -> list[str]:
    return list(Delivery.objects.order_by("pk").values_list("status", flat=True))


def test_one_post_per_event(client, celery_processes, standin):
    feed = FeedFactory()
    ConnectionFactory(post_url=standin.url, event_types=["custom_event", "screen_view"], send_as_batch=False)

    assert post_batch(client, feed, 1).status_code == 202

    assert wait_for(lambda: statuses() == ["delivered", "delivered"]), celery_processes.log("worker")
    bodies = [json.loads(record["body"]) for record in standin.records]
    assert sorted(len(body["events"]) for body in bodies) == [1, 1]
    assert {body["events"][0]["event_type"] for body in bodies} == {"custom_event", "screen_view"}
    custom = next(r["body"] for r in standin.records if "custom_event" in r["body"])
    assert '"ratio":0.10' in custom
    assert "-8602161397754364123" in custom
    assert "Zürich" in custom


def test_send_as_batch_flushes_window(client, celery_processes, standin):
    feed = FeedFactory()
    ConnectionFactory(
        post_url=standin.url, event_types=["custom_event", "session_start"], send_as_batch=True, batch_window_seconds=2
    )

    assert post_batch(client, feed, 1).status_code == 202
    assert post_batch(client, feed, 2).status_code == 202

    assert wait_for(lambda: statuses() == ["delivered"], timeout=30), celery_processes.log("beat")
    assert len(standin.records) == 1
    sent = json.loads(standin.records[0]["body"])
    names = [event["event_type"] for event in sent["events"]]
    assert names == ["custom_event", "session_start", "custom_event", "session_start"]
    assert sent["source_request_id"] == "e2e-2"


def test_retry_after_503(client, celery_processes, standin):
    standin.configure(fail_first=2, fail_status=503)
    feed = FeedFactory()
    ConnectionFactory(post_url=standin.url, event_types=["custom_event"], send_as_batch=False)

    assert post_batch(client, feed, 1).status_code == 202

    assert wait_for(lambda: statuses() == ["delivered"], timeout=30), celery_processes.log("worker")
    delivery = Delivery.objects.get()
    assert delivery.attempt_count == 3
    assert list(delivery.attempts.values_list("status_code", flat=True)) == [503, 503, 200]
    assert len({record["headers"].get("X-Delivery-Id") for record in standin.records}) == 1


def test_no_retry_after_400(client, celery_processes, standin):
    standin.configure(status=400)
    feed = FeedFactory()
    ConnectionFactory(post_url=standin.url, event_types=["custom_event"], send_as_batch=False)

    assert post_batch(client, feed, 1).status_code == 202

    assert wait_for(lambda: statuses() == ["failed"], timeout=30), celery_processes.log("worker")
    delivery = Delivery.objects.get()
    assert delivery.attempt_count == 1
    assert delivery.last_status_code == 400
    assert delivery.last_error == "HTTP 400"
    assert len(standin.records) == 1


def test_repeated_batch_sent_once(client, celery_processes, standin):
    feed = FeedFactory()
    ConnectionFactory(post_url=standin.url, event_types=["custom_event"], send_as_batch=False)

    first = post_batch(client, feed, 7)
    second = post_batch(client, feed, 7)

    assert first.json()["batch_id"] == second.json()["batch_id"]
    assert second.json()["duplicate"] is True
    assert wait_for(lambda: statuses() == ["delivered"], timeout=30), celery_processes.log("worker")
    assert len(standin.records) == 1
