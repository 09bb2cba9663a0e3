"""Admin for Qualtrics connections and the records of what was sent to them.

Connections are the only records an operator edits here. Their POST URL and
Authorization header are shown masked everywhere: see `ConnectionForm`.
Deliveries, attempts and batch windows are written by the workers and shown
read-only.
"""

from typing import Any

from django.contrib import admin, messages
from django.db.models import Count, QuerySet
from django.http import HttpRequest, HttpResponse
from django.urls import URLPattern, path
from django.utils.safestring import SafeString

from events.admin import ReadOnlyModelAdmin, ReadOnlyTabularInline, json_block, short_text
from events.event_types import RouteType
from integrations import admin_tools, delivery, protection
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
    form = ConnectionForm
    list_display = (
        "name",
        "active",
        "paused",
        "masked_post_url",
        "event_types_summary",
        "send_as_batch",
        "last_success_at",
        "last_error_summary",
    )
    list_filter = ("active", PausedFilter, "send_as_batch", "environment")
    search_fields = ("name",)
    filter_horizontal = ("feeds",)
    readonly_fields = STATUS_FIELDS
    actions = ("pause_connections", "resume_connections", "send_sample_payload")
    change_list_template = "admin/integrations/connection/change_list.html"

    def get_urls(self) -> list[URLPattern]:
        preview = path("preview/", self.admin_site.admin_view(self.preview), name="integrations_connection_preview")
        return [preview, *super().get_urls()]

    def preview(self, request: HttpRequest) -> HttpResponse:
        return admin_tools.preview_view(request, self)

    @admin.action(description="Send the sample payload to the selected connection", permissions=["change"])
    def send_sample_payload(self, request: HttpRequest, queryset: QuerySet[Connection]) -> HttpResponse | None:
        """POST a fully populated example of what the connection sends, for Qualtrics' "capture event" step."""
        if queryset.count() != 1:
            self.message_user(request, "Select exactly one connection to send the sample payload to.", messages.ERROR)
            return None
        return admin_tools.send_sample(request, self, queryset.get())

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
            fieldsets.append(("Delivery status", {"fields": STATUS_FIELDS}))
        return fieldsets

    @admin.display(description="Paused", boolean=True, ordering="paused_at")
    def paused(self, obj: Connection) -> bool:
        return obj.is_paused

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
    def last_error_summary(self, obj: Connection) -> str:
        return short_text(obj.last_error)

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


@admin.register(Delivery)
class DeliveryAdmin(ReadOnlyModelAdmin):
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
    search_fields = ("uuid",)
    fields = (
        "uuid",
        "connection",
        "batch",
        "window",
        "status",
        "event_count",
        "event_types",
        "attempt_count",
        "attempts_before_replay",
        "next_attempt_at",
        "lease_expires_at",
        "last_status_code",
        "last_error",
        "created_at",
        "replayed_at",
        "delivered_at",
        "pretty_payload",
    )
    readonly_fields = fields
    inlines = (DeliveryAttemptInline,)
    actions = ("replay_deliveries",)

    def has_replay_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("integrations.change_delivery")

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
