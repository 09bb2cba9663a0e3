"""Log records: event names with fields, JSON and console formats, no secrets, and the request id."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from events import tasks
from events.models import InboundBatch
from integrations import delivery
from integrations.transport import Outcome
from portal.logging import (
    REDACTED,
    ConsoleFormatter,
    JsonFormatter,
    RequestIdFilter,
    bound_request_id,
    inbound_request_id,
)
from tests.factories import ConnectionFactory, DeliveryFactory, FeedFactory, InboundBatchFactory

pytestmark = pytest.mark.django_db

REPO = Path(__file__).resolve().parents[1]
POST_URL = "https://iad1.qualtrics.com/inbound-event/v1/events/json/triggers?urlTokenId=0b9f6a3e-secret-token"
AUTHORIZATION = "Basic c2VjcmV0LXVzZXI6c2VjcmV0LXBhc3N3b3Jk"


def make_record(message="delivery.attempt", **extra):
    record = logging.LogRecord("integrations.delivery", logging.INFO, __file__, 1, message, (), None)
    record.__dict__.update(extra)
    return record


def records_named(caplog, event):
    return [record for record in caplog.records if record.getMessage() == event]


def test_json_line_has_the_event_and_its_fields():
    line = JsonFormatter().format(make_record(connection_id=3, delivery_id="d-1", status_code=200))

    entry = json.loads(line)
    assert entry["message"] == "delivery.attempt"
    assert entry["level"] == "INFO"
    assert entry["logger"] == "integrations.delivery"
    assert entry["time"].endswith("+00:00")
    assert (entry["connection_id"], entry["delivery_id"], entry["status_code"]) == (3, "d-1", 200)


def test_json_line_carries_the_exception():
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "inbound.enqueue_failed", (), sys.exc_info())

    entry = json.loads(JsonFormatter().format(record))

    assert "ValueError: boom" in entry["exception"]


def test_fields_named_like_secrets_are_redacted():
    record = make_record(authorization="Basic abc", post_url=POST_URL, feed_secret="mpf_x", connection_id=1)

    line = JsonFormatter().format(record)
    console = ConsoleFormatter().format(record)

    entry = json.loads(line)
    assert entry["authorization"] == entry["post_url"] == entry["feed_secret"] == REDACTED
    assert "Basic abc" not in console
    assert "urlTokenId" not in console
    assert "connection_id=1" in console


def test_console_line_reads_as_event_and_key_values():
    record = make_record(connection_id=3, reason="too large: 5 bytes", types=["a", "b"])

    line = ConsoleFormatter().format(record)

    assert line.endswith(
        'INFO integrations.delivery delivery.attempt connection_id=3 reason="too large: 5 bytes" types=["a","b"]'
    )


def test_attempt_record_fields_without_secrets(caplog):
    caplog.set_level(logging.INFO, logger="integrations.delivery")
    batch = InboundBatchFactory()
    attempt = DeliveryFactory(connection=ConnectionFactory(post_url=POST_URL, authorization=AUTHORIZATION), batch=batch)

    delivery.deliver(attempt.pk, send=lambda *args, **kwargs: Outcome(200, 42, response_excerpt="ok"))

    [record] = records_named(caplog, "delivery.attempt")
    line = JsonFormatter().format(record)
    entry = json.loads(line)
    assert entry["connection_id"] == attempt.connection_id
    assert entry["delivery_id"] == str(attempt.uuid)
    assert entry["batch_id"] == batch.pk
    assert (entry["attempt"], entry["status_code"], entry["duration_ms"], entry["outcome"]) == (1, 200, 42, "delivered")
    for secret in (AUTHORIZATION, POST_URL, "secret-token", "c2VjcmV0"):
        assert secret not in line


def test_paused_connection_logs_its_id_and_reason(caplog):
    from integrations import protection

    caplog.set_level(logging.INFO, logger="integrations.protection")
    connection = ConnectionFactory(authorization=AUTHORIZATION)

    protection.pause(connection, "Qualtrics refused access (403)", auto_resume=False)

    [record] = records_named(caplog, "connection.paused")
    assert (record.connection_id, record.auto_resume, record.reason) == (
        connection.pk,
        False,
        "Qualtrics refused access (403)",
    )


def test_request_id_echoed_and_stored(client):
    feed = FeedFactory()

    response = client.post(
        "/api/v1/mparticle/",
        '{"events": []}',
        content_type="application/json",
        HTTP_AUTHORIZATION=feed.plain_secret,
        HTTP_X_REQUEST_ID="req-0042",
    )

    assert response.status_code == 202
    assert response["X-Request-Id"] == "req-0042"
    assert InboundBatch.objects.get(pk=response.json()["batch_id"]).request_id == "req-0042"


@pytest.mark.parametrize("header", [None, "", "two words", "x" * 129, "line\nbreak"])
def test_unusable_request_id_is_replaced(header):
    request_id = inbound_request_id(header)

    assert request_id != header
    assert len(request_id) == 32


def test_routing_logs_carry_the_request_id(caplog):
    caplog.handler.addFilter(RequestIdFilter())
    caplog.set_level(logging.INFO, logger="events.router")
    batch = InboundBatchFactory(body='{"events": [{"event_type": "custom_event", "data": {}}]}')

    tasks.route_batch(batch.pk, request_id="req-0042")

    [record] = records_named(caplog, "router.routed")
    assert (record.batch_id, record.request_id) == (batch.pk, "req-0042")
    assert InboundBatch.objects.get().status == InboundBatch.Status.ROUTED


def test_woken_routing_logs_the_stored_request_id(caplog):
    caplog.handler.addFilter(RequestIdFilter())
    caplog.set_level(logging.INFO, logger="events.router")
    batch = InboundBatchFactory(body='{"events": [{"event_type": "custom_event", "data": {}}]}', request_id="req-0043")

    tasks.route_received()

    [record] = records_named(caplog, "router.routed")
    assert (record.batch_id, record.request_id) == (batch.pk, "req-0043")


def test_request_id_is_unbound_after_the_block():
    record = make_record()

    with bound_request_id("req-1"):
        pass
    RequestIdFilter().filter(record)

    assert not hasattr(record, "request_id")


def test_production_logs_are_json_lines():
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PORTAL_", "DJANGO_"))}
    env |= {"PORTAL_LOG_FORMAT": "json", "DJANGO_SETTINGS_MODULE": "portal.settings"}
    script = (
        "import django, logging; django.setup(); "
        "logging.getLogger('integrations.delivery').warning('delivery.unsendable', extra={'connection_id': 7})"
    )

    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=True
    )

    entry = json.loads(result.stderr.strip().splitlines()[-1])
    assert (entry["message"], entry["level"], entry["connection_id"]) == ("delivery.unsendable", "WARNING", 7)
