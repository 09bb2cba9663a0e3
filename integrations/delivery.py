"""Creating deliveries and carrying them out: claim, POST, record, decide.

The delivery row is the source of truth; the broker only wakes workers. A
worker claims a delivery with a compare-and-set update (pending or due
retry → in flight, with a lease), so a task handed out twice, or run by two
workers, POSTs once. The sweeper re-queues due retries and deliveries whose
lease ran out because their worker died, so no retry depends on a
countdown held in worker memory.
"""

import logging
import uuid
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta
from functools import partial
from urllib.parse import parse_qsl, urlsplit

from django.db import transaction
from django.db.models import F, Q, QuerySet
from django.utils import timezone

from events.models import InboundBatch
from integrations import jsontext, protection, retry_policy, shaping
from integrations.models import BatchWindow, Connection, Delivery, DeliveryAttempt
from integrations.retry_policy import RetryPolicy
from integrations.secrets import mask_secret
from integrations.transport import Outcome, post_json
from portal import metrics
from portal.conf import portal_setting

logger = logging.getLogger(__name__)

CLAIMABLE = (Delivery.Status.PENDING, Delivery.Status.RETRY_SCHEDULED)
LOST_ATTEMPT = "worker lost during the attempt; the POST may have reached Qualtrics"
# Retries due sooner than this are also queued with a countdown, so that they
# run on time without waiting for the next sweep.
COUNTDOWN_LIMIT_SECONDS = 300


def _enqueue(delivery_ids: Iterable[int], countdown: float | None = None) -> None:
    """Queue a task per delivery; one that cannot be queued is logged, and the sweeper queues it later."""
    from integrations.tasks import deliver

    for delivery_id in delivery_ids:
        try:
            deliver.apply_async((delivery_id,), countdown=countdown or 0)
        except Exception:
            logger.exception("delivery.enqueue_failed", extra={"delivery_id": delivery_id})


def enqueue_after_commit(deliveries: Sequence[Delivery]) -> None:
    """Queue one task per connection with new pending deliveries, once the current transaction commits.

    The task sends the connection's due deliveries in chunks and starts
    further tasks, up to the concurrency limit, while a backlog remains
    (see `integrations.runs`), so a large batch does not flood the broker.
    """
    first_per_connection: dict[int, int] = {}
    for delivery in deliveries:
        if delivery.status == Delivery.Status.PENDING:
            first_per_connection.setdefault(delivery.connection_id, delivery.pk)
    ids = list(first_per_connection.values())
    if ids:
        transaction.on_commit(lambda: _enqueue(ids))


def _in_flight(connection_id: int) -> bool:
    return Delivery.objects.filter(connection_id=connection_id, status=Delivery.Status.IN_FLIGHT).exists()


def queue_next(connection_id: int, limit: int = 1) -> None:
    """Queue the connection's oldest waiting deliveries that are due, up to `limit`."""
    _enqueue(
        list(due_deliveries(timezone.now()).filter(connection_id=connection_id).values_list("pk", flat=True)[:limit])
    )


def due_deliveries(now: datetime) -> QuerySet[Delivery]:
    """Return the deliveries a worker could claim now, oldest first."""
    return (
        Delivery.objects.filter(status__in=CLAIMABLE)
        .filter(Q(next_attempt_at__isnull=True) | Q(next_attempt_at__lte=now))
        .order_by(F("next_attempt_at").asc(nulls_first=True), "pk")
    )


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
    in the first, so that routed = delivered + pending + failed stays true. A lone
    surrogate in the envelope is replaced by U+FFFD rather than failing
    every event under it; events that hold one fail on their own before this.
    """
    limit = portal_setting("MAX_PAYLOAD_BYTES")
    try:
        payloads = shaping.build_payloads(envelope, events, limit, one_per_event=one_per_event)
    except UnicodeEncodeError:
        cleaned = jsontext.replace_lone_surrogates(envelope)
        payloads = shaping.build_payloads(cleaned, events, limit, one_per_event=one_per_event)

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
    logger.warning(
        "delivery.unsendable",
        extra={
            "connection_id": connection.pk,
            "batch_id": batch and batch.pk,
            "window_id": window and window.pk,
            "reason": reason,
        },
    )
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
        .update(
            status=Delivery.Status.IN_FLIGHT,
            lease_expires_at=now + lease,
            claim_token=uuid.uuid4(),
            attempt_count=F("attempt_count") + 1,
        )
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
        step_back(delivery, postpone_to, started_at)
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
    queue_next(delivery.connection_id)
    return delivery


def decide(delivery: Delivery, outcome: Outcome, now: datetime) -> retry_policy.Decision:
    """Apply the retry policy, except that a status that pauses the connection keeps the delivery for later."""
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


def still_claimed(items: Sequence[Delivery]) -> QuerySet[Delivery]:
    """Return the items that are still in flight under the one claim that took them all."""
    return Delivery.objects.filter(
        pk__in=[item.pk for item in items], status=Delivery.Status.IN_FLIGHT, claim_token=items[0].claim_token
    )


def postpone(items: Sequence[Delivery], until: datetime) -> None:
    """Give back deliveries of one claim unsent, due again at `until`; the claim's attempt is not counted.

    No task is queued for them: a run of their connection or the sweeper
    queues them once they are due, within the connection's limits.
    """
    if not items:
        return
    still_claimed(items).update(
        status=Delivery.Status.RETRY_SCHEDULED,
        next_attempt_at=until,
        attempt_count=F("attempt_count") - 1,
        lease_expires_at=None,
        claim_token=None,
    )


def step_back(delivery: Delivery, until: datetime, now: datetime) -> None:
    """Postpone a claimed delivery; if it is due at once and nothing of its connection is in flight, queue the next.

    Two claims racing for a connection's last slot can both step back, each
    seeing the other in flight. The later one finds nothing in flight and
    wakes the connection, so its deliveries do not wait for the sweeper.
    """
    postpone([delivery], until)
    if until <= now and not _in_flight(delivery.connection_id):
        queue_next(delivery.connection_id)


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
    """Store the attempt and move the delivery to its next state, if this worker still has its claim."""
    now = timezone.now()
    updates = outcome_updates(outcome, decision, now)
    with transaction.atomic():
        DeliveryAttempt.objects.create(**attempt_fields(delivery, outcome, started_at, decision))
        Delivery.objects.filter(
            pk=delivery.pk, status=Delivery.Status.IN_FLIGHT, attempt_count=delivery.attempt_count
        ).update(**updates)
        delivery.status = str(updates["status"])
        update_connection_health(delivery.connection, [decision], now)

    after_record(delivery, outcome, decision)


def outcome_updates(outcome: Outcome, decision: retry_policy.Decision, now: datetime) -> dict[str, object]:
    """Return the field updates that move an in-flight delivery to the state `decision` calls for."""
    updates: dict[str, object] = {
        "last_status_code": outcome.status_code,
        "lease_expires_at": None,
        "claim_token": None,
    }
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
    return updates


def attempt_fields(
    delivery: Delivery, outcome: Outcome, started_at: datetime, decision: retry_policy.Decision
) -> dict[str, object]:
    """Return the fields of the attempt record for one POST."""
    return {
        "delivery": delivery,
        "number": delivery.attempt_count,
        "started_at": started_at,
        "duration_ms": outcome.duration_ms,
        "status_code": outcome.status_code,
        "error": "" if decision.delivered else decision.reason,
        "response_excerpt": redact(outcome.response_excerpt, delivery.connection),
    }


def after_record(delivery: Delivery, outcome: Outcome, decision: retry_policy.Decision) -> None:
    """Log and count a recorded attempt, and queue a retry that is due soon."""
    _log_attempt(delivery, outcome, decision)
    metrics.observe_attempt(delivery.connection.name, attempt_result(decision), outcome.duration_ms)
    paused = outcome.status_code in protection.PAUSING_STATUS
    if decision.retry_in is not None and decision.retry_in <= COUNTDOWN_LIMIT_SECONDS and not paused:
        delivery_id = delivery.pk
        transaction.on_commit(lambda: _enqueue([delivery_id], countdown=decision.retry_in))


def update_connection_health(connection: Connection, decisions: Sequence[retry_policy.Decision], now: datetime) -> None:
    """Store the time of the last success and of the last error, with its reason, in one update."""
    updates: dict[str, object] = {}
    if any(decision.delivered for decision in decisions):
        updates["last_success_at"] = now
    failures = [decision for decision in decisions if not decision.delivered]
    if failures:
        updates |= {"last_error_at": now, "last_error": failures[-1].reason[:500]}
    if updates:
        Connection.objects.filter(pk=connection.pk).update(**updates)


def attempt_result(decision: retry_policy.Decision) -> str:
    """Return what an attempt led to: delivered, retry or failed."""
    if decision.delivered:
        return "delivered"
    if decision.retry_in is not None:
        return "retry"
    return "failed"


def _log_attempt(delivery: Delivery, outcome: Outcome, decision: retry_policy.Decision) -> None:
    level = logging.INFO if decision.delivered else logging.WARNING
    logger.log(
        level,
        "delivery.attempt",
        extra={
            "connection_id": delivery.connection_id,
            "delivery_id": str(delivery.uuid),
            "batch_id": delivery.batch_id,
            "window_id": delivery.window_id,
            "attempt": delivery.attempt_count,
            "status_code": outcome.status_code,
            "duration_ms": outcome.duration_ms,
            "outcome": attempt_result(decision),
        },
    )


def redact(text: str, connection: Connection) -> str:
    """Remove the connection's secrets from text received from its server.

    Besides the whole header and URL, the URL's path with query, and every
    query value of 4 or more characters (the trigger token), are masked, in
    case the server echoes only part of the request.
    """
    parts = urlsplit(connection.post_url or "")
    secrets = [connection.authorization, connection.post_url, f"{parts.path}?{parts.query}" if parts.query else ""]
    secrets += [value for _, value in parse_qsl(parts.query)]
    for secret in sorted(filter(None, secrets), key=len, reverse=True):
        if len(secret) >= 4:
            text = text.replace(secret, mask_secret(secret))
    return text


def sweep() -> int:
    """Recover lost work and queue what is due, within each connection's free slots; return how many were queued.

    Three repairs come first. A lease that expired means its worker died
    mid-attempt: the attempt is recorded as lost and counts, and a delivery
    whose attempts are used up is failed. A delivery older than its
    connection's maximum age is failed, paused or not.
    """
    now = timezone.now()
    _recover_lost_attempts(now)
    _expire_old(now)

    grace = now - timedelta(seconds=portal_setting("REQUEUE_AFTER_SECONDS"))
    stranded = due_deliveries(now).filter(
        Q(status=Delivery.Status.RETRY_SCHEDULED) | Q(created_at__lt=grace) | Q(replayed_at__lt=grace)
    )
    queued = 0
    sendable = Q(paused_at__isnull=True) | Q(auto_resume=True, hold_until__lte=now)
    for connection in Connection.objects.filter(sendable, pk__in=stranded.values("connection_id")):
        slots = max(connection.concurrency_limit - protection.claims_in_flight(connection.pk), 0)
        ids = list(stranded.filter(connection=connection).values_list("pk", flat=True)[:slots])
        _enqueue(ids)
        queued += len(ids)
    return queued


def _recover_lost_attempts(now: datetime) -> None:
    for item in Delivery.objects.filter(status=Delivery.Status.IN_FLIGHT, lease_expires_at__lt=now).select_related(
        "connection"
    )[:1000]:
        with transaction.atomic():
            lost = Delivery.objects.filter(
                pk=item.pk, status=Delivery.Status.IN_FLIGHT, attempt_count=item.attempt_count
            ).update(
                status=Delivery.Status.RETRY_SCHEDULED, next_attempt_at=now, lease_expires_at=None, claim_token=None
            )
            if not lost:
                continue
            DeliveryAttempt.objects.get_or_create(
                delivery=item,
                number=item.attempt_count,
                defaults={"started_at": item.lease_expires_at, "duration_ms": 0, "error": LOST_ATTEMPT},
            )
            if item.attempt_count - item.attempts_before_replay >= item.connection.max_attempts:
                Delivery.objects.filter(pk=item.pk).update(status=Delivery.Status.FAILED, last_error=LOST_ATTEMPT)


def _expire_old(now: datetime) -> None:
    waiting = Delivery.objects.filter(status__in=CLAIMABLE).select_related("connection")
    for connection in Connection.objects.filter(pk__in=waiting.values("connection_id")):
        cutoff = now - timedelta(seconds=connection.max_age_seconds)
        waiting.filter(connection=connection).filter(
            Q(replayed_at__isnull=True, created_at__lt=cutoff) | Q(replayed_at__lt=cutoff)
        ).update(
            status=Delivery.Status.FAILED,
            last_error=f"expired, not delivered within {connection.max_age_seconds} s",
            next_attempt_at=None,
        )
