"""Data retention: delete inbound batches and delivery records older than `PORTAL_RETENTION_DAYS`.

The purge deletes in chunks of primary keys, each chunk in its own short
transaction, so it never holds long locks or loads a large table into
memory. One run stops after a bounded number of chunks and reports whether it
finished; the Celery task queues another run until it has.

Only records that nothing still needs are deleted: deliveries in a final
state (delivered, failed, cancelled), flushed batch windows, and batches
that are routed (or failed) and that no open window still collects. A
delivery still waiting keeps its row until it is sent or fails; its batch
may go, which leaves its `batch` empty. The period is never shorter than
the per-event de-duplication window, whose rows go with their batches.

NOTE: `manage.py purge_records` selects the same records with its own
copy of these rules; it can call `purge` once the two are merged.
"""

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.core.cache import cache
from django.db import transaction
from django.db.models import Min
from django.utils import timezone

from events.models import InboundBatch
from integrations.models import BatchWindow, Delivery, DeliveryAttempt
from portal.conf import portal_setting

logger = logging.getLogger(__name__)

FINAL = (Delivery.Status.DELIVERED, Delivery.Status.FAILED, Delivery.Status.CANCELLED)
CHUNK_SIZE = 1000
# Chunks per run. On the benchmark's PostgreSQL (a million deliveries, two busy cores), 200 chunks
# of 1,000 deliveries and their attempts took 75 seconds.
MAX_CHUNKS = 200
LAST_RUN_CACHE_KEY = "portal:retention:last-run"
# The last run's figures are shown on the dashboard until the next daily run replaces them.
LAST_RUN_TIMEOUT = 8 * 24 * 3600


@dataclass
class PurgeResult:
    """Rows deleted by one run, by table, and whether the run reached every record past the cutoff."""

    cutoff: datetime
    finished_at: datetime | None = None
    finished: bool = True
    deleted: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.deleted.values())


def retention_days() -> int:
    return int(portal_setting("RETENTION_DAYS"))


def cutoff(now: datetime) -> datetime:
    """Return the moment before which records are purged: the retention period, or the dedup window if longer."""
    kept = max(timedelta(days=retention_days()), timedelta(seconds=portal_setting("EVENT_DEDUP_SECONDS")))
    return now - kept


def purge(now: datetime | None = None, chunk_size: int | None = None, max_chunks: int | None = None) -> PurgeResult:
    """Delete records older than the retention period, at most `max_chunks` chunks of `chunk_size` rows.

    The limits default to MAX_CHUNKS and CHUNK_SIZE. Deliveries go first,
    then flushed windows, then batches, so that the later steps find fewer
    references to clear.
    """
    chunk_size = chunk_size or CHUNK_SIZE
    result = PurgeResult(cutoff=cutoff(now or timezone.now()))
    steps: list[Callable[[datetime, int, dict[str, int]], int]] = [
        _purge_deliveries,
        _purge_windows,
        _purge_batches,
    ]
    chunks_left = max_chunks or MAX_CHUNKS
    for step in steps:
        while chunks_left > 0:
            chunks_left -= 1
            if step(result.cutoff, chunk_size, result.deleted) < chunk_size:
                break
        else:
            result.finished = False
            break
    result.finished_at = timezone.now()
    return result


def run() -> PurgeResult:
    """Purge once, log the figures and keep them in the cache for the dashboard."""
    result = purge()
    logger.info(
        "retention.purged",
        extra={"cutoff": result.cutoff.isoformat(), "finished": result.finished, **result.deleted},
    )
    cache.set(LAST_RUN_CACHE_KEY, asdict(result), timeout=LAST_RUN_TIMEOUT)
    return result


def last_run() -> dict[str, Any] | None:
    """Return the figures of the last run as `run` stored them, or None when the cache has none."""
    stored = cache.get(LAST_RUN_CACHE_KEY)
    return stored if isinstance(stored, dict) else None


def oldest_records() -> dict[str, datetime | None]:
    """Return the time of the oldest stored batch and delivery (two index lookups)."""
    return {
        "batch": InboundBatch.objects.aggregate(oldest=Min("received_at"))["oldest"],
        "delivery": Delivery.objects.aggregate(oldest=Min("created_at"))["oldest"],
    }


def _count(deleted: dict[str, int], counts: dict[str, int]) -> None:
    for label, count in counts.items():
        name = label.rsplit(".", 1)[-1].lower()
        deleted[name] = deleted.get(name, 0) + count


def _purge_deliveries(before: datetime, chunk_size: int, deleted: dict[str, int]) -> int:
    """Delete one chunk of final deliveries created before `before`, with their attempts."""
    old = Delivery.objects.filter(created_at__lt=before, status__in=FINAL).order_by("created_at")
    ids = list(old.values_list("pk", flat=True)[:chunk_size])
    if ids:
        with transaction.atomic():
            _count(deleted, DeliveryAttempt.objects.filter(delivery_id__in=ids).delete()[1])
            _count(deleted, Delivery.objects.filter(pk__in=ids).only("pk").delete()[1])
    return len(ids)


def _purge_windows(before: datetime, chunk_size: int, deleted: dict[str, int]) -> int:
    """Delete one chunk of windows flushed before `before`, with their items."""
    # Ordered by id, the oldest come first, so the scan stops early without an index on flushed_at.
    old = BatchWindow.objects.filter(status=BatchWindow.Status.FLUSHED, flushed_at__lt=before).order_by("pk")
    ids = list(old.values_list("pk", flat=True)[:chunk_size])
    if ids:
        with transaction.atomic():
            _count(deleted, BatchWindow.objects.filter(pk__in=ids).only("pk").delete()[1])
    return len(ids)


def _purge_batches(before: datetime, chunk_size: int, deleted: dict[str, int]) -> int:
    """Delete one chunk of batches received before `before`, with their routings and window items."""
    old = (
        InboundBatch.objects.filter(received_at__lt=before)
        .exclude(status=InboundBatch.Status.RECEIVED)
        .exclude(window_items__window__status=BatchWindow.Status.OPEN)
    )
    ids = list(old.order_by("received_at").values_list("pk", flat=True)[:chunk_size])
    if ids:
        with transaction.atomic():
            _count(deleted, InboundBatch.objects.filter(pk__in=ids).only("pk").delete()[1])
    return len(ids)
