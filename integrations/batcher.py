"""Send as Batch: collect a device's events per connection and send them when the window closes.

A window opens with a device's first routed event and closes
`batch_window_seconds` later. Flushing claims the window with a
compare-and-set update (open → flushed), so two beat schedulers or two
workers never send one window twice. The flushed batch contains the events in
arrival order under the envelope of the newest inbound batch in the window.
"""

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from itertools import groupby
from typing import Any

from django.db import connection as db
from django.db import transaction
from django.db.models import Case, IntegerField, QuerySet, Value, When
from django.utils import timezone

from events.event_types import route_type_of_notification
from events.models import InboundBatch
from integrations import delivery, jsontext, shaping
from integrations.models import BatchWindow, Connection, Delivery, WindowItem
from portal.conf import portal_setting

logger = logging.getLogger(__name__)

# Window items handed to `create_deliveries` at once while a window is flushed.
CHUNK_SIZE = 500
# Windows claimed and flushed in one transaction by `flush_due_windows`.
FLUSH_GROUP = 100
# Newest batches read from the database at once while windows with many items are flushed.
BODIES_PER_FETCH = 10
# Above this many items in one flush, items and bodies are read through a cursor, part by part.
STREAM_ABOVE_ITEMS = 2000


def open_window(connection: Connection, device_key: str) -> BatchWindow:
    """Return the device's open window for the connection, opening one if there is none.

    Call inside a transaction. One INSERT ... ON CONFLICT either opens the
    window or locks the open one, and the row lock makes a concurrent flush
    wait until the items added here are committed. Django's bulk_create
    cannot name the partial unique constraint, hence the SQL.
    """
    ops = db.ops
    table = ops.quote_name(BatchWindow._meta.db_table)
    open_status = BatchWindow.Status.OPEN.value
    now = timezone.now()
    closes_at = now + timedelta(seconds=connection.batch_window_seconds)
    sql = (
        f"INSERT INTO {table} (connection_id, device_key, status, opened_at, closes_at) "
        f"VALUES (%s, %s, '{open_status}', %s, %s) "
        f"ON CONFLICT (connection_id, device_key) WHERE status = '{open_status}' "
        "DO UPDATE SET device_key = excluded.device_key "
        f"RETURNING {_window_columns()}"
    )
    params = [connection.pk, device_key, ops.adapt_datetimefield_value(now), ops.adapt_datetimefield_value(closes_at)]
    (window,) = BatchWindow.objects.raw(sql, params)
    return window


def _window_columns() -> str:
    return ", ".join(db.ops.quote_name(f.column) for f in BatchWindow._meta.concrete_fields)


def collect(
    connection: Connection,
    batch: InboundBatch,
    device_key: str,
    events: list[shaping.ShapedEvent],
    notifications: list[Any],
) -> BatchWindow:
    """Add a batch's routed events and consent notifications to the device's open window.

    A batch that adds neither leaves an envelope item, so that the window
    sends its envelope.
    """
    window = open_window(connection, device_key)
    if not add_items(window, batch, events, notifications):
        WindowItem.objects.create(window=window, batch=batch, kind=WindowItem.Kind.ENVELOPE, route_type="", body="")
    return window


def add_items(
    window: BatchWindow, batch: InboundBatch, events: list[shaping.ShapedEvent], notifications: list[Any]
) -> int:
    """Add routed events, then consent notifications, to an open window; return how many items were added."""
    items = [
        WindowItem(
            window=window, batch=batch, kind=WindowItem.Kind.EVENT, route_type=e.route_type, body=e.body.decode()
        )
        for e in events
    ]
    items += [
        WindowItem(
            window=window,
            batch=batch,
            kind=WindowItem.Kind.NOTIFICATION,
            route_type=str(route_type_of_notification(notification.get("type"))),
            body=jsontext.encode(notification).decode(),
        )
        for notification in notifications
    ]
    if items:
        WindowItem.objects.bulk_create(items)
    return len(items)


def flush_window(window_id: int) -> list[Delivery]:
    """Send a closed window as one batch (split by size); a window already flushed gives nothing."""
    with transaction.atomic():
        windows = _claim(BatchWindow.objects.filter(pk=window_id))
        flushed = _flush(windows)
        delivery.enqueue_after_commit(flushed.to_queue)
    return flushed.deliveries


def flush_due_windows(limit: int = 1000) -> int:
    """Flush every open window whose time has come, up to `limit`; return how many were flushed.

    Windows are claimed and flushed FLUSH_GROUP at a time, each group in one
    transaction. On PostgreSQL, a window that a router has locked while it
    adds items is left for the next run, so a flush does not wait on routing.
    """
    flushed = 0
    remaining = limit
    while remaining > 0:
        size = min(FLUSH_GROUP, remaining)
        with transaction.atomic():
            due = BatchWindow.objects.filter(status=BatchWindow.Status.OPEN, closes_at__lte=timezone.now())
            windows = _claim(due.order_by("closes_at").select_for_update(skip_locked=True)[:size])
            result = _flush(windows, keep_deliveries=False)
            delivery.enqueue_after_commit(result.to_queue)
        flushed += result.windows_sent
        if len(windows) < size:
            break
        remaining -= size
    return flushed


def _claim(windows: QuerySet[BatchWindow]) -> list[BatchWindow]:
    """Move the open windows among `windows` to flushed with one compare-and-set UPDATE; return those it moved.

    Each returned window carries `newest_batch_id`, the newest batch among its
    items, and `item_count`, the number of its items.
    """
    ops = db.ops
    table = ops.quote_name(BatchWindow._meta.db_table)
    items = ops.quote_name(WindowItem._meta.db_table)
    open_status = BatchWindow.Status.OPEN.value
    chosen, chosen_params = windows.values("pk").query.sql_with_params()
    # The chosen ids are materialized first: PostgreSQL may run an IN subquery with
    # LIMIT and SKIP LOCKED again for each row, and would then claim more windows.
    sql = (
        f"WITH chosen AS MATERIALIZED ({chosen}) "
        f"UPDATE {table} SET status = '{BatchWindow.Status.FLUSHED.value}', flushed_at = %s "
        f"WHERE status = '{open_status}' AND id IN (SELECT * FROM chosen) "
        f"RETURNING {_window_columns()}, "
        f"(SELECT MAX(batch_id) FROM {items} WHERE {items}.window_id = {table}.id) AS newest_batch_id, "
        f"(SELECT COUNT(*) FROM {items} WHERE {items}.window_id = {table}.id) AS item_count"
    )
    params = [*chosen_params, ops.adapt_datetimefield_value(timezone.now())]
    claimed = list(BatchWindow.objects.raw(sql, params))
    claimed.sort(key=lambda window: (window.closes_at, window.pk))
    return claimed


def _newest_batch_id(window: BatchWindow) -> int | None:
    """Return the newest batch among the window's items, as `_claim` read it with the window."""
    newest: int | None = window.__dict__.get("newest_batch_id")
    return newest


def _item_count(window: BatchWindow) -> int:
    """Return the number of the window's items, as `_claim` read it with the window."""
    return int(window.__dict__.get("item_count") or 0)


@dataclass
class _Flushed:
    """The result of flushing some windows: the deliveries, or only those to queue, and the windows that sent any."""

    deliveries: list[Delivery] = field(default_factory=list)
    to_queue: list[Delivery] = field(default_factory=list)
    windows_sent: int = 0


def _flush(windows: list[BatchWindow], *, keep_deliveries: bool = True) -> _Flushed:
    """Create the deliveries of claimed windows, reading their items in one query and in chunks.

    Only each connection's first `concurrency_limit` pending deliveries are
    kept for queueing, which is all that `enqueue_after_commit` queues, unless
    `keep_deliveries` requests all of them.
    """
    result = _Flushed()
    if not windows:
        return result
    connections = Connection.objects.in_bulk({window.connection_id for window in windows})
    # A cursor costs round trips, so only a flush with many items reads through one.
    stream = sum(_item_count(window) for window in windows) > STREAM_ABOVE_ITEMS
    envelopes, batches = _envelopes(windows, connections, stream=stream)
    room = {pk: connection.concurrency_limit for pk, connection in connections.items()}
    items = (
        WindowItem.objects.filter(window__in=[window.pk for window in windows])
        .order_by(
            "window__closes_at",
            "window_id",
            # Notifications and envelope items come first: they complete the envelope.
            Case(When(kind=WindowItem.Kind.EVENT, then=Value(1)), default=Value(0), output_field=IntegerField()),
            # Batches are routed in parallel, so item ids can interleave batches;
            # arrival order is the batch order, then the order within each batch.
            "batch_id",
            "id",
        )
        .values_list("window_id", "kind", "route_type", "body")
    )
    rows: Iterable[tuple[int, str, str, str]] = items.iterator(chunk_size=CHUNK_SIZE) if stream else list(items)
    by_id = {window.pk: window for window in windows}
    for window_id, window_rows in groupby(rows, key=lambda row: row[0]):
        window = by_id[window_id]
        connection = connections[window.connection_id]
        created = _flush_one(window, connection, envelopes[window_id], batches[window_id], window_rows)
        if created:
            result.windows_sent += 1
        for new_delivery in created:
            if new_delivery.status == Delivery.Status.PENDING and room[connection.pk] > 0:
                room[connection.pk] -= 1
                result.to_queue.append(new_delivery)
        if keep_deliveries:
            result.deliveries += created
        logger.info(
            "batcher.flushed",
            extra={"connection_id": window.connection_id, "window_id": window.pk, "deliveries": len(created)},
        )
    return result


def _envelopes(
    windows: list[BatchWindow], connections: dict[int, Connection], *, stream: bool
) -> tuple[dict[int, dict[str, Any]], dict[int, InboundBatch]]:
    """Return each window's envelope, shaped from its newest batch, and that batch, by window id.

    Each stored body is parsed and let go before the next, keeping only the
    envelope without its events.
    """
    waiting: dict[int, list[BatchWindow]] = {}
    for window in windows:
        newest_id = _newest_batch_id(window)
        if newest_id is not None:
            waiting.setdefault(newest_id, []).append(window)
    envelopes: dict[int, dict[str, Any]] = {}
    batches: dict[int, InboundBatch] = {}
    newest = InboundBatch.objects.filter(pk__in=waiting).only("pk", "body").order_by("pk")
    for batch in newest.iterator(chunk_size=BODIES_PER_FETCH) if stream else list(newest):
        data = jsontext.parse(batch.body)
        del batch.body
        for window in waiting[batch.pk]:
            envelope, _ = shaping.shape_envelope(data, connections[window.connection_id].shaping_settings())
            if "events" in envelope:
                # The events list is replaced in every body, so dropping it here changes no output.
                envelope["events"] = []
            envelopes[window.pk] = envelope
            batches[window.pk] = batch
    return envelopes, batches


def _flush_one(
    window: BatchWindow,
    connection: Connection,
    envelope: dict[str, Any],
    newest: InboundBatch,
    items: Iterable[tuple[int, str, str, str]],
) -> list[Delivery]:
    """Create one window's deliveries from its items: notifications and envelope items first, then events."""
    notifications: list[Any] = []
    # Notifications and eventless batches are counted as routed items, like events.
    counted = _CountedOnce([])
    # A window that fits in one chunk is handed over whole, without planning where bodies start.
    split = _item_count(window) > CHUNK_SIZE
    plan: shaping.PayloadPlan | None = None
    envelope_complete = False
    events: list[shaping.ShapedEvent] = []
    created: list[Delivery] = []
    position = 0

    for _, kind, route_type, body in items:
        if kind != WindowItem.Kind.EVENT:
            if kind == WindowItem.Kind.NOTIFICATION:
                notifications.append(jsontext.parse(body))
            counted.types.append(route_type or "batch_without_events")
            continue
        if not envelope_complete:
            _add_notifications(envelope, notifications)
            envelope_complete = True
            if split:
                plan = shaping.PayloadPlan(envelope, portal_setting("MAX_PAYLOAD_BYTES"))

        encoded = body.encode()
        if plan is not None and plan.starts_body(len(encoded)):
            if len(events) >= CHUNK_SIZE:
                created += _create(connection, envelope, events, newest, window, counted)
                events = []
            counted.has_body = True
        events.append(shaping.ShapedEvent(index=position, route_type=route_type, event=None, body=encoded))
        position += 1

    if not envelope_complete:
        _add_notifications(envelope, notifications)
        counted.has_body = True
    created += _create(connection, envelope, events, newest, window, counted)
    return created


@dataclass
class _CountedOnce:
    """The routed notification types of a window, counted in its first body only."""

    types: list[str]
    has_body: bool = False
    done: bool = False


def _create(
    connection: Connection,
    envelope: dict[str, Any],
    events: list[shaping.ShapedEvent],
    newest: InboundBatch,
    window: BatchWindow,
    counted: _CountedOnce,
) -> list[Delivery]:
    """Create the deliveries of one part of a window; the first part that makes a body counts the notifications."""
    types = () if counted.done else counted.types
    created = delivery.create_deliveries(
        connection, envelope, events, batch=newest, window=window, notification_types=types
    )
    counted.done = counted.done or counted.has_body
    counted.has_body = False
    return created


def _add_notifications(envelope: dict[str, Any], notifications: list[Any]) -> None:
    """Put the window's routed notifications in the envelope, after its notifications that are not routed."""
    if notifications:
        kept = envelope.get("system_notifications")
        others = [n for n in kept if route_type_of_notification(_type_of(n)) is None] if isinstance(kept, list) else []
        envelope["system_notifications"] = others + notifications


def _type_of(notification: Any) -> Any:
    return notification.get("type") if isinstance(notification, dict) else None
