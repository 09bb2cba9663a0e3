"""`GET /metrics`: counters from the code paths, state read at scrape time, the token, and several processes."""

import os
import re
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from django.conf import settings as django_settings
from django.utils import timezone
from kombu import Queue
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from events import router
from integrations import delivery, demo
from integrations.models import Delivery, DeliveryAttempt
from integrations.standin import running_standin
from integrations.transport import Outcome
from portal import metrics
from tests.conftest import wait_for
from tests.factories import ConnectionFactory, DeliveryFactory, FeedFactory, InboundBatchFactory

REPO = Path(__file__).resolve().parents[1]


def unique_name(prefix: str) -> str:
    """Counters outlive each test's database, so every test counts under names of its own."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def scrape(client, **headers) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = client.get("/metrics", **headers)
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.content.decode())
        for sample in family.samples
    }


def sample(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def succeed(*args, **kwargs) -> Outcome:
    return Outcome(200, 180)


def closed_port() -> int:
    """Return a loopback port that nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@pytest.mark.django_db
def test_delivery_attempt_is_on_the_endpoint(client):
    connection = ConnectionFactory(name=unique_name("surveys"))
    waiting = DeliveryFactory(connection=connection)

    delivery.deliver(waiting.pk, send=succeed)

    samples = scrape(client)
    labels = (("connection", connection.name), ("outcome", "delivered"))
    assert samples[("portal_delivery_attempts_total", labels)] == 1
    assert samples[("portal_delivery_attempt_duration_seconds_count", (("connection", connection.name),))] == 1
    bucket = (("connection", connection.name), ("le", "0.25"))
    assert samples[("portal_delivery_attempt_duration_seconds_bucket", bucket)] == 1


@pytest.mark.django_db
def test_scrape_reads_waiting_and_paused(client):
    connection = ConnectionFactory(name=unique_name("waiting"), paused_at=timezone.now())
    idle = ConnectionFactory(name=unique_name("idle"))
    DeliveryFactory.create_batch(2, connection=connection)
    DeliveryFactory(connection=connection, status=Delivery.Status.RETRY_SCHEDULED)
    DeliveryFactory(connection=connection, status=Delivery.Status.DELIVERED)

    samples = scrape(client)

    assert samples[("portal_deliveries_pending", (("connection", connection.name),))] == 2
    assert samples[("portal_retries_pending", (("connection", connection.name),))] == 1
    assert samples[("portal_deliveries_pending", (("connection", idle.name),))] == 0
    assert samples[("portal_connections_paused", ())] == 1
    assert {labels for name, labels in samples if name == "portal_queue_depth"} >= {
        (("queue", "routing"),),
        (("queue", "deliveries"),),
        (("queue", "maintenance"),),
    }


@pytest.mark.django_db
def test_inbound_batches_are_counted_by_feed_and_outcome(client):
    feed = FeedFactory(name=unique_name("ios"))
    body = '{"source_request_id": "r-1", "events": []}'

    for _ in range(2):
        client.post("/api/v1/mparticle/", body, content_type="application/json", HTTP_AUTHORIZATION=feed.plain_secret)
    client.post("/api/v1/mparticle/", "[]", content_type="application/json", HTTP_AUTHORIZATION=feed.plain_secret)

    for outcome in ("accepted", "duplicate", "rejected"):
        assert sample("portal_inbound_batches_total", feed=feed.name, outcome=outcome) == 1


@pytest.mark.django_db
def test_routed_and_filtered_events_are_counted_by_type():
    connection = ConnectionFactory(name=unique_name("custom"), event_types=["custom_event"])
    batch = InboundBatchFactory(
        body='{"events": [{"event_type": "custom_event", "data": {"source_message_id": "m-1"}},'
        ' {"event_type": "custom_event", "data": {"source_message_id": "m-2"}},'
        ' {"event_type": "screen_view", "data": {}}]}'
    )

    router.route_batch(batch.pk)

    assert sample("portal_events_routed_total", connection=connection.name, event_type="custom_event") == 2
    assert sample("portal_events_filtered_total", connection=connection.name, event_type="screen_view") == 1


@pytest.mark.django_db
def test_token_is_required_when_set(client, settings):
    settings.PORTAL = {**settings.PORTAL, "METRICS_TOKEN": "scrape-token"}

    missing = client.get("/metrics")
    wrong = client.get("/metrics", HTTP_AUTHORIZATION="Bearer other")

    assert missing.status_code == wrong.status_code == 401
    assert missing["WWW-Authenticate"].startswith("Bearer")
    assert scrape(client, HTTP_AUTHORIZATION="Bearer scrape-token")


def test_redis_queue_depth_is_the_list_length(settings):
    if not django_settings.CELERY_BROKER_URL.startswith("redis://"):
        pytest.skip("the configured broker is not Redis")
    import redis

    queue = f"metrics-test-{uuid.uuid4().hex}"
    settings.CELERY_TASK_QUEUES = [Queue(queue)]
    client = redis.Redis.from_url(django_settings.CELERY_BROKER_URL)
    try:
        client.rpush(queue, "a", "b", "c")
        assert metrics.queue_depths() == {queue: 3}
    finally:
        client.delete(queue)
        client.close()


def test_unreachable_broker_leaves_queue_depths_out(settings):
    settings.CELERY_BROKER_URL = f"redis://127.0.0.1:{closed_port()}/0"

    assert metrics.queue_depths() == {}
    assert metrics.broker_state() == []


def count_in_subprocess(directory: Path, connection: str) -> None:
    script = (
        "import django; django.setup(); from portal import metrics; "
        f"metrics.observe_attempt({connection!r}, 'delivered', 250)"
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory), "DJANGO_SETTINGS_MODULE": "portal.settings"}
    subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, check=True, timeout=60)


@pytest.mark.django_db
def test_multiprocess_mode_adds_up_every_process(client, tmp_path, monkeypatch):
    connection = unique_name("multi")
    count_in_subprocess(tmp_path, connection)
    count_in_subprocess(tmp_path, connection)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))

    samples = scrape(client)

    assert samples[("portal_delivery_attempts_total", (("connection", connection), ("outcome", "delivered")))] == 2
    assert samples[("portal_delivery_attempt_duration_seconds_count", (("connection", connection),))] == 2


def received(log: str, task: str) -> int:
    """Count the tasks of a kind that a worker's log shows it received."""
    return len(re.findall(rf"Task {re.escape(task)}\[[^]]+\] received", log))


def worker_args(queues: str, name: str) -> tuple[str, ...]:
    return ("worker", "--pool", "threads", "--concurrency", "4", "--loglevel", "INFO", "-Q", queues, "-n", f"{name}@%h")


def post_demo_batches(client, secrets: dict[str, str]) -> list[int]:
    batch_ids = []
    for path in demo.batch_files():
        body = demo.as_new_upload(path.read_text("utf-8"))
        secret = secrets[demo.feed_name_of(path)]
        response = client.post(
            "/api/v1/mparticle/", body, content_type="application/json", HTTP_AUTHORIZATION=f"Bearer {secret}"
        )
        assert response.status_code == 202, response.content
        batch_ids.append(response.json()["batch_id"])
    return batch_ids


@pytest.mark.services
def test_workers_on_separate_queues_share_a_demo_run(client, allow_loopback, celery_control, tmp_path, monkeypatch):
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    celery_control.env |= {"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir), "PORTAL_HEARTBEAT_INTERVAL_SECONDS": "1"}

    with running_standin(expect_authorization=demo.DEMO_AUTHORIZATION) as standin:
        secrets = {name: demo.seed_feed(name, lambda line: None) for name in demo.DEMO_FEEDS}
        for plan in demo.DEMO_CONNECTIONS:
            demo.seed_connection(plan, standin.base_url)
        celery_control.start("routing-worker", *worker_args("routing,maintenance", "routing"))
        celery_control.start("delivery-worker", *worker_args("deliveries", "deliveries"))
        celery_control.start("beat", "beat", "--loglevel", "INFO", "--schedule", str(tmp_path / "beat-schedule"))

        batch_ids = post_demo_batches(client, secrets)
        done = wait_for(lambda: demo.outstanding_work(batch_ids).done, timeout=120)
        assert done, "\n".join(celery_control.log(name) for name in ("routing-worker", "delivery-worker", "beat"))

    summaries = demo.summarize(batch_ids)
    assert sum(summary.delivered for summary in summaries) > 0
    assert sum(summary.failed for summary in summaries) == 0
    routing_log, delivery_log = celery_control.log("routing-worker"), celery_control.log("delivery-worker")
    # Batches stored close together share one wake-up, and each routing task routes every batch waiting.
    routing_tasks = received(routing_log, "events.tasks.route_received")
    assert 0 < routing_tasks <= len(batch_ids)
    assert received(routing_log, "integrations.tasks.deliver") == 0
    assert received(routing_log, "integrations.tasks.send_due") == 0
    # Routing wakes each connection once, and a run with a backlog starts at most one more, so a
    # task sends several deliveries and there are never more than two tasks per delivery.
    sendable = Delivery.objects.exclude(payload="").count()
    delivery_tasks = received(delivery_log, "integrations.tasks.deliver") + received(
        delivery_log, "integrations.tasks.send_due"
    )
    assert 0 < delivery_tasks <= 2 * sendable
    assert received(delivery_log, "events.tasks.route_received") == 0
    assert received(delivery_log, "portal.health.worker_heartbeat") > 0

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(metrics_dir))
    samples = scrape(client)
    attempts = sum(value for (name, _), value in samples.items() if name == "portal_delivery_attempts_total")
    assert attempts == DeliveryAttempt.objects.count()
