"""Routing a stored batch to every active connection that wants some of it.

Routing runs once per batch: the batch row is locked and moved from
received to routed in the same transaction that creates the deliveries and
window items, and a `Routing` row per connection records what went where.

A connection's events are shaped, de-duplicated, encoded and stored
CHUNK_SIZE at a time, and each chunk is let go before the next, so that a
batch of tens of thousands of events needs little more memory than its
parsed body. All chunks run in the one routing transaction.
"""

import logging
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any

from django.db import transaction
from django.db.models import F, Q
from django.utils import timezone

from events import dedup
from events.event_types import RouteType, route_type_of_notification
from events.models import InboundBatch
from integrations import batcher, delivery, jsontext, shaping
from integrations.models import BatchWindow, Connection, Delivery, Routing
from portal import memory, metrics
from portal.conf import portal_setting
from portal.logging import bound_request_id

logger = logging.getLogger(__name__)

# Events shaped, de-duplicated, encoded and stored at once.
CHUNK_SIZE = 500
# After routing a body at least this large, the worker hands the memory it
# freed back to the operating system.
TRIM_AFTER_BYTES = 1_000_000


@dataclass
class RoutedToConnection:
    """The outcome of routing a batch to one connection: its unsaved Routing row and the deliveries it made.

    Only the first `concurrency_limit` pending deliveries are kept, because
    `delivery.enqueue_after_commit` queues no more than those.
    """

    routing: Routing
    to_queue: list[Delivery] = field(default_factory=list)
    created: int = 0

    def add(self, deliveries: list[Delivery], room: int) -> None:
        self.created += len(deliveries)
        for new_delivery in deliveries:
            if new_delivery.status == Delivery.Status.FAILED:
                self.routing.failed_count += new_delivery.event_count
            elif new_delivery.status == Delivery.Status.PENDING and len(self.to_queue) < room:
                self.to_queue.append(new_delivery)


def route_batch(batch_id: int) -> bool:
    """Route the batch if it has not been routed yet; return whether this call routed it."""
    with transaction.atomic():
        batch = InboundBatch.objects.select_for_update().filter(pk=batch_id).first()
        if batch is None or batch.status != InboundBatch.Status.RECEIVED:
            return False
        # The sweeper queues a batch without its request id, which the batch has stored.
        with bound_request_id(batch.request_id) if batch.request_id else nullcontext():
            _route_locked(batch)
    return True


def route_next() -> int | None:
    """Route the oldest received batch that no routing run has started yet; return its id, or None if none is left.

    Batches that another worker has locked are skipped, so several workers
    can route side by side. The run is counted on the batch before routing
    starts, so that a run that kills its worker still counts, and from then
    on this function passes the batch over. A successful run takes the
    count back. A batch whose routing raised keeps the count and the
    error, and the sweeper retries it with `route_batch` after a pause. The
    error is not raised, so the caller can go on with the next batch.
    """
    with transaction.atomic():
        waiting = InboundBatch.objects.filter(status=InboundBatch.Status.RECEIVED, routing_attempts=0)
        batch_id = waiting.select_for_update(skip_locked=True).order_by("pk").values_list("pk", flat=True).first()
        if batch_id is None:
            return None
        InboundBatch.objects.filter(pk=batch_id).update(routing_attempts=F("routing_attempts") + 1)

    try:
        with transaction.atomic():
            batch = InboundBatch.objects.select_for_update().filter(pk=batch_id).first()
            if batch is None or batch.status != InboundBatch.Status.RECEIVED:
                return batch_id
            with bound_request_id(batch.request_id or None):
                _route_locked(batch, run_counted=True)
    except Exception as error:
        record_failed_run(batch_id, error, counted=True)
    return batch_id


def _route_locked(batch: InboundBatch, *, run_counted: bool = False) -> None:
    """Route a batch whose row the current transaction has locked, and mark it routed (or failed if not JSON).

    With `run_counted`, the run was counted in `routing_attempts` when it
    started, and the count is taken back as the batch is marked routed.
    """
    try:
        data = jsontext.parse(batch.body)
    except jsontext.InvalidJSON as error:
        _mark_failed(batch, f"stored body is not JSON: {error}")
        return
    # The parsed body contains all that routing needs, and the stored text is not saved again.
    del batch.body

    routings: list[Routing] = []
    to_queue: list[Delivery] = []
    created = 0
    for connection in connections_for(batch):
        routed = route_to_connection(batch, data, connection)
        routings.append(routed.routing)
        to_queue += routed.to_queue
        created += routed.created
    Routing.objects.bulk_create(routings)

    batch.status = InboundBatch.Status.ROUTED
    batch.routed_at = timezone.now()
    batch.event_count = len(shaping.batch_events(data))
    updated = ["status", "routed_at", "event_count"]
    if run_counted:
        batch.routing_attempts = F("routing_attempts") - 1
        updated.append("routing_attempts")
    batch.save(update_fields=updated)
    delivery.enqueue_after_commit(to_queue)
    if batch.body_bytes >= TRIM_AFTER_BYTES:
        transaction.on_commit(memory.release_free_memory)

    logger.info("router.routed", extra={"batch_id": batch.pk, "deliveries": created})


def connections_for(batch: InboundBatch) -> list[Connection]:
    """Return the active connections that take batches from the batch's feed."""
    return list(
        Connection.objects.filter(active=True)
        .filter(Q(feeds__isnull=True) | Q(feeds=batch.feed_id))
        .distinct()
        .order_by("pk")
    )


def route_to_connection(batch: InboundBatch, data: dict[str, Any], connection: Connection) -> RoutedToConnection:
    """Shape the batch for one connection and store what it receives; return its Routing row, not yet saved."""
    settings = connection.shaping_settings()
    shaped = shaping.shape_batch_without_events(data, settings)
    routed = RoutedToConnection(Routing(batch=batch, connection=connection))

    if shaping.is_alias_request(data) or shaped.send_without_events:
        metrics.count_filtered(connection.name, data, [])
        if shaped.has_content:
            routed.add(_route_whole_body(batch, data, connection, shaped), connection.concurrency_limit)
            routed.routing.routed_count = len(shaped.notifications) or 1
    else:
        _route_events(batch, data, connection, settings, shaped, routed)

    routed.routing.filtered_count = sum(shaped.filtered.values())
    routed.routing.filter_reasons = dict(shaped.filtered)
    metrics.count_routed(connection.name, shaped)
    return routed


def _route_events(
    batch: InboundBatch,
    data: dict[str, Any],
    connection: Connection,
    settings: shaping.ShapingSettings,
    shaped: shaping.ShapedBatch,
    routed: RoutedToConnection,
) -> None:
    """Route the batch's events to the connection chunk by chunk, then its consent notifications.

    Adds the filter reasons to `shaped` and the counts to `routed.routing`.
    With one POST per event, the notifications ride in every body and are
    counted in the first one. They get a body of their own only when none
    of the batch's events could be encoded.
    """
    events = shaping.batch_events(data)
    room = connection.concurrency_limit
    window: BatchWindow | None = None
    plan: shaping.PayloadPlan | None = None
    notification_types = [_notification_type(n) for n in shaped.notifications]
    fresh_count = encoded_count = 0
    for start in range(0, len(events), CHUNK_SIZE):
        chunk, filtered = shaping.shape_events(data, settings, start, start + CHUNK_SIZE)
        shaped.filtered.update(filtered)
        _count_filtered(connection, events[start : start + CHUNK_SIZE], start, chunk)
        fresh, duplicates = dedup.split_duplicates(connection.pk, batch, data, chunk)
        del chunk
        routed.routing.duplicate_count += duplicates
        fresh_count += len(fresh)
        metrics.count_routed(connection.name, shaping.ShapedBatch(envelope={}, events=fresh))
        encoded, unsendable = shaping.encode_events(fresh)
        del fresh
        encoded_count += len(encoded)
        routed.add(delivery.record_unsendable(connection, unsendable, batch=batch), room)
        if not encoded:
            continue
        if connection.send_as_batch:
            window = window or batcher.open_window(connection, _window_key(batch, data))
            batcher.add_items(window, batch, encoded, [])
            continue
        if len(events) > CHUNK_SIZE:
            # Only a later chunk needs to know whether this one made the body that counts the notifications.
            plan = plan or shaping.PayloadPlan(shaped.envelope, portal_setting("MAX_PAYLOAD_BYTES"), one_per_event=True)
            makes_body = any(plan.fits(len(shaped_event.body)) for shaped_event in encoded)
        else:
            makes_body = True
        deliveries = delivery.create_deliveries(
            connection,
            shaped.envelope,
            encoded,
            batch=batch,
            one_per_event=True,
            notification_types=notification_types,
        )
        routed.add(deliveries, room)
        if makes_body:
            notification_types = []

    if not (fresh_count or shaped.notifications):
        return
    routed.routing.routed_count = fresh_count + len(shaped.notifications)
    if connection.send_as_batch:
        if window is None:
            batcher.collect(connection, batch, _window_key(batch, data), [], shaped.notifications)
        else:
            batcher.add_items(window, batch, [], shaped.notifications)
    elif not encoded_count and shaped.notifications:
        deliveries = delivery.create_deliveries(
            connection,
            shaped.envelope,
            [],
            batch=batch,
            one_per_event=True,
            notification_types=notification_types,
        )
        routed.add(deliveries, room)


def _count_filtered(connection: Connection, events: list[Any], start: int, routed: list[shaping.ShapedEvent]) -> None:
    """Count the filtered events of one chunk that starts at index `start` of the batch."""
    metrics.count_filtered(
        connection.name, {"events": events}, [replace(shaped, index=shaped.index - start) for shaped in routed]
    )


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


def record_failed_run(batch_id: int, error: BaseException, *, counted: bool = False) -> None:
    """Count a routing run that raised; after MAX_ROUTING_ATTEMPTS the batch is failed with the error shown.

    `counted` means the run was already counted when it started. The log
    record carries the request id stored with the batch.
    """
    reason = f"routing failed: {error.__class__.__name__}: {error}"[:1000]
    received = InboundBatch.objects.filter(pk=batch_id, status=InboundBatch.Status.RECEIVED)
    if counted:
        received.update(error=reason)
    else:
        received.update(routing_attempts=F("routing_attempts") + 1, error=reason)
    failed = received.filter(routing_attempts__gte=MAX_ROUTING_ATTEMPTS).update(status=InboundBatch.Status.FAILED)
    request_id = InboundBatch.objects.filter(pk=batch_id).values_list("request_id", flat=True).first()
    with bound_request_id(request_id) if request_id else nullcontext():
        logger.error("router.run_failed", extra={"batch_id": batch_id, "reason": reason, "gave_up": bool(failed)})


def sweep_unrouted(grace_seconds: float) -> list[int]:
    """Return the ids of batches stored more than `grace_seconds` ago and still not routed."""
    cutoff = timezone.now() - timedelta(seconds=grace_seconds)
    return list(
        InboundBatch.objects.filter(status=InboundBatch.Status.RECEIVED, received_at__lt=cutoff).values_list(
            "pk", flat=True
        )[:1000]
    )
