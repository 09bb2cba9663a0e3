"""Admin for inbound feeds and batches, and the read-only admin base the portal's record pages share.

A feed's secret is stored hashed, so the admin shows a new secret once, in
the success message of the request that generated it, and never again.
"""

from typing import Any

import simplejson
from django.contrib import admin, messages
from django.contrib.admin.views.main import ChangeList
from django.db.models import QuerySet, Sum
from django.http import HttpRequest
from django.template.defaultfilters import filesizeformat
from django.utils.html import format_html
from django.utils.safestring import SafeString
from django.utils.text import Truncator

from events.models import Feed, InboundBatch
from integrations import jsontext
from integrations.models import Routing

# Maximum length, in characters, of the JSON text a detail page renders. Longer text is cut there.
JSON_DISPLAY_LIMIT = 1_000_000
SHORT_TEXT_LENGTH = 60


def short_text(text: str) -> str:
    """Return `text` cut to one list column's width, with an ellipsis when cut."""
    return Truncator(text).chars(SHORT_TEXT_LENGTH)


def pretty_json(text: str) -> str:
    """Return JSON text indented for reading, keeping every number's digits. Invalid JSON is returned unchanged."""
    try:
        value = jsontext.parse(text)
    except jsontext.InvalidJSON:
        return text
    return simplejson.dumps(value, indent=2, ensure_ascii=False, use_decimal=True)


def json_block(text: str) -> SafeString:
    """Return JSON text as an escaped, indented <pre> block, cut at JSON_DISPLAY_LIMIT characters."""
    pretty = pretty_json(text)
    note = ""
    if len(pretty) > JSON_DISPLAY_LIMIT:
        pretty = pretty[:JSON_DISPLAY_LIMIT]
        note = f"Cut after {JSON_DISPLAY_LIMIT:,} characters; the stored text is complete."
    return format_html('<pre style="white-space: pre-wrap; max-height: 40em; overflow: auto;">{}</pre>{}', pretty, note)


class DeferringChangeList(ChangeList):
    """A change list that leaves its admin's `list_deferred_fields` (large text columns) unloaded."""

    def get_queryset(self, request: HttpRequest, exclude_parameters: list[str | None] | None = None) -> QuerySet[Any]:
        deferred = getattr(self.model_admin, "list_deferred_fields", ())
        return super().get_queryset(request, exclude_parameters).defer(*deferred)


class ReadOnlyModelAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    """Admin for records the portal writes itself, which no one can add or change and only superusers can delete."""

    list_deferred_fields: tuple[str, ...] = ()

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return bool(getattr(request.user, "is_superuser", False))

    def get_changelist(self, request: HttpRequest, **kwargs: Any) -> type[ChangeList]:
        return DeferringChangeList


class ReadOnlyTabularInline(admin.TabularInline):  # type: ignore[type-arg]
    """Inline for related records that cannot be added, changed or deleted."""

    extra = 0
    can_delete = False

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


def show_new_secret(request: HttpRequest, feed: Feed, secret: str) -> None:
    """Add the success message that shows a feed's new secret, the only time it is ever shown."""
    messages.success(
        request,
        format_html(
            "The new secret of feed “{}” is <code>{}</code>. Copy it now into the Authorization header of the "
            "mParticle Webhook output, because the portal stores only its hash and cannot show it again.",
            feed.name,
            secret,
        ),
    )


@admin.register(Feed)
class FeedAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ("name", "active", "secret_hint", "created_at")
    list_filter = ("active",)
    search_fields = ("name",)
    readonly_fields = ("secret_hint", "created_at")
    actions = ("rotate_secret",)

    def save_model(self, request: HttpRequest, obj: Feed, form: Any, change: bool) -> None:
        """Save the feed, generating a new feed's secret and showing it once in a success message."""
        secret = None if change else obj.set_new_secret()
        super().save_model(request, obj, form, change)
        if secret is not None:
            show_new_secret(request, obj, secret)

    @admin.action(description="Rotate secret of the selected feed")
    def rotate_secret(self, request: HttpRequest, queryset: QuerySet[Feed]) -> None:
        """Replace the secret of the one selected feed. The old secret stops working at once."""
        feeds = list(queryset[:2])
        if len(feeds) != 1:
            self.message_user(request, "Select exactly one feed to rotate its secret.", messages.ERROR)
            return
        feed = feeds[0]
        secret = feed.set_new_secret()
        feed.save(update_fields=["secret_hash", "secret_hint"])
        self.log_change(request, feed, "Rotated the secret.")
        show_new_secret(request, feed, secret)


class RoutingInline(ReadOnlyTabularInline):
    model = Routing
    fields = ("connection", "routed_count", "filtered_count", "duplicate_count", "failed_count", "filter_reasons")
    readonly_fields = fields
    verbose_name = "routing"

    def get_queryset(self, request: HttpRequest) -> QuerySet[Routing]:
        return super().get_queryset(request).select_related("connection")


@admin.register(InboundBatch)
class InboundBatchAdmin(ReadOnlyModelAdmin):
    list_display = ("id", "feed", "received_at", "status", "event_count", "body_size", "source_request_id")
    list_filter = ("status", "feed", "received_at")
    list_select_related = ("feed",)
    list_deferred_fields = ("body",)
    search_fields = ("=source_request_id",)
    fields = (
        "feed",
        "source_request_id",
        "status",
        "received_at",
        "routed_at",
        "event_count",
        "routing_attempts",
        "delivery_outcomes",
        "body_size",
        "error",
        "pretty_body",
    )
    readonly_fields = fields
    inlines = (RoutingInline,)

    @admin.display(description="Routed events by outcome")
    def delivery_outcomes(self, obj: InboundBatch) -> str:
        """Count the batch's routed events by delivery status, and those still waiting in a batch window."""
        from integrations.models import BatchWindow, Delivery, WindowItem

        counts = dict(
            Delivery.objects.filter(batch=obj).values_list("status").annotate(events=Sum("event_count")).order_by()
        )
        waiting = WindowItem.objects.filter(batch=obj, window__status=BatchWindow.Status.OPEN).count()
        parts = [f"{counts.get(status, 0) or 0} {label.lower()}" for status, label in Delivery.Status.choices]
        return ", ".join([*parts, f"{waiting} waiting in batch windows"])

    @admin.display(description="Body size", ordering="body_bytes")
    def body_size(self, obj: InboundBatch) -> str:
        return filesizeformat(obj.body_bytes)

    @admin.display(description="Body")
    def pretty_body(self, obj: InboundBatch) -> SafeString:
        return json_block(obj.body)
