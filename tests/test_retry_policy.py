"""The retry decision after one attempt."""

from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from integrations.retry_policy import RetryPolicy, backoff_seconds, decide, retry_after_seconds
from integrations.transport import Outcome

POLICY = RetryPolicy(max_attempts=5, base_seconds=10, max_seconds=3600)
NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize("status", [200, 201, 202, 204])
def test_2xx_is_delivered(status):
    assert decide(Outcome(status, 5), 1, POLICY).delivered


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
def test_transient_status_retried(status):
    decision = decide(Outcome(status, 5), 1, POLICY)

    assert not decision.delivered
    assert decision.retry_in is not None


@pytest.mark.parametrize("status", [301, 302, 400, 401, 403, 404, 409, 410, 413, 422])
def test_permanent_status_fails(status):
    decision = decide(Outcome(status, 5), 1, POLICY)

    assert decision.retry_in is None
    assert decision.reason.startswith(f"HTTP {status}")


def test_redirect_reason_names_location():
    decision = decide(Outcome(302, 5, location="https://elsewhere.example/"), 1, POLICY)

    assert "https://elsewhere.example/" in decision.reason


def test_network_error_retried():
    assert decide(Outcome(None, 5, error="connection failed: refused"), 1, POLICY).retry_in is not None


def test_unsafe_target_not_retried():
    assert decide(Outcome(None, 0, error="unsafe target: 10.0.0.5"), 1, POLICY).retry_in is None


def test_gives_up_after_max_attempts():
    decision = decide(Outcome(503, 5), 5, POLICY)

    assert decision.retry_in is None
    assert "gave up after 5 attempts" in decision.reason


@pytest.mark.parametrize("attempt", [1, 2, 3, 4, 8, 20])
def test_backoff_doubles_within_jitter(attempt):
    ceiling = min(3600, 10 * 2 ** (attempt - 1))

    delays = [backoff_seconds(attempt, POLICY) for _ in range(50)]

    assert all(ceiling / 2 <= delay <= ceiling for delay in delays)


def test_retry_after_seconds_used():
    assert decide(Outcome(429, 5, retry_after="120"), 1, POLICY, now=NOW).retry_in == 120


def test_retry_after_http_date():
    header = format_datetime(NOW + timedelta(seconds=90), usegmt=True)

    assert retry_after_seconds(header, now=NOW) == 90


def test_retry_after_capped():
    assert decide(Outcome(429, 5, retry_after="86400"), 1, POLICY, now=NOW).retry_in == 3600


@pytest.mark.parametrize("header", ["soon", "", "-5", "1.5e3", "²", "٣"])
def test_invalid_retry_after_uses_backoff(header):
    decision = decide(Outcome(503, 5, retry_after=header), 1, POLICY, now=NOW)

    assert decision.retry_in is not None
    assert 5 <= decision.retry_in <= 10
