"""Per-connection protection: pauses, probes, the circuit breaker, rate limit and concurrency cap.

`admit` runs after a single delivery is claimed and before it is sent. It
returns None when the attempt may go ahead, or the time to postpone it to.
One connection's limits therefore only ever postpone that connection's
deliveries, and a worker slot is never spent waiting on them. Runs that
send deliveries in chunks (`integrations.runs`) check the same pause, hold,
concurrency cap and rate limit once per chunk.
"""

import logging
import math
import time
import uuid
from datetime import datetime, timedelta

from django.core.cache import cache
from django.db.models import Count, Q
from django.utils import timezone

from integrations.models import Connection, Delivery, DeliveryAttempt
from portal.conf import portal_setting

logger = logging.getLogger(__name__)

# Qualtrics returns these when the trigger URL or credentials are wrong; no
# retry can succeed until an operator fixes the connection.
PAUSING_STATUS = {
    401: "Qualtrics rejected the Authorization header (401); fix it and resume the connection.",
    403: "Qualtrics refused access (403); check the Authorization header and resume the connection.",
    404: "Qualtrics does not know this trigger URL (404); check the POST URL and resume the connection.",
    410: "The Qualtrics trigger was removed (410); update the POST URL and resume the connection.",
}
RATE_WINDOW_SECONDS = 60


def admit(connection: Connection, delivery: Delivery, now: datetime) -> datetime | None:
    """Return None if the connection may send now, else the time to postpone the delivery to."""
    if connection.paused_at is not None:
        if not connection.auto_resume:
            return now + timedelta(days=365)
        if not _take_probe(connection, now):
            return connection.hold_until or now + _probe_interval()
        return None
    if connection.hold_until and connection.hold_until > now:
        return connection.hold_until
    if claims_in_flight(connection.pk, excluding=delivery.claim_token) >= connection.concurrency_limit:
        # Due again at once: the next finished attempt of this connection queues it.
        return now
    wait = take_rate_token(connection.rate_limit_key, connection.rate_limit_per_minute)
    if wait:
        return now + timedelta(seconds=wait)
    return None


def claims_in_flight(connection_id: int, excluding: uuid.UUID | None = None) -> int:
    """Return how many claims of the connection are in flight, leaving out the claim `excluding`.

    Each claim sends its deliveries one after another, so this is the
    number of POSTs that may be under way at once.
    """
    # NOTE: two workers counting at the same moment can both pass, so the cap
    # can be exceeded by the number of workers racing for it.
    in_flight = Delivery.objects.filter(connection_id=connection_id, status=Delivery.Status.IN_FLIGHT)
    if excluding is not None:
        in_flight = in_flight.exclude(claim_token=excluding)
    return int(in_flight.aggregate(claims=Count("claim_token", distinct=True))["claims"])


def take_rate_token(key: str, limit_per_minute: int) -> float:
    """Count one POST against `key` in the current minute; return 0, or seconds until the next minute if full."""
    granted, wait = take_rate_tokens(key, limit_per_minute, 1)
    return 0.0 if granted else wait


def take_rate_tokens(key: str, limit_per_minute: int, requested: int) -> tuple[int, float]:
    """Count up to `requested` POSTs against `key` in the current minute.

    Return how many may go now and, when that is fewer than `requested`, the
    seconds until the next minute. The counter lives in the Django cache,
    which is Redis in production so that every worker shares it. Counting
    takes one cache call, except for the first count of a minute.
    """
    now = time.time()
    window = math.floor(now / RATE_WINDOW_SECONDS)
    cache_key = f"rate:{key}:{window}"
    try:
        used = cache.incr(cache_key, requested)
    except ValueError:
        # The minute's counter does not exist yet; another worker may create it first.
        if cache.add(cache_key, requested, timeout=RATE_WINDOW_SECONDS * 2):
            used = requested
        else:
            used = cache.incr(cache_key, requested)
    granted = max(0, min(requested, limit_per_minute - (used - requested)))
    if granted == requested:
        return granted, 0.0
    return granted, (window + 1) * RATE_WINDOW_SECONDS - now


def seconds_left_in_rate_window() -> float:
    """Return the seconds until the rate limit's current minute ends."""
    return RATE_WINDOW_SECONDS - time.time() % RATE_WINDOW_SECONDS


def first_to_wait(key: str) -> bool:
    """Return True for the first caller in the current minute to find `key`'s rate limit used up, False for the rest."""
    window = math.floor(time.time() / RATE_WINDOW_SECONDS)
    return bool(cache.add(f"rate-waiting:{key}:{window}", 1, timeout=RATE_WINDOW_SECONDS * 2))


def _probe_interval() -> timedelta:
    return timedelta(seconds=portal_setting("BREAKER_PROBE_SECONDS"))


def _take_probe(connection: Connection, now: datetime) -> bool:
    """Let exactly one delivery through as a probe once the hold is over; others wait for the next one."""
    taken = (
        Connection.objects.filter(pk=connection.pk, paused_at__isnull=False, auto_resume=True)
        .filter(Q(hold_until__isnull=True) | Q(hold_until__lte=now))
        .update(hold_until=now + _probe_interval())
    )
    return bool(taken)


def after_attempt(connection: Connection, status_code: int | None, succeeded: bool, retry_in: float | None) -> None:
    """Update the connection after an attempt: resume after a good probe, pause, or hold after a 429."""
    now = timezone.now()
    if succeeded:
        if connection.paused_at is not None and connection.auto_resume:
            resume(connection, reason="probe succeeded")
        return
    if status_code in PAUSING_STATUS:
        pause(connection, PAUSING_STATUS[status_code], auto_resume=False)
        return
    if status_code == 429 and retry_in:
        Connection.objects.filter(pk=connection.pk).update(hold_until=now + timedelta(seconds=retry_in))
    if connection.paused_at is None and _breaker_trips(connection, now):
        pause(
            connection,
            f"More than {connection.breaker_failure_ratio:.0%} of recent attempts failed; "
            "the portal probes the connection and resumes it when a probe succeeds.",
            auto_resume=True,
        )


def _breaker_trips(connection: Connection, now: datetime) -> bool:
    since = now - timedelta(seconds=portal_setting("BREAKER_WINDOW_SECONDS"))
    recent = DeliveryAttempt.objects.filter(delivery__connection=connection, started_at__gte=since)
    outcomes = list(recent.order_by("-started_at").values_list("status_code", "error")[:200])
    if len(outcomes) < connection.breaker_min_attempts:
        return False
    failures = sum(1 for status_code, error in outcomes if error)
    return failures / len(outcomes) >= connection.breaker_failure_ratio


def pause(connection: Connection, reason: str, *, auto_resume: bool) -> None:
    """Pause the connection with a reason operators see; deliveries keep collecting."""
    now = timezone.now()
    hold = now + _probe_interval() if auto_resume else None
    updated = Connection.objects.filter(pk=connection.pk, paused_at__isnull=True).update(
        paused_at=now, pause_reason=reason, auto_resume=auto_resume, hold_until=hold
    )
    if updated:
        logger.warning(
            "connection.paused", extra={"connection_id": connection.pk, "auto_resume": auto_resume, "reason": reason}
        )


def resume(connection: Connection, *, reason: str) -> int:
    """Resume the connection and queue its waiting deliveries; return how many were queued."""
    from integrations.delivery import enqueue_waiting

    Connection.objects.filter(pk=connection.pk).update(
        paused_at=None, pause_reason="", auto_resume=False, hold_until=None
    )
    logger.info("connection.resumed", extra={"connection_id": connection.pk, "reason": reason})
    return enqueue_waiting(connection)
