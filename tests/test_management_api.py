"""The staff-only management API under /api/v1/ and its OpenAPI schema."""

import base64
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.utils import timezone
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from events.models import Feed
from integrations.models import Connection, Delivery
from integrations.secrets import mask_url
from tests.factories import (
    SECRET_HEADER,
    TEST_POST_URL,
    URL_TOKEN,
    ConnectionFactory,
    DeliveryAttemptFactory,
    DeliveryFactory,
    FeedFactory,
    InboundBatchFactory,
)

pytestmark = pytest.mark.django_db


def portal_permissions(*actions):
    from django.contrib.auth.models import Permission

    return Permission.objects.filter(
        content_type__app_label__in=("events", "integrations"), codename__regex=rf"^({'|'.join(actions)})_"
    )


@pytest.fixture
def staff(django_user_model):
    """A staff operator with every permission on the portal's models."""
    user = django_user_model.objects.create_user("operator", password="operator-password", is_staff=True)
    user.user_permissions.set(portal_permissions("view", "add", "change", "delete"))
    return user


@pytest.fixture
def read_only(django_user_model):
    user = django_user_model.objects.create_user("auditor", password="auditor-password", is_staff=True)
    user.user_permissions.set(portal_permissions("view"))
    client = APIClient()
    client.force_authenticate(user)
    return client


@pytest.fixture
def api(staff):
    client = APIClient()
    client.force_authenticate(staff)
    return client


@pytest.fixture
def secret_connection():
    return ConnectionFactory.create(name="Survey", authorization=SECRET_HEADER)


def new_connection(**changes):
    return {"name": "Checkout", "post_url": TEST_POST_URL, "event_types": ["custom_event"], **changes}


def test_anonymous_gets_401():
    response = APIClient().get("/api/v1/connections/")

    assert response.status_code == 401


def test_non_staff_gets_403(django_user_model):
    client = APIClient()
    client.force_authenticate(django_user_model.objects.create_user("viewer", password="viewer-password"))

    assert client.get("/api/v1/connections/").status_code == 403


def test_token_authenticates_staff(staff):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=staff).key}")

    assert client.get("/api/v1/connections/").status_code == 200


def test_basic_auth_authenticates_staff(staff):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION="Basic " + base64.b64encode(b"operator:operator-password").decode())

    assert client.get("/api/v1/feeds/").status_code == 200


def test_create_connection(api):
    response = api.post("/api/v1/connections/", new_connection(authorization="Basic dGVzdA=="), format="json")

    assert response.status_code == 201
    saved = Connection.objects.get(name="Checkout")
    assert saved.post_url == TEST_POST_URL
    assert saved.authorization == "Basic dGVzdA=="
    assert saved.event_types == ["custom_event"]


def test_create_response_hides_secrets(api):
    response = api.post("/api/v1/connections/", new_connection(authorization=SECRET_HEADER), format="json")

    assert "post_url" not in response.data
    assert "authorization" not in response.data
    assert response.data["authorization_masked"] == "••••cdef"
    assert response.data["post_url_masked"] == mask_url(TEST_POST_URL)


def test_secrets_absent_from_list(api, secret_connection):
    content = api.get("/api/v1/connections/").content.decode()

    assert "FAKE-TOKEN" not in content
    assert URL_TOKEN not in content


def test_secrets_absent_from_detail(api, secret_connection):
    response = api.get(f"/api/v1/connections/{secret_connection.pk}/")

    assert "FAKE-TOKEN" not in response.content.decode()
    assert URL_TOKEN not in response.content.decode()
    assert response.data["authorization_masked"] == "••••cdef"


def test_create_requires_post_url(api):
    response = api.post("/api/v1/connections/", {"name": "Checkout"}, format="json")

    assert response.status_code == 400
    assert "post_url" in response.data


def test_invalid_post_url_rejected(api):
    response = api.post("/api/v1/connections/", new_connection(post_url="https://evil.example.com/"), format="json")

    assert response.status_code == 400
    assert "is not a Qualtrics host" in response.data["post_url"][0]


def test_unknown_event_type_rejected(api):
    response = api.post("/api/v1/connections/", new_connection(event_types=["custom_event", "bogus"]), format="json")

    assert response.status_code == 400
    assert "event_types" in response.data


def test_unknown_metadata_field_rejected(api):
    payload = new_connection(metadata_exclusions=["ip", "device_info.serial"])
    response = api.post("/api/v1/connections/", payload, format="json")

    assert response.status_code == 400
    assert "metadata_exclusions" in response.data


def test_non_string_event_names_rejected(api):
    response = api.post("/api/v1/connections/", new_connection(custom_event_names=[{"a": 1}]), format="json")

    assert response.status_code == 400
    assert "custom_event_names" in response.data


def test_multiline_authorization_rejected(api):
    response = api.post("/api/v1/connections/", new_connection(authorization="Basic a\r\nX-Evil: 1"), format="json")

    assert response.status_code == 400
    assert "authorization" in response.data


def test_put_keeps_omitted_secrets(api, secret_connection):
    response = api.put(f"/api/v1/connections/{secret_connection.pk}/", {"name": "Renamed"}, format="json")

    assert response.status_code == 200
    saved = Connection.objects.get(pk=secret_connection.pk)
    assert saved.name == "Renamed"
    assert saved.authorization == SECRET_HEADER
    assert saved.post_url == TEST_POST_URL


def test_patch_replaces_authorization(api, secret_connection):
    url = f"/api/v1/connections/{secret_connection.pk}/"
    api.patch(url, {"authorization": "Basic bmV3"}, format="json")

    assert Connection.objects.get(pk=secret_connection.pk).authorization == "Basic bmV3"


def test_empty_authorization_removes_header(api, secret_connection):
    api.patch(f"/api/v1/connections/{secret_connection.pk}/", {"authorization": ""}, format="json")

    assert Connection.objects.get(pk=secret_connection.pk).authorization == ""


def test_patch_validates_stored_values(api, secret_connection):
    url = f"/api/v1/connections/{secret_connection.pk}/"
    response = api.patch(url, {"post_url": "http://iad1.qualtrics.com/"}, format="json")

    assert response.status_code == 400
    assert Connection.objects.get(pk=secret_connection.pk).post_url == TEST_POST_URL


def test_delete_connection(api, secret_connection):
    response = api.delete(f"/api/v1/connections/{secret_connection.pk}/")

    assert response.status_code == 204
    assert not Connection.objects.exists()


def test_feed_create_returns_secret(api):
    response = api.post("/api/v1/feeds/", {"name": "web"}, format="json")

    assert response.status_code == 201
    assert Feed.objects.authenticate(response.data["secret"]) == Feed.objects.get(name="web")


def test_feed_secret_never_shown_again(api):
    created = api.post("/api/v1/feeds/", {"name": "web"}, format="json").data

    detail = api.get(f"/api/v1/feeds/{created['id']}/")
    listing = api.get("/api/v1/feeds/")
    assert "secret" not in detail.data
    assert created["secret"] not in detail.content.decode()
    assert created["secret"] not in listing.content.decode()


def test_rotate_secret_returns_new(api):
    feed = FeedFactory.create()
    response = api.post(f"/api/v1/feeds/{feed.pk}/rotate-secret/")

    assert response.status_code == 200
    assert Feed.objects.authenticate(response.data["secret"]) == feed
    assert Feed.objects.authenticate(feed.plain_secret) is None


def test_feed_update_keeps_secret(api):
    feed = FeedFactory.create()
    response = api.patch(f"/api/v1/feeds/{feed.pk}/", {"name": "renamed", "active": False}, format="json")

    assert response.status_code == 200
    assert "secret" not in response.data
    assert Feed.objects.get(pk=feed.pk).secret_hash == feed.secret_hash


def test_feed_with_batches_conflicts(api):
    batch = InboundBatchFactory.create()
    response = api.delete(f"/api/v1/feeds/{batch.feed.pk}/")

    assert response.status_code == 409
    assert Feed.objects.filter(pk=batch.feed.pk).exists()


def test_feed_delete(api):
    feed = FeedFactory.create()

    assert api.delete(f"/api/v1/feeds/{feed.pk}/").status_code == 204
    assert not Feed.objects.exists()


def result_ids(response):
    return [item["id"] for item in response.data["results"]]


def test_deliveries_filter_by_connection(api):
    wanted = DeliveryFactory.create()
    DeliveryFactory.create()
    response = api.get("/api/v1/deliveries/", {"connection": wanted.connection.pk})

    assert result_ids(response) == [wanted.pk]


def test_deliveries_filter_by_status(api):
    failed = DeliveryFactory.create(status=Delivery.Status.FAILED)
    DeliveryFactory.create(status=Delivery.Status.DELIVERED)
    response = api.get("/api/v1/deliveries/", {"status": "failed"})

    assert result_ids(response) == [failed.pk]


def test_deliveries_invalid_status_rejected(api):
    response = api.get("/api/v1/deliveries/", {"status": "lost"})

    assert response.status_code == 400
    assert "status" in response.data


def test_deliveries_newest_first(api):
    older = DeliveryFactory.create()
    newer = DeliveryFactory.create()
    Delivery.objects.filter(pk=older.pk).update(created_at=timezone.now() - timedelta(hours=1))

    assert result_ids(api.get("/api/v1/deliveries/")) == [newer.pk, older.pk]


def test_deliveries_paginated(api):
    DeliveryFactory.create_batch(51, connection=ConnectionFactory.create())
    response = api.get("/api/v1/deliveries/")

    assert response.data["count"] == 51
    assert len(response.data["results"]) == 50
    assert response.data["next"].endswith("?page=2")


def test_delivery_list_nests_attempts(api):
    attempt = DeliveryAttemptFactory.create(status_code=503, response_excerpt="busy")
    (item,) = api.get("/api/v1/deliveries/").data["results"]

    assert item["attempts"] == [
        {
            "number": attempt.number,
            "started_at": item["attempts"][0]["started_at"],
            "duration_ms": 120,
            "status_code": 503,
            "error": "HTTP 500",
            "response_excerpt": "busy",
        }
    ]
    assert "payload" not in item


def test_delivery_detail_has_payload(api):
    delivery = DeliveryFactory.create()
    response = api.get(f"/api/v1/deliveries/{delivery.pk}/")

    assert response.data["payload"] == delivery.payload


def test_batch_list_omits_body(api):
    InboundBatchFactory.create()
    (item,) = api.get("/api/v1/batches/").data["results"]

    assert "body" not in item
    assert item["body_bytes"] == len('{"events": []}')


def test_batch_detail_has_body(api):
    batch = InboundBatchFactory.create(body='{"events": [], "mpid": 12345678901234567890}')
    response = api.get(f"/api/v1/batches/{batch.pk}/")

    assert response.data["body"] == '{"events": [], "mpid": 12345678901234567890}'
    assert response.data["routings"] == []


def test_batches_read_only(api):
    batch = InboundBatchFactory.create()

    assert api.delete(f"/api/v1/batches/{batch.pk}/").status_code == 405


def test_schema_endpoint_returns_200(api):
    response = api.get("/api/schema/")

    assert response.status_code == 200
    assert b"/api/v1/deliveries/" in response.content


def test_schema_has_no_warnings(tmp_path):
    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(tmp_path / "schema.yml"))


def test_read_only_operator_can_read(read_only, secret_connection):
    assert read_only.get("/api/v1/deliveries/").status_code == 200
    response = read_only.get(f"/api/v1/connections/{secret_connection.pk}/")

    assert response.status_code == 200
    assert "FAKE-TOKEN" not in response.content.decode()


def test_read_only_operator_cannot_change(read_only, secret_connection):
    assert read_only.patch(f"/api/v1/connections/{secret_connection.pk}/", {"name": "x"}).status_code == 403
    assert read_only.post(f"/api/v1/connections/{secret_connection.pk}/pause/").status_code == 403
    assert read_only.post("/api/v1/deliveries/replay/", {}, format="json").status_code == 403
    assert read_only.post("/api/v1/connections/", new_connection(), format="json").status_code == 403


def test_staff_without_permissions_gets_403(django_user_model):
    client = APIClient()
    client.force_authenticate(django_user_model.objects.create_user("bare", password="pw", is_staff=True))

    assert client.get("/api/v1/deliveries/").status_code == 403


def test_pause_and_resume_connection(api, secret_connection):
    paused = api.post(f"/api/v1/connections/{secret_connection.pk}/pause/")
    resumed = api.post(f"/api/v1/connections/{secret_connection.pk}/resume/")

    assert paused.status_code == 200
    assert paused.json()["paused_at"] is not None
    assert resumed.json()["paused_at"] is None


def test_replay_one_delivery(api, secret_connection):
    failed = DeliveryFactory.create(connection=secret_connection, status="failed")

    response = api.post(f"/api/v1/deliveries/{failed.pk}/replay/")

    assert response.json() == {"replayed": 1}
    failed.refresh_from_db()
    assert failed.status == "pending"


def test_replay_by_filter_spans_pages(api, secret_connection):
    other = ConnectionFactory.create()
    DeliveryFactory.create_batch(60, connection=secret_connection, status="failed")
    DeliveryFactory.create(connection=other, status="failed")
    DeliveryFactory.create(connection=secret_connection, status="delivered")

    response = api.post(
        "/api/v1/deliveries/replay/", {"connection": secret_connection.pk, "status": "failed"}, format="json"
    )

    assert response.json() == {"replayed": 60}
    assert Delivery.objects.filter(status="failed").count() == 1


def test_replay_by_time_range(api, secret_connection):
    old = DeliveryFactory.create(connection=secret_connection, status="failed")
    Delivery.objects.filter(pk=old.pk).update(created_at=timezone.now() - timedelta(days=3))
    DeliveryFactory.create(connection=secret_connection, status="failed")

    response = api.post(
        "/api/v1/deliveries/replay/",
        {"created_before": (timezone.now() - timedelta(days=1)).isoformat()},
        format="json",
    )

    assert response.json() == {"replayed": 1}
