"""Creating deliveries and carrying them out: claim, POST, record, decide.

The delivery row is the source of truth; the broker only wakes workers. A
worker claims a delivery with a compare-and-set update (pending or due
retry → in flight, with a lease), so a task handed out twice, or run by two
workers, POSTs once. The sweeper re-queues due retries and deliveries whose
lease ran out because their worker died, so no retry depends on a
countdown held in worker memory.
"""

import logging
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta
from functools import partial

from django.db import transaction
from django.db.models import F, Q, QuerySet
from django.utils import timezone

from events.models import InboundBatch
from integrations import protection, retry_policy, shaping
from integrations.models import BatchWindow, Connection, Delivery, DeliveryAttempt
from integrations.retry_policy import RetryPolicy
from integrations.secrets import mask_secret
from integrations.transport import Outcome, post_json
from portal.conf import portal_setting

logger = logging.getLogger(__name__)

CLAIMABLE = (Delivery.Status.PENDING, Delivery.Status.RETRY_SCHEDULED)
# Retries due sooner than this are also queued with a countdown, so that they
# run on time without waiting for the next sweep.
COUNTDOWN_LIMIT_SECONDS = 300


def _enqueue(delivery_ids: Iterable[int], countdown: float | None = None) -> None:
    from integrations.tasks import deliver

    for delivery_id in delivery_ids:
        deliver.apply_async((delivery_id,), countdown=countdown or 0)


def enqueue_after_commit(deliveries: Sequence[Delivery]) -> None:
    """Queue a delivery task for each pending delivery once the current transaction commits."""
    ids = [delivery.pk for delivery in deliveries if delivery.status == Delivery.Status.PENDING]
    if ids:
        transaction.on_commit(lambda: _enqueue(ids))


def create_deliveries(
    connection: Connection,
    envelope: dict[str, object],
    events: Sequence[shaping.ShapedEvent],
    *,
    batch: InboundBatch | None = None,
    window: BatchWindow | None = None,
    one_per_event: bool = False,
    notification_types: Sequence[str] = (),
) -> list[Delivery]:
    """Store the POST bodies for `events` under `envelope`, and failed records for what cannot be sent.

    An empty `events` gives one body with an empty events list. The consent
    notifications in the envelope ride in every body but are counted once,
    in the first, so that routed = delivered + pending + failed holds.
    """
    try:
        payloads = shaping.build_payloads(
            envelope, events, portal_setting("MAX_PAYLOAD_BYTES"), one_per_event=one_per_event
        )
    except (UnicodeEncodeError, TypeError, ValueError) as error:
        reason = f"batch envelope not representable as UTF-8 JSON: {error.__class__.__name__}"
        return [_failed_record(connection, batch, window, list(events), reason)]

    deliveries = [
        Delivery(
            connection=connection,
            batch=batch,
            window=window,
            payload=body.decode("utf-8"),
            event_count=len(included),
            event_types=sorted({shaped.route_type for shaped in included}),
        )
        for body, included in payloads.bodies
    ]
    if deliveries and notification_types:
        deliveries[0].event_count += len(notification_types)
        deliveries[0].event_types = sorted({*deliveries[0].event_types, *notification_types})
    Delivery.objects.bulk_create(deliveries)
    for shaped in payloads.too_large:
        reason = f"too large: event {shaped.index} alone exceeds {portal_setting('MAX_PAYLOAD_BYTES')} bytes"
        deliveries.append(_failed_record(connection, batch, window, [shaped], reason))
    return deliveries


def create_body_delivery(
    connection: Connection, body: bytes, batch: InboundBatch, route_type: str, counted: int = 1
) -> Delivery:
    """Store a body that is sent whole (an alias request or an eventless batch), or a failed record if too large.

    `counted` is how many routed items the body stands for in the accounting.
    """
    limit = portal_setting("MAX_PAYLOAD_BYTES")
    if len(body) > limit:
        failed = _failed_record(connection, batch, None, [], f"too large: {len(body)} bytes exceeds {limit}")
        Delivery.objects.filter(pk=failed.pk).update(event_count=counted, event_types=[route_type])
        failed.event_count = counted
        return failed
    return Delivery.objects.create(
        connection=connection,
        batch=batch,
        payload=body.decode("utf-8"),
        event_count=counted,
        event_types=[route_type],
    )


def record_unsendable(
    connection: Connection,
    failures: Sequence[tuple[shaping.ShapedEvent, str]],
    *,
    batch: InboundBatch | None = None,
    window: BatchWindow | None = None,
) -> list[Delivery]:
    """Store a failed delivery for each event that cannot be encoded, with the reason."""
    return [_failed_record(connection, batch, window, [shaped], reason) for shaped, reason in failures]


def _failed_record(
    connection: Connection,
    batch: InboundBatch | None,
    window: BatchWindow | None,
    events: Sequence[shaping.ShapedEvent],
    reason: str,
) -> Delivery:
    logger.warning("delivery.unsendable connection=%s batch=%s reason=%s", connection.pk, batch and batch.pk, reason)
    return Delivery.objects.create(
        connection=connection,
        batch=batch,
        window=window,
        event_count=len(events),
        event_types=sorted({shaped.route_type for shaped in events}),
        status=Delivery.Status.FAILED,
        last_error=reason,
    )


def claim(delivery_id: int) -> Delivery | None:
    """Take the delivery for one attempt, or return None when it is not due or another worker has it."""
    now = timezone.now()
    lease = timedelta(seconds=portal_setting("LEASE_SECONDS"))
    claimed = (
        Delivery.objects.filter(pk=delivery_id, status__in=CLAIMABLE)
        .filter(Q(next_attempt_at__isnull=True) | Q(next_attempt_at__lte=now))
        .update(status=Delivery.Status.IN_FLIGHT, lease_expires_at=now + lease, attempt_count=F("attempt_count") + 1)
    )
    if not claimed:
        return None
    return Delivery.objects.select_related("connection").get(pk=delivery_id)


def attempt_headers(delivery: Delivery) -> dict[str, str]:
    headers = {"X-Delivery-Id": str(delivery.uuid)}
    if delivery.connection.authorization:
        headers["Authorization"] = delivery.connection.authorization
    return headers


def deliver(delivery_id: int, send: Callable[..., Outcome] = post_json) -> Delivery | None:
    """Make one attempt at a delivery if it is due and its connection admits it; record it and decide what follows."""
    delivery = claim(delivery_id)
    if delivery is None:
        return None

    started_at = timezone.now()
    postpone_to = protection.admit(delivery.connection, delivery, started_at)
    if postpone_to is not None:
        postpone(delivery, postpone_to)
        return delivery

    outcome = send(
        delivery.connection.post_url,
        delivery.payload.encode("utf-8"),
        attempt_headers(delivery),
        connect_timeout=portal_setting("CONNECT_TIMEOUT_SECONDS"),
        total_timeout=portal_setting("TOTAL_TIMEOUT_SECONDS"),
        verify=portal_setting("CA_BUNDLE") or True,
    )
    decision = decide(delivery, outcome, started_at)

    record_attempt(delivery, outcome, started_at, decision)
    protection.after_attempt(delivery.connection, outcome.status_code, decision.delivered, decision.retry_in)
    return delivery


def decide(delivery: Delivery, outcome: Outcome, now: datetime) -> retry_policy.Decision:
    """Apply the retry policy, except that a status that pauses the connection holds the delivery for later."""
    if outcome.status_code in protection.PAUSING_STATUS:
        return retry_policy.Decision(delivered=False, retry_in=0.0, reason=retry_policy.describe(outcome))
    age = (now - (delivery.replayed_at or delivery.created_at)).total_seconds()
    attempts = delivery.attempt_count - delivery.attempts_before_replay
    return retry_policy.decide(outcome, attempts, policy_for(delivery.connection), now=now, age_seconds=age)


def policy_for(connection: Connection) -> RetryPolicy:
    return RetryPolicy(
        max_attempts=connection.max_attempts,
        base_seconds=portal_setting("RETRY_BASE_SECONDS"),
        max_seconds=portal_setting("RETRY_MAX_SECONDS"),
        max_age_seconds=connection.max_age_seconds,
    )


def postpone(delivery: Delivery, until: datetime) -> None:
    """Give back a claimed delivery unsent, due again at `until`; the claim's attempt is not counted."""
    Delivery.objects.filter(
        pk=delivery.pk, status=Delivery.Status.IN_FLIGHT, attempt_count=delivery.attempt_count
    ).update(
        status=Delivery.Status.RETRY_SCHEDULED,
        next_attempt_at=until,
        attempt_count=F("attempt_count") - 1,
        lease_expires_at=None,
    )
    delay = (until - timezone.now()).total_seconds()
    if delay <= COUNTDOWN_LIMIT_SECONDS:
        _enqueue([delivery.pk], countdown=max(delay, 0.0))


def enqueue_waiting(connection: Connection, limit: int = 1000) -> int:
    """Make the connection's waiting deliveries due now and queue up to `limit`; the sweeper queues the rest."""
    now = timezone.now()
    waiting = Delivery.objects.filter(connection=connection, status__in=CLAIMABLE)
    waiting.update(next_attempt_at=now)
    ids = list(waiting.order_by("pk").values_list("pk", flat=True)[:limit])
    _enqueue(ids)
    return len(ids)


def replay(deliveries: QuerySet[Delivery]) -> int:
    """Queue failed or cancelled deliveries again with a fresh attempt budget; return how many.

    Works on the whole queryset, not a page of it, in chunks.
    """
    replayable = deliveries.filter(status__in=(Delivery.Status.FAILED, Delivery.Status.CANCELLED)).exclude(payload="")
    total = 0
    while True:
        ids = list(replayable.order_by("pk").values_list("pk", flat=True)[:1000])
        if not ids:
            return total
        now = timezone.now()
        Delivery.objects.filter(pk__in=ids).update(
            status=Delivery.Status.PENDING,
            attempts_before_replay=F("attempt_count"),
            replayed_at=now,
            next_attempt_at=None,
            last_error="",
        )
        transaction.on_commit(partial(_enqueue, ids))
        total += len(ids)


def record_attempt(delivery: Delivery, outcome: Outcome, started_at: datetime, decision: retry_policy.Decision) -> None:
    """Store the attempt and move the delivery to its next state, if this worker still holds it."""
    now = timezone.now()
    updates: dict[str, object] = {"last_status_code": outcome.status_code, "lease_expires_at": None}
    if decision.delivered:
        updates |= {"status": Delivery.Status.DELIVERED, "delivered_at": now, "last_error": ""}
    elif decision.retry_in is not None:
        next_at = now + timedelta(seconds=decision.retry_in)
        updates |= {
            "status": Delivery.Status.RETRY_SCHEDULED,
            "next_attempt_at": next_at,
            "last_error": decision.reason,
        }
    else:
        updates |= {"status": Delivery.Status.FAILED, "last_error": decision.reason}

    with transaction.atomic():
        DeliveryAttempt.objects.create(
            delivery=delivery,
            number=delivery.attempt_count,
            started_at=started_at,
            duration_ms=outcome.duration_ms,
            status_code=outcome.status_code,
            error="" if decision.delivered else decision.reason,
            response_excerpt=redact(outcome.response_excerpt, delivery.connection),
        )
        Delivery.objects.filter(
            pk=delivery.pk, status=Delivery.Status.IN_FLIGHT, attempt_count=delivery.attempt_count
        ).update(**updates)
        delivery.status = str(updates["status"])
        _update_connection_health(delivery.connection, decision, now)

    _log_attempt(delivery, outcome, decision)
    if decision.retry_in is not None and decision.retry_in <= COUNTDOWN_LIMIT_SECONDS:
        delivery_id = delivery.pk
        transaction.on_commit(lambda: _enqueue([delivery_id], countdown=decision.retry_in))


def _update_connection_health(connection: Connection, decision: retry_policy.Decision, now: datetime) -> None:
    if decision.delivered:
        Connection.objects.filter(pk=connection.pk).update(last_success_at=now)
    else:
        Connection.objects.filter(pk=connection.pk).update(last_error_at=now, last_error=decision.reason[:500])


def _log_attempt(delivery: Delivery, outcome: Outcome, decision: retry_policy.Decision) -> None:
    level = logging.INFO if decision.delivered else logging.WARNING
    logger.log(
        level,
        "delivery.attempt connection=%s delivery=%s attempt=%s status=%s duration_ms=%s outcome=%s",
        delivery.connection_id,
        delivery.uuid,
        delivery.attempt_count,
        outcome.status_code,
        outcome.duration_ms,
        "delivered" if decision.delivered else ("retry" if decision.retry_in is not None else "failed"),
    )


def redact(text: str, connection: Connection) -> str:
    """Remove the connection's secrets from text received from its server."""
    for secret in (connection.authorization, connection.post_url):
        if secret and len(secret) >= 4:
            text = text.replace(secret, mask_secret(secret))
    return text


def sweep() -> int:
    """Re-queue due retries, stranded pending deliveries and expired leases; return how many were queued.

    A lease expires when its worker died mid-attempt. That attempt counts,
    so a delivery whose attempts are used up is failed instead.
    """
    now = timezone.now()
    expired = Delivery.objects.filter(status=Delivery.Status.IN_FLIGHT, lease_expires_at__lt=now)
    exhausted = F("attempts_before_replay") + F("connection__max_attempts")
    expired.filter(attempt_count__gte=exhausted).update(
        status=Delivery.Status.FAILED, last_error="worker lost during the last attempt", lease_expires_at=None
    )
    expired.update(status=Delivery.Status.RETRY_SCHEDULED, next_attempt_at=now, lease_expires_at=None)

    grace = now - timedelta(seconds=portal_setting("REQUEUE_AFTER_SECONDS"))
    due = Delivery.objects.filter(
        Q(status=Delivery.Status.RETRY_SCHEDULED, next_attempt_at__lte=now)
        | Q(status=Delivery.Status.PENDING, created_at__lt=grace)
    ).values_list("pk", flat=True)[:1000]
    ids = list(due)
    _enqueue(ids)
    return len(ids)
