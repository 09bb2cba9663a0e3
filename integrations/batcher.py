"""Send as Batch: collect a device's events per connection and send them when the window closes.

A window opens with a device's first routed event and closes
`batch_window_seconds` later. Flushing claims the window with a
compare-and-set update (open → flushed), so two beat schedulers or two
workers never send one window twice. The flushed batch contains the events in
arrival order under the envelope of the newest inbound batch in the window.
"""

import logging
from datetime import timedelta
from typing import Any

from django.db import IntegrityError, transaction
from django.utils import timezone

from events.event_types import route_type_of_notification
from events.models import InboundBatch
from integrations import delivery, jsontext, shaping
from integrations.models import BatchWindow, Connection, Delivery, WindowItem

logger = logging.getLogger(__name__)


def open_window(connection: Connection, device_key: str) -> BatchWindow:
    """Return the device's open window for the connection, opening one if there is none.

    Call inside a transaction. The row lock makes a concurrent flush wait
    until the items added here are committed.
    """
    existing = (
        BatchWindow.objects.select_for_update()
        .filter(connection=connection, device_key=device_key, status=BatchWindow.Status.OPEN)
        .first()
    )
    if existing is not None:
        return existing
    closes_at = timezone.now() + timedelta(seconds=connection.batch_window_seconds)
    try:
        with transaction.atomic():
            return BatchWindow.objects.create(connection=connection, device_key=device_key, closes_at=closes_at)
    except IntegrityError:
        # Another router opened it first.
        return BatchWindow.objects.select_for_update().get(
            connection=connection, device_key=device_key, status=BatchWindow.Status.OPEN
        )


def collect(
    connection: Connection,
    batch: InboundBatch,
    device_key: str,
    events: list[shaping.ShapedEvent],
    notifications: list[Any],
) -> BatchWindow:
    """Add a batch's routed events and consent notifications to the device's open window."""
    window = open_window(connection, device_key)
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
    if not items:
        items = [WindowItem(window=window, batch=batch, kind=WindowItem.Kind.ENVELOPE, route_type="", body="")]
    WindowItem.objects.bulk_create(items)
    return window


def flush_window(window_id: int) -> list[Delivery]:
    """Send a closed window as one batch (split by size); a window already flushed gives nothing."""
    with transaction.atomic():
        claimed = BatchWindow.objects.filter(pk=window_id, status=BatchWindow.Status.OPEN).update(
            status=BatchWindow.Status.FLUSHED, flushed_at=timezone.now()
        )
        if not claimed:
            return []
        window = BatchWindow.objects.select_related("connection").get(pk=window_id)
        deliveries = _build_deliveries(window)
        delivery.enqueue_after_commit(deliveries)
    logger.info(
        "batcher.flushed",
        extra={"connection_id": window.connection_id, "window_id": window.pk, "deliveries": len(deliveries)},
    )
    return deliveries


def _build_deliveries(window: BatchWindow) -> list[Delivery]:
    # Batches are routed in parallel, so item ids can interleave batches;
    # arrival order is the batch order, then the order within each batch.
    items = list(window.items.order_by("batch_id", "id"))
    if not items:
        return []
    newest = InboundBatch.objects.get(pk=max(item.batch_id for item in items))
    settings = window.connection.shaping_settings()
    envelope, _ = shaping.shape_envelope(jsontext.parse(newest.body), settings)

    notifications = [jsontext.parse(item.body) for item in items if item.kind == WindowItem.Kind.NOTIFICATION]
    if notifications:
        kept = envelope.get("system_notifications")
        others = [n for n in kept if route_type_of_notification(_type_of(n)) is None] if isinstance(kept, list) else []
        envelope["system_notifications"] = others + notifications

    events = [
        shaping.ShapedEvent(index=position, route_type=item.route_type, event=None, body=item.body.encode())
        for position, item in enumerate(i for i in items if i.kind == WindowItem.Kind.EVENT)
    ]
    # Notifications and eventless batches are counted as routed items, like events.
    notification_types = [
        item.route_type or "batch_without_events" for item in items if item.kind != WindowItem.Kind.EVENT
    ]
    return delivery.create_deliveries(
        window.connection, envelope, events, batch=newest, window=window, notification_types=notification_types
    )


def _type_of(notification: Any) -> Any:
    return notification.get("type") if isinstance(notification, dict) else None


def flush_due_windows(limit: int = 1000) -> int:
    """Flush every open window whose time has come, up to `limit`; return how many were flushed."""
    due = BatchWindow.objects.filter(status=BatchWindow.Status.OPEN, closes_at__lte=timezone.now())
    flushed = 0
    for window_id in due.order_by("closes_at").values_list("pk", flat=True)[:limit]:
        if flush_window(window_id):
            flushed += 1
    return flushed
