"""Tests of the demo: its batches, its summary counts, and one full run of `manage.py demo`."""

import json
import os
import signal
import socket
import subprocess
import sys
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.utils import timezone

from events.event_types import EVENT_ROUTE_TYPES, NOTIFICATION_ROUTE_TYPES, RouteType
from integrations import demo
from integrations.models import BatchWindow, Delivery, DeliveryAttempt, Routing, WindowItem
from tests.factories import ConnectionFactory, FeedFactory, InboundBatchFactory

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEMO_RUN_SECONDS = 90


def load_batches() -> dict[str, dict[str, Any]]:
    return {path.name: json.loads(path.read_text("utf-8")) for path in demo.batch_files()}


def routed_item_types() -> Counter[str]:
    """Count the event types and consent notification types across the demo batches."""
    counts: Counter[str] = Counter()
    for batch in load_batches().values():
        counts.update(event["event_type"] for event in batch["events"])
        counts.update(notification["type"] for notification in batch.get("system_notifications") or [])
    return counts


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def test_batches_cover_all_route_types() -> None:
    covered = set(routed_item_types())

    assert covered >= EVENT_ROUTE_TYPES | NOTIFICATION_ROUTE_TYPES


def test_batches_span_feeds_and_devices() -> None:
    batches = load_batches()

    assert {demo.feed_name_of(Path(name)) for name in batches} == set(demo.DEMO_FEEDS)
    assert len({batch["mp_deviceid"] for batch in batches.values()}) >= 4
    assert len({batch["source_request_id"] for batch in batches.values()}) == len(batches)


def test_connections_partition_route_types() -> None:
    routed = Counter(route_type for plan in demo.DEMO_CONNECTIONS for route_type in plan.event_types)

    assert set(routed) == set(RouteType.values)
    assert set(routed.values()) == {1}


def test_as_new_upload_renews_dedup_keys() -> None:
    text = (
        '{"source_request_id": "r-1", "mpid": -9146158168781218815, "events": [{"data": '
        '{"source_message_id": "3DBFC52E-164F-405E-885E-2B448B301F83", "price": 34.950, "name": "Mug 🏔️"}}]}'
    )

    upload = json.loads(demo.as_new_upload(text))
    encoded = demo.as_new_upload(text).decode("utf-8")

    assert upload["source_request_id"] != "r-1"
    message_id = upload["events"][0]["data"]["source_message_id"]
    assert message_id != "3DBFC52E-164F-405E-885E-2B448B301F83"
    assert message_id.isupper()
    assert '"mpid":-9146158168781218815' in encoded
    assert '"price":34.950,"name":"Mug 🏔️"' in encoded


def make_delivery(connection: Any, status: str, event_count: int, attempts: int = 0, **fields: Any) -> Delivery:
    delivery = Delivery.objects.create(connection=connection, status=status, event_count=event_count, **fields)
    for number in range(1, attempts + 1):
        DeliveryAttempt.objects.create(delivery=delivery, number=number, started_at=timezone.now(), duration_ms=3)
    return delivery


@pytest.mark.django_db
def test_summarize_counts_given_batches_only() -> None:
    feed = FeedFactory.create()
    per_event = ConnectionFactory.create(name="B per event")
    batched = ConnectionFactory.create(name="A batched", send_as_batch=True)
    first, second, unrelated = (InboundBatchFactory.create(feed=feed) for _ in range(3))
    Routing.objects.create(batch=first, connection=per_event, routed_count=3, filtered_count=1, duplicate_count=2)
    Routing.objects.create(batch=second, connection=per_event, routed_count=2, filtered_count=0)
    Routing.objects.create(batch=first, connection=batched, routed_count=4, filtered_count=2)
    Routing.objects.create(batch=unrelated, connection=per_event, routed_count=50, filtered_count=50)
    window = BatchWindow.objects.create(connection=batched, device_key="mp_deviceid:a", closes_at=timezone.now())
    WindowItem.objects.create(window=window, batch=first, kind=WindowItem.Kind.EVENT, body="{}")

    make_delivery(per_event, Delivery.Status.DELIVERED, 1, attempts=1, batch=first)
    make_delivery(per_event, Delivery.Status.DELIVERED, 1, attempts=2, batch=second)
    make_delivery(per_event, Delivery.Status.FAILED, 1, attempts=1, batch=first)
    make_delivery(per_event, Delivery.Status.RETRY_SCHEDULED, 2, attempts=1, batch=second)
    make_delivery(per_event, Delivery.Status.DELIVERED, 7, attempts=1, batch=unrelated)
    make_delivery(batched, Delivery.Status.DELIVERED, 4, attempts=1, batch=unrelated, window=window)

    summaries = demo.summarize([first.pk, second.pk])

    assert summaries == [
        demo.ConnectionSummary("A batched", routed=4, filtered=2, delivered=4, failed=0, requests=1),
        demo.ConnectionSummary("B per event", routed=5, filtered=1, duplicates=2, delivered=2, failed=1, requests=5),
    ]


@pytest.mark.django_db
def test_outstanding_work_counts_open_work() -> None:
    connection = ConnectionFactory.create(send_as_batch=True)
    batch = InboundBatchFactory.create()
    window = BatchWindow.objects.create(
        connection=connection, device_key="mpid:1", closes_at=timezone.now() + timedelta(seconds=3)
    )
    WindowItem.objects.create(window=window, batch=batch, kind=WindowItem.Kind.EVENT, body="{}")
    make_delivery(connection, Delivery.Status.IN_FLIGHT, 1, batch=batch)
    make_delivery(connection, Delivery.Status.DELIVERED, 1, batch=batch)

    outstanding = demo.outstanding_work([batch.pk])

    assert outstanding == demo.Outstanding(unrouted_batches=1, open_windows=1, unfinished_deliveries=1)
    assert not outstanding.done


def run_demo(tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Run `manage.py demo --stop-after-summary` on a database and broker under `tmp_path`."""
    environment = {
        **os.environ,
        "DATABASE_URL": f"sqlite:///{tmp_path / 'demo.sqlite3'}",
        "CELERY_BROKER_URL": "filesystem://",
        "PORTAL_FILESYSTEM_BROKER_DIR": str(tmp_path / "broker"),
        "PORTAL_ALLOW_LOOPBACK_TARGETS": "1",
    }
    argv = [sys.executable, "manage.py", "demo", "--stop-after-summary", "--timeout", "45"]
    argv += ["--port", str(free_port()), "--var-dir", str(tmp_path / "var")]
    process = subprocess.Popen(
        argv, cwd=PROJECT_ROOT, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        stdout, stderr = process.communicate(timeout=DEMO_RUN_SECONDS)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=30)
        pytest.fail(f"the demo ran longer than {DEMO_RUN_SECONDS} s:\n{stdout}\n{stderr}")
    return subprocess.CompletedProcess(argv, process.returncode, stdout, stderr)


def summary_rows(stdout: str) -> dict[str, dict[str, int]]:
    """Return the summary table's counts by connection name."""
    columns = ("routed", "filtered", "duplicates", "delivered", "failed", "requests")
    names = [plan.name for plan in demo.DEMO_CONNECTIONS] + ["total"]
    rows = {}
    for line in map(str.strip, stdout.splitlines()):
        name = next((name for name in names if line.startswith(name)), None)
        cells = line[len(name) :].split() if name else []
        if name and len(cells) == len(columns) and all(cell.isdigit() for cell in cells):
            rows[name] = dict(zip(columns, map(int, cells), strict=True))
    return rows


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    tmp_path = tmp_path_factory.mktemp("demo")
    return run_demo(tmp_path), tmp_path / "var" / "standin.jsonl"


def test_demo_run_succeeds(demo_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    result, _ = demo_run

    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    assert "OK: nothing failed" in result.stdout
    assert "recognised as a duplicate" in result.stdout


def test_demo_run_delivers_routed_events(
    demo_run: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    rows = summary_rows(demo_run[0].stdout)
    items = routed_item_types()

    assert rows["total"]["routed"] == sum(items.values())
    assert rows["total"]["failed"] == 0
    for plan in demo.DEMO_CONNECTIONS:
        assert rows[plan.name]["delivered"] == rows[plan.name]["routed"], plan.name
    assert rows["Consent changes"]["requests"] == sum(items[kind] for kind in NOTIFICATION_ROUTE_TYPES)


def test_demo_run_posts_survey_events_singly(demo_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    rows = summary_rows(demo_run[0].stdout)
    items = routed_item_types()

    assert rows["Surveys: custom & commerce events"]["requests"] == items["custom_event"] + items["commerce_event"]


def test_standin_records_every_request(
    demo_run: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    result, record_path = demo_run
    records = [json.loads(line) for line in record_path.read_text("utf-8").splitlines()]

    assert len(records) == summary_rows(result.stdout)["total"]["requests"]
    assert {record["status"] for record in records} == {200}
    assert {record["headers"]["Authorization"] for record in records} == {demo.DEMO_AUTHORIZATION}
