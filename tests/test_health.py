"""`/healthz` (process up), `/readyz` (database, broker, migrations) and the worker heartbeats."""

import socket
from datetime import timedelta

import pytest
from django.core.cache import cache
from django.db.utils import ConnectionHandler
from django.utils import timezone
from kombu import Connection

from portal import health
from portal.celery import app


def closed_port() -> int:
    """Return a loopback port that nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@pytest.fixture
def database_down(monkeypatch):
    """Point the health checks at a PostgreSQL server on a closed port."""
    unreachable = ConnectionHandler(
        {
            "default": {
                "ENGINE": "django.db.backends.postgresql",
                "HOST": "127.0.0.1",
                "PORT": str(closed_port()),
                "NAME": "portal",
                "USER": "portal",
                "OPTIONS": {"connect_timeout": 2},
            }
        }
    )
    monkeypatch.setattr(health, "connections", unreachable)
    yield
    unreachable.close_all()


@pytest.fixture
def broker_down(monkeypatch):
    """Point the broker check at a Redis server on a closed port."""
    url = f"redis://127.0.0.1:{closed_port()}/0"
    monkeypatch.setattr(app, "connection_for_write", lambda: Connection(url))


def record_heartbeat(queue: str, age_seconds: float) -> None:
    at = timezone.now() - timedelta(seconds=age_seconds)
    cache.set(health.HEARTBEAT_CACHE_KEY.format(queue=queue), {"hostname": f"{queue}@host", "at": at.isoformat()})


def test_healthz_answers_while_the_database_is_down(client, database_down):
    response = client.get("/healthz")

    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


@pytest.mark.django_db
def test_readyz_when_everything_answers(client):
    response = client.get("/readyz")

    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert body["checks"] == {"database": True, "broker": True, "migrations": True}
    assert set(body["heartbeats"]) == {"routing", "deliveries", "maintenance"}


@pytest.mark.django_db
def test_readyz_fails_when_the_database_is_down(client, database_down):
    response = client.get("/readyz")

    assert response.status_code == 503
    assert response.json()["status"] == "unavailable"
    assert response.json()["checks"] == {"database": False, "broker": True, "migrations": False}


@pytest.mark.django_db
def test_readyz_fails_when_the_broker_is_down(client, broker_down):
    response = client.get("/readyz")

    assert response.status_code == 503
    assert response.json()["checks"] == {"database": True, "broker": False, "migrations": True}


@pytest.mark.django_db
def test_readyz_fails_with_unapplied_migrations(client, monkeypatch):
    monkeypatch.setattr(health.MigrationExecutor, "migration_plan", lambda self, targets: [("a migration", False)])

    response = client.get("/readyz")

    assert response.status_code == 503
    assert response.json()["checks"]["migrations"] is False


def test_heartbeat_task_records_the_worker_per_queue():
    health.worker_heartbeat.apply(args=("deliveries",))

    beats = health.heartbeats()

    assert beats["routing"] is None
    assert beats["deliveries"]["hostname"]
    assert beats["deliveries"]["stale"] is False
    assert beats["deliveries"]["age_seconds"] < 5


@pytest.mark.django_db
def test_readyz_shows_heartbeats_without_depending_on_them(client, settings):
    record_heartbeat("routing", age_seconds=5)
    record_heartbeat("deliveries", age_seconds=settings.PORTAL["HEARTBEAT_STALE_SECONDS"] + 1)

    body = client.get("/readyz").json()

    assert body["status"] == "ok"
    assert body["heartbeats"]["routing"]["hostname"] == "routing@host"
    assert body["heartbeats"]["routing"]["stale"] is False
    assert body["heartbeats"]["deliveries"]["stale"] is True
    assert body["heartbeats"]["maintenance"] is None


@pytest.mark.parametrize(
    ("ages", "status"),
    [({"routing": 1, "deliveries": 1, "maintenance": 1}, 0), ({"routing": 1, "deliveries": 1}, 1)],
)
def test_heartbeat_check_command_exit_status(monkeypatch, capsys, ages, status):
    monkeypatch.setattr("django.setup", lambda: None)
    for queue, age in ages.items():
        record_heartbeat(queue, age)

    assert health.main() == status
    assert "maintenance: " in capsys.readouterr().out
