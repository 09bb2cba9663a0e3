"""The admin's sample send and batch preview."""

import json

import pytest
from django.contrib.auth.models import User
from django.urls import reverse

from integrations import jsontext
from integrations.preview import jsonpaths, preview, sample_batch
from integrations.shaping import ShapingSettings
from tests.factories import ConnectionFactory, InboundBatchFactory

pytestmark = pytest.mark.django_db

ALL_EVENT_TYPES = {
    "application_state_transition",
    "breadcrumb",
    "commerce_event",
    "custom_event",
    "crash_report",
    "network_performance",
    "opt_out",
    "profile",
    "push_registration",
    "push_message",
    "screen_view",
    "session_start",
    "session_end",
    "uninstall",
    "user_attribute_change",
    "user_identity_change",
}


@pytest.fixture
def admin_client(client):
    client.force_login(User.objects.create_superuser("ops", "ops@example.com", "pw"))
    return client


def test_sample_batch_covers_every_type():
    batch = sample_batch()

    assert {event["event_type"] for event in batch["events"]} >= ALL_EVENT_TYPES
    assert {note["type"] for note in batch["system_notifications"]} == {"gdpr_change", "ccpa_change"}


def test_jsonpaths_list_every_leaf():
    paths = list(jsonpaths({"a": {"b": [1, {"c": None}]}, "odd key": "", "e": {}}))

    assert paths == ["$.a.b[0]", "$.a.b[1].c", "$['odd key']", "$.e"]


def test_preview_explains_each_event():
    settings = ShapingSettings(event_types=frozenset({"custom_event", "crash_report"}), send_crash_events=False)

    result = preview(sample_batch(), settings, 100_000, as_batch=True)

    reasons = {decision.event_type: decision.reason for decision in result.decisions}
    assert reasons["custom_event"] == "routed"
    assert reasons["crash_report"] == "send_crash_events is off"
    assert reasons["screen_view"] == "event type screen_view not routed"
    assert len(result.bodies) == 1
    assert "$.events[0].data.custom_attributes.score" in result.jsonpaths


def test_preview_one_body_per_event():
    settings = ShapingSettings(event_types=frozenset({"custom_event", "screen_view"}))

    result = preview(sample_batch(), settings, 100_000, as_batch=False)

    assert len(result.bodies) == 2


def test_preview_page_for_stored_batch(admin_client):
    ConnectionFactory(name="Surveys", event_types=["custom_event"])
    batch = InboundBatchFactory(body=jsontext.encode(sample_batch()).decode())
    url = reverse("admin:integrations_connection_preview")

    response = admin_client.post(url, {"batch": batch.pk, "body": ""})

    assert response.status_code == 200
    page = response.content.decode()
    assert "Surveys" in page
    assert "$.events[0].data.event_name" in page


def test_preview_page_rejects_invalid_json(admin_client):
    response = admin_client.post(reverse("admin:integrations_connection_preview"), {"body": "{nope"})

    assert "not valid JSON" in response.content.decode()


def test_send_sample_payload_action(admin_client, standin, allow_loopback):
    connection = ConnectionFactory(post_url=standin.url, event_types=["custom_event", "gdpr_change"])

    response = admin_client.post(
        reverse("admin:integrations_connection_changelist"),
        {"action": "send_sample_payload", "_selected_action": [connection.pk]},
    )

    assert response.status_code == 200
    page = response.content.decode()
    assert "HTTP 200" in page
    sent = json.loads(standin.records[0]["body"])
    assert [event["event_type"] for event in sent["events"]] == ["custom_event"]
    assert [note["type"] for note in sent["system_notifications"]] == ["gdpr_change"]
    assert connection.authorization not in page
    assert "urlTokenId=00000000" not in page


def test_preview_handles_lone_surrogate_envelope(admin_client):
    ConnectionFactory(name="Everything")
    body = '{"user_attributes": {"nick": "\\ud83d"}, "events": [{"event_type": "custom_event", "data": {"n": 1.10}}]}'

    response = admin_client.post(reverse("admin:integrations_connection_preview"), {"body": body})

    assert response.status_code == 200
    assert "&quot;n&quot;: 1.10" in response.content.decode()
