"""What to do after an attempt: done, try again later, or give up.

The rules follow what Qualtrics and mParticle document. Any 2xx is success
(Qualtrics returns both 200 and 202). 408, 429, every 5xx, connection errors
and timeouts are transient and retried with exponential backoff and jitter;
a `Retry-After` header (seconds or an HTTP date) sets the delay instead,
capped at the maximum delay. Every other status, 3xx redirects included,
can never succeed unchanged, so it fails at once.
"""

import random
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

from integrations.transport import Outcome

RETRYABLE_STATUS = frozenset({408, 429})


@dataclass(frozen=True)
class RetryPolicy:
    """How long to keep trying: attempts, the backoff's first and longest delay, and the maximum age, in seconds."""

    max_attempts: int
    base_seconds: float
    max_seconds: float
    max_age_seconds: float | None = None


@dataclass(frozen=True)
class Decision:
    """The verdict on one attempt. `retry_in` is set only when another attempt follows."""

    delivered: bool
    retry_in: float | None = None
    reason: str = ""


def is_transient(outcome: Outcome) -> bool:
    if outcome.status_code is None:
        return not outcome.error.startswith("unsafe target")
    return outcome.status_code in RETRYABLE_STATUS or outcome.status_code >= 500


def describe(outcome: Outcome) -> str:
    """Return a one-line reason for a failed attempt, as operators see it."""
    if outcome.status_code is None:
        return outcome.error
    if outcome.location:
        return f"HTTP {outcome.status_code} redirect to {outcome.location} (redirects are not followed)"
    return f"HTTP {outcome.status_code}"


def decide(
    outcome: Outcome, attempt: int, policy: RetryPolicy, *, now: datetime | None = None, age_seconds: float = 0.0
) -> Decision:
    """Decide what follows attempt number `attempt` (counting from 1) of a delivery `age_seconds` old."""
    if outcome.succeeded:
        return Decision(delivered=True)
    reason = describe(outcome)
    if not is_transient(outcome):
        return Decision(delivered=False, reason=reason)
    if attempt >= policy.max_attempts:
        return Decision(delivered=False, reason=f"{reason}; gave up after {attempt} attempts")
    delay = retry_after_seconds(outcome.retry_after, now=now)
    if delay is None:
        delay = backoff_seconds(attempt, policy)
    delay = min(delay, policy.max_seconds)
    if policy.max_age_seconds is not None and age_seconds + delay > policy.max_age_seconds:
        return Decision(delivered=False, reason=f"{reason}; expired, not delivered within {policy.max_age_seconds:g} s")
    return Decision(delivered=False, retry_in=delay, reason=reason)


def backoff_seconds(attempt: int, policy: RetryPolicy) -> float:
    """Return the delay after attempt `attempt`: base * 2^(attempt-1), capped, with jitter in its upper half."""
    ceiling = min(policy.max_seconds, policy.base_seconds * 2 ** (attempt - 1))
    return ceiling / 2 + random.uniform(0, ceiling / 2)


def retry_after_seconds(value: str | None, *, now: datetime | None = None) -> float | None:
    """Parse a Retry-After header (delta seconds or HTTP date); None when absent or invalid."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())
