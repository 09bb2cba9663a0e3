"""The operator's cockpit in a real browser: the system's Chromium, driven by Playwright, against a live server.

These tests need `/usr/bin/chromium` (Debian's `chromium` package) and the
`playwright` package; without either they are skipped. Playwright's own
browser builds are never downloaded. `-m "not browser"` deselects them.
They also write the screenshots under docs/screenshots that the README shows.
"""

import json
import os
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.core.cache import cache
from django.utils import timezone

from events.models import InboundBatch
from integrations import delivery
from integrations.models import Connection, Delivery, DeliveryAttempt, Routing
from tests.factories import ConnectionFactory, DeliveryFactory, FeedFactory

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = Path(__file__).resolve().parents[1] / "docs" / "screenshots"
VIEWPORT = {"width": 1680, "height": 860}
ASYNC_UNSAFE = "DJANGO_ALLOW_ASYNC_UNSAFE"
USERNAME, PASSWORD = "operator", "cockpit-pass-4821"
AUTHORIZATION = "Basic dGVzdDp0ZXN0LXRva2Vu"
PAYLOAD = '{"events":[{"data":{"event_name":"Survey Eligible"},"event_type":"custom_event"}],"mpid":8675309}'

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason="No Chromium at /usr/bin/chromium: install it with `apt-get install -y chromium` to run browser tests.",
    ),
]
sync_api = pytest.importorskip("playwright.sync_api", reason="The playwright package is not installed.")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Chromium for this module's tests.

    Playwright's sync API keeps an event loop in the test's thread, which
    Django takes for async code and refuses the ORM in. The tests' own ORM
    calls are synchronous, so that guard is lifted while the browser runs.
    """
    previous = os.environ.get(ASYNC_UNSAFE)
    os.environ[ASYNC_UNSAFE] = "true"
    try:
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            yield browser
            browser.close()
    finally:
        if previous is None:
            os.environ.pop(ASYNC_UNSAFE, None)
        else:
            os.environ[ASYNC_UNSAFE] = previous


@pytest.fixture
def page(browser: Any, live_server: Any, transactional_db: None, django_user_model: Any) -> Iterator[Any]:
    """An admin page of the live server, logged in through the login form."""
    cache.clear()
    django_user_model.objects.create_superuser(USERNAME, "operator@example.com", PASSWORD)
    context = browser.new_context(viewport=VIEWPORT, base_url=live_server.url)
    # The admin's navigation sidebar starts folded, leaving the screenshots' width to the page itself.
    context.add_init_script("localStorage.setItem('django.admin.navSidebarIsOpen', 'false')")
    page = context.new_page()
    page.goto("/admin/login/")
    page.fill("#id_username", USERNAME)
    page.fill("#id_password", PASSWORD)
    page.click("input[type=submit]")
    sync_api.expect(page.locator("#user-tools")).to_contain_text(USERNAME)
    yield page
    context.close()


@pytest.fixture
def queued(monkeypatch: Any) -> list[int]:
    """Delivery ids handed to the task queue, instead of a broker."""
    ids: list[int] = []
    monkeypatch.setattr(delivery, "_enqueue", lambda delivery_ids, countdown=None: ids.extend(delivery_ids))
    return ids


def screenshot(page: Any, name: str, *, full_page: bool = False) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / name), full_page=full_page)


def test_create_connection_with_routing_and_settings(page, standin, allow_loopback):
    page.goto("/admin/integrations/connection/add/")
    page.fill("#id_name", "Checkout survey")
    page.fill("#id_post_url", standin.url)
    page.fill("#id_qualtrics_username", "test")
    page.fill("#id_qualtrics_api_token", "test-token")
    page.check("input[name=event_types][value=custom_event]")
    page.check("input[name=event_types][value=screen_view]")
    page.fill("#id_custom_event_names", "Survey Eligible\nCheckout")
    page.uncheck("#id_send_as_batch")
    page.check("input[name=metadata_exclusions][value=ip]")
    page.fill("#id_rate_limit_per_minute", "600")
    page.click("input[name=_save]")

    sync_api.expect(page.locator(".messagelist .success")).to_contain_text("Checkout survey")
    saved = Connection.objects.get(name="Checkout survey")
    assert saved.event_types == ["custom_event", "screen_view"]
    assert saved.custom_event_names == ["Survey Eligible", "Checkout"]
    assert saved.metadata_exclusions == ["ip"]
    assert (saved.send_as_batch, saved.rate_limit_per_minute) == (False, 600)
    assert saved.authorization == AUTHORIZATION


def test_test_send_shows_request_and_response(page, standin, allow_loopback):
    connection = ConnectionFactory.create(post_url=standin.url, authorization=AUTHORIZATION)
    page.goto(f"/admin/integrations/connection/{connection.pk}/change/")

    page.click("#cockpit-test-send")
    page.select_option("#id_event_type", "custom_event")
    page.click("#test-send-form input[type=submit]")

    sync_api.expect(page.locator("#sample-status")).to_contain_text("HTTP 200")
    request_text = page.inner_text("#sample-request")
    (record,) = standin.records
    assert f"X-Delivery-Id: {record['headers']['X-Delivery-Id']}" in request_text
    assert "Authorization: ••••" in request_text
    assert AUTHORIZATION not in page.content()
    assert [event["event_type"] for event in json.loads(record["body"])["events"]] == ["custom_event"]


def test_delivery_and_attempt_shown(page, standin, allow_loopback, queued):
    connection = ConnectionFactory.create(name="Checkout survey", post_url=standin.url, authorization=AUTHORIZATION)
    created = DeliveryFactory.create(connection=connection, payload=PAYLOAD)
    delivery.deliver(created.pk)

    page.goto("/admin/integrations/delivery/?q=mpid%3A8675309")
    page.click(f"text={str(created.uuid)[:8]}")

    sync_api.expect(page.locator(".field-status_code").last).to_contain_text("200")
    sync_api.expect(page.locator("pre.cockpit-request")).to_contain_text(f"X-Delivery-Id: {created.uuid}")
    assert Delivery.objects.get(pk=created.pk).status == Delivery.Status.DELIVERED
    screenshot(page, "delivery-detail.png", full_page=True)


def test_pause_and_resume(page, queued):
    connection = ConnectionFactory.create(name="NPS after support")
    page.goto(f"/admin/integrations/connection/{connection.pk}/change/")

    page.click("#cockpit-pause")
    page.fill("#id_reason", "Workflow is being rebuilt")
    page.click("#confirm-submit")
    sync_api.expect(page.locator("#cockpit-paused-note")).to_contain_text("Workflow is being rebuilt")
    assert Connection.objects.get(pk=connection.pk).is_paused

    page.goto("/admin/integrations/connection/")
    sync_api.expect(page.locator("#result_list")).to_contain_text("Workflow is being rebuilt")

    page.goto(f"/admin/integrations/connection/{connection.pk}/change/")
    page.click("#cockpit-resume")
    sync_api.expect(page.locator(".messagelist .success")).to_contain_text("Resumed NPS after support")
    assert not Connection.objects.get(pk=connection.pk).is_paused


def test_replay_failed_delivery(page, queued):
    failed = DeliveryFactory.create(status=Delivery.Status.FAILED, attempt_count=15, last_error="HTTP 400")
    page.goto(f"/admin/integrations/delivery/{failed.pk}/change/")

    page.click("#cockpit-replay")

    sync_api.expect(page.locator(".messagelist .success")).to_contain_text("Queued the delivery again.")
    assert Delivery.objects.get(pk=failed.pk).status == Delivery.Status.PENDING
    assert queued == [failed.pk]


def test_dashboard_and_connection_list(page):
    seed_traffic()

    page.goto("/admin/integrations/connection/")
    sync_api.expect(page.locator("#result_list")).to_contain_text("Qualtrics refused access")
    screenshot(page, "connection-list.png")

    page.click("#cockpit-dashboard-link")
    charts = page.locator("figure.cockpit-chart")
    sync_api.expect(charts).to_have_count(3)
    sync_api.expect(charts.first.locator("svg")).to_be_visible()
    sync_api.expect(charts.first.locator("svg polyline")).to_have_count(6)
    sync_api.expect(page.locator("#cockpit-latency")).to_contain_text("p99")
    screenshot(page, "dashboard.png")

    page.select_option("#cockpit-connection", label="Checkout survey")
    sync_api.expect(page.locator("h1")).to_contain_text("Dashboard: Checkout survey")


# Connection name, events per delivery and share of failed deliveries, for the screenshots' traffic.
TRAFFIC = (("Checkout survey", 3, 0.0), ("Onboarding feedback", 2, 0.2), ("NPS after support", 1, 0.05))


def seed_traffic() -> None:
    """Store two weeks of batches, routings, deliveries and attempts for three connections, one paused."""
    feed = FeedFactory.create()
    now = timezone.now()
    connections = [ConnectionFactory.create(name=name, event_types=["custom_event"]) for name, _, _ in TRAFFIC]
    paused = connections[-1]
    Connection.objects.filter(pk=paused.pk).update(
        paused_at=now, pause_reason="Qualtrics refused access (403); check the Authorization header."
    )
    Connection.objects.update(last_success_at=now - timedelta(seconds=20))
    Connection.objects.filter(name="Onboarding feedback").update(
        last_error_at=now - timedelta(minutes=3), last_error="HTTP 500: server error, retried with backoff"
    )
    # Dense over the last hour, sparser over the day, a few batches a day over two weeks.
    ages = [*range(0, 60), *range(60, 24 * 60, 20), *range(24 * 60, 14 * 24 * 60, 180)]
    for step, minutes in enumerate(ages):
        at = now - timedelta(minutes=minutes, seconds=20)
        batch = InboundBatch.objects.create(feed=feed, body="{}", body_bytes=2, status="routed", event_count=8)
        InboundBatch.objects.filter(pk=batch.pk).update(received_at=at)
        for index, (connection, (_, events, failure_share)) in enumerate(zip(connections, TRAFFIC, strict=True)):
            failed = (step + index) % 20 < failure_share * 20
            seed_delivery(connection, batch, at, events, failed, waiting=connection is paused and minutes < 30)


def seed_delivery(
    connection: Connection, batch: InboundBatch, at: Any, events: int, failed: bool, waiting: bool
) -> None:
    routing = Routing.objects.create(batch=batch, connection=connection, routed_count=events, filtered_count=1)
    Routing.objects.filter(pk=routing.pk).update(created_at=at)
    status = Delivery.Status.DELIVERED
    if failed:
        status = Delivery.Status.FAILED
    if waiting:
        status = Delivery.Status.PENDING
    created = Delivery.objects.create(
        connection=connection, batch=batch, payload=PAYLOAD, event_count=events, status=status
    )
    latency = timedelta(milliseconds=180 + 40 * events + (created.pk % 7) * 30)
    delivered_at = at + latency if status == Delivery.Status.DELIVERED else None
    Delivery.objects.filter(pk=created.pk).update(created_at=at, delivered_at=delivered_at)
    if not waiting:
        DeliveryAttempt.objects.create(
            delivery=created,
            number=1,
            started_at=at + timedelta(milliseconds=50),
            duration_ms=latency.microseconds // 1000,
            status_code=500 if failed else 200,
            error="HTTP 500" if failed else "",
        )
