"""The operations commands: replay, purge, export and import of connections, and encryption key rotation."""

import json
from datetime import timedelta
from io import StringIO

import pytest
from cryptography.fernet import Fernet
from django.core.management import CommandError, call_command
from django.db import connection as db
from django.utils import timezone

from events.models import InboundBatch, SeenEvent
from integrations.models import BatchWindow, Connection, Delivery, DeliveryAttempt, Routing, WindowItem
from tests.factories import (
    ConnectionFactory,
    DeliveryAttemptFactory,
    DeliveryFactory,
    FeedFactory,
    InboundBatchFactory,
)

pytestmark = pytest.mark.django_db

SECRET_TOKEN = "5f0e8d1c-2b3a-4c5d-8e9f-0a1b2c3d4e5f"
SECRET_URL = f"https://iad1.qualtrics.com/inbound-event/v1/events/json/triggers?urlTokenId={SECRET_TOKEN}"
SECRET_AUTHORIZATION = "Basic c2VjcmV0LWF1dGg="


def run(*args: str) -> str:
    out = StringIO()
    call_command(*args, stdout=out, stderr=StringIO())
    return out.getvalue()


def age(model, pks, days: float, field: str) -> None:
    """Move records' timestamps `days` into the past (auto_now_add fields ignore values given at creation)."""
    model.objects.filter(pk__in=pks).update(**{field: timezone.now() - timedelta(days=days)})


def statuses(*deliveries: Delivery) -> list[str]:
    return [Delivery.objects.get(pk=d.pk).status for d in deliveries]


# replay_deliveries


def test_replay_selects_by_connection():
    surveys, other = ConnectionFactory(name="Surveys"), ConnectionFactory(name="Other")
    failed = DeliveryFactory(connection=surveys, status=Delivery.Status.FAILED, attempt_count=3)
    untouched = DeliveryFactory(connection=other, status=Delivery.Status.FAILED)

    output = run("replay_deliveries", "--connection", "Surveys")

    assert "1 deliveries queued again" in output
    assert statuses(failed, untouched) == ["pending", "failed"]
    assert Delivery.objects.get(pk=failed.pk).attempts_before_replay == 3


def test_replay_selects_by_status_and_time():
    connection = ConnectionFactory()
    old_failed, new_failed, cancelled = DeliveryFactory.create_batch(
        3, connection=connection, status=Delivery.Status.FAILED
    )
    Delivery.objects.filter(pk=cancelled.pk).update(status=Delivery.Status.CANCELLED)
    age(Delivery, [old_failed.pk], days=10, field="created_at")
    since = (timezone.now() - timedelta(days=1)).date().isoformat()

    run("replay_deliveries", "--status", "failed", "--since", since)

    assert statuses(old_failed, new_failed, cancelled) == ["failed", "pending", "cancelled"]


def test_replay_dry_run_changes_nothing():
    failed = DeliveryFactory(status=Delivery.Status.FAILED)

    output = run("replay_deliveries", "--dry-run")

    assert "1 deliveries would be replayed" in output
    assert statuses(failed) == ["failed"]


def test_replay_rejects_an_unknown_connection():
    with pytest.raises(CommandError, match="No connection named Nope"):
        run("replay_deliveries", "--connection", "Nope")


# purge_records


@pytest.fixture
def old_and_new_records():
    """Records 40 days old and fresh ones, each kind in a state that may or may not be purged."""
    connection = ConnectionFactory()
    routed = InboundBatchFactory(status=InboundBatch.Status.ROUTED)
    Routing.objects.create(batch=routed, connection=connection)
    SeenEvent.objects.create(connection=connection, mpid="1", source_message_id="m-1", batch=routed)
    unrouted = InboundBatchFactory()
    collecting = InboundBatchFactory(status=InboundBatch.Status.ROUTED)
    open_window = BatchWindow.objects.create(connection=connection, device_key="d-1", closes_at=timezone.now())
    WindowItem.objects.create(window=open_window, batch=collecting, kind=WindowItem.Kind.EVENT, body="{}")
    flushed = BatchWindow.objects.create(
        connection=connection, device_key="d-2", closes_at=timezone.now(), status=BatchWindow.Status.FLUSHED
    )
    delivered = DeliveryAttemptFactory(delivery__connection=connection, delivery__status="delivered").delivery
    waiting = DeliveryFactory(connection=connection, batch=routed, status=Delivery.Status.RETRY_SCHEDULED)
    fresh = DeliveryFactory(connection=connection, status=Delivery.Status.DELIVERED)

    age(InboundBatch, [routed.pk, unrouted.pk, collecting.pk], days=40, field="received_at")
    age(BatchWindow, [flushed.pk], days=40, field="flushed_at")
    age(Delivery, [delivered.pk, waiting.pk], days=40, field="created_at")
    return {
        "routed": routed,
        "unrouted": unrouted,
        "collecting": collecting,
        "flushed": flushed,
        "delivered": delivered,
        "waiting": waiting,
        "fresh": fresh,
    }


def test_purge_deletes_only_old_finished_records(old_and_new_records):
    records = old_and_new_records

    output = run("purge_records", "--older-than-days", "30", "--chunk-size", "1")

    assert "1 deliveries deleted" in output
    assert "1 batch windows deleted" in output
    assert "1 inbound batches deleted" in output
    assert not Delivery.objects.filter(pk=records["delivered"].pk).exists()
    assert not DeliveryAttempt.objects.exists()
    assert not BatchWindow.objects.filter(pk=records["flushed"].pk).exists()
    assert not InboundBatch.objects.filter(pk=records["routed"].pk).exists()
    assert set(InboundBatch.objects.values_list("pk", flat=True)) == {
        records["unrouted"].pk,
        records["collecting"].pk,
    }
    assert set(Delivery.objects.values_list("pk", flat=True)) == {records["waiting"].pk, records["fresh"].pk}
    assert Delivery.objects.get(pk=records["waiting"].pk).batch is None


def test_purge_dry_run_only_counts(old_and_new_records):
    output = run("purge_records", "--older-than-days", "30", "--dry-run")

    assert "1 deliveries would be deleted" in output
    assert InboundBatch.objects.count() == 3
    assert Delivery.objects.count() == 3


def test_purge_refuses_a_period_shorter_than_deduplication(settings):
    settings.PORTAL = {**settings.PORTAL, "EVENT_DEDUP_SECONDS": 3 * 86400}

    with pytest.raises(CommandError, match="PORTAL_EVENT_DEDUP_SECONDS"):
        run("purge_records", "--older-than-days", "2")


# export_connections and import_connections


def export() -> dict:
    return json.loads(run("export_connections"))


def test_export_has_settings_and_feeds_but_no_secrets():
    feed = FeedFactory(name="ios-app")
    connection = ConnectionFactory(
        name="Surveys", post_url=SECRET_URL, authorization=SECRET_AUTHORIZATION, event_types=["custom_event"]
    )
    connection.feeds.add(feed)

    text = run("export_connections")

    [entry] = json.loads(text)["connections"]
    assert entry["name"] == "Surveys"
    assert entry["event_types"] == ["custom_event"]
    assert entry["feeds"] == ["ios-app"]
    assert "post_url" not in entry
    assert "authorization" not in entry
    assert "paused_at" not in entry
    for secret in (SECRET_TOKEN, SECRET_AUTHORIZATION):
        assert secret not in text


def import_file(tmp_path, data: dict, *options: str) -> str:
    path = tmp_path / "connections.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return run("import_connections", str(path), *options)


def test_round_trip_creates_inactive_connections_without_secrets(tmp_path):
    FeedFactory(name="ios-app")
    original = ConnectionFactory(name="Surveys", send_as_batch=True, batch_window_seconds=30, max_attempts=5)
    original.feeds.set([FeedFactory(name="web-app")])
    exported = export()
    Connection.objects.all().delete()

    output = import_file(tmp_path, exported)

    imported = Connection.objects.get(name="Surveys")
    assert "created 'Surveys' (inactive" in output
    assert (imported.post_url, imported.authorization, imported.active) == ("", "", False)
    assert (imported.send_as_batch, imported.batch_window_seconds, imported.max_attempts) == (True, 30, 5)
    assert [feed.name for feed in imported.feeds.all()] == ["web-app"]
    assert export() == {**exported, "connections": [{**exported["connections"][0], "active": False}]}


def test_import_keeps_existing_secrets_and_sets_given_ones(tmp_path):
    ConnectionFactory(name="Surveys", post_url=SECRET_URL, authorization=SECRET_AUTHORIZATION, max_attempts=15)
    data = {
        "connections": [
            {"name": "Surveys", "max_attempts": 3},
            {"name": "New", "post_url": SECRET_URL, "authorization": "Basic bmV3"},
        ]
    }

    import_file(tmp_path, data)

    surveys, new = Connection.objects.get(name="Surveys"), Connection.objects.get(name="New")
    assert (surveys.max_attempts, surveys.post_url, surveys.authorization) == (3, SECRET_URL, SECRET_AUTHORIZATION)
    assert (new.post_url, new.authorization, new.active) == (SECRET_URL, "Basic bmV3", True)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"name": "B", "feeds": ["missing-feed"]}, "no feed named missing-feed"),
        ({"name": "B", "max_atempts": 3}, "unknown fields max_atempts"),
        ({"name": "B", "event_types": ["not_a_type"]}, "Unknown event types"),
    ],
)
def test_import_is_all_or_nothing(tmp_path, entry, message):
    data = {"connections": [{"name": "A"}, entry]}

    with pytest.raises(CommandError, match=message):
        import_file(tmp_path, data)

    assert not Connection.objects.exists()


def test_import_dry_run_changes_nothing(tmp_path):
    output = import_file(tmp_path, {"connections": [{"name": "A"}]}, "--dry-run")

    assert "created 'A'" in output
    assert not Connection.objects.exists()


# rotate_encryption_key


def stored_secrets(connection: Connection) -> tuple[str, str]:
    """Return the connection's two secret columns as stored; `authorization` is reserved in PostgreSQL, hence quoted."""
    quote = db.ops.quote_name
    columns = f"{quote('post_url')}, {quote('authorization')}"
    with db.cursor() as cursor:
        cursor.execute(f"SELECT {columns} FROM {quote(Connection._meta.db_table)} WHERE id = %s", [connection.pk])
        return cursor.fetchone()


def test_rotation_reencrypts_with_the_first_key(settings):
    old_key, new_key = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    settings.PORTAL = {**settings.PORTAL, "ENCRYPTION_KEYS": [old_key]}
    connection = ConnectionFactory(post_url=SECRET_URL, authorization=SECRET_AUTHORIZATION)
    settings.PORTAL = {**settings.PORTAL, "ENCRYPTION_KEYS": [new_key, old_key]}

    output = run("rotate_encryption_key")

    assert "1 connections" in output
    stored_url, stored_authorization = stored_secrets(connection)
    assert Fernet(new_key.encode()).decrypt(stored_url.encode()).decode() == SECRET_URL
    assert Fernet(new_key.encode()).decrypt(stored_authorization.encode()).decode() == SECRET_AUTHORIZATION
    settings.PORTAL = {**settings.PORTAL, "ENCRYPTION_KEYS": [new_key]}
    assert Connection.objects.get().post_url == SECRET_URL


def test_rotation_stops_on_a_value_no_key_decrypts(settings):
    settings.PORTAL = {**settings.PORTAL, "ENCRYPTION_KEYS": [Fernet.generate_key().decode()]}
    connection = ConnectionFactory(post_url=SECRET_URL)
    before = stored_secrets(connection)
    settings.PORTAL = {**settings.PORTAL, "ENCRYPTION_KEYS": [Fernet.generate_key().decode()]}

    with pytest.raises(CommandError, match="Nothing was changed"):
        run("rotate_encryption_key")

    assert stored_secrets(connection) == before


def test_rotation_needs_configured_keys(settings):
    settings.PORTAL = {**settings.PORTAL, "ENCRYPTION_KEYS": []}

    with pytest.raises(CommandError, match="PORTAL_ENCRYPTION_KEYS is empty"):
        run("rotate_encryption_key")
