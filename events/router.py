"""Routing a stored batch to every active connection that wants some of it.

Routing runs once per batch: the batch row is locked and moved from
received to routed in the same transaction that creates the deliveries and
window items, and a `Routing` row per connection records what went where.
"""

import logging
from datetime import timedelta
from typing import Any

from django.db import transaction
from django.db.models import F, Q
from django.utils import timezone

from events import dedup
from events.event_types import RouteType, route_type_of_notification
from events.models import InboundBatch
from integrations import batcher, delivery, jsontext, shaping
from integrations.models import Connection, Delivery, Routing
from portal import metrics

logger = logging.getLogger(__name__)


def route_batch(batch_id: int) -> bool:
    """Route the batch if it has not been routed yet; return whether this call routed it."""
    with transaction.atomic():
        batch = InboundBatch.objects.select_for_update().filter(pk=batch_id).first()
        if batch is None or batch.status != InboundBatch.Status.RECEIVED:
            return False

        try:
            data = jsontext.parse(batch.body)
        except jsontext.InvalidJSON as error:
            _mark_failed(batch, f"stored body is not JSON: {error}")
            return True

        deliveries: list[Delivery] = []
        for connection in connections_for(batch):
            deliveries += route_to_connection(batch, data, connection)

        batch.status = InboundBatch.Status.ROUTED
        batch.routed_at = timezone.now()
        batch.event_count = len(shaping.batch_events(data))
        batch.save(update_fields=["status", "routed_at", "event_count"])
        delivery.enqueue_after_commit(deliveries)

    logger.info("router.routed", extra={"batch_id": batch.pk, "deliveries": len(deliveries)})
    return True


def connections_for(batch: InboundBatch) -> list[Connection]:
    """Return the active connections that take batches from the batch's feed."""
    return list(
        Connection.objects.filter(active=True)
        .filter(Q(feeds__isnull=True) | Q(feeds=batch.feed_id))
        .distinct()
        .order_by("pk")
    )


def route_to_connection(batch: InboundBatch, data: dict[str, Any], connection: Connection) -> list[Delivery]:
    """Shape the batch for one connection and store what it receives; return new deliveries."""
    shaped = shaping.shape_batch(data, connection.shaping_settings())
    metrics.count_filtered(connection.name, data, shaped.events)
    shaped.events, duplicates = dedup.split_duplicates(connection.pk, batch, data, shaped.events)
    routing = Routing(
        duplicate_count=duplicates,
        batch=batch,
        connection=connection,
        filtered_count=sum(shaped.filtered.values()),
        filter_reasons=dict(shaped.filtered),
    )
    deliveries: list[Delivery] = []

    if shaping.is_alias_request(data) or (shaped.send_without_events and not shaped.events):
        if shaped.has_content:
            deliveries = _route_whole_body(batch, data, connection, shaped)
            routing.routed_count = len(shaped.notifications) or 1
    elif shaped.has_content:
        encoded, unsendable = shaping.encode_events(shaped.events)
        deliveries = delivery.record_unsendable(connection, unsendable, batch=batch)
        routing.routed_count = len(shaped.events) + len(shaped.notifications)
        if connection.send_as_batch:
            batcher.collect(connection, batch, _window_key(batch, data), encoded, shaped.notifications)
        elif encoded or shaped.notifications:
            deliveries += delivery.create_deliveries(
                connection,
                shaped.envelope,
                encoded,
                batch=batch,
                one_per_event=True,
                notification_types=[_notification_type(n) for n in shaped.notifications],
            )

    routing.failed_count = sum(d.event_count for d in deliveries if d.status == Delivery.Status.FAILED)
    routing.save()
    metrics.count_routed(connection.name, shaped)
    return deliveries


def _route_whole_body(
    batch: InboundBatch, data: dict[str, Any], connection: Connection, shaped: shaping.ShapedBatch
) -> list[Delivery]:
    """Route an alias request or a batch that arrived without events: sent whole, never per event."""
    if connection.send_as_batch and not shaping.is_alias_request(data):
        batcher.collect(connection, batch, _window_key(batch, data), [], shaped.notifications)
        return []
    route_type = RouteType.OTHER if shaping.is_alias_request(data) else "batch_without_events"
    try:
        body = shaping.encode_whole(shaped.envelope)
    except (UnicodeEncodeError, TypeError, ValueError) as error:
        reason = f"body not representable as UTF-8 JSON: {error.__class__.__name__}"
        return delivery.record_unsendable(connection, [(shaping.ShapedEvent(0, route_type, None), reason)], batch=batch)
    counted = len(shaped.notifications) or 1
    return [delivery.create_body_delivery(connection, body, batch, route_type, counted)]


def _notification_type(notification: Any) -> str:
    return str(route_type_of_notification(notification.get("type")))


def _window_key(batch: InboundBatch, data: dict[str, Any]) -> str:
    """Return the Send as Batch key; a batch without device or user ids gets a window of its own."""
    return shaping.device_key(data) or f"batch:{batch.pk}"


def _mark_failed(batch: InboundBatch, reason: str) -> None:
    batch.status = InboundBatch.Status.FAILED
    batch.error = reason
    batch.save(update_fields=["status", "error"])
    logger.error("router.failed", extra={"batch_id": batch.pk, "reason": reason})


# Failed routing runs after which a batch is marked failed.
MAX_ROUTING_ATTEMPTS = 5


def record_failed_run(batch_id: int, error: BaseException) -> None:
    """Count a routing run that raised; after MAX_ROUTING_ATTEMPTS the batch is failed with the error shown."""
    reason = f"routing failed: {error.__class__.__name__}: {error}"[:1000]
    InboundBatch.objects.filter(pk=batch_id, status=InboundBatch.Status.RECEIVED).update(
        routing_attempts=F("routing_attempts") + 1, error=reason
    )
    failed = InboundBatch.objects.filter(
        pk=batch_id, status=InboundBatch.Status.RECEIVED, routing_attempts__gte=MAX_ROUTING_ATTEMPTS
    ).update(status=InboundBatch.Status.FAILED)
    logger.error("router.run_failed", extra={"batch_id": batch_id, "reason": reason, "gave_up": bool(failed)})


def sweep_unrouted(grace_seconds: float) -> list[int]:
    """Return the ids of batches stored more than `grace_seconds` ago and still not routed."""
    cutoff = timezone.now() - timedelta(seconds=grace_seconds)
    return list(
        InboundBatch.objects.filter(status=InboundBatch.Status.RECEIVED, received_at__lt=cutoff).values_list(
            "pk", flat=True
        )[:1000]
    )
