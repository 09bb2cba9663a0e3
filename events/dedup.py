"""De-duplication of events that mParticle's SDKs upload twice.

A repeated event arrives in a new batch with a new `batch_id`,
`source_request_id` and `event_id`, but the same `mpid` and
`source_message_id`. The key is (connection, mpid, source_message_id), kept
for `PORTAL_EVENT_DEDUP_SECONDS` (24 hours by default). An event without a
`source_message_id`, or in a batch without an `mpid`, is never treated as a
duplicate.

Keys are claimed insert-first, with one statement per chunk of keys: an
INSERT ... ON CONFLICT that takes over a key only when it has expired, and
returns the keys it inserted or took over. Two batches routed at the same
moment therefore cannot both claim one event, because the unique constraint
makes the second insert wait for the first transaction. A key that this
batch claimed earlier, in an earlier part of the same routing, is never
taken over again, so a repeat within the batch is a duplicate.
"""

from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta
from typing import Any

from django.db import connection
from django.utils import timezone

from events.models import InboundBatch, SeenEvent
from portal.conf import portal_setting

# Keys per statement, which keeps the parameters of one INSERT under SQLite's limit.
CHUNK = 500
# The columns of a SeenEvent row, in the order the INSERT lists them.
SEEN_EVENT_COLUMNS = ("connection_id", "mpid", "source_message_id", "batch_id", "seen_at")

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
        owned.update(_insert_or_take_over(connection_id, batch.pk, chunk, window_start))
    return owned


def _insert_or_take_over(connection_id: int, batch_id: int, keys: list[Key], window_start: datetime) -> list[Key]:
    """Claim the keys in one statement; return those inserted, or taken over from an expired sighting.

    Sorted keys make concurrent routings lock SeenEvent rows in one order, so
    they cannot deadlock on them. Django's bulk_create cannot express the
    condition on the update nor return only the rows written, hence the SQL.
    """
    ops = connection.ops
    table = ops.quote_name(SeenEvent._meta.db_table)
    columns = [ops.quote_name(name) for name in SEEN_EVENT_COLUMNS]
    connection_col, mpid_col, message_col, batch_col, seen_col = columns
    seen_at = ops.adapt_datetimefield_value(timezone.now())
    rows = ", ".join(["(%s, %s, %s, %s, %s)"] * len(keys))
    params: list[Any] = []
    for mpid, message_id in keys:
        params += [connection_id, mpid, message_id, batch_id, seen_at]
    params += [ops.adapt_datetimefield_value(window_start), batch_id]
    sql = (
        f"INSERT INTO {table} ({', '.join(columns)}) VALUES {rows} "
        f"ON CONFLICT ({connection_col}, {message_col}, {mpid_col}) DO UPDATE "
        f"SET {batch_col} = excluded.{batch_col}, {seen_col} = excluded.{seen_col} "
        f"WHERE {table}.{seen_col} < %s AND {table}.{batch_col} <> %s "
        f"RETURNING {mpid_col}, {message_col}"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return [(mpid, message_id) for mpid, message_id in cursor.fetchall()]


def _chunks(keys: list[Key]) -> Iterator[list[Key]]:
    for start in range(0, len(keys), CHUNK):
        yield keys[start : start + CHUNK]


def purge_expired() -> int:
    """Delete keys older than the window; return how many went."""
    cutoff = timezone.now() - timedelta(seconds=portal_setting("EVENT_DEDUP_SECONDS"))
    deleted, _ = SeenEvent.objects.filter(seen_at__lt=cutoff).delete()
    return deleted
