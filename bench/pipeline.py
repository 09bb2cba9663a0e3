"""`make bench`: the whole pipeline beside its physical ceilings, on this machine, in one run.

    .venv/bin/python -m bench.pipeline [--rounds 3] [--profile]

Steps, each figure the median of `--rounds` rounds with min and max:

1. Ingest: gunicorn serves the portal (DEBUG off, production settings) and,
   on another port with the same gunicorn settings, the bare-insert ceiling
   (`bench.ceiling_app`). A closed-loop aiohttp client finds each one's
   highest rate for a 5 KB batch of 10 events. An open-loop client then
   measures the portal's latency at half its highest rate. No Celery worker
   runs yet, so the web server has the machine to itself.
2. One POST per event: a Celery worker and beat start, and a connection
   without Send as Batch receives every event. The rate counts from the
   first inbound POST to the last POST recorded by the stand-in
   (`bench.receiver`). The ceiling is a plain `requests.Session` loop
   POSTing the same payload to the same stand-in.
3. Send as Batch: the same with a connection that collects each device's
   events for `--window` seconds, many devices.
4. Memory: the peak RSS of a web worker and the Celery worker so far, then
   their growth while a 10 MB batch is accepted and routed, for each mode.
5. Scaling, in this process with the servers stopped: routing batches of
   10, 100 and 1,000 events, and a flush run with 100 due windows beside
   1,000 and 100,000 open ones.

`DATABASE_URL` and `CELERY_BROKER_URL` default to the local PostgreSQL
database `portal_bench` and Redis database 7; PostgreSQL, Redis and the
database are started or created when missing. The database is emptied at
the start, so its name must contain "bench". Results, logs and profiles
go to `var/bench/`.
"""

import argparse
import asyncio
import base64
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests

from bench import profiles
from bench.batches import BatchTemplate
from bench.loadgen import LoadResult, Target, closed_loop, open_loop, post_each
from bench.report import Figure, context_lines, formatted, table, target_lines, write_results
from bench.services import (
    REPO,
    BenchError,
    Children,
    CpuMeter,
    descendants,
    ensure_postgres,
    ensure_redis,
    executable,
    memory_kib,
    pids_named,
    reset_peak_memory,
    wait_for_http,
)

DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/portal_bench"
DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/7"
HOST = "127.0.0.1"
WEB_PORT, CEILING_PORT, RECEIVER_PORT = 19080, 19081, 19082
# Fixed values for a benchmark database only; none of them protects anything.
SECRET_KEY = "portal-bench-secret-key-not-for-production-0123456789"
FERNET_KEY = base64.urlsafe_b64encode(b"portal-bench-key-not-a-secret-32").decode()
AUTHORIZATION = "Basic " + base64.b64encode(b"bench:bench").decode()
EVENTS_PER_BATCH = 10
MEMORY_BODY_BYTES = 10_000_000
WAIT_SECONDS = 180.0
STEPS = ("ingest", "per-event", "batched", "memory", "round-trips", "scaling")


@dataclass(frozen=True)
class Options:
    rounds: int
    seconds: float
    web_workers: int
    worker_processes: int
    worker_threads: int
    round_seconds: float
    max_batches: int
    batches_per_device: int
    window: int
    profile: bool
    out: Path
    steps: tuple[str, ...]


def parse_options(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(prog="python -m bench.pipeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds per figure (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds per ingest round (default: %(default)s)")
    parser.add_argument(
        "--round-seconds", type=float, default=10.0, help="aim of an end-to-end round's length (default: %(default)s)"
    )
    parser.add_argument(
        "--max-batches", type=int, default=3000, help="maximum batches in an end-to-end round (default: %(default)s)"
    )
    parser.add_argument(
        "--batches-per-device", type=int, default=4, help="Send as Batch: batches per device in a round (default: 4)"
    )
    parser.add_argument("--window", type=int, default=1, help="batch window in seconds (default: %(default)s)")

    # The servers, as `make web` and `make worker` run them unless changed here.
    web_workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
    parser.add_argument("--web-workers", type=int, default=web_workers, help="gunicorn workers (default: %(default)s)")
    parser.add_argument("--worker-processes", type=int, default=1, help="Celery worker processes (default: 1)")
    threads = int(os.environ.get("WORKER_CONCURRENCY", "8"))
    parser.add_argument(
        "--worker-threads", type=int, default=threads, help="threads per Celery worker (default: %(default)s)"
    )

    parser.add_argument(
        "--profile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="profile the web worker and the Celery worker with py-spy and routing with pyinstrument (default: on)",
    )
    parser.add_argument("--out", type=Path, default=REPO / "var" / "bench")
    parser.add_argument(
        "--steps", default=",".join(STEPS), help="comma-separated steps to run (default: all of %(default)s)"
    )

    values = parser.parse_args(argv)
    steps = tuple(step.strip() for step in values.steps.split(",") if step.strip())
    unknown = set(steps) - set(STEPS)
    if unknown:
        parser.error(f"unknown steps {', '.join(sorted(unknown))}; choose from {', '.join(STEPS)}")
    return Options(**{**vars(values), "steps": steps})


def configure_environment() -> tuple[str, str]:
    """Set this process's environment for Django and return the database and broker URLs."""
    database_url = os.environ.setdefault("DATABASE_URL", DEFAULT_DATABASE_URL)
    broker_url = os.environ.setdefault("CELERY_BROKER_URL", DEFAULT_BROKER_URL)
    if "bench" not in urlsplit(database_url).path:
        raise BenchError(f"The benchmark empties its database; {database_url} does not look like a benchmark database.")
    os.environ.update(
        {
            "DJANGO_SETTINGS_MODULE": "portal.settings",
            "DJANGO_DEBUG": "false",
            "DJANGO_SECRET_KEY": SECRET_KEY,
            "PORTAL_ENCRYPTION_KEYS": FERNET_KEY,
            "PORTAL_ALLOW_LOOPBACK_TARGETS": "1",
            # The harness logs only problems; its children log as `make worker` does.
            "PORTAL_LOG_LEVEL": "WARNING",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return database_url, broker_url


def child_environment(**changes: str) -> dict[str, str]:
    """Return this process's environment with `changes`; an empty value removes the variable."""
    environment = {**os.environ, "PORTAL_LOG_LEVEL": "INFO", **changes}
    return {name: value for name, value in environment.items() if value != ""}


# The portal under production settings. Loopback targets are refused in
# production, and the web server never POSTs, so it goes without them.
WEB_ENVIRONMENT = {
    "PORTAL_PRODUCTION": "1",
    "DJANGO_ALLOWED_HOSTS": f"{HOST},localhost",
    "DJANGO_SECURE_SSL_REDIRECT": "false",
    "PORTAL_ALLOW_LOOPBACK_TARGETS": "",
}


class Bench:
    """One benchmark run: its children, its seeded feed and connections, and the figures measured so far."""

    def __init__(self, options: Options, database_url: str) -> None:
        self.options = options
        self.database_name = urlsplit(database_url).path.lstrip("/")
        self.children = Children(options.out)
        self.figures: dict[str, Figure] = {}
        self.context: dict[str, Any] = {"cpu": {}, "notes": []}
        self.template = BatchTemplate(EVENTS_PER_BATCH)
        self.secret = ""
        self._device = 0

    # Figures and output.

    def figure(self, key: str, label: str, unit: str, note: str = "") -> Figure:
        self.figures[key] = Figure(key, label, unit, note=note)
        return self.figures[key]

    def say(self, text: str) -> None:
        print(text, flush=True)

    # Preparation.

    def prepare(self) -> None:
        from django.core.management import call_command

        from bench import ceiling_app

        self.say(f"Migrating {self.database_name} ...")
        call_command("migrate", interactive=False, verbosity=0)
        ceiling_app.create_table()
        self.reset_data()
        self.seed()

    def reset_data(self) -> None:
        """Empty the tables the pipeline writes and the broker's queue; connections and the feed stay."""
        from django.db import connection

        from bench import ceiling_app
        from events.models import InboundBatch, SeenEvent
        from integrations.models import BatchWindow, Delivery, DeliveryAttempt, Routing, WindowItem
        from portal.celery import app

        models = (InboundBatch, SeenEvent, Routing, BatchWindow, WindowItem, Delivery, DeliveryAttempt)
        tables = [model._meta.db_table for model in models] + [ceiling_app.TABLE]
        with connection.cursor() as cursor:
            cursor.execute(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE")
        app.control.purge()

    def seed(self) -> None:
        from events.event_types import RouteType
        from events.models import Feed
        from integrations.models import Connection

        Connection.objects.all().delete()
        Feed.objects.all().delete()
        feed = Feed(name="bench")
        self.secret = feed.set_new_secret()
        feed.save()
        for name, send_as_batch in (("per event", False), ("send as batch", True)):
            connection = Connection(
                name=name,
                post_url=f"http://{HOST}:{RECEIVER_PORT}/inbound-event/v1/events/json/triggers?urlTokenId=bench",
                authorization=AUTHORIZATION,
                event_types=list(RouteType.values),
                send_as_batch=send_as_batch,
                batch_window_seconds=self.options.window,
                # Protection limits high enough never to postpone: the benchmark measures the pipeline.
                rate_limit_per_minute=10_000_000,
                concurrency_limit=1000,
                active=False,
            )
            connection.full_clean()
            connection.save()

    def activate(self, name: str) -> None:
        from integrations.models import Connection

        Connection.objects.update(active=False)
        Connection.objects.filter(name=name).update(active=True)

    # Children.

    def gunicorn(self, name: str, app: str, port: int, environment: dict[str, str]) -> None:
        argv = [executable("gunicorn"), app, "--bind", f"{HOST}:{port}", "--workers", str(self.options.web_workers)]
        argv += ["--graceful-timeout", "5", "--no-control-socket"]
        self.children.start(name, argv, environment)

    def start_servers(self) -> None:
        receiver_argv = [sys.executable, "-m", "bench.receiver", "--port", str(RECEIVER_PORT)]
        self.children.start("receiver", receiver_argv, child_environment())
        self.gunicorn("web", "portal.wsgi", WEB_PORT, child_environment(**WEB_ENVIRONMENT))
        ceiling_environment = child_environment(DJANGO_SETTINGS_MODULE="bench.ceiling_settings")
        self.gunicorn("ceiling", "bench.ceiling_app:application", CEILING_PORT, ceiling_environment)
        wait_for_http(f"http://{HOST}:{WEB_PORT}/healthz", self.children)
        wait_for_http(f"http://{HOST}:{CEILING_PORT}/ingest/", self.children, expect=405)
        wait_for_http(f"http://{HOST}:{RECEIVER_PORT}/stats", self.children)

    def start_celery(self) -> None:
        environment = child_environment(PORTAL_FLUSH_INTERVAL_SECONDS=str(min(self.options.window, 1)))
        for index in range(1, self.options.worker_processes + 1):
            argv = [executable("celery"), "-A", "portal", "worker", "--pool", "threads"]
            argv += ["--concurrency", str(self.options.worker_threads), "--loglevel", "INFO"]
            argv += ["--hostname", f"bench{index}@%h"]
            self.children.start(f"worker-{index}", argv, environment)
        schedule = str(self.options.out / "celerybeat-schedule")
        argv = [executable("celery"), "-A", "portal", "beat", "--loglevel", "INFO", "--schedule", schedule]
        self.children.start("beat", argv, environment)
        self._wait_for_workers()

    def _wait_for_workers(self) -> None:
        from portal.celery import app

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            self.children.check_alive()
            replies = app.control.ping(timeout=1.0) or []
            if len(replies) >= self.options.worker_processes:
                return
        raise BenchError(f"The Celery workers did not respond to a ping within a minute; see {self.options.out}.")

    def pids(self, name: str) -> list[int]:
        """Return the processes of the named children (a name prefix), leaders and descendants."""
        found: list[int] = []
        for child in self.children.started:
            if child.name.startswith(name):
                found += descendants(child.process.pid)
        return found

    def web_workers(self) -> list[int]:
        master = next(child.process.pid for child in self.children.started if child.name == "web")
        return [pid for pid in descendants(master) if pid != master]

    def worker_pids(self) -> list[int]:
        return [child.process.pid for child in self.children.started if child.name.startswith("worker-")]

    def postgres_pids(self) -> list[int]:
        """Return this database's backends and the server's own processes, not other databases' backends."""
        ours = []
        for pid in pids_named("postgres"):
            with suppress(FileNotFoundError, ProcessLookupError):
                command = Path(f"/proc/{pid}/cmdline").read_text()
                if f" {self.database_name} " in command or "(" not in command:
                    ours.append(pid)
        return ours

    def cpu_meter(self) -> CpuMeter:
        return CpuMeter(
            {
                "web": lambda: self.pids("web"),
                "ceiling": lambda: self.pids("ceiling"),
                "celery worker": lambda: self.pids("worker-"),
                "celery beat": lambda: self.pids("beat"),
                "stand-in": lambda: self.pids("receiver"),
                "load generator and harness": lambda: [os.getpid()],
                "postgres": self.postgres_pids,
                "redis": lambda: pids_named("redis-server"),
            }
        )

    def metered(self, key: str, unit: str, work: Callable[[], tuple[int, float]]) -> tuple[int, float]:
        """Run `work`, which returns how many `unit`s it handled in how many seconds; keep the CPU used meanwhile."""
        meter = self.cpu_meter()
        meter.start()
        units, seconds = work()
        cores = meter.stop()
        entry = self.context["cpu"].setdefault(key, {"unit": unit, "rounds": []})
        entry["rounds"].append({"units": units, "seconds": seconds, "wall": meter.seconds, "cores": cores})
        return units, seconds

    # Loads.

    def next_body(self) -> bytes:
        self._device += 1
        return self.template.render(f"bench-device-{self._device}")

    def inbound_target(self) -> Target:
        headers = {"Authorization": f"Bearer {self.secret}", "Content-Type": "application/json"}
        return Target(f"http://{HOST}:{WEB_PORT}/api/v1/mparticle/", headers, self.next_body)

    def ceiling_target(self) -> Target:
        headers = {"Content-Type": "application/json"}
        return Target(f"http://{HOST}:{CEILING_PORT}/ingest/", headers, self.next_body)

    # 1. Ingest.

    def ingest(self) -> None:
        options = self.options
        concurrency = 4 * options.web_workers
        product, ceiling = self.inbound_target(), self.ceiling_target()
        rate = self.figure("ingest_rate", "Ingest: accepted batches", "batches/s")
        ceiling_rate = self.figure("ceiling_rate", "Ingest ceiling: bare INSERT view", "batches/s")
        self.say(f"Ingest: {len(self.next_body())}-byte batches of {EVENTS_PER_BATCH} events, {concurrency} clients")
        asyncio.run(closed_loop(product, concurrency, 1.0))
        asyncio.run(closed_loop(ceiling, concurrency, 1.0))
        for round_number in range(1, options.rounds + 1):
            result = self.load("ingest, portal", "batch", product, concurrency)
            rate.values.append(result.rate)
            ceiling_result = self.load("ingest, bare-insert ceiling", "batch", ceiling, concurrency)
            ceiling_rate.values.append(ceiling_result.rate)
            self.say(
                f"  round {round_number}: portal {result.rate:.0f}/s ({result.rejected} rejected, "
                f"{result.errors} errors), ceiling {ceiling_result.rate:.0f}/s"
            )
        self.ingest_latency(product, ceiling)
        if options.profile:
            self.profile_web(product, concurrency)
        self.reset_data()

    def load(self, key: str, unit: str, target: Target, concurrency: int) -> LoadResult:
        """Run one closed-loop round against `target`, metered under `key`."""
        results: list[LoadResult] = []

        def work() -> tuple[int, float]:
            results.append(asyncio.run(closed_loop(target, concurrency, self.options.seconds)))
            return results[0].accepted, results[0].seconds

        self.metered(key, unit, work)
        return results[0]

    def ingest_latency(self, product: Target, ceiling: Target) -> None:
        half = self.figures["ingest_rate"].median / 2
        ceiling_half = self.figures["ceiling_rate"].median / 2
        p50 = self.figure("ingest_p50", f"Ingest p50 at half the highest rate ({half:.0f}/s)", "ms")
        p99 = self.figure("ingest_p99", f"Ingest p99 at half the highest rate ({half:.0f}/s)", "ms")
        ceiling_p99 = self.figure("ceiling_p99", f"Ceiling p99 at half its highest rate ({ceiling_half:.0f}/s)", "ms")
        for round_number in range(1, self.options.rounds + 1):
            result = asyncio.run(open_loop(product, half, self.options.seconds))
            p50.values.append(result.percentile(0.5))
            p99.values.append(result.percentile(0.99))
            ceiling_result = asyncio.run(open_loop(ceiling, ceiling_half, self.options.seconds))
            ceiling_p99.values.append(ceiling_result.percentile(0.99))
            self.say(
                f"  latency round {round_number}: portal p50 {p50.values[-1]:.1f} ms, p99 {p99.values[-1]:.1f} ms "
                f"({result.accepted} accepted of {int(half * self.options.seconds)}); ceiling p99 "
                f"{ceiling_p99.values[-1]:.1f} ms"
            )

    def profile_web(self, product: Target, concurrency: int) -> None:
        master = next(child.process.pid for child in self.children.started if child.name == "web")
        output = self.options.out / "profile-ingest.raw"
        spy = profiles.record(master, self.options.seconds, output, subprocesses=True)
        asyncio.run(closed_loop(product, concurrency, self.options.seconds))
        self._finish_profile(spy, output)

    def _finish_profile(self, spy: "subprocess.Popen[bytes]", output: Path) -> None:
        _, errors = spy.communicate(timeout=60)
        if spy.returncode != 0:
            self.context["notes"].append(f"py-spy failed for {output.name}: {errors.decode(errors='replace')[-300:]}")
            return
        summary = profiles.summarize(output)
        output.with_suffix(".txt").write_text("\n".join(summary) + "\n")
        self.say("\n".join(summary[:12]))

    # 2. and 3. End to end.

    def end_to_end(self, key: str, label: str, connection: str, batches_per_device: int = 1) -> None:
        """Measure one delivery mode end to end, in rounds sized to last about `--round-seconds` each.

        A warm-up round of 50 batches sets the size. Its rate includes the
        wait for a batch window to close, so for Send as Batch the estimate is
        low and the rounds come out shorter than aimed, not longer.
        """
        self.activate(connection)
        rate = self.figure(key, label, "events/s")
        warm_up = 50
        events, seconds, _ = self.run_pipeline(warm_up, max(warm_up // batches_per_device, 1))
        sized = int(events / seconds * self.options.round_seconds / EVENTS_PER_BATCH)
        batches = min(max(sized, warm_up), self.options.max_batches)
        devices = max(batches // batches_per_device, 1)
        self.say(f"{label}: {batches} batches of {EVENTS_PER_BATCH} events from {devices} devices per round")
        posts = []
        for round_number in range(1, self.options.rounds + 1):
            events, seconds, requests_made = self.run_pipeline(batches, devices, metered_as=label)
            rate.values.append(events / seconds)
            posts.append(requests_made)
            self.say(f"  round {round_number}: {events} events in {seconds:.2f} s over {requests_made} POSTs")
        rate.note = f"{batches} batches from {devices} devices, {statistics.median(posts):.0f} POSTs per round"

    def run_pipeline(self, batches: int, devices: int, metered_as: str = "") -> tuple[int, float, int]:
        """POST `batches` batches and wait until every event is delivered; return events, seconds and POSTs.

        The time runs from the first inbound POST to the last POST the stand-in recorded.
        """
        self.reset_data()
        requests.get(f"http://{HOST}:{RECEIVER_PORT}/reset", timeout=5).raise_for_status()
        bodies = [self.template.render(f"device-{self._device}-{number % devices}") for number in range(batches)]
        self._device += 1
        target = self.inbound_target()
        stats: dict[str, Any] = {}

        def work() -> tuple[int, float]:
            started = time.time()
            result = asyncio.run(post_each(target.url, target.headers, bodies, concurrency=8))
            if result.accepted != batches:
                raise BenchError(f"{batches - result.accepted} of {batches} batches were not accepted.")
            delivered = self.wait_until_delivered(batches * EVENTS_PER_BATCH)
            stats.update(requests.get(f"http://{HOST}:{RECEIVER_PORT}/stats", timeout=5).json())
            return delivered, stats["last_at"] - started

        events, seconds = self.metered(metered_as, "event", work) if metered_as else work()
        return events, seconds, stats["requests"]

    def wait_until_delivered(self, events: int) -> int:
        """Wait until nothing is left to route, flush or deliver; return the events delivered."""
        from django.db.models import Sum

        from events.models import InboundBatch
        from integrations.models import BatchWindow, Delivery

        unfinished = (Delivery.Status.PENDING, Delivery.Status.IN_FLIGHT, Delivery.Status.RETRY_SCHEDULED)
        deadline = time.monotonic() + WAIT_SECONDS
        while time.monotonic() < deadline:
            self.children.check_alive()
            busy = (
                InboundBatch.objects.filter(status=InboundBatch.Status.RECEIVED).exists()
                or BatchWindow.objects.filter(status=BatchWindow.Status.OPEN).exists()
                or Delivery.objects.filter(status__in=unfinished).exists()
            )
            if not busy:
                delivered = Delivery.objects.filter(status=Delivery.Status.DELIVERED).aggregate(n=Sum("event_count"))
                if delivered["n"] != events:
                    raise BenchError(f"{delivered['n']} of {events} events were delivered; see the worker log.")
                return events
            time.sleep(0.1)
        raise BenchError(f"The pipeline did not finish within {WAIT_SECONDS:.0f} s; see {self.options.out}.")

    def post_ceiling(self) -> None:
        """Time a plain requests.Session loop POSTing a real delivery payload to the same stand-in."""
        from integrations.models import Delivery

        figure = self.figure("post_ceiling", "Ceiling: plain requests.Session loop", "POSTs/s")
        sample = Delivery.objects.filter(status=Delivery.Status.DELIVERED).order_by("pk").first()
        payload = sample.payload.encode() if sample else self.next_body()
        url = f"http://{HOST}:{RECEIVER_PORT}/inbound-event/v1/events/json/triggers?urlTokenId=bench"
        headers = {"Content-Type": "application/json; charset=utf-8", "Authorization": AUTHORIZATION}
        with requests.Session() as session:
            for _ in range(self.options.rounds):
                count, started = 0, time.perf_counter()
                while time.perf_counter() - started < 3.0:
                    count += session.post(url, data=payload, headers=headers, timeout=10).status_code == 200
                figure.values.append(count / (time.perf_counter() - started))
        figure.note = f"{len(payload)}-byte payload"
        self.say(f"  plain requests loop: {formatted(figure.median)} POSTs/s")

    def profile_worker(self) -> None:
        output = self.options.out / "profile-worker.raw"
        spy = profiles.record(self.worker_pids()[0], 8, output)
        batches = int(self.figures["e2e_rate"].median * 8 / EVENTS_PER_BATCH)
        self.run_pipeline(min(max(batches, 50), self.options.max_batches), max(batches, 50))
        self._finish_profile(spy, output)

    # 4. Memory.

    def memory(self) -> None:
        mib = 1024.0
        web_peak = max(memory_kib(pid, "VmHWM") for pid in self.web_workers()) / mib
        worker_peak = max(memory_kib(pid, "VmHWM") for pid in self.worker_pids()) / mib
        body = BatchTemplate(self._events_for(MEMORY_BODY_BYTES)).render("memory-device")
        self.say(f"Memory: a {len(body) / 1e6:.1f} MB batch of {body.count(b'source_message_id')} events")
        self.figure("web_peak_mb", "Web worker peak RSS under load", "MiB").values.append(web_peak)
        self.figure("worker_load_peak_mb", "Celery worker peak RSS under load", "MiB").values.append(worker_peak)
        growth = {}
        for connection in ("send as batch", "per event"):
            self.activate(connection)
            growth[connection] = self._growth_for(body, wait_for_delivery=connection == "send as batch")
            self.say(
                f"  {connection}: web worker +{growth[connection][0]:.0f} MiB, worker +{growth[connection][1]:.0f} MiB"
            )
        web_growth = max(web for web, _, _ in growth.values())
        worker_peak = max([worker_peak] + [peak for _, _, peak in growth.values()])
        self.figure("worker_peak_mb", "Celery worker peak RSS (load and 10 MB batch)", "MiB").values.append(worker_peak)
        self.figure("web_growth_mb", "Web worker growth for the 10 MB batch", "MiB").values.append(web_growth)
        self.figure("web_growth_x", "Web worker growth / body size", "x").values.append(
            web_growth * mib * 1024 / len(body)
        )
        for connection, (_, worker, _) in growth.items():
            key = "worker_growth_batch_mb" if connection == "send as batch" else "worker_growth_event_mb"
            self.figure(key, f"Celery worker growth routing it ({connection})", "MiB").values.append(worker)

    def _events_for(self, size: int) -> int:
        small, large = len(BatchTemplate(10).render("x")), len(BatchTemplate(110).render("x"))
        per_event = (large - small) / 100
        return int((size - small) / per_event) + 10

    def _growth_for(self, body: bytes, *, wait_for_delivery: bool) -> tuple[float, float, float]:
        """POST `body`, wait until routed (and delivered); return web growth, worker growth and worker peak in MiB."""
        from events.models import InboundBatch
        from integrations.models import Delivery

        self.reset_data()
        watched = self.web_workers() + self.worker_pids()
        before = {pid: memory_kib(pid, "VmRSS") for pid in watched}
        for pid in watched:
            reset_peak_memory(pid)
        headers = {"Authorization": f"Bearer {self.secret}", "Content-Type": "application/json"}
        response = requests.post(f"http://{HOST}:{WEB_PORT}/api/v1/mparticle/", data=body, headers=headers, timeout=120)
        if response.status_code != 202:
            raise BenchError(f"The 10 MB batch got {response.status_code}: {response.text[:200]}")
        if wait_for_delivery:
            self.wait_until_delivered(body.count(b"source_message_id"))
        else:
            self._wait(lambda: not InboundBatch.objects.filter(status=InboundBatch.Status.RECEIVED).exists())
            # The deliveries themselves are not needed: cancel them and wait for those already taken.
            Delivery.objects.filter(status=Delivery.Status.PENDING).update(status=Delivery.Status.CANCELLED)
            self._wait(lambda: not Delivery.objects.filter(status=Delivery.Status.IN_FLIGHT).exists())
        growth = {pid: (memory_kib(pid, "VmHWM") - before[pid]) / 1024.0 for pid in watched}
        workers = self.worker_pids()
        return (
            max(growth[pid] for pid in watched if pid not in workers),
            max(growth[pid] for pid in workers),
            max(memory_kib(pid, "VmHWM") / 1024.0 for pid in workers),
        )

    def _wait(self, condition: Callable[[], bool]) -> None:
        deadline = time.monotonic() + WAIT_SECONDS
        while not condition():
            self.children.check_alive()
            if time.monotonic() > deadline:
                raise BenchError(f"Gave up waiting after {WAIT_SECONDS:.0f} s; see {self.options.out}.")
            time.sleep(0.1)

    # Round trips.

    def round_trips(self) -> None:
        """Stop everything but the stand-in and count each step's SQL statements and Redis calls here."""
        from bench import anatomy
        from events.models import Feed

        for name in [child.name for child in self.children.started if child.name != "receiver"]:
            self.children.stop(name)
        self.reset_data()
        steps = anatomy.count_all(Feed.objects.get(name="bench"), self.secret, self.activate)
        self.context["round_trips"] = [vars(step) for step in steps]
        self.reset_data()

    # 5. Scaling.

    def scaling(self) -> None:
        from bench import scaling
        from events.models import Feed
        from integrations.models import Connection

        feed = Feed.objects.get(name="bench")
        sizes = (10, 100, 1000)
        growth = self.figure("route_growth", "Routing: cost per event at 1,000 / at 100 (worst mode)", "x")
        for connection in ("per event", "send as batch"):
            self.activate(connection)
            self.reset_data()
            times = scaling.route_times(feed, sizes, max(self.options.rounds, 5))
            for size, values in times.items():
                self.figure(f"route_{connection}_{size}", f"Route {size} events ({connection})", "ms").values += [
                    value * 1000 for value in values
                ]
            per_event = [statistics.median(times[size]) / size * 1e6 for size in sizes]
            self.say(
                f"Routing ({connection}): "
                + ", ".join(f"{us:.0f} us/event at {n}" for us, n in zip(per_event, sizes, strict=True))
            )
            growth.values = [max([*growth.values, per_event[2] / per_event[1]])]
        self.activate("send as batch")
        self.reset_data()
        batched = Connection.objects.get(name="send as batch")
        times = scaling.flush_times(batched, feed, (1_000, 100_000), due=100, rounds=max(self.options.rounds, 5))
        for count, values in times.items():
            label = f"Flush 100 due windows beside {count:,} open"
            self.figure(f"flush_{count}", label, "ms").values += [value * 1000 for value in values]
        ratio = statistics.median(times[100_000]) / statistics.median(times[1_000])
        self.figure("flush_growth", "Flush: time beside 100,000 open / beside 1,000", "x").values.append(ratio)
        self.reset_data()
        if self.options.profile:
            self.profile_routing(feed)

    def profile_routing(self, feed: "Any") -> None:
        from pyinstrument import Profiler  # type: ignore[import-not-found, unused-ignore]  # the bench extra

        from bench import scaling
        from events import router

        self.activate("per event")
        batch = scaling.store(feed, BatchTemplate(1000).render("profile"))
        profiler = Profiler(interval=0.0005)
        profiler.start()
        router.route_batch(batch.pk)
        profiler.stop()
        text = profiler.output_text(unicode=False, color=False)
        (self.options.out / "profile-route-1000.txt").write_text(text)
        self.reset_data()


def machine() -> dict[str, Any]:
    memory = Path("/proc/meminfo").read_text().split("\n", 1)[0].split()[1]
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        "unknown",
    )
    return {
        "cores": os.cpu_count(),
        "memory_gib": round(int(memory) / 1024 / 1024, 1),
        "cpu": model,
        "load_before": os.getloadavg(),
    }


def run(options: Options, database_url: str) -> Bench:
    bench = Bench(options, database_url)
    bench.context.update(machine=machine(), options={k: str(v) for k, v in vars(options).items()})
    steps = options.steps
    try:
        bench.prepare()
        bench.start_servers()
        if "ingest" in steps:
            bench.ingest()
        if {"per-event", "batched", "memory"} & set(steps):
            bench.start_celery()
        if "per-event" in steps:
            bench.end_to_end("e2e_rate", "One POST per event, end to end", "per event")
            bench.post_ceiling()
            if options.profile:
                bench.profile_worker()
        if "batched" in steps:
            bench.end_to_end("batched_rate", "Send as Batch, end to end", "send as batch", options.batches_per_device)
        if "memory" in steps:
            bench.memory()
        if "round-trips" in steps:
            bench.round_trips()
    finally:
        bench.children.stop_all()
    if "scaling" in steps:
        bench.scaling()
    return bench


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_options(argv)
    options.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    try:
        database_url, broker_url = configure_environment()
        ensure_postgres(database_url)
        ensure_redis(broker_url)
        import django

        django.setup()
        bench = run(options, database_url)
    except BenchError as error:
        print(f"bench: {error}", file=sys.stderr)
        return 1
    bench.context["seconds"] = round(time.monotonic() - started)
    print()
    print("\n".join(table(bench.figures)))
    print()
    print("Targets:")
    print("\n".join(target_lines(bench.figures)))
    print()
    print("\n".join(context_lines(bench.context)))
    write_results(options.out / "results.json", bench.figures, bench.context)
    print(f"\nResults in {options.out / 'results.json'}; {bench.context['seconds']} s in all.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
