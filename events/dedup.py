"""De-duplication of events that mParticle's SDKs upload twice.

A repeated event arrives in a new batch with a new `batch_id`,
`source_request_id` and `event_id`, but the same `mpid` and
`source_message_id`. The key is (connection, mpid, source_message_id), kept
for `PORTAL_EVENT_DEDUP_SECONDS` (24 hours by default). An event without a
`source_message_id`, or in a batch without an `mpid`, is never treated as a
duplicate.
"""

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from django.db.models import Q
from django.utils import timezone

from events.models import InboundBatch, SeenEvent
from portal.conf import portal_setting


def event_key(batch: dict[str, Any], event: Any) -> tuple[str, str] | None:
    """Return the (mpid, source_message_id) key of an event, or None when it has none."""
    mpid = batch.get("mpid")
    data = event.get("data") if isinstance(event, dict) else None
    message_id = data.get("source_message_id") if isinstance(data, dict) else None
    if mpid is None or mpid == "" or not isinstance(message_id, str) or not message_id:
        return None
    return str(mpid)[:64], message_id[:200]


def split_duplicates(
    connection_id: int, batch: InboundBatch, data: dict[str, Any], events: Sequence[Any]
) -> tuple[list[Any], int]:
    """Return the events not seen by this connection within the window, and how many were duplicates.

    The first sighting of each key is recorded, so a repeat in the same batch is a duplicate too.
    """
    window_start = timezone.now() - timedelta(seconds=portal_setting("EVENT_DEDUP_SECONDS"))
    keys = [event_key(data, getattr(shaped, "event", shaped)) for shaped in events]
    wanted = {key for key in keys if key is not None}
    if not wanted:
        return list(events), 0

    seen = _recently_seen(connection_id, wanted, window_start)
    fresh: list[Any] = []
    new_keys: dict[tuple[str, str], None] = {}
    duplicates = 0
    for shaped, key in zip(events, keys, strict=True):
        if key is not None and (key in seen or key in new_keys):
            duplicates += 1
            continue
        if key is not None:
            new_keys[key] = None
        fresh.append(shaped)
    _remember(connection_id, batch, list(new_keys), window_start)
    return fresh, duplicates


def _recently_seen(connection_id: int, keys: set[tuple[str, str]], window_start: Any) -> set[tuple[str, str]]:
    message_ids = {message_id for _, message_id in keys}
    rows = SeenEvent.objects.filter(
        connection_id=connection_id, source_message_id__in=message_ids, seen_at__gte=window_start
    ).values_list("mpid", "source_message_id")
    return {row for row in rows if row in keys}


def _remember(connection_id: int, batch: InboundBatch, keys: list[tuple[str, str]], window_start: Any) -> None:
    if not keys:
        return
    stale = Q()
    for mpid, message_id in keys:
        stale |= Q(mpid=mpid, source_message_id=message_id)
    SeenEvent.objects.filter(stale, connection_id=connection_id, seen_at__lt=window_start).delete()
    SeenEvent.objects.bulk_create(
        [SeenEvent(connection_id=connection_id, mpid=m, source_message_id=s, batch=batch) for m, s in keys],
        ignore_conflicts=True,
    )


def purge_expired() -> int:
    """Delete keys older than the window; return how many went."""
    cutoff = timezone.now() - timedelta(seconds=portal_setting("EVENT_DEDUP_SECONDS"))
    deleted, _ = SeenEvent.objects.filter(seen_at__lt=cutoff).delete()
    return deleted
