"""The Django admin: pages, write-only secrets, feed secrets shown once, read-only records."""

import pytest
from django import forms
from django.contrib.admin.models import LogEntry
from django.contrib.auth.models import Permission
from django.db import connection as db_connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone
from django.utils.html import escape

from events.models import Feed, InboundBatch
from integrations import delivery
from integrations.fields import field_cipher
from integrations.forms import ConnectionForm
from integrations.models import BatchWindow, Connection, Delivery, Routing, WindowItem
from integrations.secrets import mask_url
from tests.factories import (
    SECRET_HEADER,
    TEST_POST_URL,
    URL_TOKEN,
    ConnectionFactory,
    DeliveryAttemptFactory,
    DeliveryFactory,
    FeedFactory,
    InboundBatchFactory,
)

pytestmark = pytest.mark.django_db
OTHER_POST_URL = (
    "https://sjc1.qualtrics.com/inbound-event/v1/events/json/triggers?urlTokenId=0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"
)
ADMIN_MODELS = [
    "events_feed",
    "events_inboundbatch",
    "integrations_connection",
    "integrations_delivery",
    "integrations_deliveryattempt",
    "integrations_batchwindow",
]
READ_ONLY_MODELS = [name for name in ADMIN_MODELS if name not in ("events_feed", "integrations_connection")]


def admin_url(name, action, *args):
    return reverse(f"admin:{name}_{action}", args=args)


def make_window(connection, batch):
    window = BatchWindow.objects.create(connection=connection, device_key="device-1", closes_at=timezone.now())
    WindowItem.objects.create(window=window, batch=batch, kind=WindowItem.Kind.EVENT, body="{}")
    return window


@pytest.fixture
def records():
    """One record of every model the admin shows, keyed by admin URL name."""
    secret_connection = ConnectionFactory.create(name="Survey", authorization=SECRET_HEADER)
    batch = InboundBatchFactory.create(body='{"events": [{"event_type": "custom_event"}], "mpid": 7}')
    Routing.objects.create(batch=batch, connection=secret_connection, routed_count=1, filter_reasons={"crash": 2})
    attempt = DeliveryAttemptFactory.create(delivery__connection=secret_connection, delivery__batch=batch)
    return {
        "events_feed": batch.feed,
        "events_inboundbatch": batch,
        "integrations_connection": secret_connection,
        "integrations_delivery": attempt.delivery,
        "integrations_deliveryattempt": attempt,
        "integrations_batchwindow": make_window(secret_connection, batch),
    }


@pytest.fixture
def secret_connection(records):
    return records["integrations_connection"]


def connection_form_data(connection=None, **changes):
    """Return the POST data that submits the connection form unchanged (secret inputs blank), plus `changes`."""
    form = ConnectionForm(instance=connection)
    data = {}
    for name, field in form.fields.items():
        value = field.prepare_value(form.get_initial_for_field(field, name))
        if isinstance(field, forms.BooleanField):
            value = "on" if value else None
        if value is not None:
            data[name] = value
    data.update(post_url="", authorization="", qualtrics_api_token="")
    data.update(changes)
    return {key: value for key, value in data.items() if value is not None}


def post_connection_change(client, connection, **changes):
    url = admin_url("integrations_connection", "change", connection.pk)
    return client.post(url, connection_form_data(connection, **changes))


@pytest.mark.parametrize("name", ADMIN_MODELS)
def test_changelist_page_loads(admin_client, records, name):
    response = admin_client.get(admin_url(name, "changelist"))

    assert response.status_code == 200


@pytest.mark.parametrize("name", ADMIN_MODELS)
def test_change_page_loads(admin_client, records, name):
    response = admin_client.get(admin_url(name, "change", records[name].pk))

    assert response.status_code == 200


@pytest.mark.parametrize("name", ["events_feed", "integrations_connection"])
def test_add_page_loads(admin_client, name):
    response = admin_client.get(admin_url(name, "add"))

    assert response.status_code == 200


@pytest.mark.parametrize("name", READ_ONLY_MODELS)
def test_record_add_page_forbidden(admin_client, name):
    response = admin_client.get(admin_url(name, "add"))

    assert response.status_code == 403


@pytest.mark.parametrize("name", ["events_inboundbatch", "integrations_delivery"])
def test_record_change_post_forbidden(admin_client, records, name):
    response = admin_client.post(admin_url(name, "change", records[name].pk), {"status": "failed"})

    assert response.status_code == 403


def changelist_queries(client, name):
    with CaptureQueriesContext(db_connection) as queries:
        assert client.get(admin_url(name, "changelist")).status_code == 200
    return len(queries)


@pytest.mark.parametrize("name", ADMIN_MODELS)
def test_changelist_queries_constant(admin_client, records, name):
    baseline = changelist_queries(admin_client, name)
    secret_connection = records["integrations_connection"]
    for index in range(3):
        batch = InboundBatchFactory.create()
        ConnectionFactory.create()
        DeliveryAttemptFactory.create(delivery__connection=ConnectionFactory.create())
        BatchWindow.objects.create(connection=secret_connection, device_key=f"other-{index}", closes_at=timezone.now())
        Routing.objects.create(batch=batch, connection=secret_connection)

    assert changelist_queries(admin_client, name) == baseline


def test_secret_absent_from_changelist(admin_client, secret_connection):
    content = admin_client.get(admin_url("integrations_connection", "changelist")).content.decode()

    assert "FAKE-TOKEN" not in content
    assert URL_TOKEN not in content
    assert escape(mask_url(TEST_POST_URL)) in content


def test_secret_masked_in_change_form(admin_client, secret_connection):
    url = admin_url("integrations_connection", "change", secret_connection.pk)
    content = admin_client.get(url).content.decode()

    assert "FAKE-TOKEN" not in content
    assert URL_TOKEN not in content
    assert "••••cdef" in content


def test_secret_absent_from_history(admin_client, secret_connection):
    post_connection_change(admin_client, secret_connection, authorization="Bearer FAKE-TOKEN-new-0987654321")

    content = admin_client.get(admin_url("integrations_connection", "history", secret_connection.pk)).content
    assert b"FAKE-TOKEN" not in content
    assert b"Authorization header" in content


def test_secret_absent_from_search(admin_client, secret_connection):
    url = admin_url("integrations_connection", "changelist")
    content = admin_client.get(url, {"q": "FAKE-TOKEN"}).content.decode()

    assert "FAKE-TOKEN-1234567890abcdef" not in content
    assert "0 results" in content


def test_log_entries_hold_no_secret(admin_client, secret_connection):
    new_header = "Bearer FAKE-TOKEN-new-0987654321"
    post_connection_change(admin_client, secret_connection, authorization=new_header, post_url=OTHER_POST_URL)

    entry = LogEntry.objects.get(object_id=str(secret_connection.pk))
    assert "FAKE-TOKEN" not in entry.change_message
    assert "qualtrics.com" not in entry.change_message
    assert entry.get_change_message() == "Changed POST URL and Authorization header."


def test_blank_authorization_keeps_secret(admin_client, secret_connection):
    response = post_connection_change(admin_client, secret_connection)

    assert response.status_code == 302
    assert Connection.objects.get(pk=secret_connection.pk).authorization == SECRET_HEADER


def test_blank_post_url_keeps_stored(admin_client, secret_connection):
    post_connection_change(admin_client, secret_connection)

    assert Connection.objects.get(pk=secret_connection.pk).post_url == TEST_POST_URL


def test_unchanged_secrets_not_logged(admin_client, secret_connection):
    post_connection_change(admin_client, secret_connection, name="Renamed")

    entry = LogEntry.objects.get(object_id=str(secret_connection.pk))
    assert entry.get_change_message() == "Changed Name."


def test_authorization_column_holds_ciphertext(admin_client, secret_connection):
    column = db_connection.ops.quote_name("authorization")
    with db_connection.cursor() as cursor:
        cursor.execute(f"SELECT {column} FROM integrations_connection WHERE id = %s", [secret_connection.pk])
        (stored,) = cursor.fetchone()

    assert "FAKE-TOKEN" not in stored
    assert field_cipher().decrypt(stored.encode()).decode() == SECRET_HEADER


def test_pasted_header_replaces_secret(admin_client, secret_connection):
    post_connection_change(admin_client, secret_connection, authorization="X-Other abcdefghijkl")

    assert Connection.objects.get(pk=secret_connection.pk).authorization == "X-Other abcdefghijkl"


def test_username_token_build_basic(admin_client, secret_connection):
    post_connection_change(
        admin_client, secret_connection, qualtrics_username="ops@example.com", qualtrics_api_token="tok"
    )

    stored = Connection.objects.get(pk=secret_connection.pk).authorization
    assert stored == "Basic b3BzQGV4YW1wbGUuY29tOnRvaw=="


def test_username_without_token_rejected(admin_client, secret_connection):
    response = post_connection_change(admin_client, secret_connection, qualtrics_username="ops@example.com")

    assert "qualtrics_api_token" in response.context["adminform"].form.errors
    assert Connection.objects.get(pk=secret_connection.pk).authorization == SECRET_HEADER


def test_header_and_credentials_rejected(admin_client, secret_connection):
    response = post_connection_change(
        admin_client, secret_connection, authorization="Basic abc", qualtrics_username="u", qualtrics_api_token="t"
    )

    assert response.status_code == 200
    assert response.context["adminform"].form.non_field_errors()


def test_remove_authorization_clears_header(admin_client, secret_connection):
    post_connection_change(admin_client, secret_connection, remove_authorization="on")

    assert Connection.objects.get(pk=secret_connection.pk).authorization == ""


def test_invalid_post_url_shows_field_error(admin_client, secret_connection):
    response = post_connection_change(admin_client, secret_connection, post_url="https://evil.example.com/hook")

    errors = response.context["adminform"].form.errors
    assert "is not a Qualtrics host" in errors["post_url"][0]
    assert Connection.objects.get(pk=secret_connection.pk).post_url == TEST_POST_URL


def test_rejected_post_url_not_echoed(admin_client, secret_connection):
    rejected = "https://iad1.qualtrics.com/inbound-event/v1/events/json/triggers?urlTokenId=SECRET-NOT-A-UUID"
    response = post_connection_change(admin_client, secret_connection, post_url=rejected)

    assert response.status_code == 200
    assert b"SECRET-NOT-A-UUID" not in response.content


def test_unknown_event_type_shows_field_error(admin_client, secret_connection):
    response = post_connection_change(admin_client, secret_connection, event_types=["custom_event", "bogus"])

    assert "event_types" in response.context["adminform"].form.errors


def test_add_requires_post_url(admin_client):
    response = admin_client.post(admin_url("integrations_connection", "add"), connection_form_data(name="New"))

    assert "post_url" in response.context["adminform"].form.errors
    assert not Connection.objects.exists()


def test_add_connection_saves_settings(admin_client):
    data = connection_form_data(
        post_url=TEST_POST_URL,
        authorization="Basic dGVzdA==",
        custom_event_names="Survey Eligible\n\n  Checkout  \nSurvey Eligible\n",
        metadata_exclusions=["ip", "device_info.device"],
    )
    admin_client.post(admin_url("integrations_connection", "add"), {**data, "name": "New connection"})

    saved = Connection.objects.get(name="New connection")
    assert saved.post_url == TEST_POST_URL
    assert saved.authorization == "Basic dGVzdA=="
    assert saved.custom_event_names == ["Survey Eligible", "Checkout"]
    assert saved.metadata_exclusions == ["ip", "device_info.device"]


def test_change_form_lists_lines(admin_client):
    connection = ConnectionFactory.create(custom_event_types=["Navigation", "Transaction"])
    content = admin_client.get(admin_url("integrations_connection", "change", connection.pk)).content.decode()

    assert "Navigation\nTransaction</textarea>" in content


def test_feed_add_shows_secret_once(admin_client):
    response = admin_client.post(admin_url("events_feed", "add"), {"name": "web", "active": "on"}, follow=True)

    feed = Feed.objects.get(name="web")
    secret = next(str(message) for message in response.context["messages"] if "new secret" in str(message))
    plain = secret.split("<code>")[1].split("</code>")[0]
    assert Feed.objects.authenticate(plain) == feed
    assert plain not in admin_client.get(admin_url("events_feed", "change", feed.pk)).content.decode()


def test_feed_secret_stored_hashed(admin_client):
    response = admin_client.post(admin_url("events_feed", "add"), {"name": "web", "active": "on"}, follow=True)

    feed = Feed.objects.get(name="web")
    assert feed.secret_hash
    assert feed.secret_hash not in response.content.decode()


def rotate(client, *feeds):
    data = {"action": "rotate_secret", "_selected_action": [feed.pk for feed in feeds]}
    return client.post(admin_url("events_feed", "changelist"), data, follow=True)


def test_rotate_secret_replaces_old(admin_client):
    feed = FeedFactory.create()
    response = rotate(admin_client, feed)

    message = next(str(message) for message in response.context["messages"] if "new secret" in str(message))
    plain = message.split("<code>")[1].split("</code>")[0]
    assert Feed.objects.authenticate(feed.plain_secret) is None
    assert Feed.objects.authenticate(plain) == feed


def test_rotate_secret_needs_one_feed(admin_client):
    first, second = FeedFactory.create(), FeedFactory.create()
    rotate(admin_client, first, second)

    assert Feed.objects.authenticate(first.plain_secret) == first
    assert Feed.objects.authenticate(second.plain_secret) == second


def test_batch_body_pretty_printed(admin_client, records):
    batch = records["events_inboundbatch"]
    content = admin_client.get(admin_url("events_inboundbatch", "change", batch.pk)).content.decode()

    assert "&quot;mpid&quot;: 7" in content
    assert "&quot;events&quot;: [\n    {\n      &quot;event_type&quot;: &quot;custom_event&quot;" in content


def test_batch_detail_shows_routing(admin_client, records):
    batch = records["events_inboundbatch"]
    content = admin_client.get(admin_url("events_inboundbatch", "change", batch.pk)).content.decode()

    assert "Routings" in content
    assert "&quot;crash&quot;: 2" in content


def test_batch_delete_allowed_superuser(admin_client, records):
    batch = records["events_inboundbatch"]
    admin_client.post(admin_url("events_inboundbatch", "delete", batch.pk), {"post": "yes"})

    assert not InboundBatch.objects.filter(pk=batch.pk).exists()


def test_batch_delete_forbidden_staff(client, django_user_model, records):
    staff = django_user_model.objects.create_user("staff", password="pw", is_staff=True)
    staff.user_permissions.set(Permission.objects.filter(codename__in=["view_inboundbatch", "delete_inboundbatch"]))
    client.force_login(staff)
    batch = records["events_inboundbatch"]

    response = client.post(admin_url("events_inboundbatch", "delete", batch.pk), {"post": "yes"})

    assert response.status_code == 403
    assert InboundBatch.objects.filter(pk=batch.pk).exists()


def test_delivery_detail_shows_attempts(admin_client):
    attempt = DeliveryAttemptFactory.create(response_excerpt="upstream busy")
    content = admin_client.get(admin_url("integrations_delivery", "change", attempt.delivery.pk)).content.decode()

    assert "upstream busy" in content
    assert "&quot;event_type&quot;: &quot;custom_event&quot;" in content


def test_delivery_search_by_uuid(admin_client):
    wanted, other = DeliveryFactory.create(), DeliveryFactory.create()
    url = admin_url("integrations_delivery", "changelist")
    response = admin_client.get(url, {"q": str(wanted.uuid)[:13]})

    shown = list(response.context["cl"].result_list)
    assert shown == [wanted]
    assert other not in shown


def test_window_list_counts_items(admin_client, records):
    response = admin_client.get(admin_url("integrations_batchwindow", "changelist"))

    (window,) = response.context["cl"].result_list
    assert window.item_total == 1


def test_change_form_edits_policy(admin_client, secret_connection):
    post_connection_change(admin_client, secret_connection, max_attempts="3", rate_limit_per_minute="600")

    saved = Connection.objects.get(pk=secret_connection.pk)
    assert saved.max_attempts == 3
    assert saved.rate_limit_per_minute == 600


def run_action(client, name, action, *objects):
    data = {"action": action, "_selected_action": [obj.pk for obj in objects]}
    return client.post(admin_url(name, "changelist"), data, follow=True)


@pytest.fixture
def queued(monkeypatch):
    """Delivery ids handed to the task queue, instead of a broker."""
    ids = []
    monkeypatch.setattr(delivery, "_enqueue", lambda delivery_ids, countdown=None: ids.extend(delivery_ids))
    return ids


def test_pause_action_pauses_connection(admin_client, secret_connection):
    run_action(admin_client, "integrations_connection", "pause_connections", secret_connection)

    saved = Connection.objects.get(pk=secret_connection.pk)
    assert saved.is_paused
    assert saved.pause_reason == "Paused by admin in the admin."
    assert not saved.auto_resume


def test_resume_action_queues_waiting(admin_client, queued):
    paused = ConnectionFactory.create(paused_at=timezone.now(), pause_reason="HTTP 401")
    waiting = DeliveryFactory.create(connection=paused)

    run_action(admin_client, "integrations_connection", "resume_connections", paused)

    assert not Connection.objects.get(pk=paused.pk).is_paused
    assert queued == [waiting.pk]


def test_paused_filter_lists_paused(admin_client):
    paused = ConnectionFactory.create(paused_at=timezone.now())
    ConnectionFactory.create()
    response = admin_client.get(admin_url("integrations_connection", "changelist"), {"paused": "yes"})

    assert list(response.context["cl"].result_list) == [paused]


def test_replay_action_requeues_failed(admin_client, queued, django_capture_on_commit_callbacks):
    failed = DeliveryFactory.create(status=Delivery.Status.FAILED, attempt_count=8)
    delivered = DeliveryFactory.create(status=Delivery.Status.DELIVERED)

    with django_capture_on_commit_callbacks(execute=True):
        run_action(admin_client, "integrations_delivery", "replay_deliveries", failed, delivered)

    assert Delivery.objects.get(pk=failed.pk).status == Delivery.Status.PENDING
    assert Delivery.objects.get(pk=delivered.pk).status == Delivery.Status.DELIVERED
    assert queued == [failed.pk]


def test_batch_page_shows_delivery_outcomes(admin_client):
    from integrations.models import Delivery
    from tests.factories import InboundBatchFactory

    batch = InboundBatchFactory()
    connection = ConnectionFactory.create()
    Delivery.objects.create(connection=connection, batch=batch, event_count=3, status="delivered")
    Delivery.objects.create(connection=connection, batch=batch, event_count=1, status="failed")

    page = admin_client.get(f"/admin/events/inboundbatch/{batch.pk}/change/").content.decode()

    assert "3 delivered" in page
    assert "1 failed" in page
    assert "0 waiting in batch windows" in page
