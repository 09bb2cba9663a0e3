"""The ceiling of the inbound endpoint: a bare Django view that stores the body with one INSERT.

gunicorn serves it with the portal's gunicorn settings on its own port:

    DJANGO_SETTINGS_MODULE=bench.ceiling_settings gunicorn bench.ceiling_app:application

It is its own URLconf and WSGI application, so the portal's URLconf never
reaches it. The table is created by `create_table`, which the benchmark
calls before it starts the server.
"""

from django.core.wsgi import get_wsgi_application
from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.urls import path
from django.views.decorators.http import require_POST

TABLE = "bench_ceiling_batch"


def create_table() -> None:
    with connection.cursor() as cursor:
        cursor.execute(
            f"CREATE TABLE IF NOT EXISTS {TABLE} "
            "(id bigserial PRIMARY KEY, body text NOT NULL, received_at timestamptz NOT NULL DEFAULT now())"
        )


@require_POST
def store(request: HttpRequest) -> HttpResponse:
    """Insert the body as received and respond 202 with its id, like the inbound endpoint."""
    with connection.cursor() as cursor:
        cursor.execute(f"INSERT INTO {TABLE} (body) VALUES (%s) RETURNING id", [request.body.decode("utf-8")])
        row = cursor.fetchone()
    assert row is not None
    return JsonResponse({"batch_id": row[0], "status": "accepted", "duplicate": False}, status=202)


urlpatterns = [path("ingest/", store)]

application = get_wsgi_application()
