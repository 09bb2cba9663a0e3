"""Admin for Qualtrics connections and the records of what was sent to them.

Connections are the only records an operator edits here. Their POST URL and
Authorization header are shown masked everywhere: see `ConnectionForm`.
Deliveries, attempts and batch windows are written by the workers and shown
read-only.
"""

import json
import re
from collections.abc import Callable
from typing import Any

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db.models import Count, Max, Q, QuerySet
from django.http import Http404, HttpRequest, HttpResponse
from django.urls import URLPattern, path
from django.utils import formats, timezone
from django.utils.html import format_html
from django.utils.safestring import SafeString
from django.views.decorators.http import require_POST

from events.admin import ReadOnlyModelAdmin, ReadOnlyTabularInline, json_block, short_text
from events.event_types import RouteType
from integrations import admin_tools, dashboard, delivery, protection
from integrations.forms import DELIVERY_POLICY_FIELDS, MPARTICLE_SETTING_FIELDS, ConnectionForm
from integrations.models import BatchWindow, Connection, Delivery, DeliveryAttempt
from integrations.secrets import mask_url

admin.site.site_header = "mParticle to Qualtrics portal"
admin.site.site_title = "mParticle to Qualtrics portal"
admin.site.index_title = "Administration"

STATUS_FIELDS = (
    "paused_at",
    "pause_reason",
    "auto_resume",
    "hold_until",
    "last_success_at",
    "last_error_at",
    "last_error",
    "created_at",
    "updated_at",
)
ROUTE_TYPE_LABELS = dict(RouteType.choices)
SHOWN_ROUTE_TYPES = 3


def summarize_route_types(values: list[str]) -> str:
    """Return a short label list for route types: the first few labels and how many more there are."""
    if not values:
        return "None"
    labels = [ROUTE_TYPE_LABELS.get(value, value) for value in values]
    summary = ", ".join(labels[:SHOWN_ROUTE_TYPES])
    hidden = len(labels) - SHOWN_ROUTE_TYPES
    return f"{summary} +{hidden} more" if hidden > 0 else summary


# Payload search reads this many of the newest deliveries at most, so that a
# search costs the same on a table of any size, and lists at most
# SEARCH_MATCHES of them, newest first.
SEARCH_ROWS = 100_000
SEARCH_MATCHES = 1000
# Search qualifiers and the JSON key each one matches in the stored payload.
SEARCH_KEYS = {
    "mpid": "mpid",
    "mp_deviceid": "mp_deviceid",
    "source_message_id": "source_message_id",
    "event": "event_name",
    "event_name": "event_name",
}
QUALIFIED_TERM = re.compile(r"^(?P<key>[a-z_]+):\s*(?P<value>.+)$")
FULL_UUID = re.compile(r"^[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}$", re.IGNORECASE)
INTEGER = re.compile(r"^-?[0-9]+$")

# The delivery page: what happened first, then the request, then the bookkeeping (folded).
DELIVERY_SUMMARY_FIELDS = (
    "uuid",
    "connection",
    "status",
    "event_count",
    "attempt_count",
    "last_status_code",
    "last_error",
    "created_at",
    "delivered_at",
    "latency",
)
DELIVERY_REQUEST_FIELDS = ("request_headers", "pretty_payload")
DELIVERY_DETAIL_FIELDS = (
    "batch",
    "window",
    "event_types",
    "attempts_before_replay",
    "next_attempt_at",
    "lease_expires_at",
    "replayed_at",
)

ObjectPage = Callable[[HttpRequest, Any, Any], HttpResponse]


def object_page(model_admin: admin.ModelAdmin, page: ObjectPage, allowed: Callable[[HttpRequest, Any], bool]) -> Any:  # type: ignore[type-arg]
    """Wrap `page(request, model_admin, obj)` as an admin view of one object: 404 when missing, 403 when not allowed."""

    def view(request: HttpRequest, object_id: str) -> HttpResponse:
        obj = model_admin.get_object(request, object_id)
        if obj is None:
            raise Http404(f"No {model_admin.opts.verbose_name} with id {object_id}.")
        if not allowed(request, obj):
            raise PermissionDenied
        return page(request, model_admin, obj)

    return model_admin.admin_site.admin_view(view)


class PausedFilter(admin.SimpleListFilter):
    title = "paused"
    parameter_name = "paused"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("yes", "Yes"), ("no", "No")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        if self.value() in ("yes", "no"):
            return queryset.filter(paused_at__isnull=self.value() == "no")
        return queryset


@admin.register(Connection)
class ConnectionAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    """Connections with their health at a glance, and the pages to test, pause, resume and drain one."""

    form = ConnectionForm
    list_display = (
        "name",
        "state",
        "delivered_24h",
        "waiting_24h",
        "failed_24h",
        "rate",
        "last_success_at",
        "last_error_summary",
        "event_types_summary",
        "masked_post_url",
    )
    list_filter = ("active", PausedFilter, "send_as_batch", "environment")
    # The page counts through the health join, so one count (of the filtered list) is enough.
    show_full_result_count = False
    search_fields = ("name",)
    filter_horizontal = ("feeds",)
    readonly_fields = (*STATUS_FIELDS, "waiting_deliveries")
    actions = ("pause_connections", "resume_connections", "send_sample_payload")
    change_list_template = "admin/integrations/connection/change_list.html"
    change_form_template = "admin/integrations/connection/change_form.html"

    def get_queryset(self, request: HttpRequest) -> QuerySet[Connection]:
        """Return the connections annotated with their health (see `dashboard.with_health`), in one query."""
        return dashboard.with_health(super().get_queryset(request), timezone.now())

    def get_urls(self) -> list[URLPattern]:
        site = self.admin_site
        changeable = self.has_change_permission
        return [
            path("preview/", site.admin_view(self.preview), name="integrations_connection_preview"),
            path("dashboard/", site.admin_view(self.dashboard), name="integrations_dashboard"),
            path(
                "<path:object_id>/test-send/",
                object_page(self, admin_tools.sample_send_view, changeable),
                name="integrations_connection_test_send",
            ),
            path(
                "<path:object_id>/pause/",
                object_page(self, admin_tools.pause_view, changeable),
                name="integrations_connection_pause",
            ),
            path(
                "<path:object_id>/resume/",
                object_page(self, require_POST(admin_tools.resume_view), changeable),
                name="integrations_connection_resume",
            ),
            path(
                "<path:object_id>/drain/",
                object_page(self, admin_tools.drain_view, changeable),
                name="integrations_connection_drain",
            ),
            *super().get_urls(),
        ]

    def preview(self, request: HttpRequest) -> HttpResponse:
        return admin_tools.preview_view(request, self)

    def dashboard(self, request: HttpRequest) -> HttpResponse:
        if not self.has_view_permission(request):
            raise PermissionDenied
        return admin_tools.dashboard_view(request, self)

    @admin.action(description="Send the sample payload to the selected connection", permissions=["change"])
    def send_sample_payload(self, request: HttpRequest, queryset: QuerySet[Connection]) -> HttpResponse | None:
        """POST a fully populated example of what the connection sends, for Qualtrics' "capture event" step."""
        connections = list(queryset[:2])
        if len(connections) != 1:
            self.message_user(request, "Select exactly one connection to send the sample payload to.", messages.ERROR)
            return None
        return admin_tools.send_sample(request, self, connections[0])

    def get_fieldsets(self, request: HttpRequest, obj: Connection | None = None) -> Any:
        credentials: tuple[str, ...] = ("qualtrics_username", "qualtrics_api_token")
        if obj is not None:
            credentials += ("remove_authorization",)
        fieldsets: list[tuple[str, dict[str, Any]]] = [
            ("Connection", {"fields": ("name", "active", "post_url", "authorization", *credentials, "feeds")}),
            ("Routing", {"fields": ("event_types", "custom_event_names", "custom_event_types", "environment")}),
            ("mParticle settings", {"fields": MPARTICLE_SETTING_FIELDS}),
            ("Metadata Field Exclusion", {"fields": ("metadata_exclusions",)}),
            ("Delivery policy", {"fields": DELIVERY_POLICY_FIELDS}),
        ]
        if obj is not None:
            fieldsets.append(("Delivery status", {"fields": ("waiting_deliveries", *STATUS_FIELDS)}))
        return fieldsets

    @admin.display(description="State", ordering="paused_at")
    def state(self, obj: Connection) -> SafeString:
        """Active, inactive, or paused with the reason and how many deliveries wait."""
        if obj.paused_at is not None:
            return format_html(
                '<span class="cockpit-badge cockpit-paused">Paused</span> {}<br><small>{} deliveries wait</small>',
                short_text(obj.pause_reason),
                f"{self._waiting(obj):,}",
            )
        if not obj.active:
            return format_html('<span class="cockpit-badge cockpit-inactive">{}</span>', "Inactive")
        return format_html('<span class="cockpit-badge cockpit-active">{}</span>', "Active")

    @admin.display(description="Delivered (24 h)", ordering="delivered_24h")
    def delivered_24h(self, obj: Connection) -> str:
        return f"{getattr(obj, 'delivered_24h', 0):,}"

    @admin.display(description="Pending or retrying (24 h)", ordering="waiting_24h")
    def waiting_24h(self, obj: Connection) -> str:
        return f"{getattr(obj, 'waiting_24h', 0):,}"

    @admin.display(description="Failed (24 h)", ordering="failed_24h")
    def failed_24h(self, obj: Connection) -> SafeString:
        failed = getattr(obj, "failed_24h", 0)
        css = "cockpit-bad" if failed else ""
        return format_html('<span class="{}">{}</span>', css, f"{failed:,}")

    @admin.display(description="Rate (last minute)", ordering="posts_last_minute")
    def rate(self, obj: Connection) -> SafeString:
        """POSTs started in the last minute against the connection's limit per minute."""
        posts = getattr(obj, "posts_last_minute", 0)
        css = "cockpit-bad" if posts >= obj.rate_limit_per_minute * 0.9 else ""
        return format_html('<span class="{}">{} / {}</span>', css, f"{posts:,}", f"{obj.rate_limit_per_minute:,}")

    @admin.display(description="Waiting deliveries")
    def waiting_deliveries(self, obj: Connection) -> str:
        count = self._waiting(obj)
        if obj.paused_at is not None:
            return f"{count:,} deliveries wait until the connection is resumed."
        return f"{count:,} deliveries are pending or scheduled for a retry."

    def _waiting(self, obj: Connection) -> int:
        annotated = getattr(obj, "waiting_now", None)
        return int(annotated) if annotated is not None else admin_tools.waiting_count(obj)

    @admin.display(description="POST URL")
    def masked_post_url(self, obj: Connection) -> str:
        return mask_url(obj.post_url)

    @admin.display(description="Event types")
    def event_types_summary(self, obj: Connection) -> str:
        values = list(obj.event_types or [])
        if set(values) >= set(RouteType.values):
            return f"All ({len(RouteType.values)})"
        return summarize_route_types(values)

    @admin.display(description="Last error")
    def last_error_summary(self, obj: Connection) -> SafeString | str:
        if not obj.last_error:
            return ""
        when = formats.localize(timezone.localtime(obj.last_error_at)) if obj.last_error_at else ""
        return format_html("{}<br><small>{}</small>", short_text(obj.last_error), when)

    @admin.action(description="Pause the selected connections", permissions=["change"])
    def pause_connections(self, request: HttpRequest, queryset: QuerySet[Connection]) -> None:
        """Pause each selected connection until an operator resumes it. Its new deliveries wait until then."""
        running = list(queryset.filter(paused_at__isnull=True))
        reason = f"Paused by {request.user.get_username()} in the admin."
        for connection in running:
            protection.pause(connection, reason, auto_resume=False)
            self.log_change(request, connection, "Paused.")
        self.message_user(request, f"Paused {len(running)} connection(s).", messages.SUCCESS)

    @admin.action(description="Resume the selected connections", permissions=["change"])
    def resume_connections(self, request: HttpRequest, queryset: QuerySet[Connection]) -> None:
        """Resume each selected paused connection and queue the deliveries that waited for it."""
        paused = list(queryset.filter(paused_at__isnull=False))
        reason = f"resumed by {request.user.get_username()} in the admin"
        queued = 0
        for connection in paused:
            queued += protection.resume(connection, reason=reason)
            self.log_change(request, connection, "Resumed.")
        self.message_user(
            request, f"Resumed {len(paused)} connection(s) and queued {queued} waiting deliveries.", messages.SUCCESS
        )


class DeliveryAttemptInline(ReadOnlyTabularInline):
    model = DeliveryAttempt
    fields = ("number", "started_at", "duration_ms", "status_code", "error", "response_excerpt")
    readonly_fields = fields


def payload_search(term: str) -> Q:
    """Return the filter for one search term: `key:value` as the compact JSON payload spells it, or any text.

    A number is matched both quoted and bare, and a bare one must end at a
    comma or brace, so that `mpid:12` does not match mpid 123. The plain
    `contains value` comes first: PostgreSQL checks it first, and only the
    few rows it lets through pay for the three exact patterns.
    """
    match = QUALIFIED_TERM.match(term)
    if match is None or match["key"] not in SEARCH_KEYS:
        return Q(payload__contains=term) | Q(uuid__istartswith=term)
    key, value = SEARCH_KEYS[match["key"]], match["value"].strip()
    quoted = Q(payload__contains=f'"{key}":{json.dumps(value, ensure_ascii=False)}')
    if not INTEGER.match(value):
        return quoted
    bare = Q(payload__contains=f'"{key}":{value},') | Q(payload__contains=f'"{key}":{value}}}')
    return Q(payload__contains=value) & (quoted | bare)


@admin.register(Delivery)
class DeliveryAdmin(ReadOnlyModelAdmin):
    """Every delivery with its attempts, searchable in its payload, and replayable one, some or all at a time."""

    list_display = (
        "short_uuid",
        "connection",
        "status",
        "event_count",
        "event_types_summary",
        "attempt_count",
        "last_status_code",
        "next_attempt_at",
        "created_at",
        "delivered_at",
        "last_error_summary",
    )
    list_filter = ("status", "connection", "created_at")
    list_select_related = ("connection",)
    list_deferred_fields = ("payload",)
    # A count of the unfiltered table on every filtered page is a scan the operator did not ask for.
    show_full_result_count = False
    search_fields = ("uuid",)
    search_help_text = (
        "mpid:<id>, mp_deviceid:<id>, source_message_id:<id>, event:<event name>, any payload text, or a delivery "
        f"UUID. Payload searches read the newest {SEARCH_ROWS:,} deliveries and list up to {SEARCH_MATCHES:,} matches."
    )
    fieldsets = (
        (None, {"fields": DELIVERY_SUMMARY_FIELDS}),
        ("Request", {"fields": DELIVERY_REQUEST_FIELDS}),
        ("Details", {"classes": ("collapse",), "fields": DELIVERY_DETAIL_FIELDS}),
    )
    readonly_fields = (*DELIVERY_SUMMARY_FIELDS, *DELIVERY_REQUEST_FIELDS, *DELIVERY_DETAIL_FIELDS)
    inlines = (DeliveryAttemptInline,)
    actions = ("replay_deliveries",)
    change_list_template = "admin/integrations/delivery/change_list.html"
    change_form_template = "admin/integrations/delivery/change_form.html"

    def get_urls(self) -> list[URLPattern]:
        site = self.admin_site
        return [
            path(
                "replay-matching/",
                site.admin_view(self.replay_matching),
                name="integrations_delivery_replay_matching",
            ),
            path(
                "<path:object_id>/replay/",
                object_page(self, require_POST(admin_tools.replay_one_view), self._may_replay),
                name="integrations_delivery_replay",
            ),
            *super().get_urls(),
        ]

    def has_replay_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("integrations.change_delivery")

    def _may_replay(self, request: HttpRequest, obj: Delivery) -> bool:
        return self.has_replay_permission(request)

    def replay_matching(self, request: HttpRequest) -> HttpResponse:
        if not self.has_replay_permission(request):
            raise PermissionDenied
        return admin_tools.replay_matching_view(request, self)

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[Delivery], search_term: str
    ) -> tuple[QuerySet[Delivery], bool]:
        """Find a delivery by its full UUID anywhere, or the newest SEARCH_MATCHES matches among the newest
        SEARCH_ROWS payloads (see payload_search).

        The payloads are read once, for the ids; the page and its count then
        look those ids up instead of reading the payloads again.
        """
        term = search_term.strip()
        if not term:
            return queryset, False
        if FULL_UUID.match(term):
            return queryset.filter(uuid=term), False
        newest = Delivery.objects.aggregate(newest=Max("pk"))["newest"] or 0
        matches = queryset.filter(pk__gt=newest - SEARCH_ROWS).filter(payload_search(term)).order_by("-pk")
        ids = list(matches.values_list("pk", flat=True)[:SEARCH_MATCHES])
        return queryset.filter(pk__in=ids), False

    def render_change_form(self, request: HttpRequest, context: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        context["may_replay"] = self.has_replay_permission(request)
        return super().render_change_form(request, context, *args, **kwargs)

    def changelist_view(self, request: HttpRequest, extra_context: dict[str, Any] | None = None) -> Any:
        context = {"may_replay": self.has_replay_permission(request), **(extra_context or {})}
        return super().changelist_view(request, context)

    @admin.action(description="Replay the selected failed or cancelled deliveries", permissions=["replay"])
    def replay_deliveries(self, request: HttpRequest, queryset: QuerySet[Delivery]) -> None:
        """Queue the selected failed or cancelled deliveries again with a fresh attempt budget."""
        count = delivery.replay(queryset)
        self.message_user(request, f"Queued {count} failed or cancelled deliveries again.", messages.SUCCESS)

    @admin.display(description="UUID", ordering="uuid")
    def short_uuid(self, obj: Delivery) -> str:
        return str(obj.uuid)[:8]

    @admin.display(description="Event types")
    def event_types_summary(self, obj: Delivery) -> str:
        return summarize_route_types(list(obj.event_types or []))

    @admin.display(description="Last error")
    def last_error_summary(self, obj: Delivery) -> str:
        return short_text(obj.last_error)

    @admin.display(description="End-to-end latency")
    def latency(self, obj: Delivery) -> str:
        """From the batch's arrival (or the window's opening, with Send as Batch) to the delivery."""
        started = None
        if obj.window:
            started = obj.window.opened_at
        elif obj.batch:
            started = obj.batch.received_at
        if obj.delivered_at is None or started is None:
            return "-"
        return f"{(obj.delivered_at - started).total_seconds():,.3f} s"

    @admin.display(description="Request headers")
    def request_headers(self, obj: Delivery) -> SafeString:
        """Show the request line and headers of every attempt, with the connection's current Authorization masked."""
        return format_html('<pre class="cockpit-request">{}</pre>', admin_tools.request_text(obj))

    @admin.display(description="Payload")
    def pretty_payload(self, obj: Delivery) -> SafeString:
        return json_block(obj.payload)


@admin.register(DeliveryAttempt)
class DeliveryAttemptAdmin(ReadOnlyModelAdmin):
    list_display = (
        "delivery",
        "connection",
        "number",
        "started_at",
        "duration_ms",
        "status_code",
        "error_summary",
    )
    list_filter = ("status_code",)
    list_select_related = ("delivery__connection",)
    list_deferred_fields = ("delivery__payload",)
    fields = ("delivery", "number", "started_at", "duration_ms", "status_code", "error", "response_excerpt")
    readonly_fields = fields

    @admin.display(description="Connection", ordering="delivery__connection__name")
    def connection(self, obj: DeliveryAttempt) -> str:
        return str(obj.delivery.connection)

    @admin.display(description="Error")
    def error_summary(self, obj: DeliveryAttempt) -> str:
        return short_text(obj.error)


@admin.register(BatchWindow)
class BatchWindowAdmin(ReadOnlyModelAdmin):
    list_display = ("id", "connection", "device_key", "status", "opened_at", "closes_at", "item_count")
    list_filter = ("status", "connection")
    list_select_related = ("connection",)
    search_fields = ("=device_key",)
    fields = ("connection", "device_key", "status", "opened_at", "closes_at", "flushed_at", "item_count")
    readonly_fields = fields

    def get_queryset(self, request: HttpRequest) -> QuerySet[BatchWindow]:
        return super().get_queryset(request).annotate(item_total=Count("items"))

    @admin.display(description="Items", ordering="item_total")
    def item_count(self, obj: BatchWindow) -> int:
        return int(getattr(obj, "item_total", 0))
