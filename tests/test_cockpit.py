"""The operator's cockpit in the admin: connection health, dashboard, delivery log, test send, pause and drain."""

import json
from datetime import timedelta

import pytest
from django.contrib.auth.models import Permission
from django.core.cache import cache
from django.urls import reverse
from django.utils import timezone

from integrations import admin as integrations_admin
from integrations import dashboard, delivery, retention
from integrations.models import BatchWindow, Connection, Delivery, Routing
from integrations.transport import USER_AGENT
from tests.factories import (
    ConnectionFactory,
    DeliveryAttemptFactory,
    DeliveryFactory,
    InboundBatchFactory,
)

pytestmark = pytest.mark.django_db

AUTHORIZATION = "Basic dGVzdDp0ZXN0LXRva2Vu"
PAYLOAD = (
    '{"events":[{"data":{"event_name":"Survey Eligible","source_message_id":"msg-42"},'
    '"event_type":"custom_event"}],"mpid":8675309,"mp_deviceid":"dev-7"}'
)


@pytest.fixture(autouse=True)
def empty_cache():
    """The dashboard caches closed days; each test starts without them."""
    cache.clear()


@pytest.fixture
def queued(monkeypatch):
    """Delivery ids handed to the task queue, instead of a broker."""
    ids = []
    monkeypatch.setattr(delivery, "_enqueue", lambda delivery_ids, countdown=None: ids.extend(delivery_ids))
    return ids


def aged(record, field, **delta):
    """Move a record's auto-set timestamp `field` into the past by `delta` and return the record reloaded."""
    type(record).objects.filter(pk=record.pk).update(**{field: timezone.now() - timedelta(**delta)})
    return type(record).objects.get(pk=record.pk)


def url(name, *args):
    return reverse(f"admin:{name}", args=args)


def listed_connection(client, connection):
    response = client.get(url("integrations_connection_changelist"))
    return next(row for row in response.context["cl"].result_list if row.pk == connection.pk)


# Connection list ------------------------------------------------------------


def test_list_counts_last_day_events(admin_client):
    connection = ConnectionFactory.create()
    DeliveryFactory.create(connection=connection, status=Delivery.Status.DELIVERED, event_count=3)
    DeliveryFactory.create(connection=connection, status=Delivery.Status.RETRY_SCHEDULED, event_count=2)
    DeliveryFactory.create(connection=connection, status=Delivery.Status.FAILED, event_count=4)
    aged(DeliveryFactory.create(connection=connection, status=Delivery.Status.FAILED), "created_at", hours=25)

    row = listed_connection(admin_client, connection)

    assert (row.delivered_24h, row.waiting_24h, row.failed_24h) == (3, 2, 4)


def test_list_rate_counts_last_minute(admin_client):
    connection = ConnectionFactory.create(rate_limit_per_minute=600)
    DeliveryAttemptFactory.create(delivery__connection=connection)
    aged(DeliveryAttemptFactory.create(delivery__connection=connection), "started_at", minutes=2)

    response = admin_client.get(url("integrations_connection_changelist"))

    assert '<span class="">1 / 600</span>' in response.content.decode()


def test_list_shows_pause_reason_and_waiting(admin_client):
    connection = ConnectionFactory.create(paused_at=timezone.now(), pause_reason="Qualtrics answered 401")
    DeliveryFactory.create_batch(2, connection=connection, status=Delivery.Status.PENDING)
    DeliveryFactory.create(connection=connection, status=Delivery.Status.DELIVERED)

    content = admin_client.get(url("integrations_connection_changelist")).content.decode()

    assert "Qualtrics answered 401" in content
    assert "2 deliveries wait" in content


def test_list_sorts_by_failures(admin_client):
    calm, failing = ConnectionFactory.create(name="a-calm"), ConnectionFactory.create(name="b-failing")
    DeliveryFactory.create(connection=failing, status=Delivery.Status.FAILED)

    response = admin_client.get(url("integrations_connection_changelist"), {"o": "-5"})

    assert list(response.context["cl"].result_list) == [failing, calm]


def test_list_queries_bounded(admin_client, django_assert_max_num_queries):
    for _ in range(5):
        connection = ConnectionFactory.create(paused_at=timezone.now())
        DeliveryAttemptFactory.create(delivery__connection=connection)

    with django_assert_max_num_queries(8):
        admin_client.get(url("integrations_connection_changelist"))


# Dashboard ------------------------------------------------------------------


def test_dashboard_draws_three_inline_charts(admin_client):
    content = admin_client.get(url("integrations_dashboard")).content.decode()

    assert content.count('<figure class="cockpit-chart"') == 3
    assert content.count(f'<svg viewBox="0 0 {dashboard.PLOT_WIDTH} {dashboard.PLOT_HEIGHT}"') == 3
    assert "<polyline" in content
    assert "<script src=" not in content.split('id="content"')[1]


def test_dashboard_linked_from_every_page(admin_client):
    content = admin_client.get(url("index")).content.decode()

    assert url("integrations_dashboard") in content


def current_minute_values(client, **params):
    """Return the hour chart's values for the current minute, by series key."""
    chart = client.get(url("integrations_dashboard"), params).context["plots"][0].chart
    return {key: values[-1] for key, values in chart.values.items()}


def test_dashboard_counts_each_series(admin_client):
    connection = ConnectionFactory.create()
    batch = InboundBatchFactory.create(event_count=6)
    Routing.objects.create(batch=batch, connection=connection, routed_count=4, filtered_count=2)
    DeliveryFactory.create(connection=connection, batch=batch, status=Delivery.Status.DELIVERED, event_count=2)
    DeliveryFactory.create(connection=connection, batch=batch, status=Delivery.Status.PENDING, event_count=1)
    DeliveryFactory.create(connection=connection, batch=batch, status=Delivery.Status.FAILED, event_count=1)

    values = current_minute_values(admin_client)

    assert values == {"received": 6, "routed": 4, "filtered": 2, "delivered": 2, "waiting": 1, "failed": 1}


def test_dashboard_one_connection(admin_client):
    selected, other = ConnectionFactory.create(), ConnectionFactory.create()
    DeliveryFactory.create(connection=selected, status=Delivery.Status.DELIVERED, event_count=2)
    DeliveryFactory.create(connection=other, status=Delivery.Status.DELIVERED, event_count=5)

    values = current_minute_values(admin_client, connection=selected.pk)

    assert values["delivered"] == 2
    assert "received" not in values


def test_dashboard_two_weeks_by_day(admin_client):
    aged(DeliveryFactory.create(status=Delivery.Status.FAILED, event_count=3), "created_at", days=3)
    DeliveryFactory.create(status=Delivery.Status.FAILED, event_count=1)

    chart = admin_client.get(url("integrations_dashboard")).context["plots"][2].chart

    assert chart.values["failed"][-4] == 3
    assert chart.values["failed"][-1] == 1
    assert sum(chart.values["failed"]) == 4


def test_closed_days_served_from_cache():
    old = aged(DeliveryFactory.create(status=Delivery.Status.DELIVERED, event_count=3), "created_at", days=2)
    days = dashboard.TWO_WEEKS.starts(timezone.now())[:-1]
    first = dashboard.closed_days(days)
    old.delete()

    assert dashboard.closed_days(days) == first
    assert sum(series.get("delivered", 0) for counts in first.values() for series in counts.values()) == 3


def test_dashboard_totals_per_connection(admin_client):
    connection = ConnectionFactory.create(name="Surveys")
    DeliveryFactory.create(connection=connection, status=Delivery.Status.CANCELLED, event_count=2)

    totals = dict(admin_client.get(url("integrations_dashboard")).context["totals"])

    assert totals[connection] == [0, 0, 0, 0, 0, 2]


def test_dashboard_queries_bounded(admin_client, django_assert_max_num_queries):
    for _ in range(3):
        DeliveryAttemptFactory.create()

    with django_assert_max_num_queries(20):
        admin_client.get(url("integrations_dashboard"))


def delivered_after(seconds, connection):
    batch = InboundBatchFactory.create()
    created = DeliveryFactory.create(connection=connection, batch=batch, status=Delivery.Status.DELIVERED)
    Delivery.objects.filter(pk=created.pk).update(delivered_at=batch.received_at + timedelta(seconds=seconds))


def test_latency_percentiles():
    connection = ConnectionFactory.create()
    for seconds in range(1, 11):
        delivered_after(seconds, connection)

    latency = dashboard.latency(timezone.now(), timedelta(hours=1), "Last hour")

    assert latency.count == 10
    assert latency.percentiles["p50"].total_seconds() == pytest.approx(5, abs=0.6)
    assert latency.percentiles["p99"].total_seconds() == pytest.approx(10, abs=0.2)


def test_latency_starts_at_window_opening():
    connection = ConnectionFactory.create()
    window = BatchWindow.objects.create(connection=connection, device_key="d", closes_at=timezone.now())
    window = aged(window, "opened_at", seconds=600)
    created = DeliveryFactory.create(connection=connection, window=window, status=Delivery.Status.DELIVERED)
    Delivery.objects.filter(pk=created.pk).update(delivered_at=window.opened_at + timedelta(seconds=600))

    latency = dashboard.latency(timezone.now(), timedelta(hours=1), "Last hour")

    assert latency.percentiles["p50"].total_seconds() == pytest.approx(600, abs=1)


def test_latency_empty():
    latency = dashboard.latency(timezone.now(), timedelta(hours=1), "Last hour")

    assert latency.count == 0
    assert latency.percentiles == {"p50": None, "p90": None, "p99": None}


@pytest.mark.parametrize(("value", "ceiling"), [(0, 2), (3, 4), (7, 8), (9, 10), (11, 20), (2400, 4000), (61, 80)])
def test_nice_ceiling(value, ceiling):
    assert dashboard.nice_ceiling(value) == ceiling


def test_plot_scales_to_axis():
    starts = dashboard.HOUR.starts(timezone.now())
    chart = dashboard.Chart(dashboard.HOUR, starts, {"delivered": [0] * 59 + [4]})

    plot = dashboard.plot(chart)

    (line,) = plot.lines
    assert len(line.dots) == 60
    assert line.dots[-1].y == f"{dashboard.PLOT_TOP:.1f}"
    assert line.dots[0].y == f"{dashboard.PLOT_BOTTOM:.1f}"
    assert [tick.label for tick in plot.y_ticks] == ["0", "2", "4"]


def test_dashboard_shows_retention(admin_client, settings):
    settings.PORTAL = {**settings.PORTAL, "RETENTION_DAYS": 45}
    last_run = {"finished_at": timezone.now(), "finished": True, "deleted": {"delivery": 7}}
    cache.set(retention.LAST_RUN_CACHE_KEY, last_run)

    content = admin_client.get(url("integrations_dashboard")).content.decode()

    assert "45 days" in content
    assert "7 delivery" in content


def test_dashboard_needs_view_permission(client, django_user_model):
    client.force_login(django_user_model.objects.create_user("staff", password="pw", is_staff=True))

    assert client.get(url("integrations_dashboard")).status_code == 403


# Delivery log ---------------------------------------------------------------


def test_delivery_detail_reconstructs_headers(admin_client):
    created = DeliveryFactory.create(connection__authorization="Bearer FAKE-TOKEN-1234567890abcdef")

    content = admin_client.get(url("integrations_delivery_change", created.pk)).content.decode()

    assert f"X-Delivery-Id: {created.uuid}" in content
    assert f"User-Agent: {USER_AGENT}" in content
    assert "Content-Type: application/json; charset=utf-8" in content
    assert "Authorization: ••••cdef" in content
    assert "FAKE-TOKEN" not in content


def test_delivery_detail_shows_latency(admin_client):
    connection = ConnectionFactory.create()
    delivered_after(2, connection)
    created = Delivery.objects.get()

    content = admin_client.get(url("integrations_delivery_change", created.pk)).content.decode()

    assert "2.000 s" in content


def search(client, term):
    response = client.get(url("integrations_delivery_changelist"), {"q": term})
    return list(response.context["cl"].result_list)


@pytest.mark.parametrize(
    "term",
    [
        "mpid:8675309",
        "mp_deviceid:dev-7",
        "source_message_id:msg-42",
        "event:Survey Eligible",
        "Survey Eligible",
    ],
)
def test_search_finds_payload_values(admin_client, term):
    matching = DeliveryFactory.create(payload=PAYLOAD)
    DeliveryFactory.create()

    assert search(admin_client, term) == [matching]


def test_search_number_not_prefix(admin_client):
    DeliveryFactory.create(payload=PAYLOAD)

    assert search(admin_client, "mpid:867530") == []


def test_search_quoted_mpid(admin_client):
    matching = DeliveryFactory.create(payload='{"events":[],"mpid":"-42"}')

    assert search(admin_client, "mpid:-42") == [matching]


def test_search_bounded_to_newest(admin_client, monkeypatch):
    monkeypatch.setattr(integrations_admin, "SEARCH_ROWS", 1)
    old = DeliveryFactory.create(payload=PAYLOAD)
    DeliveryFactory.create()

    assert search(admin_client, "mpid:8675309") == []
    assert search(admin_client, str(old.uuid)) == [old]


def test_replay_button_queues_one(admin_client, queued, django_capture_on_commit_callbacks):
    failed = DeliveryFactory.create(status=Delivery.Status.FAILED, attempt_count=3)

    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post(url("integrations_delivery_replay", failed.pk))

    assert response.status_code == 302
    assert Delivery.objects.get(pk=failed.pk).status == Delivery.Status.PENDING
    assert queued == [failed.pk]


def test_replay_button_leaves_delivered(admin_client, queued):
    delivered = DeliveryFactory.create(status=Delivery.Status.DELIVERED)

    admin_client.post(url("integrations_delivery_replay", delivered.pk))

    assert Delivery.objects.get(pk=delivered.pk).status == Delivery.Status.DELIVERED


def test_replay_button_shown_for_failed(admin_client):
    failed = DeliveryFactory.create(status=Delivery.Status.FAILED)

    content = admin_client.get(url("integrations_delivery_change", failed.pk)).content.decode()

    assert url("integrations_delivery_replay", failed.pk) in content


def test_replay_needs_post(admin_client):
    failed = DeliveryFactory.create(status=Delivery.Status.FAILED)

    assert admin_client.get(url("integrations_delivery_replay", failed.pk)).status_code == 405


def test_replay_matching_confirms_count(admin_client):
    connection = ConnectionFactory.create()
    DeliveryFactory.create_batch(3, connection=connection, status=Delivery.Status.FAILED)
    DeliveryFactory.create(status=Delivery.Status.FAILED)

    response = admin_client.get(url("integrations_delivery_replay_matching"), {"connection__id__exact": connection.pk})

    assert "3 failed or cancelled deliveries match" in response.content.decode()
    assert Delivery.objects.filter(status=Delivery.Status.FAILED).count() == 4


def test_replay_matching_replays_every_page(admin_client, queued, monkeypatch, django_capture_on_commit_callbacks):
    monkeypatch.setattr(integrations_admin.DeliveryAdmin, "list_per_page", 2)
    connection = ConnectionFactory.create()
    failed = DeliveryFactory.create_batch(5, connection=connection, status=Delivery.Status.FAILED)
    other = DeliveryFactory.create(status=Delivery.Status.FAILED)
    query = f"?connection__id__exact={connection.pk}&p=2"

    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post(url("integrations_delivery_replay_matching") + query)

    assert response.status_code == 302
    assert sorted(queued) == sorted(d.pk for d in failed)
    assert Delivery.objects.get(pk=other.pk).status == Delivery.Status.FAILED


def test_replay_matching_follows_search(admin_client, queued, django_capture_on_commit_callbacks):
    matching = DeliveryFactory.create(status=Delivery.Status.FAILED, payload=PAYLOAD)
    DeliveryFactory.create(status=Delivery.Status.FAILED)

    with django_capture_on_commit_callbacks(execute=True):
        admin_client.post(url("integrations_delivery_replay_matching") + "?q=mpid%3A8675309")

    assert queued == [matching.pk]


def test_replay_matching_needs_permission(client, django_user_model):
    staff = django_user_model.objects.create_user("staff", password="pw", is_staff=True)
    staff.user_permissions.set(Permission.objects.filter(codename="view_delivery"))
    client.force_login(staff)

    assert client.post(url("integrations_delivery_replay_matching")).status_code == 403


def test_delivery_list_links_replay_matching(admin_client):
    response = admin_client.get(url("integrations_delivery_changelist"), {"status__exact": "failed"})

    assert url("integrations_delivery_replay_matching") + "?status__exact=failed" in response.content.decode()


def test_delivery_list_queries_bounded(admin_client, django_assert_max_num_queries):
    for _ in range(5):
        DeliveryAttemptFactory.create()

    with django_assert_max_num_queries(8):
        admin_client.get(url("integrations_delivery_changelist"))


# Test send ------------------------------------------------------------------


def test_test_send_lists_sample_types(admin_client):
    connection = ConnectionFactory.create()

    content = admin_client.get(url("integrations_connection_test_send", connection.pk)).content.decode()

    assert '<option value="screen_view">Screen View</option>' in content
    assert '<option value="gdpr_change">GDPR Consent Change</option>' in content


def test_test_send_one_type(admin_client, standin, allow_loopback):
    connection = ConnectionFactory.create(post_url=standin.url, authorization=AUTHORIZATION)

    response = admin_client.post(url("integrations_connection_test_send", connection.pk), {"event_type": "screen_view"})

    content = response.content.decode()
    (record,) = standin.records
    assert [event["event_type"] for event in json.loads(record["body"])["events"]] == ["screen_view"]
    assert "HTTP 200" in content
    assert f"X-Delivery-Id: {record['headers']['X-Delivery-Id']}" in content
    assert f"Content-Type: {record['headers']['Content-Type']}" in content
    assert f"User-Agent: {record['headers']['User-Agent']}" in content
    assert AUTHORIZATION not in content


def test_test_send_dropped_type_explained(admin_client, standin, allow_loopback):
    connection = ConnectionFactory.create(post_url=standin.url, event_types=["custom_event"])

    response = admin_client.post(url("integrations_connection_test_send", connection.pk), {"event_type": "screen_view"})

    assert "Nothing was sent" in response.content.decode()
    assert "event type screen_view not routed" in response.content.decode()
    assert standin.records == []


def test_test_send_needs_change_permission(client, django_user_model):
    staff = django_user_model.objects.create_user("staff", password="pw", is_staff=True)
    staff.user_permissions.set(Permission.objects.filter(codename="view_connection"))
    client.force_login(staff)
    connection = ConnectionFactory.create()

    assert client.get(url("integrations_connection_test_send", connection.pk)).status_code == 403


def test_change_form_links_tools(admin_client):
    connection = ConnectionFactory.create()

    content = admin_client.get(url("integrations_connection_change", connection.pk)).content.decode()

    assert url("integrations_connection_test_send", connection.pk) in content
    assert url("integrations_connection_pause", connection.pk) in content
    assert url("integrations_connection_drain", connection.pk) in content


# Pause, resume, drain -------------------------------------------------------


def test_pause_page_pauses_with_reason(admin_client):
    connection = ConnectionFactory.create()

    admin_client.post(url("integrations_connection_pause", connection.pk), {"reason": "Workflow being rebuilt"})

    saved = Connection.objects.get(pk=connection.pk)
    assert saved.pause_reason == "Workflow being rebuilt (paused by admin in the admin)"
    assert not saved.auto_resume


def test_paused_change_form_offers_resume(admin_client):
    connection = ConnectionFactory.create(paused_at=timezone.now(), pause_reason="HTTP 401")
    DeliveryFactory.create(connection=connection)

    content = admin_client.get(url("integrations_connection_change", connection.pk)).content.decode()

    assert url("integrations_connection_resume", connection.pk) in content
    assert "1 deliveries wait until the connection is resumed." in content


def test_resume_button_queues_waiting(admin_client, queued):
    connection = ConnectionFactory.create(paused_at=timezone.now(), pause_reason="HTTP 401")
    waiting = DeliveryFactory.create(connection=connection)

    admin_client.post(url("integrations_connection_resume", connection.pk))

    assert not Connection.objects.get(pk=connection.pk).is_paused
    assert queued == [waiting.pk]


def test_resume_needs_post(admin_client):
    connection = ConnectionFactory.create(paused_at=timezone.now())

    assert admin_client.get(url("integrations_connection_resume", connection.pk)).status_code == 405
    assert Connection.objects.get(pk=connection.pk).is_paused


def test_drain_page_counts_waiting(admin_client):
    connection = ConnectionFactory.create()
    DeliveryFactory.create_batch(2, connection=connection, status=Delivery.Status.RETRY_SCHEDULED)

    content = admin_client.get(url("integrations_connection_drain", connection.pk)).content.decode()

    assert "2 deliveries of this connection are pending or scheduled for a retry" in content


def test_drain_cancels_only_waiting(admin_client):
    connection = ConnectionFactory.create()
    statuses = ["pending", "retry_scheduled", "in_flight", "delivered", "failed"]
    created = {status: DeliveryFactory.create(connection=connection, status=status) for status in statuses}
    untouched = DeliveryFactory.create(status=Delivery.Status.PENDING)

    admin_client.post(url("integrations_connection_drain", connection.pk))

    after = {status: Delivery.objects.get(pk=d.pk).status for status, d in created.items()}
    expected = {status: status for status in statuses} | {"pending": "cancelled", "retry_scheduled": "cancelled"}
    assert after == expected
    assert Delivery.objects.get(pk=created["pending"].pk).last_error == "Drained by admin in the admin."
    assert Delivery.objects.get(pk=untouched.pk).status == Delivery.Status.PENDING


def test_drained_deliveries_replayable(admin_client, queued, django_capture_on_commit_callbacks):
    connection = ConnectionFactory.create()
    waiting = DeliveryFactory.create(connection=connection, status=Delivery.Status.PENDING)
    admin_client.post(url("integrations_connection_drain", connection.pk))

    with django_capture_on_commit_callbacks(execute=True):
        admin_client.post(url("integrations_delivery_replay", waiting.pk))

    assert queued == [waiting.pk]


def test_drain_chunks_cover_everything():
    from integrations.admin_tools import drain

    connection = ConnectionFactory.create()
    DeliveryFactory.create_batch(5, connection=connection)

    assert drain(connection, "test", chunk=2) == 5
    assert not Delivery.objects.filter(connection=connection, status=Delivery.Status.PENDING).exists()


def test_delete_action_despite_health_annotations(admin_client):
    connection = ConnectionFactory.create()
    DeliveryFactory.create(connection=connection)
    data = {"action": "delete_selected", "_selected_action": [connection.pk], "post": "yes"}

    admin_client.post(url("integrations_connection_changelist"), data)

    assert not Connection.objects.filter(pk=connection.pk).exists()


def test_dashboard_shows_worker_heartbeats(admin_client):
    from django.core.cache import cache

    from portal.health import HEARTBEAT_CACHE_KEY

    cache.set(
        HEARTBEAT_CACHE_KEY.format(queue="deliveries"), {"hostname": "worker@host-7", "at": timezone.now().isoformat()}
    )

    page = admin_client.get(reverse("admin:integrations_dashboard")).content.decode()

    assert "worker@host-7" in page
    assert "no heartbeat seen" in page
