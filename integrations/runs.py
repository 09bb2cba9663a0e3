"""Sending a connection's due deliveries in chunks, several per claim.

A delivery task starts a run for the delivery's connection. The run claims
a chunk of due deliveries with one compare-and-set update, POSTs them one
after another, records every attempt in one transaction and goes on with
the next chunk until nothing is due. Database work is therefore paid per
chunk rather than per event.

The chunk size follows the connection's speed: a chunk should take about
`CHUNK_SECONDS` to send, so a fast receiver gets large chunks and a slow
one gets chunks of one, as if each delivery were sent on its own. A
worker process remembers each connection's last size for its next run. The
concurrency limit counts claims, so at most that many runs POST to a
connection at once. A run that finds more due deliveries than it claimed
starts one more run while the limit allows. A failed attempt ends the
chunk, gives the rest back unsent and shrinks the next chunk to one.

A paused or held connection is left to `delivery.deliver`, which handles
the probe and the postponements.
"""

import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db import transaction
from django.db.models import F
from django.utils import timezone

from integrations import protection, retry_policy
from integrations.delivery import (
    CLAIMABLE,
    after_record,
    attempt_fields,
    attempt_headers,
    decide,
    deliver,
    due_deliveries,
    outcome_updates,
    postpone,
    still_claimed,
    update_connection_health,
)
from integrations.models import Connection, Delivery, DeliveryAttempt
from integrations.transport import Outcome, post_json
from portal.conf import portal_setting

logger = logging.getLogger(__name__)

# Seconds a chunk should take to send; the next chunk's size follows from the last one's pace.
CHUNK_SECONDS = 0.5
# Seconds after which a run hands the connection over to a fresh task, so
# that a worker shutting down waits for no more than this.
RUN_SECONDS = 5.0
# Seconds of lease kept in reserve: no POST starts unless it can end this long before the lease runs out.
LEASE_MARGIN_SECONDS = 5.0

# The last chunk size per connection in this process, so that the next run
# starts at the pace the last one found instead of at one.
_chunk_sizes: dict[int, int] = {}


@dataclass
class Sent:
    """One attempt made within a chunk."""

    delivery: Delivery
    outcome: Outcome
    started_at: datetime
    decision: retry_policy.Decision


def run_for_delivery(delivery_id: int, send: Callable[..., Outcome] = post_json) -> int:
    """Start a run for the delivery's connection; return how many attempts it made."""
    connection_id = Delivery.objects.filter(pk=delivery_id).values_list("connection_id", flat=True).first()
    if connection_id is None:
        return 0
    return run(connection_id, delivery_id, send=send)


def run(connection_id: int, delivery_id: int | None = None, send: Callable[..., Outcome] = post_json) -> int:
    """Send the connection's due deliveries chunk by chunk until none is due; return how many attempts were made.

    A connection that is paused or held after a 429 gets one attempt at
    `delivery_id` through `delivery.deliver`, which probes or postpones.
    """
    started = time.monotonic()
    size = _chunk_sizes.get(connection_id, 1)
    attempted = 0
    spread = False
    while time.monotonic() - started < RUN_SECONDS:
        connection = Connection.objects.filter(pk=connection_id).first()
        if connection is None:
            return attempted
        if not _sends_freely(connection):
            if delivery_id is not None and attempted == 0:
                deliver(delivery_id, send)
            return attempted

        chunk, backlog = claim_chunk(connection, size)
        if not chunk:
            return attempted
        if backlog and not spread and protection.claims_in_flight(connection.pk) < connection.concurrency_limit:
            start_run(connection.pk)
            spread = True

        chunk_started = time.monotonic()
        sent = send_chunk(connection, chunk, send)
        attempted += len(sent)
        size = next_chunk_size(sent, time.monotonic() - chunk_started)
        _chunk_sizes[connection_id] = size

    start_run(connection_id)
    return attempted


def _sends_freely(connection: Connection) -> bool:
    """Return whether the connection is neither paused nor held after a 429."""
    if connection.paused_at is not None:
        return False
    return connection.hold_until is None or connection.hold_until <= timezone.now()


def start_run(connection_id: int, countdown: float = 0) -> None:
    """Queue a task that starts a run for the connection once the current transaction commits."""
    from integrations.tasks import send_due

    def queue() -> None:
        try:
            send_due.apply_async((connection_id,), countdown=countdown)
        except Exception:
            # The connection's due deliveries stay claimable, and the sweeper queues them.
            logger.exception("delivery.run_enqueue_failed", extra={"connection_id": connection_id})

    transaction.on_commit(queue)


def next_chunk_size(sent: Sequence[Sent], seconds: float) -> int:
    """Return the size of the next chunk: what takes about CHUNK_SECONDS at the last chunk's pace.

    After a failure it is 1, and it grows at most fourfold from one chunk to the next.
    """
    if not sent or not all(item.decision.delivered for item in sent):
        return 1
    per_item = max(seconds / len(sent), 1e-4)
    return max(1, min(int(CHUNK_SECONDS / per_item), portal_setting("DELIVERY_CHUNK_MAX"), len(sent) * 4))


def claim_chunk(connection: Connection, size: int) -> tuple[list[Delivery], bool]:
    """Claim up to `size` due deliveries of the connection under one token.

    Return the claimed deliveries, oldest first, and whether more were due.
    Nothing is claimed while the connection's claims fill its concurrency
    limit, and no more than its rate limit grants for the minute. When the
    rate limit stops it, one run per connection and minute is queued for
    the next minute.
    """
    if protection.claims_in_flight(connection.pk) >= connection.concurrency_limit:
        return [], False

    now = timezone.now()
    token = uuid.uuid4()
    lease = timedelta(seconds=portal_setting("LEASE_SECONDS"))
    with transaction.atomic():
        due = due_deliveries(now).filter(connection_id=connection.pk).select_for_update(skip_locked=True)
        ids = list(due.values_list("pk", flat=True)[: size + 1])
        backlog = len(ids) > size
        ids = ids[:size]
        if not ids:
            return [], False
        granted, wait = protection.take_rate_tokens(
            connection.rate_limit_key, connection.rate_limit_per_minute, len(ids)
        )
        if granted < len(ids) and protection.first_to_wait(connection.rate_limit_key):
            start_run(connection.pk, countdown=wait)
        ids = ids[:granted]
        Delivery.objects.filter(pk__in=ids, status__in=CLAIMABLE).update(
            status=Delivery.Status.IN_FLIGHT,
            lease_expires_at=now + lease,
            claim_token=token,
            attempt_count=F("attempt_count") + 1,
        )
    if not ids:
        return [], False
    chunk = list(Delivery.objects.filter(pk__in=ids, claim_token=token).order_by("pk"))
    for item in chunk:
        item.connection = connection
    return chunk, backlog


def send_chunk(connection: Connection, chunk: Sequence[Delivery], send: Callable[..., Outcome]) -> list[Sent]:
    """POST the chunk's deliveries one after another and record them; return the attempts made.

    Sending stops at the first attempt that does not deliver, when the
    lease could run out before the next attempt ends, or when the rate
    limit's minute in which the chunk was claimed is over. What is left is
    given back unsent, due at once. If sending or recording raises, the
    attempts made are still recorded where possible and the unsent rest is
    given back. The delivery whose POST raised stays in flight, so the
    sweeper records it as lost once its lease expires.
    """
    lease_budget = portal_setting("LEASE_SECONDS") - portal_setting("TOTAL_TIMEOUT_SECONDS") - LEASE_MARGIN_SECONDS
    budget = min(lease_budget, protection.seconds_left_in_rate_window())
    started = time.monotonic()
    sent: list[Sent] = []
    # Everything from this index on is given back unsent.
    unsent_from = len(chunk)
    try:
        for index, item in enumerate(chunk):
            if sent and (not sent[-1].decision.delivered or time.monotonic() - started > budget):
                unsent_from = index
                break
            unsent_from = index + 1
            started_at = timezone.now()
            outcome = send(
                connection.post_url,
                item.payload.encode("utf-8"),
                attempt_headers(item),
                connect_timeout=portal_setting("CONNECT_TIMEOUT_SECONDS"),
                total_timeout=portal_setting("TOTAL_TIMEOUT_SECONDS"),
                verify=portal_setting("CA_BUNDLE") or True,
            )
            sent.append(Sent(item, outcome, started_at, decide(item, outcome, started_at)))
    finally:
        try:
            record_chunk(connection, sent)
        finally:
            postpone(chunk[unsent_from:], timezone.now())

    for attempt in sent:
        if not attempt.decision.delivered:
            decision = attempt.decision
            protection.after_attempt(connection, attempt.outcome.status_code, False, decision.retry_in)
    return sent


def record_chunk(connection: Connection, sent: Sequence[Sent]) -> None:
    """Store the chunk's attempts and move each delivery on, in one transaction.

    A delivery whose claim the sweeper took back meanwhile keeps the state
    the sweeper gave it, as with a single attempt.
    """
    if not sent:
        return
    now = timezone.now()
    # Deliveries that succeeded with the same status code share one update.
    delivered: dict[int | None, list[Delivery]] = {}
    with transaction.atomic():
        attempts = [DeliveryAttempt(**attempt_fields(s.delivery, s.outcome, s.started_at, s.decision)) for s in sent]
        DeliveryAttempt.objects.bulk_create(attempts, ignore_conflicts=True)
        for item in sent:
            updates = outcome_updates(item.outcome, item.decision, now)
            item.delivery.status = str(updates["status"])
            if item.decision.delivered:
                delivered.setdefault(item.outcome.status_code, []).append(item.delivery)
            else:
                still_claimed([item.delivery]).update(**updates)
        for status_code, items in delivered.items():
            updates = outcome_updates(Outcome(status_code, 0), retry_policy.Decision(delivered=True), now)
            still_claimed(items).update(**updates)
        update_connection_health(connection, [item.decision for item in sent], now)

    for item in sent:
        after_record(item.delivery, item.outcome, item.decision)
