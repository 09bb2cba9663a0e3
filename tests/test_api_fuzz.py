"""Schemathesis over the OpenAPI schema: no operation returns 500, whatever it is sent."""

import pytest
import schemathesis
from django.core.signals import request_finished, request_started
from django.core.wsgi import get_wsgi_application
from django.db import close_old_connections
from drf_spectacular.generators import SchemaGenerator
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rest_framework.authtoken.models import Token
from schemathesis.checks import not_a_server_error

from tests.factories import FeedFactory

pytestmark = pytest.mark.django_db

SCHEMA = schemathesis.openapi.from_dict(SchemaGenerator().get_schema(request=None, public=True))
OPERATIONS = {
    operation.label: operation
    for operation in (result.ok() for result in SCHEMA.get_all_operations())  # type: ignore[union-attr]
}
APP = get_wsgi_application()


@pytest.fixture(autouse=True)
def keep_test_connection():
    """Keep the test transaction's connection open across WSGI requests, as Django's test client does."""
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    yield
    request_started.connect(close_old_connections)
    request_finished.connect(close_old_connections)


@pytest.fixture
def credentials(django_user_model):
    user = django_user_model.objects.create_superuser("fuzz", "fuzz@example.com", "fuzz-password")
    feed = FeedFactory()
    # Token rather than Basic authentication: hashing a password on every request would dominate the run.
    return {
        "staff": f"Token {Token.objects.create(user=user).key}",
        "feed": f"Bearer {feed.plain_secret}",
    }


def test_schema_lists_every_operation():
    assert "POST /api/v1/mparticle/" in OPERATIONS
    assert "POST /api/v1/deliveries/replay/" in OPERATIONS
    assert len(OPERATIONS) >= 20


@pytest.mark.parametrize("label", sorted(OPERATIONS))
def test_operation_never_answers_500(label, credentials):
    operation = OPERATIONS[label]
    credential = credentials["feed" if operation.path == "/api/v1/mparticle/" else "staff"]

    @given(data=st.data())
    @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def run(data):
        case = data.draw(operation.as_strategy())
        case.call_and_validate(app=APP, headers={"Authorization": credential}, checks=[not_a_server_error])

    run()
