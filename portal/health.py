"""Health endpoints and the Celery worker heartbeat.

- `GET /healthz` returns 200 whenever the process serves requests. It is a
  liveness check, which must not fail because a dependency is down, or a
  supervisor would restart healthy web processes.
- `GET /readyz` returns 200 when the database and the broker are reachable
  and every migration is applied, else 503. It is a readiness check for
  load balancers. It also shows each queue's last worker heartbeat, for
  information only: inbound batches are stored and acknowledged without
  workers, so a stopped worker must not take the web servers out.

Beat sends `worker_heartbeat` to each queue, and the worker that takes it
records its host name and the time in the Django cache. Web processes see
the record only through a shared cache (Redis, the default with a Redis
broker). With the local-memory cache `/readyz` shows no heartbeats.

`python -m portal.health` exits 1 when a queue's heartbeat is missing or
stale, for a container health check.
"""

import logging
import sys
from datetime import datetime
from typing import Any

from celery import shared_task
from django.core.cache import cache
from django.db import DEFAULT_DB_ALIAS, DatabaseError, connections
from django.db.migrations.executor import MigrationExecutor
from django.http import HttpRequest, JsonResponse
from django.utils import timezone
from django.views.decorators.http import require_GET

from portal.celery import app
from portal.conf import portal_setting

logger = logging.getLogger(__name__)

BROKER_TIMEOUT_SECONDS = 2
HEARTBEAT_CACHE_KEY = "portal:worker-heartbeat:{queue}"
# A day: long enough to show when a queue was last served after an outage.
HEARTBEAT_CACHE_SECONDS = 24 * 3600


def database_ok() -> bool:
    try:
        with connections[DEFAULT_DB_ALIAS].cursor() as cursor:
            cursor.execute("SELECT 1")
        return True
    except DatabaseError:
        logger.warning("health.database_unavailable", exc_info=True)
        return False


def broker_ok() -> bool:
    try:
        with app.connection_for_write() as broker:
            broker.ensure_connection(max_retries=1, timeout=BROKER_TIMEOUT_SECONDS)
        return True
    except Exception:  # kombu raises transport-specific errors
        logger.warning("health.broker_unavailable", exc_info=True)
        return False


def migrations_applied() -> bool:
    """Return whether the database has every migration of the running code; False when it cannot tell."""
    try:
        executor = MigrationExecutor(connections[DEFAULT_DB_ALIAS])
        return not executor.migration_plan(executor.loader.graph.leaf_nodes())
    except DatabaseError:
        logger.warning("health.migrations_unknown", exc_info=True)
        return False


def queue_names() -> list[str]:
    return [queue.name for queue in app.conf.task_queues]


@shared_task(name="portal.health.worker_heartbeat", bind=True, ignore_result=True)
def worker_heartbeat(self: Any, queue: str) -> None:
    """Record that a worker consuming `queue` took this task: its host name and the time."""
    record = {"hostname": self.request.hostname, "at": timezone.now().isoformat()}
    cache.set(HEARTBEAT_CACHE_KEY.format(queue=queue), record, timeout=HEARTBEAT_CACHE_SECONDS)


def heartbeats(now: datetime | None = None) -> dict[str, dict[str, Any] | None]:
    """Return each queue's last heartbeat with its age in seconds and whether it is stale; None if none is known."""
    now = now or timezone.now()
    stale_after = portal_setting("HEARTBEAT_STALE_SECONDS")
    result: dict[str, dict[str, Any] | None] = {}
    for queue in queue_names():
        record = cache.get(HEARTBEAT_CACHE_KEY.format(queue=queue))
        if not isinstance(record, dict):
            result[queue] = None
            continue
        age = (now - datetime.fromisoformat(record["at"])).total_seconds()
        result[queue] = {**record, "age_seconds": round(age, 1), "stale": age > stale_after}
    return result


@require_GET
def healthz(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok"})


@require_GET
def readyz(request: HttpRequest) -> JsonResponse:
    checks = {"database": database_ok(), "broker": broker_ok()}
    checks["migrations"] = checks["database"] and migrations_applied()
    ready = all(checks.values())
    body = {"status": "ok" if ready else "unavailable", "checks": checks, "heartbeats": heartbeats()}
    return JsonResponse(body, status=200 if ready else 503)


def main() -> int:
    """Print the heartbeats; return 1 when a queue has none or a stale one, else 0."""
    import django

    django.setup()
    beats = heartbeats()
    for queue, beat in beats.items():
        print(f"{queue}: {beat or 'no heartbeat'}")
    return 0 if all(beat and not beat["stale"] for beat in beats.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
