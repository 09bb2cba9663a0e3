"""`GET /healthz`: whether the database and the Celery broker answer."""

import logging

from django.db import DatabaseError, connection
from django.http import HttpRequest, JsonResponse

from portal.celery import app

logger = logging.getLogger(__name__)


def database_ok() -> bool:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        return True
    except DatabaseError:
        logger.warning("health.database_unavailable", exc_info=True)
        return False


def broker_ok() -> bool:
    try:
        with app.connection_for_write() as broker:
            broker.ensure_connection(max_retries=1, timeout=2)
        return True
    except Exception:  # kombu raises transport-specific errors
        logger.warning("health.broker_unavailable", exc_info=True)
        return False


def healthz(request: HttpRequest) -> JsonResponse:
    checks = {"database": database_ok(), "broker": broker_ok()}
    healthy = all(checks.values())
    return JsonResponse({"status": "ok" if healthy else "unavailable", **checks}, status=200 if healthy else 503)
