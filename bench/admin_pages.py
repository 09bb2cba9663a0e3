"""Server time of the operator's admin pages over a million deliveries.

    createdb -h 127.0.0.1 -U postgres cockpit_bench
    DATABASE_URL=postgres://postgres@127.0.0.1:5432/cockpit_bench .venv/bin/python bench/admin_pages.py

The script migrates the configured database and tops it up to `--rows`
deliveries (1,000,000 by default). Rows already there are kept, so a second
run only measures. It then times each page with Django's test client: a
first request with cold caches, then `--requests` more, and reports the
first, the median and the slowest of these in milliseconds. The time is the server's: URL resolution, queries,
template rendering; no network and no browser.

The data imitates two weeks of traffic, the dashboard's longest range: 20
connections, one batch per 10 deliveries, a routing row per delivery, one
attempt per delivered delivery and three per failed one, and payloads that
carry mpid, mp_deviceid, source_message_id and an event name.
"""

import argparse
import json
import os
import random
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")
# The timed pages run as in production: no query log kept in memory.
os.environ.setdefault("DJANGO_DEBUG", "false")

CONNECTIONS = 20
DELIVERIES_PER_BATCH = 10
SPAN = timedelta(days=14)
CHUNK = 5_000
EVENT_NAMES = ("Survey Eligible", "Checkout", "Add To Cart", "Support Chat Closed", "Subscription Renewed")
# Delivery outcomes and their share of rows; the rest are delivered.
OUTCOMES = (("failed", 0.03), ("retry_scheduled", 0.015), ("pending", 0.005), ("cancelled", 0.002))
# Attempts made per delivery status; other statuses made one.
ATTEMPTS = {"failed": 3, "pending": 0}


def main() -> None:
    import django

    django.setup()
    from django.core.management import call_command
    from django.db import connection as db

    arguments = parse_arguments()
    print(f"database: {db.vendor} {db.settings_dict['NAME']}")
    call_command("migrate", verbosity=0)
    existing = count_deliveries()
    if existing < arguments.rows:
        generate(arguments.rows - existing, existing)
    set_proposed_indexes(arguments.indexes == "proposed")
    analyze()
    print(f"deliveries: {count_deliveries():,}; indexes: {arguments.indexes}")
    report(time_pages(arguments.requests))


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000, help="deliveries the database should hold")
    parser.add_argument("--requests", type=int, default=7, help="timed requests per page")
    parser.add_argument(
        "--indexes",
        choices=("repository", "proposed"),
        default="repository",
        help="time with the models' indexes only, or with the indexes proposed in BENCHMARKS.md added",
    )
    return parser.parse_args()


def proposed_indexes() -> list[tuple[Any, Any]]:
    """Return the indexes proposed for the models' Meta, as (model, index), exactly as BENCHMARKS.md gives them."""
    from django.db import models

    from integrations.models import Delivery, DeliveryAttempt, Routing

    return [
        (
            Delivery,
            models.Index(fields=["created_at", "connection", "status", "event_count"], name="delivery_created_outcome"),
        ),
        (
            Routing,
            models.Index(
                fields=["created_at", "connection", "routed_count", "filtered_count"], name="routing_created_counts"
            ),
        ),
        (DeliveryAttempt, models.Index(fields=["started_at"], name="attempt_started_at")),
    ]


def set_proposed_indexes(wanted: bool) -> None:
    """Add the proposed indexes to the database, or drop them, so both cases can be timed on the same data."""
    from django.db import connection as db

    for model, index in proposed_indexes():
        with db.cursor() as cursor:
            present = index.name in db.introspection.get_constraints(cursor, model._meta.db_table)
        if wanted and not present:
            with db.schema_editor() as editor:
                editor.add_index(model, index)
        elif present and not wanted:
            with db.schema_editor() as editor:
                editor.remove_index(model, index)


def count_deliveries() -> int:
    from integrations.models import Delivery

    return Delivery.objects.count()


@contextmanager
def explicit_timestamps() -> Iterator[None]:
    """Let bulk_create store the generated times instead of the auto_now_add ones."""
    from events.models import InboundBatch
    from integrations.models import Delivery, Routing

    columns = ((InboundBatch, "received_at"), (Delivery, "created_at"), (Routing, "created_at"))
    fields: list[Any] = [model._meta.get_field(name) for model, name in columns]
    for field in fields:
        field.auto_now_add = False
    try:
        yield
    finally:
        for field in fields:
            field.auto_now_add = True


def generate(rows: int, offset: int) -> None:
    """Add `rows` deliveries, with their batches, routings and attempts, spread over the last two weeks."""
    from django.utils import timezone

    rng = random.Random(offset)
    connections = ensure_connections()
    feed = ensure_feed()
    now = timezone.now()
    started = time.monotonic()
    batches_needed = -(-rows // DELIVERIES_PER_BATCH)
    per_chunk = CHUNK // DELIVERIES_PER_BATCH
    start = now - SPAN
    with explicit_timestamps():
        for first in range(0, batches_needed, per_chunk):
            count = min(per_chunk, batches_needed - first)
            # In arrival order, as production writes them, so a time range is a contiguous part of each table.
            times = [start + SPAN * (first + index + rng.random()) / batches_needed for index in range(count)]
            generate_chunk(rng, feed, connections, times)
            done = min((first + count) * DELIVERIES_PER_BATCH, rows)
            print(f"\rgenerated {done:,} of {rows:,} deliveries ({time.monotonic() - started:.0f} s)", end="")
    print()


def ensure_connections() -> list[Any]:
    from django.utils import timezone

    from integrations.models import Connection

    connections = []
    for index in range(CONNECTIONS):
        connection, _ = Connection.objects.get_or_create(
            name=f"bench-{index:02d}",
            defaults={
                "post_url": f"https://iad1.qualtrics.com/inbound-event/v1/events/json/triggers?urlTokenId={uuid.uuid4()}",
                "authorization": "Basic YmVuY2g6YmVuY2gtdG9rZW4=",
                "event_types": ["custom_event", "screen_view", "commerce_event"],
                "send_as_batch": index % 2 == 0,
                "last_success_at": timezone.now(),
            },
        )
        connections.append(connection)
    paused = connections[-1]
    if paused.paused_at is None:
        Connection.objects.filter(pk=paused.pk).update(paused_at=timezone.now(), pause_reason="HTTP 401 (bench)")
    return connections


def ensure_feed() -> Any:
    from events.models import Feed

    feed = Feed.objects.filter(name="bench").first()
    if feed is None:
        feed = Feed(name="bench")
        feed.set_new_secret()
        feed.save()
    return feed


def generate_chunk(rng: random.Random, feed: Any, connections: list[Any], times: list[datetime]) -> None:
    from django.db import transaction

    from events.models import InboundBatch
    from integrations.models import Delivery, DeliveryAttempt, Routing

    with transaction.atomic():
        batches = InboundBatch.objects.bulk_create([make_batch(rng, feed, at) for at in times])
        routings, deliveries = [], []
        for batch in batches:
            for connection in rng.sample(connections, DELIVERIES_PER_BATCH):
                routed = rng.randint(1, 5)
                routings.append(
                    Routing(
                        batch=batch,
                        connection=connection,
                        routed_count=routed,
                        filtered_count=(batch.event_count or routed) - routed,
                        created_at=batch.received_at,
                    )
                )
                deliveries.append(make_delivery(rng, batch, connection, routed))
        Routing.objects.bulk_create(routings)
        Delivery.objects.bulk_create(deliveries)
        DeliveryAttempt.objects.bulk_create([attempt for d in deliveries for attempt in make_attempts(rng, d)])


def make_batch(rng: random.Random, feed: Any, received_at: datetime) -> Any:
    from events.models import InboundBatch

    body = json.dumps({"events": [], "mpid": str(rng.getrandbits(62)), "environment": "production"})
    return InboundBatch(
        feed=feed,
        body=body,
        body_bytes=len(body),
        received_at=received_at,
        status="routed",
        routed_at=received_at + timedelta(milliseconds=40),
        event_count=rng.randint(5, 12),
    )


def make_delivery(rng: random.Random, batch: Any, connection: Any, events: int) -> Any:
    from integrations.models import Delivery

    status = pick_status(rng)
    delivered = status == "delivered"
    created_at = batch.received_at + timedelta(milliseconds=60)
    latency = timedelta(milliseconds=rng.lognormvariate(5.5, 0.8))
    return Delivery(
        connection=connection,
        batch=batch,
        payload=make_payload(rng, events),
        event_count=events,
        event_types=["custom_event"],
        status=status,
        attempt_count=ATTEMPTS.get(status, 1),
        last_status_code=200 if delivered else 503,
        last_error="" if delivered else "HTTP 503",
        created_at=created_at,
        delivered_at=created_at + latency if delivered else None,
        next_attempt_at=created_at + timedelta(minutes=5) if status == "retry_scheduled" else None,
    )


def pick_status(rng: random.Random) -> str:
    draw = rng.random()
    for status, share in OUTCOMES:
        if draw < share:
            return status
        draw -= share
    return "delivered"


def make_payload(rng: random.Random, events: int) -> str:
    """Return a compact JSON body like the ones shaping produces, about 200 bytes per event."""
    body = {
        "events": [
            {
                "data": {
                    "event_name": rng.choice(EVENT_NAMES),
                    "custom_event_type": "other",
                    "source_message_id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                    "timestamp_unixtime_ms": 1767225000000 + index,
                    "custom_attributes": {"plan": "pro"},
                },
                "event_type": "custom_event",
            }
            for index in range(events)
        ],
        "mpid": str(rng.getrandbits(62)),
        "mp_deviceid": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        "environment": "production",
    }
    return json.dumps(body, separators=(",", ":"))


def make_attempts(rng: random.Random, delivery: Any) -> list[Any]:
    from integrations.models import DeliveryAttempt

    status_code = 200 if delivery.status == "delivered" else 503
    return [
        DeliveryAttempt(
            delivery=delivery,
            number=number,
            started_at=delivery.created_at + timedelta(seconds=30 * (number - 1)),
            duration_ms=rng.randint(40, 900),
            status_code=status_code,
            error="" if status_code == 200 else "HTTP 503",
            response_excerpt=json.dumps({"meta": {"httpStatus": str(status_code)}}),
        )
        for number in range(1, delivery.attempt_count + 1)
    ]


def analyze() -> None:
    """Refresh the planner's statistics and the visibility map, as autovacuum would after a load."""
    from django.db import connection as db

    if db.vendor != "postgresql":
        return
    with db.cursor() as cursor:
        for table in (
            "events_inboundbatch",
            "integrations_routing",
            "integrations_delivery",
            "integrations_deliveryattempt",
        ):
            cursor.execute(f"VACUUM ANALYZE {table}")


def time_pages(requests: int) -> dict[str, list[float]]:
    from django.contrib.auth import get_user_model
    from django.test import Client
    from django.urls import reverse

    from integrations.models import Delivery

    user_model = get_user_model()
    user = user_model.objects.filter(username="bench").first() or user_model.objects.create_superuser(
        "bench", "bench@example.com", "bench"
    )
    client = Client()
    client.force_login(user)
    failed = Delivery.objects.filter(status="failed").order_by("-created_at").only("pk").first()
    assert failed is not None, "no failed delivery generated"
    pages: dict[str, Callable[[], Any]] = {
        "connection list": lambda: client.get(reverse("admin:integrations_connection_changelist")),
        "delivery list": lambda: client.get(reverse("admin:integrations_delivery_changelist")),
        "delivery list, failed": lambda: client.get(
            reverse("admin:integrations_delivery_changelist"), {"status__exact": "failed"}
        ),
        "delivery search (mpid)": lambda: client.get(
            reverse("admin:integrations_delivery_changelist"), {"q": "mpid:1234567"}
        ),
        "delivery detail": lambda: client.get(reverse("admin:integrations_delivery_change", args=[failed.pk])),
        "dashboard": lambda: client.get(reverse("admin:integrations_dashboard")),
    }
    return {name: timed(page, requests) for name, page in pages.items()}


def timed(page: Callable[[], Any], requests: int) -> list[float]:
    """Return the durations in ms of one first request (caches cold) and then `requests` more."""
    durations = []
    for _ in range(requests + 1):
        started = time.perf_counter()
        response = page()
        durations.append((time.perf_counter() - started) * 1000)
        assert response.status_code == 200, response.status_code
    return durations


def report(results: dict[str, list[float]]) -> None:
    print(f"| {'page':<26} | {'first ms':>8} | {'median ms':>9} | {'max ms':>6} |")
    print(f"|{'-' * 28}|{'-' * 9}:|{'-' * 10}:|{'-' * 7}:|")
    for name, (first, *rest) in results.items():
        print(f"| {name:<26} | {first:>8.0f} | {statistics.median(rest):>9.0f} | {max(rest):>6.0f} |")


if __name__ == "__main__":
    main()
