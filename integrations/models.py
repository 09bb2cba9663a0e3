"""Qualtrics connections, what was routed to them, and every delivery and attempt."""

import uuid

from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.db.models import Q

from events.event_types import RouteType
from events.models import Feed, InboundBatch
from integrations.fields import EncryptedTextField
from integrations.metadata_fields import MetadataField
from integrations.secrets import mask_secret
from integrations.shaping import ShapingSettings
from integrations.url_policy import rate_limit_key, validate_post_url


class Environment(models.TextChoices):
    PRODUCTION = "production", "Production only"
    DEVELOPMENT = "development", "Development only"
    BOTH = "both", "Production and development"


class Connection(models.Model):
    """One Qualtrics JSON Event workflow and the mParticle settings applied to what it receives."""

    name = models.CharField(max_length=200, unique=True)
    active = models.BooleanField(
        default=True, help_text="Inactive connections receive nothing new; deliveries already created still go out."
    )
    post_url = EncryptedTextField(
        "POST URL",
        help_text="The workflow's JSON Event trigger URL, https://<datacenter>.qualtrics.com/inbound-event/….",
    )
    authorization = EncryptedTextField(
        "Authorization header",
        blank=True,
        help_text="Sent as the Authorization header; for example Basic base64(username:token). Blank sends none.",
    )
    feeds = models.ManyToManyField(
        Feed, blank=True, related_name="connections", help_text="Feeds this connection receives from; none means all."
    )
    event_types = models.JSONField(
        default=list, blank=True, help_text="The event types routed to this connection (the routing)."
    )

    # mParticle's Qualtrics Event settings, with mParticle's defaults.
    include_mp_deviceid = models.BooleanField(
        "include MP DeviceId", default=True, help_text="Keeps the top-level mp_deviceid; off removes it."
    )
    unique_id = models.CharField(
        "unique ID",
        max_length=200,
        blank=True,
        help_text="Sets the top-level unique_id of every payload to this value.",
    )
    metadata_exclusions = models.JSONField(
        "metadata field exclusion",
        default=list,
        blank=True,
        help_text="Removes each chosen metadata field from every payload.",
    )
    send_as_batch = models.BooleanField(
        default=True,
        help_text="Collects a device's events and POSTs them as one batch when its window closes; "
        "off POSTs each event on its own at once.",
    )
    batch_window_seconds = models.PositiveIntegerField(
        default=600, help_text="Seconds a device's batch stays open before it is sent, with Send as Batch on."
    )
    send_crash_events = models.BooleanField(default=True, help_text="Forwards crash_report events; off drops them.")
    include_location = models.BooleanField(
        "include location information", default=True, help_text="Keeps each event's data.location; off removes it."
    )
    send_network_performance_events = models.BooleanField(
        default=True, help_text="Forwards network_performance events; off drops them."
    )
    include_metadata = models.BooleanField(
        default=True, help_text="Keeps application_info, device_info and source_info; off removes all three."
    )
    include_user_attribute_change_events = models.BooleanField(
        default=False, help_text="Forwards user_attribute_change events; off drops them."
    )
    include_user_identity_change_events = models.BooleanField(
        default=False, help_text="Forwards user_identity_change events; off drops them."
    )
    send_batches_without_events = models.BooleanField(
        default=True,
        help_text="Forwards a batch that arrived with no events, as its envelope with an empty events list.",
    )
    include_event_batch_location = models.BooleanField(
        default=False, help_text="Keeps the batch's context.location; off removes it."
    )
    send_alias_requests = models.BooleanField(
        default=False, help_text="Forwards alias requests and events of type alias; off drops them."
    )
    send_validation_results = models.BooleanField(
        default=False, help_text="Forwards data-planning validation_result events; off drops them."
    )
    raw_data_feed = models.BooleanField(
        default=False,
        help_text="Rewrites user_identities into mParticle's inbound form, an object map by identity type.",
    )

    # Filters on top of the routing.
    custom_event_names = models.JSONField(
        default=list,
        blank=True,
        help_text="If set, only custom events whose event_name equals one of these (exact, case-sensitive) pass.",
    )
    custom_event_types = models.JSONField(
        default=list,
        blank=True,
        help_text="If set, only custom events whose custom_event_type is one of these (exact, case-sensitive) pass.",
    )
    environment = models.CharField(
        max_length=16,
        choices=Environment.choices,
        default=Environment.BOTH,
        help_text="Only batches whose environment matches are forwarded.",
    )

    # Delivery policy and protection.
    max_attempts = models.PositiveIntegerField(
        default=15,
        validators=[MinValueValidator(1)],
        help_text="Attempts per delivery before it is failed; the default retry schedule spans about a day.",
    )
    max_age_seconds = models.PositiveIntegerField(
        "maximum age (seconds)",
        default=2 * 24 * 3600,
        help_text="A delivery still not sent this many seconds after it was created (or replayed) is failed.",
    )
    rate_limit_per_minute = models.PositiveIntegerField(
        default=2400,
        validators=[MinValueValidator(1)],
        help_text="POSTs per minute, shared with every connection to the same Qualtrics brand and data center.",
    )
    concurrency_limit = models.PositiveIntegerField(
        default=4, validators=[MinValueValidator(1)], help_text="POSTs in flight at once for this connection."
    )
    breaker_failure_ratio = models.FloatField(
        default=0.5,
        validators=[MinValueValidator(0.01), MaxValueValidator(1.0)],
        help_text="Share of failed attempts in the breaker window at which the connection pauses itself.",
    )
    breaker_min_attempts = models.PositiveIntegerField(
        default=20, help_text="Attempts needed in the breaker window before the failure ratio is judged."
    )

    paused_at = models.DateTimeField(null=True, blank=True, editable=False)
    pause_reason = models.TextField(blank=True, editable=False)
    auto_resume = models.BooleanField(
        default=False, editable=False, help_text="Whether the pause ends by itself after a successful probe."
    )
    hold_until = models.DateTimeField(
        null=True, blank=True, editable=False, help_text="No POST before this time (after a 429 or a failed probe)."
    )
    last_success_at = models.DateTimeField(null=True, blank=True, editable=False)
    last_error_at = models.DateTimeField(null=True, blank=True, editable=False)
    last_error = models.TextField(blank=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        errors: dict[str, str] = {}
        if self.post_url:
            try:
                validate_post_url(self.post_url)
            except ValidationError as error:
                errors["post_url"] = " ".join(error.messages)
        if self.authorization and not all(" " <= char <= "~" for char in self.authorization):
            errors["authorization"] = "The Authorization header may contain only printable ASCII, without line breaks."
        unknown_types = set(self.event_types or []) - set(RouteType.values)
        if unknown_types:
            errors["event_types"] = f"Unknown event types: {', '.join(sorted(map(str, unknown_types)))}."
        unknown_fields = set(self.metadata_exclusions or []) - set(MetadataField.values)
        if unknown_fields:
            errors["metadata_exclusions"] = f"Unknown metadata fields: {', '.join(sorted(map(str, unknown_fields)))}."
        for name in ("custom_event_names", "custom_event_types"):
            values = getattr(self, name)
            if not isinstance(values, list) or not all(isinstance(value, str) for value in values):
                errors[name] = "Enter a list of strings."
        if errors:
            raise ValidationError(errors)

    @property
    def is_paused(self) -> bool:
        return self.paused_at is not None

    @property
    def rate_limit_key(self) -> str:
        """Return the key under which connections share a rate limit: the brand and host where the URL shows them."""
        return rate_limit_key(self.post_url) or f"connection:{self.pk}"

    @property
    def masked_authorization(self) -> str:
        return mask_secret(self.authorization)

    def shaping_settings(self) -> ShapingSettings:
        """Return the routing and settings as the plain values that shaping takes."""
        return ShapingSettings(
            event_types=frozenset(self.event_types or ()),
            include_mp_deviceid=self.include_mp_deviceid,
            unique_id=self.unique_id,
            metadata_exclusions=tuple(self.metadata_exclusions or ()),
            send_crash_events=self.send_crash_events,
            include_location=self.include_location,
            send_network_performance_events=self.send_network_performance_events,
            include_metadata=self.include_metadata,
            include_user_attribute_change_events=self.include_user_attribute_change_events,
            include_user_identity_change_events=self.include_user_identity_change_events,
            send_batches_without_events=self.send_batches_without_events,
            include_event_batch_location=self.include_event_batch_location,
            send_alias_requests=self.send_alias_requests,
            send_validation_results=self.send_validation_results,
            raw_data_feed=self.raw_data_feed,
            custom_event_names=frozenset(self.custom_event_names or ()),
            custom_event_types=frozenset(self.custom_event_types or ()),
            environment=self.environment,
        )


class Routing(models.Model):
    """The outcome of routing one inbound batch to one connection.

    The unique pair makes routing idempotent: a batch routed twice adds nothing.
    """

    batch = models.ForeignKey(InboundBatch, on_delete=models.CASCADE, related_name="routings")
    connection = models.ForeignKey(Connection, on_delete=models.CASCADE, related_name="routings")
    routed_count = models.PositiveIntegerField(default=0)
    filtered_count = models.PositiveIntegerField(default=0)
    duplicate_count = models.PositiveIntegerField(
        default=0, help_text="Events dropped because this connection saw the same mpid and source_message_id."
    )
    failed_count = models.PositiveIntegerField(default=0)
    filter_reasons = models.JSONField(default=dict, blank=True, help_text="Filtered events counted by reason.")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["batch", "connection"], name="unique_routing")]
        indexes = [
            models.Index(
                fields=["created_at", "connection", "routed_count", "filtered_count"], name="routing_created_counts"
            )
        ]

    def __str__(self) -> str:
        return f"Batch {self.batch_id} → {self.connection}"


class BatchWindow(models.Model):
    """Events of one device collected for one connection until the window closes (Send as Batch)."""

    class Status(models.TextChoices):
        OPEN = "open", "Open"
        FLUSHED = "flushed", "Flushed"

    connection = models.ForeignKey(Connection, on_delete=models.CASCADE, related_name="windows")
    device_key = models.CharField(max_length=200, help_text="mp_deviceid, or mpid when the batch has none.")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.OPEN)
    opened_at = models.DateTimeField(auto_now_add=True)
    closes_at = models.DateTimeField()
    flushed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["connection", "device_key"], condition=Q(status="open"), name="one_open_window_per_device"
            )
        ]
        indexes = [
            models.Index(fields=["closes_at"], condition=Q(status="open"), name="open_window_closes_at"),
        ]

    def __str__(self) -> str:
        return f"Window {self.pk} of {self.device_key} for {self.connection}"


class WindowItem(models.Model):
    """One shaped event or consent notification waiting in a batch window, in arrival order."""

    class Kind(models.TextChoices):
        EVENT = "event", "Event"
        NOTIFICATION = "notification", "System notification"
        ENVELOPE = "envelope", "Envelope of a batch without events"

    window = models.ForeignKey(BatchWindow, on_delete=models.CASCADE, related_name="items")
    batch = models.ForeignKey(InboundBatch, on_delete=models.CASCADE, related_name="window_items")
    kind = models.CharField(max_length=16, choices=Kind.choices)
    route_type = models.CharField(max_length=40, blank=True)
    body = models.TextField(help_text="The shaped event as JSON text.")

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return f"{self.get_kind_display()} in window {self.window_id}"


class Delivery(models.Model):
    """One POST body for one connection, and the state of getting it there.

    Workers claim a delivery by a compare-and-set update of its status, so
    a task run twice cannot POST twice while the first run holds the lease.
    One claim can take several deliveries of a connection; they share its
    token, and the connection's concurrency limit counts claims.
    """

    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        IN_FLIGHT = "in_flight", "In flight"
        RETRY_SCHEDULED = "retry_scheduled", "Retry scheduled"
        DELIVERED = "delivered", "Delivered"
        FAILED = "failed", "Failed"
        CANCELLED = "cancelled", "Cancelled"

    uuid = models.UUIDField(
        default=uuid.uuid4, unique=True, editable=False, help_text="Sent as X-Delivery-Id on every attempt."
    )
    connection = models.ForeignKey(Connection, on_delete=models.CASCADE, related_name="deliveries")
    batch = models.ForeignKey(InboundBatch, null=True, blank=True, on_delete=models.SET_NULL, related_name="deliveries")
    window = models.ForeignKey(BatchWindow, null=True, blank=True, on_delete=models.SET_NULL, related_name="deliveries")
    payload = models.TextField(blank=True, help_text="The JSON body, exactly as POSTed.")
    event_count = models.PositiveIntegerField(default=0)
    event_types = models.JSONField(default=list, blank=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    attempt_count = models.PositiveIntegerField(default=0)
    attempts_before_replay = models.PositiveIntegerField(
        default=0, help_text="Attempts made before the last replay; the attempt limit counts from here."
    )
    replayed_at = models.DateTimeField(null=True, blank=True)
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    claim_token = models.UUIDField(
        null=True, blank=True, editable=False, help_text="Names the claim that holds the delivery in flight."
    )
    last_status_code = models.PositiveIntegerField(null=True, blank=True)
    last_error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    delivered_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name_plural = "deliveries"
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["status", "next_attempt_at"], name="delivery_due"),
            models.Index(fields=["connection", "status"], name="delivery_connection_status"),
            # Covers the dashboard's and the connection list's counts over a time range.
            models.Index(fields=["created_at", "connection", "status", "event_count"], name="delivery_created_outcome"),
        ]

    def __str__(self) -> str:
        return f"Delivery {self.uuid}"


class DeliveryAttempt(models.Model):
    """One HTTP request of a delivery and its outcome."""

    delivery = models.ForeignKey(Delivery, on_delete=models.CASCADE, related_name="attempts")
    number = models.PositiveIntegerField()
    started_at = models.DateTimeField()
    duration_ms = models.PositiveIntegerField()
    status_code = models.PositiveIntegerField(null=True, blank=True)
    error = models.TextField(blank=True, help_text="Why the attempt failed, when it did.")
    response_excerpt = models.TextField(blank=True, help_text="The start of the response body, secrets removed.")

    class Meta:
        ordering = ["delivery", "number"]
        constraints = [models.UniqueConstraint(fields=["delivery", "number"], name="unique_attempt_number")]
        # The circuit breaker and the dashboard read recent attempts.
        indexes = [models.Index(fields=["started_at"], name="attempt_started_at")]

    def __str__(self) -> str:
        return f"Attempt {self.number} of {self.delivery}"
