"""Shared fixtures: loopback targets, the Qualtrics stand-in, and real Celery processes."""

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings as django_settings
from django.core.cache import cache
from django.db import connection

from integrations.standin import running_standin
from portal.celery import app

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def private_filesystem_broker(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Give this test run a broker folder of its own, so that concurrent runs never take each other's tasks.

    Celery processes started by the tests inherit it through the environment.
    """
    if not django_settings.CELERY_BROKER_URL.startswith("filesystem://"):
        return
    folder = tmp_path_factory.mktemp("broker")
    for name in ("processed", "control"):
        (folder / name).mkdir()
    app.conf.broker_transport_options = {
        **django_settings.CELERY_BROKER_TRANSPORT_OPTIONS,
        "data_folder_in": str(folder),
        "data_folder_out": str(folder),
        "processed_folder": str(folder / "processed"),
        "control_folder": str(folder / "control"),
    }
    os.environ["PORTAL_FILESYSTEM_BROKER_DIR"] = str(folder)


@pytest.fixture(autouse=True)
def clear_cache() -> None:
    """Start each test with empty rate-limit and throttle counters."""
    cache.clear()


@pytest.fixture
def allow_loopback(settings: Any) -> None:
    """Let connections target the stand-in on 127.0.0.1."""
    settings.PORTAL = {**settings.PORTAL, "ALLOW_LOOPBACK_TARGETS": True}


@pytest.fixture
def standin() -> Iterator[Any]:
    with running_standin(expect_authorization="Basic dGVzdDp0ZXN0LXRva2Vu") as server:
        yield server


def wait_for(condition: Callable[[], bool], timeout: float = 30.0, interval: float = 0.1) -> bool:
    """Poll `condition` until it is true or `timeout` seconds pass, and return its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


def _database_url() -> str:
    """Return a URL for the test database the worker processes must share with the tests."""
    db = django_settings.DATABASES["default"]
    if db["ENGINE"] == "django.db.backends.sqlite3":
        return f"sqlite:///{db['NAME']}"
    user = db.get("USER") or ""
    password = f":{db['PASSWORD']}" if db.get("PASSWORD") else ""
    credentials = f"{user}{password}@" if user else ""
    return f"postgres://{credentials}{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


class CeleryProcesses:
    """A Celery worker and beat running as real processes against the test database and broker."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env = env
        self.log_dir = log_dir
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, *args: str) -> None:
        log = (self.log_dir / f"{name}.log").open("ab")
        command = [sys.executable, "-m", "celery", "-A", "portal", *args]
        self.processes[name] = subprocess.Popen(
            command, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        process = self.processes.pop(name)
        process.send_signal(sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def stop_all(self) -> None:
        for name in list(self.processes):
            self.stop(name)

    def log(self, name: str) -> str:
        return (self.log_dir / f"{name}.log").read_text(errors="replace")


def _purge_broker(env: dict[str, str]) -> None:
    subprocess.run(
        [sys.executable, "-m", "celery", "-A", "portal", "purge", "-f"],
        cwd=REPO,
        env=env,
        check=False,
        capture_output=True,
        timeout=60,
    )


WORKER_ARGS = (
    "worker",
    "--pool",
    "threads",
    "--concurrency",
    "4",
    "--loglevel",
    "INFO",
    "-Q",
    "routing,deliveries,maintenance",
)


@pytest.fixture
def celery_env(transactional_db: None) -> dict[str, str]:
    """The environment of Celery processes started by a test; tests may change it before starting them.

    The tests' data must be committed for these processes to see it, hence
    `transactional_db`. The broker is the configured one: Redis in CI, the
    filesystem broker otherwise.
    """
    return {
        **os.environ,
        "DATABASE_URL": _database_url(),
        "PORTAL_ALLOW_LOOPBACK_TARGETS": "1",
        "PORTAL_RETRY_BASE_SECONDS": "0.5",
        "PORTAL_FLUSH_INTERVAL_SECONDS": "0.5",
        "PORTAL_SWEEP_INTERVAL_SECONDS": "1",
        "PORTAL_LEASE_SECONDS": "10",
        "PORTAL_ENCRYPTION_KEYS": ",".join(django_settings.PORTAL["ENCRYPTION_KEYS"]),
        "DJANGO_SECRET_KEY": django_settings.SECRET_KEY,
    }


@pytest.fixture
def celery_control(celery_env: dict[str, str], tmp_path: Path) -> Iterator[CeleryProcesses]:
    """A purged broker and no processes yet; whatever the test starts is stopped after it."""
    _purge_broker(celery_env)
    connection.close()
    processes = CeleryProcesses(celery_env, tmp_path)
    try:
        yield processes
    finally:
        processes.stop_all()


@pytest.fixture
def celery_processes(celery_control: CeleryProcesses, tmp_path: Path) -> CeleryProcesses:
    """A Celery worker and beat with short intervals, running for the test."""
    celery_control.start("worker", *WORKER_ARGS)
    celery_control.start("beat", "beat", "--loglevel", "INFO", "--schedule", str(tmp_path / "beat-schedule"))
    return celery_control
