"""Data retention: the purge, its bounds, the Celery task and what the dashboard shows of it."""

from datetime import timedelta

import pytest
from django.conf import settings as django_settings
from django.core.cache import cache
from django.utils import timezone

from events.models import InboundBatch, SeenEvent
from integrations import retention, tasks
from integrations.models import BatchWindow, Delivery, DeliveryAttempt, Routing, WindowItem
from tests.factories import ConnectionFactory, DeliveryAttemptFactory, DeliveryFactory, InboundBatchFactory

pytestmark = pytest.mark.django_db

OLD = {"days": 31}


@pytest.fixture(autouse=True)
def empty_cache():
    cache.clear()


def aged(record, field, **delta):
    """Move a record's auto-set timestamp `field` into the past by `delta` and return the record reloaded."""
    type(record).objects.filter(pk=record.pk).update(**{field: timezone.now() - timedelta(**delta)})
    return type(record).objects.get(pk=record.pk)


def old_delivery(status=Delivery.Status.DELIVERED, **fields):
    return aged(DeliveryFactory.create(status=status, **fields), "created_at", **OLD)


def old_batch(**fields):
    return aged(InboundBatchFactory.create(status=InboundBatch.Status.ROUTED, **fields), "received_at", **OLD)


def test_retention_defaults_to_30_days():
    assert django_settings.PORTAL["RETENTION_DAYS"] == 30


def test_beat_runs_purge_daily():
    entry = django_settings.CELERY_BEAT_SCHEDULE["purge-old-records"]

    assert entry["task"] == "integrations.tasks.purge_old_records"
    assert entry["schedule"].remaining_estimate(timezone.now()) <= timedelta(days=1)


@pytest.mark.parametrize("status", ["delivered", "failed", "cancelled"])
def test_purge_deletes_old_final_deliveries(status):
    attempt = DeliveryAttemptFactory.create(delivery=old_delivery(status))

    retention.purge()

    assert not Delivery.objects.filter(pk=attempt.delivery_id).exists()
    assert not DeliveryAttempt.objects.filter(pk=attempt.pk).exists()


@pytest.mark.parametrize("status", ["pending", "in_flight", "retry_scheduled"])
def test_purge_keeps_waiting_deliveries(status):
    waiting = old_delivery(status)

    retention.purge()

    assert Delivery.objects.filter(pk=waiting.pk).exists()


def test_purge_keeps_recent_records():
    recent = DeliveryFactory.create(status=Delivery.Status.DELIVERED)
    batch = InboundBatchFactory.create(status=InboundBatch.Status.ROUTED)

    retention.purge()

    assert Delivery.objects.filter(pk=recent.pk).exists()
    assert InboundBatch.objects.filter(pk=batch.pk).exists()


def test_purge_deletes_old_batch_with_routings():
    batch = old_batch()
    Routing.objects.create(batch=batch, connection=ConnectionFactory.create())
    SeenEvent.objects.create(connection=ConnectionFactory.create(), mpid="1", source_message_id="m", batch=batch)

    retention.purge()

    assert not InboundBatch.objects.filter(pk=batch.pk).exists()
    assert not Routing.objects.exists()
    assert not SeenEvent.objects.exists()


def test_purge_keeps_waiting_delivery_of_old_batch():
    batch = old_batch()
    waiting = DeliveryFactory.create(batch=batch, status=Delivery.Status.RETRY_SCHEDULED)

    retention.purge()

    assert not InboundBatch.objects.filter(pk=batch.pk).exists()
    assert Delivery.objects.get(pk=waiting.pk).batch_id is None


def test_purge_keeps_unrouted_batch():
    batch = aged(InboundBatchFactory.create(), "received_at", **OLD)

    retention.purge()

    assert InboundBatch.objects.filter(pk=batch.pk).exists()


def test_purge_keeps_batch_in_open_window():
    batch = old_batch()
    window = BatchWindow.objects.create(connection=ConnectionFactory.create(), device_key="d", closes_at=timezone.now())
    WindowItem.objects.create(window=window, batch=batch, kind=WindowItem.Kind.EVENT, body="{}")

    retention.purge()

    assert InboundBatch.objects.filter(pk=batch.pk).exists()


def test_purge_deletes_old_flushed_windows():
    old_flush = timezone.now() - timedelta(**OLD)
    window = BatchWindow.objects.create(
        connection=ConnectionFactory.create(),
        device_key="d",
        closes_at=old_flush,
        status=BatchWindow.Status.FLUSHED,
        flushed_at=old_flush,
    )
    sent = DeliveryFactory.create(window=window, status=Delivery.Status.PENDING)

    retention.purge()

    assert not BatchWindow.objects.filter(pk=window.pk).exists()
    assert Delivery.objects.get(pk=sent.pk).window_id is None


def test_purge_follows_retention_setting(settings):
    settings.PORTAL = {**settings.PORTAL, "RETENTION_DAYS": 60}
    within_period = old_delivery()

    retention.purge()

    assert Delivery.objects.filter(pk=within_period.pk).exists()


def test_cutoff_covers_dedup_window(settings):
    settings.PORTAL = {**settings.PORTAL, "RETENTION_DAYS": 1, "EVENT_DEDUP_SECONDS": 3 * 86400}
    now = timezone.now()

    assert retention.cutoff(now) == now - timedelta(days=3)


def test_purge_stops_after_chunk_limit():
    for _ in range(5):
        old_delivery()

    first = retention.purge(chunk_size=2, max_chunks=2)

    assert not first.finished
    assert first.deleted["delivery"] == 4
    assert retention.purge(chunk_size=2, max_chunks=5).finished
    assert not Delivery.objects.exists()


def test_purge_counts_by_table():
    DeliveryAttemptFactory.create(delivery=old_delivery())
    old_batch()

    result = retention.purge()

    assert result.finished
    assert result.deleted == {"deliveryattempt": 1, "delivery": 1, "inboundbatch": 1}
    assert result.total == 3


def test_run_keeps_figures_for_dashboard():
    old_delivery()

    retention.run()

    stored = retention.last_run()
    assert stored["deleted"] == {"delivery": 1}
    assert stored["finished"] is True


def test_last_run_none_without_cache():
    assert retention.last_run() is None


def test_oldest_records():
    delivery = old_delivery(Delivery.Status.PENDING)

    assert retention.oldest_records() == {"batch": None, "delivery": delivery.created_at}


def test_task_continues_until_finished(monkeypatch):
    queued = []
    monkeypatch.setattr(retention, "MAX_CHUNKS", 1)
    monkeypatch.setattr(retention, "CHUNK_SIZE", 1)
    monkeypatch.setattr(tasks.purge_old_records, "apply_async", lambda **options: queued.append(options))
    old_delivery()
    old_delivery()

    tasks.purge_old_records()

    assert queued == [{"countdown": tasks.PURGE_CONTINUE_SECONDS}]
    assert Delivery.objects.count() == 1


def test_task_stops_when_finished(monkeypatch):
    queued = []
    monkeypatch.setattr(tasks.purge_old_records, "apply_async", lambda **options: queued.append(options))

    tasks.purge_old_records()

    assert queued == []
