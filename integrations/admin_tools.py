"""Admin pages beyond the model forms: test sends, batch preview, pause and drain, replay, the dashboard.

Each page is a function of the request, the ModelAdmin serving it and, when
it acts on one record, that record. The ModelAdmin checks permissions before
calling it. Pages that change something do so on POST only, after a
confirmation page where the change reaches many records.
"""

import uuid
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any, TypeAlias

from django import forms
from django.contrib import admin, messages
from django.db import transaction
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils import timezone

from events.models import InboundBatch
from integrations import dashboard, jsontext, preview, protection, retention
from integrations import delivery as deliveries
from integrations.delivery import attempt_headers
from integrations.forms import FULL_SAMPLE, PauseForm, SampleSendForm
from integrations.models import Connection, Delivery
from integrations.secrets import mask_secret, mask_url
from integrations.transport import USER_AGENT, Outcome, post_json
from portal import health
from portal.conf import portal_setting

ModelAdmin: TypeAlias = "admin.ModelAdmin[Any]"
# The Content-Type that transport.post_json sends with every attempt.
CONTENT_TYPE = "application/json; charset=utf-8"
REPLAYABLE = (Delivery.Status.FAILED, Delivery.Status.CANCELLED)
DRAINABLE = (Delivery.Status.PENDING, Delivery.Status.RETRY_SCHEDULED)
DRAIN_CHUNK = 1000


def _render(request: HttpRequest, model_admin: ModelAdmin, template: str, **context: Any) -> TemplateResponse:
    base = {**model_admin.admin_site.each_context(request), "opts": model_admin.model._meta}
    return TemplateResponse(request, f"admin/integrations/{template}", base | context)


def shown_headers(connection: Connection, delivery_id: uuid.UUID | str) -> dict[str, str]:
    """Return the headers every attempt of a delivery sends, with the Authorization header masked.

    The Authorization header is the connection's current one, which may
    differ from the one an older attempt sent.
    """
    headers = {"Content-Type": CONTENT_TYPE, "User-Agent": USER_AGENT, "X-Delivery-Id": str(delivery_id)}
    if connection.authorization:
        headers["Authorization"] = mask_secret(connection.authorization)
    return headers


# Test send ------------------------------------------------------------------


@dataclass
class SampleSend:
    """One test POST: what was sent exactly, and what came back; `reason` explains why nothing was sent."""

    event_type: str
    body: str | None = None
    reason: str = ""
    url: str = ""
    headers: dict[str, str] | None = None
    outcome: Outcome | None = None

    @property
    def pretty_body(self) -> str:
        return jsontext.pretty(self.body) if self.body else ""

    @property
    def headers_text(self) -> str:
        return "\n".join(f"{name}: {value}" for name, value in (self.headers or {}).items())

    @property
    def body_bytes(self) -> int:
        return len(self.body.encode("utf-8")) if self.body else 0


def sample_for(event_type: str) -> dict[str, Any]:
    """Return the sample batch, cut down to the events or consent notifications of `event_type` unless it is blank."""
    batch = preview.sample_batch()
    if event_type == FULL_SAMPLE:
        return batch
    batch["events"] = [event for event in batch.get("events", []) if event.get("event_type") == event_type]
    notifications = batch.get("system_notifications", [])
    batch["system_notifications"] = [note for note in notifications if note.get("type") == event_type]
    return batch


def sample_body(connection: Connection, event_type: str = FULL_SAMPLE) -> tuple[str | None, str]:
    """Return one body of the (cut) sample batch shaped by the connection's settings, or None and why not."""
    result = preview.preview(
        sample_for(event_type),
        connection.shaping_settings(),
        portal_setting("MAX_PAYLOAD_BYTES"),
        as_batch=True,
    )
    if result.bodies:
        return result.bodies[0], ""
    reasons = sorted({d.reason for d in result.decisions if d.reason != "routed"})
    if reasons:
        return None, "The connection's routing and settings drop it: " + "; ".join(reasons) + "."
    return None, "The connection's routing and settings leave nothing of it to send."


def send_sample_body(connection: Connection, event_type: str) -> SampleSend:
    """POST the sample body for `event_type` to the connection now, outside its rate limit and pause."""
    body, reason = sample_body(connection, event_type)
    if body is None:
        return SampleSend(event_type, reason=reason)
    delivery_id = uuid.uuid4()
    outcome = post_json(
        connection.post_url,
        body.encode("utf-8"),
        attempt_headers(Delivery(connection=connection, uuid=delivery_id)),
        connect_timeout=portal_setting("CONNECT_TIMEOUT_SECONDS"),
        total_timeout=portal_setting("TOTAL_TIMEOUT_SECONDS"),
        verify=portal_setting("CA_BUNDLE") or True,
    )
    outcome = replace(outcome, response_excerpt=deliveries.redact(outcome.response_excerpt, connection))
    return SampleSend(
        event_type,
        body=body,
        url=mask_url(connection.post_url),
        headers=shown_headers(connection, delivery_id),
        outcome=outcome,
    )


def sample_send_view(request: HttpRequest, model_admin: ModelAdmin, connection: Connection) -> HttpResponse:
    """Pick a sample event type (GET), or POST it to the connection and show the request and response."""
    form = SampleSendForm(request.POST or None)
    sent = None
    if request.method == "POST" and form.is_valid():
        sent = send_sample_body(connection, form.cleaned_data["event_type"])
        model_admin.log_change(request, connection, f"Sent a test: {sent.event_type or 'full sample'}.")
    return _sample_send_page(request, model_admin, connection, form, sent)


def send_sample(request: HttpRequest, model_admin: ModelAdmin, connection: Connection) -> HttpResponse:
    """POST the full sample payload now and show the test send page with its request and response."""
    sent = send_sample_body(connection, FULL_SAMPLE)
    model_admin.log_change(request, connection, "Sent the sample payload.")
    return _sample_send_page(request, model_admin, connection, SampleSendForm(), sent)


def _sample_send_page(
    request: HttpRequest, model_admin: ModelAdmin, connection: Connection, form: forms.Form, sent: SampleSend | None
) -> HttpResponse:
    return _render(
        request,
        model_admin,
        "connection/test_send.html",
        title=f"Test send to {connection}",
        connection=connection,
        original=connection,
        form=form,
        sent=sent,
    )


# Preview --------------------------------------------------------------------


class PreviewForm(forms.Form):
    batch = forms.ModelChoiceField(
        InboundBatch.objects.order_by("-pk"),
        required=False,
        help_text="A stored inbound batch; or paste a batch below.",
    )
    body = forms.CharField(widget=forms.Textarea(attrs={"rows": 12, "cols": 100}), required=False, label="Batch JSON")

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean() or {}
        batch, body = cleaned.get("batch"), cleaned.get("body", "").strip()
        if batch is None and not body:
            raise forms.ValidationError("Pick a stored batch or paste a batch.")
        text = body or (batch.body if batch is not None else "")
        try:
            parsed = jsontext.parse(text)
        except jsontext.InvalidJSON as error:
            raise forms.ValidationError(f"The batch is not valid JSON: {error}.") from error
        if not isinstance(parsed, dict):
            raise forms.ValidationError("The batch must be a JSON object.")
        cleaned["parsed"] = parsed
        return cleaned


def preview_view(request: HttpRequest, model_admin: ModelAdmin) -> HttpResponse:
    """Show, per active connection, what a batch would produce and why each event is routed or not."""
    form = PreviewForm(request.POST or None, initial={"batch": request.GET.get("batch")})
    results = []
    if request.method == "POST" and form.is_valid():
        for connection in Connection.objects.filter(active=True).order_by("name"):
            result = preview.preview(
                form.cleaned_data["parsed"],
                connection.shaping_settings(),
                portal_setting("MAX_PAYLOAD_BYTES"),
                as_batch=connection.send_as_batch,
            )
            results.append({"connection": connection, "result": result, "pretty": [_pretty(b) for b in result.bodies]})
    title = "Preview routing and payloads"
    return _render(request, model_admin, "connection/preview.html", title=title, form=form, results=results)


def _pretty(body: str) -> str:
    return jsontext.pretty(body)


# Pause, resume, drain -------------------------------------------------------


def _change_url(connection: Connection) -> str:
    return reverse("admin:integrations_connection_change", args=[connection.pk])


def waiting_count(connection: Connection) -> int:
    """Return how many of the connection's deliveries wait to be sent (pending or retry scheduled)."""
    return Delivery.objects.filter(connection=connection, status__in=DRAINABLE).count()


def pause_view(request: HttpRequest, model_admin: ModelAdmin, connection: Connection) -> HttpResponse:
    """Ask for a reason (GET), then pause the connection until an operator resumes it (POST)."""
    form = PauseForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        actor = f"paused by {request.user.get_username()} in the admin"
        reason = form.cleaned_data["reason"].strip()
        protection.pause(connection, f"{reason} ({actor})" if reason else f"{actor.capitalize()}.", auto_resume=False)
        model_admin.log_change(request, connection, "Paused.")
        model_admin.message_user(request, f"Paused {connection}; its deliveries wait until it is resumed.")
        return HttpResponseRedirect(_change_url(connection))
    return _render(
        request,
        model_admin,
        "confirm.html",
        title=f"Pause {connection}?",
        original=connection,
        form=form,
        lines=[
            "A paused connection keeps collecting: its deliveries are created and wait, and nothing is dropped.",
            "It stays paused until an operator resumes it.",
        ],
        submit="Pause",
        cancel_url=_change_url(connection),
    )


def resume_view(request: HttpRequest, model_admin: ModelAdmin, connection: Connection) -> HttpResponse:
    """Resume the connection and queue the deliveries that waited for it (POST)."""
    queued = protection.resume(connection, reason=f"resumed by {request.user.get_username()} in the admin")
    model_admin.log_change(request, connection, "Resumed.")
    model_admin.message_user(request, f"Resumed {connection} and queued {queued} waiting deliveries.", messages.SUCCESS)
    return HttpResponseRedirect(_change_url(connection))


def drain(connection: Connection, reason: str, chunk: int = DRAIN_CHUNK) -> int:
    """Cancel the connection's pending and retry-scheduled deliveries, in chunks; return how many.

    Each update is a compare-and-set on the status, so a delivery a worker
    has just claimed (in flight) finishes its attempt instead. Events still
    collecting in open batch windows are not touched. Cancelled deliveries
    can be replayed.
    """
    waiting = Delivery.objects.filter(connection=connection, status__in=DRAINABLE)
    total = 0
    while ids := list(waiting.order_by("pk").values_list("pk", flat=True)[:chunk]):
        with transaction.atomic():
            total += Delivery.objects.filter(pk__in=ids, status__in=DRAINABLE).update(
                status=Delivery.Status.CANCELLED, next_attempt_at=None, last_error=reason
            )
    return total


def drain_view(request: HttpRequest, model_admin: ModelAdmin, connection: Connection) -> HttpResponse:
    """Show how many deliveries wait (GET), then cancel them all (POST)."""
    if request.method == "POST":
        count = drain(connection, f"Drained by {request.user.get_username()} in the admin.")
        model_admin.log_change(request, connection, f"Drained {count} waiting deliveries.")
        model_admin.message_user(
            request, f"Cancelled {count} waiting deliveries of {connection}; they can be replayed.", messages.SUCCESS
        )
        return HttpResponseRedirect(_change_url(connection))
    count = waiting_count(connection)
    return _render(
        request,
        model_admin,
        "confirm.html",
        title=f"Drain {connection}?",
        original=connection,
        lines=[
            f"{count:,} deliveries of this connection are pending or scheduled for a retry. "
            "Draining cancels all of them, with the reason, so that they are not sent.",
            "Deliveries in flight finish their attempt. Events still collecting in open batch windows are not "
            "affected. Cancelled deliveries can be replayed later from the delivery list.",
        ],
        submit=f"Cancel {count:,} deliveries",
        cancel_url=_change_url(connection),
    )


# Deliveries -----------------------------------------------------------------


def request_text(delivery: Delivery) -> str:
    """Return the request line and headers that each attempt of the delivery sends, secrets masked."""
    headers = shown_headers(delivery.connection, delivery.uuid)
    lines = [f"POST {mask_url(delivery.connection.post_url)}", *(f"{name}: {value}" for name, value in headers.items())]
    return "\n".join(lines)


def replay_one_view(request: HttpRequest, model_admin: ModelAdmin, delivery: Delivery) -> HttpResponse:
    """Queue one failed or cancelled delivery again with a fresh attempt budget (POST)."""
    count = deliveries.replay(Delivery.objects.filter(pk=delivery.pk))
    if count:
        model_admin.message_user(request, "Queued the delivery again.", messages.SUCCESS)
    else:
        model_admin.message_user(request, "Only a failed or cancelled delivery with a payload can be replayed.")
    return HttpResponseRedirect(reverse("admin:integrations_delivery_change", args=[delivery.pk]))


def replayable(queryset: QuerySet[Delivery]) -> QuerySet[Delivery]:
    return queryset.filter(status__in=REPLAYABLE).exclude(payload="")


def replay_matching_view(request: HttpRequest, model_admin: ModelAdmin) -> HttpResponse:
    """Replay every failed or cancelled delivery that the delivery list's filters and search match.

    The filters travel in the query string, on the confirmation page (GET)
    and on its POST alike, and the whole filtered set is replayed, not
    only the page the list showed.
    """
    matching = model_admin.get_changelist_instance(request).get_queryset(request)
    query = request.GET.urlencode()
    list_url = reverse("admin:integrations_delivery_changelist") + (f"?{query}" if query else "")
    if request.method == "POST":
        count = deliveries.replay(matching)
        model_admin.message_user(request, f"Queued {count} failed or cancelled deliveries again.", messages.SUCCESS)
        return HttpResponseRedirect(list_url)
    count = replayable(matching).count()
    return _render(
        request,
        model_admin,
        "confirm.html",
        title="Replay all matching deliveries?",
        lines=[
            f"{count:,} failed or cancelled deliveries match the list's current filters and search.",
            "Each is queued again with a fresh attempt budget. Delivered and waiting deliveries are left alone.",
        ],
        filters=query,
        submit=f"Replay {count:,} deliveries",
        cancel_url=list_url,
    )


# Dashboard ------------------------------------------------------------------

TOTAL_COLUMNS = (
    ("routed", "Routed"),
    ("filtered", "Filtered"),
    ("delivered", "Delivered"),
    ("waiting", "Pending or retrying"),
    ("failed", "Failed"),
    ("cancelled", "Cancelled"),
)


def dashboard_view(request: HttpRequest, model_admin: ModelAdmin) -> HttpResponse:
    """Charts of every connection, or of the one chosen with `?connection=<id>`, with latency and retention."""
    now = timezone.now()
    connections = list(Connection.objects.order_by("name").only("pk", "name", "active", "paused_at"))
    selected = next((c for c in connections if str(c.pk) == request.GET.get("connection")), None)
    selected_id = selected.pk if selected else None
    data = dashboard.snapshot(now)
    totals = dashboard.totals(data)
    return _render(
        request,
        model_admin,
        "dashboard.html",
        title=f"Dashboard: {selected}" if selected else "Dashboard",
        connections=connections,
        selected=selected,
        plots=[dashboard.plot(chart) for chart in dashboard.charts(data, selected_id)],
        total_columns=[label for _, label in TOTAL_COLUMNS],
        totals=[(c, [totals.get(c.pk, {}).get(key, 0) for key, _ in TOTAL_COLUMNS]) for c in connections],
        latencies=[
            dashboard.latency(now, timedelta(hours=1), "Last hour", selected_id),
            dashboard.latency(now, timedelta(hours=24), "Last 24 hours", selected_id),
        ],
        heartbeats=health.heartbeats(now),
        retention_days=retention.retention_days(),
        oldest=retention.oldest_records(),
        last_purge=retention.last_run(),
    )
