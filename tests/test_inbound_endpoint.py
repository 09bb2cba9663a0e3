"""The inbound endpoint: authentication, validation, storage and de-duplication."""

import gzip
import zlib

import pytest
from django.contrib.auth.models import User

from events import wakeup
from events.models import InboundBatch
from tests.factories import FeedFactory

pytestmark = pytest.mark.django_db

URL = "/api/v1/mparticle/"
BASE = (
    '{"source_request_id": "req-1", "environment": "production", "mpid": 9223372036854775807,'
    ' "mp_deviceid": "4f6b2b2e-3f4d-4c3e-9a8f-2b1f2c3d4e5f", "batch_id": -42,'
    ' "events": [{"event_type": "custom_event", "data": {"event_name": "Survey Eligible",'
    ' "source_message_id": "m-1", "custom_attributes": {"score": 9}}}]}'
)


@pytest.fixture
def feed():
    return FeedFactory()


def post(client, body, secret, **headers):
    if secret is not None:
        headers["HTTP_AUTHORIZATION"] = secret
    return client.post(URL, body, content_type="application/json", **headers)


def test_accepts_batch_with_raw_secret(client, feed):
    response = post(client, BASE, feed.plain_secret)

    assert response.status_code == 202
    assert response.json()["status"] == "accepted"
    assert response.json()["duplicate"] is False
    assert InboundBatch.objects.get(pk=response.json()["batch_id"]).body == BASE


def test_accepts_bearer_secret(client, feed):
    assert post(client, BASE, f"Bearer {feed.plain_secret}").status_code == 202


def test_missing_secret_is_401_json(client, feed):
    response = post(client, BASE, None)

    assert response.status_code == 401
    assert response["Content-Type"] == "application/json"
    assert "detail" in response.json()
    assert InboundBatch.objects.count() == 0


def test_wrong_secret_is_401(client, feed):
    response = post(client, BASE, "Bearer WRONG-INBOUND-SECRET")

    assert response.status_code == 401
    assert "WRONG-INBOUND-SECRET" not in response.content.decode()


def test_inactive_feed_is_401(client, feed):
    feed.active = False
    feed.save()

    assert post(client, BASE, feed.plain_secret).status_code == 401


def test_admin_session_without_csrf_token(feed):
    from django.test import Client

    client = Client(enforce_csrf_checks=True)
    client.force_login(User.objects.create_superuser("ops", "ops@example.com", "pw"))

    assert post(client, BASE, feed.plain_secret).status_code == 202
    assert post(client, BASE.replace("req-1", "req-2"), None).status_code == 401


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("{not json", "not valid JSON"),
        ("", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('"text"', "must be a JSON object"),
        ("null", "must be a JSON object"),
        ('{"a": NaN}', "not valid JSON"),
        ("[" * 100_000 + "]" * 100_000, "not valid JSON"),
    ],
)
def test_invalid_body_is_400(client, feed, body, message):
    response = post(client, body, feed.plain_secret)

    assert response.status_code == 400
    assert message in response.json()["detail"]
    assert InboundBatch.objects.count() == 0


def test_invalid_utf8_is_400(client, feed):
    response = post(client, b'{"name": "\xff\xfe"}', feed.plain_secret)

    assert response.status_code == 400
    assert "UTF-8" in response.json()["detail"]


def test_error_does_not_echo_body(client, feed):
    response = post(client, '{"secret-looking-value": ', feed.plain_secret)

    assert response.status_code == 400
    assert "secret-looking-value" not in response.content.decode()


def test_duplicate_source_request_id(client, feed):
    first = post(client, BASE, feed.plain_secret)
    second = post(client, BASE, feed.plain_secret)

    assert second.status_code == 202
    assert second.json()["duplicate"] is True
    assert second.json()["batch_id"] == first.json()["batch_id"]
    assert InboundBatch.objects.count() == 1


def test_same_request_id_other_feed(client, feed):
    other = FeedFactory()

    post(client, BASE, feed.plain_secret)
    response = post(client, BASE, other.plain_secret)

    assert response.json()["duplicate"] is False
    assert InboundBatch.objects.count() == 2


def test_batch_without_request_id_stored_each_time(client, feed):
    body = '{"events": []}'

    post(client, body, feed.plain_secret)
    post(client, body, feed.plain_secret)

    assert InboundBatch.objects.count() == 2


def test_null_containers_accepted(client, feed):
    body = '{"events": null, "user_attributes": null, "user_identities": null}'

    assert post(client, body, feed.plain_secret).status_code == 202


def test_body_over_limit_is_413(client, feed, settings):
    settings.PORTAL = {**settings.PORTAL, "MAX_BODY_BYTES": 1000}

    response = post(client, '{"pad": "' + "x" * 2000 + '"}', feed.plain_secret)

    assert response.status_code == 413
    assert "1000 bytes" in response.json()["detail"]


def test_large_batch_above_django_default(client, feed):
    event = '{"event_type": "custom_event", "data": {"event_name": "e%s"}}'
    events = ",".join(event.replace("%s", str(i)) for i in range(60_000))
    body = '{"events": [' + events + "]}"
    assert len(body) > 2_621_440

    assert post(client, body, feed.plain_secret).status_code == 202


def test_gzip_body_accepted(client, feed):
    response = post(client, gzip.compress(BASE.encode()), feed.plain_secret, HTTP_CONTENT_ENCODING="gzip")

    assert response.status_code == 202
    assert InboundBatch.objects.get().body == BASE


def test_deflate_body_accepted(client, feed):
    response = post(client, zlib.compress(BASE.encode()), feed.plain_secret, HTTP_CONTENT_ENCODING="deflate")

    assert response.status_code == 202


def test_gzip_bomb_is_413(client, feed, settings):
    settings.PORTAL = {**settings.PORTAL, "MAX_BODY_BYTES": 100_000}
    bomb = gzip.compress(b'{"pad": "' + b"0" * 5_000_000 + b'"}')

    response = post(client, bomb, feed.plain_secret, HTTP_CONTENT_ENCODING="gzip")

    assert response.status_code == 413


def test_mislabelled_gzip_is_400(client, feed):
    response = post(client, BASE, feed.plain_secret, HTTP_CONTENT_ENCODING="gzip")

    assert response.status_code == 400


def test_brotli_is_415(client, feed):
    response = post(client, b"\x0b\x02\x80", feed.plain_secret, HTTP_CONTENT_ENCODING="br")

    assert response.status_code == 415


def test_broker_down_keeps_batch(client, feed, monkeypatch, django_capture_on_commit_callbacks):
    from events import tasks, views

    wakes = []
    monkeypatch.setattr(views.routing_wakeup, "wake", lambda: wakes.append(1))

    def broker_down(*args, **kwargs):
        raise ConnectionError("broker unavailable")

    monkeypatch.setattr(tasks.route_received, "delay", broker_down)

    with django_capture_on_commit_callbacks(execute=True):
        response = post(client, BASE, feed.plain_secret)

    assert response.status_code == 202
    assert wakes == [1]
    assert wakeup.publish_wakeup() is False
    assert InboundBatch.objects.get().status == InboundBatch.Status.RECEIVED


def test_declared_length_over_limit_rejected_early(client, feed, settings):
    settings.PORTAL = {**settings.PORTAL, "MAX_BODY_BYTES": 1000}

    response = post(client, BASE, feed.plain_secret, CONTENT_LENGTH="5000000")

    assert response.status_code == 413
    assert response.json() == {"detail": "The body exceeds the limit of 1000 bytes."}


def test_django_body_limit_becomes_json_413(settings):
    from django.core.exceptions import RequestDataTooBig
    from django.test import RequestFactory

    from events.middleware import InboundBodyLimitMiddleware

    settings.PORTAL = {**settings.PORTAL, "MAX_BODY_BYTES": 1000}
    middleware = InboundBodyLimitMiddleware(lambda request: None)

    response = middleware.process_exception(RequestFactory().post(URL), RequestDataTooBig())

    assert response.status_code == 413
    assert b"1000 bytes" in response.content


def test_failed_auth_throttled_per_address(client, feed, settings):
    settings.PORTAL = {**settings.PORTAL, "AUTH_FAILURES_PER_MINUTE": 3}

    answers = [post(client, BASE, "Bearer WRONG") for _ in range(4)]
    other_address = post(client, BASE, "Bearer WRONG", REMOTE_ADDR="192.0.2.7")
    good = post(client, BASE, feed.plain_secret)

    assert [answer.status_code for answer in answers] == [401, 401, 401, 429]
    assert "Retry-After" in answers[-1]
    assert other_address.status_code == 401
    assert good.status_code == 202


@pytest.mark.parametrize("request_id", ["a\\u0000b", "x" * 300])
def test_awkward_request_ids_deduplicate(client, feed, request_id):
    body = '{"source_request_id": "' + request_id + '", "events": []}'

    first = post(client, body, feed.plain_secret)
    second = post(client, body, feed.plain_secret)

    assert first.status_code == 202
    assert second.json()["duplicate"] is True


def test_long_request_ids_differ_after_200_characters(client, feed):
    prefix = "x" * 250

    post(client, '{"source_request_id": "' + prefix + '1"}', feed.plain_secret)
    response = post(client, '{"source_request_id": "' + prefix + '2"}', feed.plain_secret)

    assert response.json()["duplicate"] is False
