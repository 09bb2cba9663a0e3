"""The demo: the whole portal on this machine, fed with the project's own mParticle batches.

`python manage.py demo` runs these steps and prints a line for each:

1. migrate the database and create or update the superuser `admin` / `admin`
   (development only);
2. start the Qualtrics stand-in, then seed the feeds `ios-app` and `web-app`
   (new secrets on every run, printed once) and one connection per demo
   routing, pointed at the stand-in;
3. start gunicorn, a Celery worker and Celery beat, and wait for `/healthz`;
4. POST every file of `demo/batches/` over HTTP with its feed's secret;
5. wait until everything posted is routed and delivered, and print a table
   per connection.

Children run in their own process groups with their output in
`<var dir>/<name>.log`, and are always stopped on the way out. The demo
needs `PORTAL_ALLOW_LOOPBACK_TARGETS`, because its connections POST to the
stand-in on 127.0.0.1, and stops with an error when it is not set.
"""

import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import requests
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.db.models import Count, Q, QuerySet, Sum

from events.event_types import RouteType
from events.models import Feed, InboundBatch
from integrations import demo_showcase, jsontext, protection, shaping
from integrations.models import BatchWindow, Connection, Delivery, DeliveryAttempt, Routing
from portal.conf import portal_setting

Write = Callable[[str], None]

BASE_DIR = Path(settings.BASE_DIR)
BATCHES_DIR = BASE_DIR / "demo" / "batches"
DEFAULT_VAR_DIR = BASE_DIR / "var" / "demo"
DEMO_FEEDS = ("ios-app", "web-app")
# The stand-in checks this header. It is a fixed development credential, not a Qualtrics token.
DEMO_AUTHORIZATION = "Basic " + base64.b64encode(b"demo-user:demo-api-token").decode("ascii")
# Short intervals so that a demo run takes seconds, not the production minutes.
CHILD_ENVIRONMENT = {
    "PORTAL_ALLOW_LOOPBACK_TARGETS": "1",
    "PORTAL_FLUSH_INTERVAL_SECONDS": "1",
    "PORTAL_SWEEP_INTERVAL_SECONDS": "2",
    "PORTAL_RETRY_BASE_SECONDS": "1",
    "PYTHONUNBUFFERED": "1",
}
STARTUP_TIMEOUT_SECONDS = 60.0
STOP_GRACE_SECONDS = 10.0
POLL_SECONDS = 0.5
UNFINISHED = (Delivery.Status.PENDING, Delivery.Status.IN_FLIGHT, Delivery.Status.RETRY_SCHEDULED)
LISTENING_LINE = re.compile(r"listening on (http://\S+)")


class DemoError(Exception):
    """A failed demo step; the message names the step and the log to read."""


class StopRequested(Exception):
    """A SIGTERM received by the demo, which then stops its children and ends."""


@dataclass(frozen=True)
class ConnectionPlan:
    """One seeded connection: its routing, delivery mode and settings that differ from the defaults."""

    name: str
    event_types: tuple[str, ...]
    send_as_batch: bool
    batch_window_seconds: int = 3
    overrides: Mapping[str, object] = field(default_factory=dict)

    @property
    def mode(self) -> str:
        return f"batched, {self.batch_window_seconds} s window" if self.send_as_batch else "per event"


SURVEY_TYPES = (RouteType.CUSTOM_EVENT, RouteType.COMMERCE_EVENT)
SESSION_TYPES = (RouteType.SESSION_START, RouteType.SESSION_END, RouteType.SCREEN_VIEW)
CONSENT_TYPES = (RouteType.GDPR_CHANGE, RouteType.CCPA_CHANGE)
ROUTED_SEPARATELY = {*SURVEY_TYPES, *SESSION_TYPES, *CONSENT_TYPES}
DEMO_CONNECTIONS = (
    ConnectionPlan("Surveys: custom & commerce events", SURVEY_TYPES, send_as_batch=False),
    ConnectionPlan("Sessions & screens", SESSION_TYPES, send_as_batch=True),
    ConnectionPlan("Consent changes", CONSENT_TYPES, send_as_batch=False),
    ConnectionPlan(
        "Everything else",
        tuple(route_type for route_type in RouteType if route_type not in ROUTED_SEPARATELY),
        send_as_batch=True,
        overrides={"include_user_attribute_change_events": True, "include_user_identity_change_events": True},
    ),
)


@dataclass(frozen=True)
class DemoOptions:
    """The demo command's options."""

    port: int = 8000
    standin_port: int = 0
    timeout: float = 120.0
    var_dir: Path = DEFAULT_VAR_DIR
    seed: bool = True
    stop_after_summary: bool = False
    showcase_settings: bool = False


@dataclass(frozen=True)
class PostedBatch:
    """A demo batch file and the id under which the portal stored it."""

    file_name: str
    batch_id: int


@dataclass(frozen=True)
class ConnectionSummary:
    """Counts of what one connection received from the demo's batches (events counted by `event_count`)."""

    name: str
    routed: int = 0
    filtered: int = 0
    duplicates: int = 0
    delivered: int = 0
    failed: int = 0
    requests: int = 0


@dataclass(frozen=True)
class Outstanding:
    """Counts of the work still open for the demo's batches."""

    unrouted_batches: int
    open_windows: int
    unfinished_deliveries: int

    @property
    def done(self) -> bool:
        return not (self.unrouted_batches or self.open_windows or self.unfinished_deliveries)

    def __str__(self) -> str:
        return (
            f"{self.unrouted_batches} batches not routed, {self.open_windows} batch windows open, "
            f"{self.unfinished_deliveries} deliveries not finished"
        )


def run(options: DemoOptions, write: Write) -> bool:
    """Run the demo and return whether every step succeeded.

    Children are stopped before this returns. Raises DemoError when a step fails.
    """
    require_loopback_targets()
    options.var_dir.mkdir(parents=True, exist_ok=True)
    migrate(write)
    ensure_demo_admin(write)

    try:
        with stop_on_sigterm(), supervised(options.var_dir) as supervisor:
            succeeded = run_services(options, supervisor, write)
            if not options.stop_after_summary:
                wait_until_interrupted(supervisor, write)
            write("Stopping the stand-in, web server, worker and beat ...")
    except (KeyboardInterrupt, StopRequested):
        write("Interrupted; all children stopped.")
        return False
    write("All children stopped.")
    return succeeded


def run_services(options: DemoOptions, supervisor: "Supervisor", write: Write) -> bool:
    """Start the children, then seed, post and report unless seeding is off, and return whether nothing failed."""
    standin_url = start_standin(supervisor, options, write)
    secrets = seed(standin_url, write) if options.seed else {}
    if options.seed and options.showcase_settings:
        seed_showcase(standin_url, write)
    base_url = start_portal(supervisor, options, write)

    succeeded = True
    if options.seed:
        posted = post_batches(base_url, secrets, write)
        succeeded = report(posted, options, supervisor, write)
        if options.showcase_settings:
            report_showcase(options.var_dir / "standin.jsonl", write)
    else:
        write(f"Not seeding: connections keep their POST URLs; the stand-in listens on {standin_url}.")
    write(f"Log in at {base_url}/admin/ as admin / admin. Logs are in {options.var_dir}/.")
    return succeeded


def require_loopback_targets() -> None:
    """Raise DemoError unless PORTAL_ALLOW_LOOPBACK_TARGETS lets connections POST to the stand-in on 127.0.0.1."""
    if not portal_setting("ALLOW_LOOPBACK_TARGETS"):
        raise DemoError(
            "PORTAL_ALLOW_LOOPBACK_TARGETS is not set, so connections cannot POST to the demo's Qualtrics "
            "stand-in on 127.0.0.1. Run `PORTAL_ALLOW_LOOPBACK_TARGETS=1 python manage.py demo` or `make demo` "
            "(development only)."
        )


def migrate(write: Write) -> None:
    write("Migrating the database ...")
    call_command("migrate", interactive=False, verbosity=0)


def ensure_demo_admin(write: Write) -> None:
    """Create or reset the superuser admin with password admin."""
    user, _ = get_user_model().objects.get_or_create(username="admin")
    user.is_staff = True
    user.is_superuser = True
    user.is_active = True
    user.set_password("admin")
    user.save()
    write("Superuser admin with password admin is ready (a demo account: development only).")


@contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into StopRequested while the block runs, so that cleanup runs as for Ctrl-C."""

    def request_stop(signum: int, frame: FrameType | None) -> None:
        raise StopRequested

    previous = signal.signal(signal.SIGTERM, request_stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclass
class Child:
    """A started child process and its log file."""

    name: str
    process: "subprocess.Popen[bytes]"
    log_path: Path


class Supervisor:
    """Starts child processes, each leading its own process group, and stops them all."""

    def __init__(self, log_dir: Path, environment: Mapping[str, str]) -> None:
        self.log_dir = log_dir
        self.environment = dict(environment)
        self.children: list[Child] = []

    def start(self, name: str, argv: Sequence[str]) -> Child:
        """Start `argv` with its output in `<log dir>/<name>.log`, truncated first."""
        log_path = self.log_dir / f"{name}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                list(argv),
                cwd=BASE_DIR,
                env=self.environment,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        child = Child(name, process, log_path)
        self.children.append(child)
        return child

    def check_alive(self) -> None:
        """Raise DemoError when a child has exited."""
        for child in self.children:
            code = child.process.poll()
            if code is not None:
                raise DemoError(f"The {child.name} process exited with status {code}; see {child.log_path}.")

    def stop_all(self, grace_seconds: float = STOP_GRACE_SECONDS) -> None:
        """Send SIGTERM to every child's process group, then SIGKILL to the groups left after the grace.

        A group counts as stopped once its leader and every other member (gunicorn's workers) have exited.
        """
        running = [child for child in reversed(self.children) if _group_alive(child)]
        for child in running:
            _signal_group(child, signal.SIGTERM)
        deadline = time.monotonic() + grace_seconds
        for child in running:
            if not _wait_for_group(child, deadline):
                _signal_group(child, signal.SIGKILL)
                child.process.wait()


def _group_alive(child: Child) -> bool:
    """Reap the leader if it exited, then return whether any process of the child's group is still running."""
    child.process.poll()
    try:
        os.killpg(child.process.pid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_for_group(child: Child, deadline: float) -> bool:
    while time.monotonic() < deadline:
        if not _group_alive(child):
            return True
        time.sleep(0.05)
    return not _group_alive(child)


def _signal_group(child: Child, signum: signal.Signals) -> None:
    with suppress(ProcessLookupError):
        os.killpg(child.process.pid, signum)


@contextmanager
def supervised(log_dir: Path) -> Iterator[Supervisor]:
    """Yield a Supervisor whose children get the demo environment; stop them all on the way out."""
    supervisor = Supervisor(log_dir, {**os.environ, **CHILD_ENVIRONMENT})
    try:
        yield supervisor
    finally:
        with stop_signals_ignored():
            supervisor.stop_all()


@contextmanager
def stop_signals_ignored() -> Iterator[None]:
    """Ignore SIGINT and SIGTERM while the block runs, so that a second Ctrl-C cannot interrupt the cleanup."""
    previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def executable(name: str) -> str:
    """Return the path of a console script installed beside the running Python."""
    return str(Path(sys.executable).parent / name)


def start_standin(supervisor: Supervisor, options: DemoOptions, write: Write) -> str:
    """Start the Qualtrics stand-in and return its base URL once it listens."""
    record_path = options.var_dir / "standin.jsonl"
    record_path.unlink(missing_ok=True)
    child = supervisor.start(
        "standin",
        [
            sys.executable,
            str(BASE_DIR / "manage.py"),
            "qualtrics_standin",
            "--port",
            str(options.standin_port),
            "--record",
            str(record_path),
            "--expect-authorization",
            DEMO_AUTHORIZATION,
        ],
    )
    base_url = wait_for_listening_line(child, supervisor)
    write(f"Qualtrics stand-in listening on {base_url}, recording to {record_path}.")
    return base_url


def wait_for_listening_line(child: Child, supervisor: Supervisor) -> str:
    """Return the URL from the child's `listening on` log line, or raise DemoError when it is missing after a minute."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        match = LISTENING_LINE.search(child.log_path.read_text("utf-8", errors="replace"))
        if match:
            return match.group(1)
        supervisor.check_alive()
        time.sleep(0.1)
    raise DemoError(
        f"The {child.name} did not start listening within {STARTUP_TIMEOUT_SECONDS:.0f} s; see {child.log_path}."
    )


def seed(standin_url: str, write: Write) -> dict[str, str]:
    """Seed the feeds and connections; return each feed's new secret by feed name."""
    write("Seeding the demo feeds and connections ...")
    secrets = {name: seed_feed(name, write) for name in DEMO_FEEDS}
    for plan in DEMO_CONNECTIONS:
        seed_connection(plan, standin_url)
        write(f"  connection {plan.name!r}: {plan.mode}, routes {', '.join(plan.event_types)}")
    others = Connection.objects.filter(active=True).exclude(name__in=[plan.name for plan in DEMO_CONNECTIONS])
    if others.exists():
        write(f"  NOTE: {others.count()} other active connections may also receive the demo batches.")
    return secrets


def showcase_plans() -> list[ConnectionPlan]:
    """Return the all-defaults connection and one connection per setting case, each routing every type."""
    every_type = demo_showcase.ALL_ROUTE_TYPES
    plans = [ConnectionPlan(demo_showcase.BASELINE_NAME, every_type, send_as_batch=False)]
    for case in demo_showcase.CASES:
        batched = case.setting == "send_as_batch"
        overrides = {} if batched else {case.setting: case.value}
        plans.append(ConnectionPlan(case.connection_name, every_type, send_as_batch=batched, overrides=overrides))
    return plans


def seed_showcase(standin_url: str, write: Write) -> None:
    plans = showcase_plans()
    for plan in plans:
        seed_connection(plan, standin_url)
    write(f"  {len(plans)} showcase connections: all defaults, and one per mParticle setting changed")


def report_showcase(record_path: Path, write: Write) -> None:
    """Print, per setting, how many bodies sent show its effect, beside the all-defaults connection."""
    names = [plan.name for plan in showcase_plans()]
    write("Settings showcase: bodies for which the question holds, per changed setting:")
    for result in demo_showcase.compare(demo_showcase.bodies_by_connection(record_path, names)):
        write(result.line())


def seed_feed(name: str, write: Write) -> str:
    """Create or reactivate the feed with a new secret, print the secret once and return it."""
    feed = Feed.objects.filter(name=name).first() or Feed(name=name)
    secret = feed.set_new_secret()
    feed.active = True
    feed.save()
    write(f"  feed {name!r}: new secret {secret} (shown only now; the portal stores only its hash)")
    return secret


def seed_connection(plan: ConnectionPlan, standin_url: str) -> Connection:
    """Create or update the plan's connection, pointed at the stand-in and taking batches from every feed."""
    connection = Connection.objects.filter(name=plan.name).first() or Connection(name=plan.name)
    token = demo_showcase.url_token(plan.name)
    connection.post_url = f"{standin_url}/inbound-event/v1/events/json/triggers?urlTokenId={token}"
    connection.authorization = DEMO_AUTHORIZATION
    connection.active = True
    connection.event_types = [str(route_type) for route_type in plan.event_types]
    connection.send_as_batch = plan.send_as_batch
    connection.batch_window_seconds = plan.batch_window_seconds
    for name, value in plan.overrides.items():
        setattr(connection, name, value)
    connection.full_clean()
    connection.save()
    connection.feeds.clear()
    if connection.is_paused:
        protection.resume(connection, reason="reseeded by the demo")
    return connection


def start_portal(supervisor: Supervisor, options: DemoOptions, write: Write) -> str:
    """Start gunicorn, a Celery worker and Celery beat, and return the web base URL once /healthz returns 200."""
    require_free_port(options.port)
    bind = f"127.0.0.1:{options.port}"
    supervisor.start("web", web_command(bind))
    supervisor.start("worker", worker_command())
    supervisor.start("beat", beat_command(options.var_dir / "celerybeat-schedule"))
    base_url = f"http://{bind}"
    wait_for_health(base_url, supervisor)
    write(f"Web server on {base_url}, Celery worker and beat started, and /healthz returns 200.")
    return base_url


def web_command(bind: str) -> list[str]:
    return [
        executable("gunicorn"),
        "portal.wsgi",
        "--bind",
        bind,
        "--workers",
        "2",
        "--graceful-timeout",
        "5",
        "--access-logfile",
        "-",
        "--no-control-socket",
    ]


def worker_command() -> list[str]:
    return [
        executable("celery"),
        "-A",
        "portal",
        "worker",
        "--pool",
        "threads",
        "--concurrency",
        "8",
        "--loglevel",
        "WARNING",
        "-Q",
        "routing,deliveries,maintenance",
    ]


def beat_command(schedule_path: Path) -> list[str]:
    return [executable("celery"), "-A", "portal", "beat", "--loglevel", "WARNING", "--schedule", str(schedule_path)]


def require_free_port(port: int) -> None:
    """Raise DemoError when a server listens on the port (connections in TIME_WAIT do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as error:
            raise DemoError(f"Port {port} on 127.0.0.1 is in use ({error.strerror}); pass --port.") from error


def wait_for_health(base_url: str, supervisor: Supervisor) -> None:
    """Return once GET /healthz returns 200, or raise DemoError when a child exits or a minute passes."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        supervisor.check_alive()
        try:
            if requests.get(f"{base_url}/healthz", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(POLL_SECONDS)
    raise DemoError(
        f"{base_url}/healthz did not return 200 within {STARTUP_TIMEOUT_SECONDS:.0f} s; "
        f"see {supervisor.log_dir / 'web.log'}."
    )


def batch_files() -> list[Path]:
    """Return the demo batches in posting order; each file is named `<feed name>.<rest>.json`."""
    return sorted(BATCHES_DIR.glob("*.json"))


def feed_name_of(path: Path) -> str:
    return path.name.split(".", 1)[0]


def as_new_upload(text: str) -> bytes:
    """Return the batch as a new upload of the same activity, which the portal routes again.

    The batch gets a new `source_request_id` and every event a new
    `source_message_id`, the keys of the portal's batch and event
    de-duplication, so that a second demo run is delivered like the first.
    Every other value keeps its digits and key order.
    """
    batch = jsontext.parse(text)
    batch["source_request_id"] = str(uuid.uuid4())
    for event in shaping.batch_events(batch):
        data = event.get("data") if isinstance(event, dict) else None
        if isinstance(data, dict) and isinstance(data.get("source_message_id"), str):
            data["source_message_id"] = _new_id_like(data["source_message_id"])
    return jsontext.encode(batch)


def _new_id_like(old: str) -> str:
    new = str(uuid.uuid4())
    return new.upper() if old.isupper() else new


def post_batches(base_url: str, secrets: Mapping[str, str], write: Write) -> list[PostedBatch]:
    """POST every demo batch with its feed's secret, then resend the first.

    Raises DemoError when a response status is not 202.
    """
    url = f"{base_url}/api/v1/mparticle/"
    files = batch_files()
    if not files:
        raise DemoError(f"No batch files found in {BATCHES_DIR}.")
    write(f"Posting {len(files)} batches to {url} ...")
    posted: list[PostedBatch] = []
    first_body = b""
    for path in files:
        body = as_new_upload(path.read_text("utf-8"))
        stored = post_batch(url, secrets[feed_name_of(path)], body, path.name)
        posted.append(PostedBatch(path.name, stored["batch_id"]))
        first_body = first_body or body
        write(f"  {path.name}: 202, stored as batch {stored['batch_id']}")
    resend_duplicate(url, secrets[feed_name_of(files[0])], first_body, files[0].name, write)
    return posted


def post_batch(url: str, secret: str, body: bytes, label: str) -> dict[str, Any]:
    """POST one body and return the JSON response, or raise DemoError unless the status is 202."""
    headers = {"Authorization": f"Bearer {secret}", "Content-Type": "application/json"}
    try:
        response = requests.post(url, data=body, headers=headers, timeout=30)
    except requests.RequestException as error:
        raise DemoError(f"POST of {label} failed: {error.__class__.__name__}") from error
    if response.status_code != 202:
        raise DemoError(f"POST of {label} returned {response.status_code}, expected 202: {response.text[:200]}")
    response_body: dict[str, Any] = response.json()
    return response_body


def resend_duplicate(url: str, secret: str, body: bytes, label: str, write: Write) -> None:
    """Resend a batch as mParticle does after a timeout, and raise DemoError unless the portal reports a duplicate."""
    response_body = post_batch(url, secret, body, label)
    if not response_body.get("duplicate"):
        raise DemoError(f"The resent {label} was stored again instead of being recognised as a duplicate.")
    write(f"  {label} sent again, as mParticle does after a timeout: 202, recognised as a duplicate")


def report(posted: Sequence[PostedBatch], options: DemoOptions, supervisor: Supervisor, write: Write) -> bool:
    """Wait for the pipeline, print the summary table and return whether nothing failed."""
    batch_ids = [batch.batch_id for batch in posted]
    elapsed = wait_for_pipeline(batch_ids, options.timeout, supervisor, write)
    write(f"Everything routed and delivered after {elapsed:.1f} s.")

    summaries = summarize(batch_ids)
    for line in summary_table(summaries):
        write(line)
    delivery_uuids = {str(value) for value in deliveries_of(batch_ids).values_list("uuid", flat=True)}
    recorded, in_all = recorded_requests(options.var_dir / "standin.jsonl", delivery_uuids)
    write(f"The stand-in recorded {recorded} requests for these deliveries ({in_all} since it started).")
    return verdict(batch_ids, summaries, recorded, write)


def wait_for_pipeline(batch_ids: Sequence[int], timeout: float, supervisor: Supervisor, write: Write) -> float:
    """Return the seconds waited until no work is outstanding, or raise DemoError after `timeout` seconds."""
    write(f"Waiting for routing, batch windows and deliveries (timeout {timeout:.0f} s) ...")
    started = time.monotonic()
    while True:
        outstanding = outstanding_work(batch_ids)
        if outstanding.done:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise DemoError(
                f"Timed out after {timeout:.0f} s with {outstanding}; "
                f"see worker.log and beat.log in {supervisor.log_dir}."
            )
        supervisor.check_alive()
        time.sleep(POLL_SECONDS)


def windows_of(batch_ids: Sequence[int]) -> "QuerySet[BatchWindow]":
    return BatchWindow.objects.filter(items__batch_id__in=batch_ids).distinct()


def deliveries_of(batch_ids: Sequence[int]) -> "QuerySet[Delivery]":
    """Return the deliveries made from the batches, directly or through a batch window holding their events."""
    window_ids = windows_of(batch_ids).values("pk")
    return Delivery.objects.filter(Q(batch_id__in=batch_ids) | Q(window_id__in=window_ids))


def outstanding_work(batch_ids: Sequence[int]) -> Outstanding:
    """Count the batches not yet routed, their open windows and their unfinished deliveries."""
    return Outstanding(
        unrouted_batches=InboundBatch.objects.filter(pk__in=batch_ids, status=InboundBatch.Status.RECEIVED).count(),
        open_windows=windows_of(batch_ids).filter(status=BatchWindow.Status.OPEN).count(),
        unfinished_deliveries=deliveries_of(batch_ids).filter(status__in=UNFINISHED).count(),
    )


def summarize(batch_ids: Sequence[int]) -> list[ConnectionSummary]:
    """Count per connection what the batches routed, filtered and dropped, and the events delivered and failed.

    `routed`, `filtered` and `duplicates` come from the `Routing` rows.
    `delivered` and `failed` add up `event_count` of the delivered and failed
    deliveries. `requests` counts the recorded HTTP attempts. The list is
    ordered by connection name.
    """
    routings = (
        Routing.objects.filter(batch_id__in=batch_ids)
        .values("connection_id")
        .annotate(routed=Sum("routed_count"), filtered=Sum("filtered_count"), duplicates=Sum("duplicate_count"))
    )
    deliveries = deliveries_of(batch_ids)
    outcomes = deliveries.values("connection_id", "status").annotate(events=Sum("event_count"))
    attempts = (
        DeliveryAttempt.objects.filter(delivery__in=deliveries.values("pk"))
        .values("delivery__connection_id")
        .annotate(count=Count("pk"))
    )

    counts: dict[int, dict[str, int]] = {}
    for row in routings:
        counts.setdefault(row["connection_id"], {}).update(
            routed=row["routed"], filtered=row["filtered"], duplicates=row["duplicates"]
        )
    for row in outcomes:
        key = {Delivery.Status.DELIVERED: "delivered", Delivery.Status.FAILED: "failed"}.get(row["status"])
        if key:
            counts.setdefault(row["connection_id"], {})[key] = row["events"] or 0
    for row in attempts:
        counts.setdefault(row["delivery__connection_id"], {})["requests"] = row["count"]

    names = dict(Connection.objects.filter(pk__in=counts).values_list("pk", "name"))
    return sorted((ConnectionSummary(names[pk], **values) for pk, values in counts.items()), key=lambda s: s.name)


def summary_table(summaries: Sequence[ConnectionSummary]) -> list[str]:
    """Return the summary as aligned text lines: a header, a row per connection and a total row."""
    width = max([len("connection"), *(len(summary.name) for summary in summaries)])
    columns = ("routed", "filtered", "duplicates", "delivered", "failed", "requests")

    def line(name: str, values: Sequence[object]) -> str:
        return f"  {name:<{width}}" + "".join(f"  {value!s:>9}" for value in values)

    total = [sum(getattr(summary, column) for summary in summaries) for column in columns]
    return [
        line("connection", columns),
        *(line(s.name, [getattr(s, column) for column in columns]) for s in summaries),
        line("total", total),
    ]


def recorded_requests(record_path: Path, delivery_uuids: set[str]) -> tuple[int, int]:
    """Return how many requests the stand-in recorded for the given deliveries, and in all.

    A request belongs to a delivery by its X-Delivery-Id header.
    """
    if not record_path.exists():
        return 0, 0
    with record_path.open(encoding="utf-8") as lines:
        records = [json.loads(line) for line in lines if line.strip()]
    ours = sum(1 for record in records if _delivery_id(record) in delivery_uuids)
    return ours, len(records)


def _delivery_id(record: Mapping[str, Any]) -> str | None:
    headers = record.get("headers") or {}
    return next((value for name, value in headers.items() if name.lower() == "x-delivery-id"), None)


def verdict(batch_ids: Sequence[int], summaries: Sequence[ConnectionSummary], recorded: int, write: Write) -> bool:
    """Print each problem found and return whether the run succeeded.

    A run succeeds when no batch failed to route, no delivery failed, and the
    stand-in recorded exactly the attempts the portal recorded.
    """
    problems = []
    failed_batches = InboundBatch.objects.filter(pk__in=batch_ids, status=InboundBatch.Status.FAILED).count()
    if failed_batches:
        problems.append(f"{failed_batches} batches failed to route")
    failed_deliveries = deliveries_of(batch_ids).filter(status=Delivery.Status.FAILED).count()
    if failed_deliveries:
        problems.append(f"{failed_deliveries} deliveries failed (see Deliveries in the admin)")
    attempts = sum(summary.requests for summary in summaries)
    if attempts != recorded:
        problems.append(f"the portal recorded {attempts} attempts but the stand-in {recorded} requests")
    for problem in problems:
        write(f"FAILED: {problem}.")
    if not problems:
        write(f"OK: nothing failed, and the stand-in recorded all {attempts} requests the portal made.")
    return not problems


def wait_until_interrupted(supervisor: Supervisor, write: Write) -> None:
    """Keep the children running until Ctrl-C or SIGTERM, and raise DemoError when one exits on its own."""
    write("Running until Ctrl-C or SIGTERM ...")
    try:
        while True:
            supervisor.check_alive()
            time.sleep(1)
    except (KeyboardInterrupt, StopRequested):
        return
