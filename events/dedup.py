"""De-duplication of events that mParticle's SDKs upload twice.

A repeated event arrives in a new batch with a new `batch_id`,
`source_request_id` and `event_id`, but the same `mpid` and
`source_message_id`. The key is (connection, mpid, source_message_id), kept
for `PORTAL_EVENT_DEDUP_SECONDS` (24 hours by default). An event without a
`source_message_id`, or in a batch without an `mpid`, is never treated as a
duplicate.

Keys are claimed insert-first: each routing inserts the keys of its events with
ON CONFLICT DO NOTHING and then reads back which rows are its own. Two
batches routed at the same moment therefore cannot both claim one event,
because the unique constraint makes the second insert wait for the first
transaction.
"""

from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta
from typing import Any

from django.utils import timezone

from events.models import InboundBatch, SeenEvent
from portal.conf import portal_setting

# Keys per query; SQLite limits the size of one statement's expression tree.
CHUNK = 400

Key = tuple[str, str]


def event_key(batch: dict[str, Any], event: Any) -> Key | None:
    """Return the (mpid, source_message_id) key of an event, or None when it has none."""
    mpid = batch.get("mpid")
    data = event.get("data") if isinstance(event, dict) else None
    message_id = data.get("source_message_id") if isinstance(data, dict) else None
    if mpid is None or mpid == "" or not isinstance(message_id, str) or not message_id:
        return None
    return _storable(str(mpid), 64), _storable(message_id, 200)


def _storable(value: str, length: int) -> str:
    """Return `value` cut to the column length, with NUL replaced, which PostgreSQL text cannot hold."""
    return value.replace("\x00", "\ufffd")[:length]


def split_duplicates(
    connection_id: int, batch: InboundBatch, data: dict[str, Any], events: Sequence[Any]
) -> tuple[list[Any], int]:
    """Return the events this connection has not seen within the window, and how many were duplicates.

    A repeat within the same batch is a duplicate too. Call inside the routing transaction.
    """
    keys = [event_key(data, getattr(shaped, "event", shaped)) for shaped in events]
    wanted = sorted({key for key in keys if key is not None})
    if not wanted:
        return list(events), 0

    claimed = _claim(connection_id, batch, wanted)
    fresh: list[Any] = []
    duplicates = 0
    for shaped, key in zip(events, keys, strict=True):
        if key is not None and key not in claimed:
            duplicates += 1
            continue
        if key is not None:
            claimed.discard(key)
        fresh.append(shaped)
    return fresh, duplicates


def _claim(connection_id: int, batch: InboundBatch, keys: list[Key]) -> set[Key]:
    """Insert the keys for this batch and return those it now owns, i.e. seen first by this batch."""
    window_start = timezone.now() - timedelta(seconds=portal_setting("EVENT_DEDUP_SECONDS"))
    owned: set[Key] = set()
    for chunk in _chunks(keys):
        message_ids = sorted({message_id for _, message_id in chunk})
        _forget_expired(connection_id, message_ids, window_start)
        # Sorted keys make concurrent routings lock SeenEvent rows in one order, so they cannot deadlock on them.
        SeenEvent.objects.bulk_create(
            [SeenEvent(connection_id=connection_id, mpid=m, source_message_id=s, batch=batch) for m, s in chunk],
            ignore_conflicts=True,
        )
        rows = SeenEvent.objects.filter(connection_id=connection_id, source_message_id__in=message_ids).values_list(
            "mpid", "source_message_id", "batch_id"
        )
        wanted = set(chunk)
        owned |= {(mpid, message_id) for mpid, message_id, batch_id in rows if batch_id == batch.pk} & wanted
    return owned


def _forget_expired(connection_id: int, message_ids: list[str], window_start: datetime) -> None:
    SeenEvent.objects.filter(
        connection_id=connection_id, source_message_id__in=message_ids, seen_at__lt=window_start
    ).delete()


def _chunks(keys: list[Key]) -> Iterator[list[Key]]:
    for start in range(0, len(keys), CHUNK):
        yield keys[start : start + CHUNK]


def purge_expired() -> int:
    """Delete keys older than the window; return how many went."""
    cutoff = timezone.now() - timedelta(seconds=portal_setting("EVENT_DEDUP_SECONDS"))
    deleted, _ = SeenEvent.objects.filter(seen_at__lt=cutoff).delete()
    return deleted
