"""Delivery under faults, on real Celery processes, the configured broker and database,
and stand-ins on loopback: killed and stopped workers, repeated tasks, two beats,
failing and hanging destinations, and a broker restart."""

import itertools
import json
import os
import signal
import subprocess
import time

import pytest
from django.conf import settings

from integrations.models import BatchWindow, Connection, Delivery, DeliveryAttempt
from integrations.standin import running_standin
from integrations.tasks import deliver
from tests.conftest import WORKER_ARGS, wait_for
from tests.factories import ConnectionFactory, FeedFactory, InboundBatchFactory

pytestmark = pytest.mark.services


def new_delivery(connection, n=1):
    return Delivery.objects.create(connection=connection, payload=json.dumps({"events": [{"n": n}]}), event_count=1)


def status_of(item):
    item.refresh_from_db()
    return item.status


def delivery_ids(standin):
    return [record["headers"].get("X-Delivery-Id") for record in standin.records]


def test_worker_killed_mid_post(celery_control, celery_env, standin):
    celery_env.update(PORTAL_LEASE_SECONDS="4", PORTAL_TOTAL_TIMEOUT_SECONDS="3")
    standin.configure(delay=2)
    item = new_delivery(ConnectionFactory(post_url=standin.url))
    celery_control.start("worker", *WORKER_ARGS)

    deliver.delay(item.pk)
    assert wait_for(lambda: status_of(item) == "in_flight", timeout=20)
    celery_control.stop("worker", signal.SIGKILL)
    standin.configure(delay=0)
    celery_control.start("worker", *WORKER_ARGS)
    celery_control.start("beat", "beat", "--schedule", str(celery_control.log_dir / "beat-schedule"))

    assert wait_for(lambda: status_of(item) == "delivered", timeout=40), celery_control.log("worker")
    ids = delivery_ids(standin)
    assert 1 <= len(ids) <= 2
    assert set(ids) == {str(item.uuid)}


def test_sigterm_mid_post_finishes(celery_control, standin):
    standin.configure(delay=3)
    item = new_delivery(ConnectionFactory(post_url=standin.url))
    celery_control.start("worker", *WORKER_ARGS)

    deliver.delay(item.pk)
    assert wait_for(lambda: status_of(item) == "in_flight", timeout=20)
    time.sleep(1)
    celery_control.stop("worker", signal.SIGTERM, timeout=30)

    assert status_of(item) == "delivered"
    assert len(standin.records) == 1


def test_retry_survives_worker_restart(celery_control, standin):
    standin.configure(fail_first=1, fail_status=500)
    item = new_delivery(ConnectionFactory(post_url=standin.url))
    celery_control.start("worker", *WORKER_ARGS)

    deliver.delay(item.pk)
    assert wait_for(lambda: status_of(item) == "retry_scheduled", timeout=20)
    celery_control.stop("worker", signal.SIGTERM)
    celery_control.start("worker", *WORKER_ARGS)
    celery_control.start("beat", "beat", "--schedule", str(celery_control.log_dir / "beat-schedule"))

    assert wait_for(lambda: status_of(item) == "delivered", timeout=30), celery_control.log("worker")
    assert [r["status"] for r in standin.records] == [500, 200]


def test_task_handed_out_twice(celery_control, standin):
    standin.configure(delay=1)
    item = new_delivery(ConnectionFactory(post_url=standin.url))
    celery_control.start("worker", *WORKER_ARGS)

    for _ in range(5):
        deliver.delay(item.pk)

    assert wait_for(lambda: status_of(item) == "delivered", timeout=20)
    time.sleep(1)
    assert len(standin.records) == 1


def test_two_beats_flush_once(celery_control, standin):
    connection = ConnectionFactory(post_url=standin.url, send_as_batch=True, batch_window_seconds=1)
    feed = FeedFactory()
    from events import router

    for n in range(20):
        body = json.dumps({"mp_deviceid": f"device-{n}", "events": [{"event_type": "custom_event", "data": {}}]})
        router.route_batch(InboundBatchFactory(feed=feed, body=body).pk)
    assert BatchWindow.objects.filter(connection=connection).count() == 20
    celery_control.start("worker", *WORKER_ARGS)
    celery_control.start("beat", "beat", "--schedule", str(celery_control.log_dir / "beat-1"))
    celery_control.start("beat-2", "beat", "--schedule", str(celery_control.log_dir / "beat-2"))

    assert wait_for(lambda: Delivery.objects.filter(status="delivered").count() == 20, timeout=40)
    time.sleep(2)
    assert Delivery.objects.count() == 20
    assert len(standin.records) == 20


def test_outage_then_recovery(celery_processes, standin):
    standin.configure(fail_first=6, fail_status=503)
    connection = ConnectionFactory(post_url=standin.url, max_attempts=5)
    items = [new_delivery(connection, n) for n in range(3)]

    for item in items:
        deliver.delay(item.pk)

    assert wait_for(lambda: all(status_of(i) == "delivered" for i in items), timeout=60), celery_processes.log("worker")
    assert len(standin.records) == 9
    for item in items:
        attempts = list(item.attempts.order_by("number").values_list("started_at", flat=True))
        gaps = [(later - earlier).total_seconds() for earlier, later in itertools.pairwise(attempts)]
        # Backoff with PORTAL_RETRY_BASE_SECONDS=0.5: at least half of 0.5 * 2^(n-1) after attempt n.
        for number, gap in enumerate(gaps, start=1):
            assert gap >= 0.25 * 2 ** (number - 1)


def test_exhausted_delivery_failed_with_reason(celery_processes, standin):
    standin.configure(status=503)
    item = new_delivery(ConnectionFactory(post_url=standin.url, max_attempts=2))

    deliver.delay(item.pk)

    assert wait_for(lambda: status_of(item) == "failed", timeout=30)
    assert "gave up after 2 attempts" in item.last_error
    assert len(standin.records) == 2


def test_hanging_connection_isolated(celery_env, celery_control):
    celery_env.update(PORTAL_TOTAL_TIMEOUT_SECONDS="4")
    with running_standin(delay=30) as hanging, running_standin() as healthy:
        slow = ConnectionFactory(post_url=hanging.url, concurrency_limit=1, authorization="")
        fast = ConnectionFactory(post_url=healthy.url, authorization="")
        stuck = [new_delivery(slow, n) for n in range(4)]
        flowing = [new_delivery(fast, n) for n in range(20)]
        celery_control.start("worker", *WORKER_ARGS)

        started = time.monotonic()
        for item in stuck + flowing:
            deliver.delay(item.pk)

        assert wait_for(lambda: Delivery.objects.filter(connection=fast, status="delivered").count() == 20, timeout=20)
        assert time.monotonic() - started < 10
        timed_out = DeliveryAttempt.objects.filter(delivery__connection=slow, error="timed out after 4 s")
        assert wait_for(timed_out.exists, timeout=10)
        assert Connection.objects.get(pk=fast.pk).last_error == ""


@pytest.mark.skipif(
    not settings.CELERY_BROKER_URL.startswith("redis://") or os.environ.get("PORTAL_TEST_RESTART_REDIS") != "1",
    reason="restarts the local Redis: needs the Redis broker and PORTAL_TEST_RESTART_REDIS=1",
)
def test_redis_restart_loses_nothing(celery_control, standin):
    items = [new_delivery(ConnectionFactory(post_url=standin.url), n) for n in range(5)]
    for item in items:
        deliver.delay(item.pk)
    restart_redis()
    celery_control.env.update(PORTAL_REQUEUE_AFTER_SECONDS="1")
    celery_control.start("worker", *WORKER_ARGS)
    celery_control.start("beat", "beat", "--schedule", str(celery_control.log_dir / "beat-schedule"))

    assert wait_for(lambda: all(status_of(i) == "delivered" for i in items), timeout=40)
    assert len(standin.records) == 5


def restart_redis():
    """Stop Redis without saving, so queued messages are lost, and start it with the machine's command."""
    subprocess.run(["redis-cli", "-h", "127.0.0.1", "shutdown", "nosave"], check=False, capture_output=True)
    wait_for(lambda: subprocess.run(["redis-cli", "ping"], capture_output=True).returncode != 0, timeout=10)
    subprocess.run(
        [
            "redis-server",
            "--daemonize",
            "yes",
            "--bind",
            "127.0.0.1",
            "-::1",
            "--port",
            "6379",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            "/var/lib/redis",
            "--logfile",
            "/var/log/redis/ci.log",
        ],
        check=True,
    )
    assert wait_for(lambda: subprocess.run(["redis-cli", "ping"], capture_output=True).returncode == 0, timeout=10)


@pytest.mark.parametrize("retry_after", ["2", "soon"])
def test_429_retry_after_respected(celery_processes, standin, retry_after):
    standin.configure(fail_first=1, fail_status=429, retry_after=retry_after)
    item = new_delivery(ConnectionFactory(post_url=standin.url))

    deliver.delay(item.pk)

    assert wait_for(lambda: status_of(item) == "delivered", timeout=30), celery_processes.log("worker")
    first, second = item.attempts.order_by("number").values_list("started_at", flat=True)
    gap = (second - first).total_seconds()
    if retry_after == "2":
        assert gap >= 2
    else:
        assert gap >= 0.25
    assert len(standin.records) == 2


def test_concurrent_repeats_sent_once(transactional_db):
    from concurrent.futures import ThreadPoolExecutor

    from django.db import connection as db_connection

    from events import router

    connection = ConnectionFactory(event_types=["custom_event"], send_as_batch=False)
    feed = FeedFactory()
    event = {"event_type": "custom_event", "data": {"source_message_id": "same-message"}}
    batches = [
        InboundBatchFactory(feed=feed, body=json.dumps({"mpid": 7, "batch_id": n, "events": [event]})) for n in range(8)
    ]

    def route(batch_id):
        try:
            return router.route_batch(batch_id)
        finally:
            db_connection.close()

    with ThreadPoolExecutor(max_workers=8) as pool:
        assert all(pool.map(route, [batch.pk for batch in batches]))

    assert Delivery.objects.filter(connection=connection).count() == 1


def test_thousands_of_keys_route(transactional_db):
    from events import router

    connection = ConnectionFactory(event_types=["custom_event"], send_as_batch=False)
    events = [{"event_type": "custom_event", "data": {"source_message_id": f"m-{n}"}} for n in range(3000)]
    batch = InboundBatchFactory(body=json.dumps({"mpid": 7, "events": events}))

    assert router.route_batch(batch.pk)

    assert Delivery.objects.filter(connection=connection).count() == 3000


def test_nul_in_keys_routes(transactional_db):
    from events import router

    ConnectionFactory(event_types=["custom_event"], send_as_batch=True)
    body = (
        '{"mpid": "1\\u0000", "mp_deviceid": "d\\u0000",'
        ' "events": [{"event_type": "custom_event", "data": {"source_message_id": "m\\u0000x"}}]}'
    )
    batch = InboundBatchFactory(body=body)

    assert router.route_batch(batch.pk)

    assert BatchWindow.objects.count() == 1
