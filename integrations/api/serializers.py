"""Serializers of the staff-only management API.

A connection's POST URL and Authorization header are write-only: responses
carry only `post_url_masked` and `authorization_masked`.
"""

import copy
from typing import Any

from django.core.exceptions import ValidationError as DjangoValidationError
from rest_framework import serializers

from events.event_types import RouteType
from events.models import Feed, InboundBatch
from integrations.forms import validate_header_value
from integrations.metadata_fields import MetadataField
from integrations.models import Connection, Delivery, DeliveryAttempt, Routing
from integrations.secrets import mask_url


def unique_in_order(values: list[str]) -> list[str]:
    return list(dict.fromkeys(values))


class ConnectionSerializer(serializers.ModelSerializer[Connection]):
    """Connection with every setting, validated by the same rules as `Connection.clean`.

    On update, an omitted `post_url` or `authorization` keeps the stored
    value, and an empty `authorization` removes the header.
    """

    post_url = serializers.CharField(
        write_only=True,
        required=False,
        help_text="The workflow's JSON Event trigger URL; required on create, kept when omitted on update.",
    )
    post_url_masked = serializers.SerializerMethodField(help_text="The POST URL with every query value masked.")
    authorization = serializers.CharField(
        write_only=True,
        required=False,
        allow_blank=True,
        help_text="The full Authorization header value, for example Basic base64(username:token). "
        "Kept when omitted on update; an empty string removes it.",
    )
    authorization_masked = serializers.CharField(
        source="masked_authorization", read_only=True, help_text="The last 4 characters of the header."
    )
    event_types = serializers.ListField(
        child=serializers.ChoiceField(choices=RouteType.choices),
        required=False,
        help_text="The event types routed to this connection.",
    )
    metadata_exclusions = serializers.ListField(
        child=serializers.ChoiceField(choices=MetadataField.choices),
        required=False,
        help_text="Removes each listed metadata field from every payload.",
    )
    custom_event_names = serializers.ListField(
        child=serializers.CharField(trim_whitespace=False),
        required=False,
        help_text="If set, only custom events whose event_name equals one of these (exact, case-sensitive) pass.",
    )
    custom_event_types = serializers.ListField(
        child=serializers.CharField(trim_whitespace=False),
        required=False,
        help_text="If set, only custom events whose custom_event_type is one of these (exact, case-sensitive) pass.",
    )

    class Meta:
        model = Connection
        fields = "__all__"

    def get_post_url_masked(self, obj: Connection) -> str:
        return mask_url(obj.post_url)

    def validate_authorization(self, value: str) -> str:
        try:
            validate_header_value(value)
        except DjangoValidationError as error:
            raise serializers.ValidationError(error.messages) from error
        return value

    def validate_event_types(self, value: list[str]) -> list[str]:
        return unique_in_order(value)

    def validate_metadata_exclusions(self, value: list[str]) -> list[str]:
        return unique_in_order(value)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        """Validate the connection that `attrs` would produce with `Connection.clean`, reporting errors by field."""
        if self.instance is None and not attrs.get("post_url"):
            raise serializers.ValidationError({"post_url": ["This field is required."]})
        candidate = copy.copy(self.instance) if self.instance is not None else Connection()
        for name, value in attrs.items():
            if name != "feeds":
                setattr(candidate, name, value)
        try:
            candidate.clean()
        except DjangoValidationError as error:
            raise serializers.ValidationError(error.message_dict) from error
        return attrs


class FeedSerializer(serializers.ModelSerializer[Feed]):
    """A feed without its secret, which the portal stores only hashed."""

    class Meta:
        model = Feed
        fields: tuple[str, ...] = ("id", "name", "active", "secret_hint", "created_at")
        read_only_fields = ("secret_hint", "created_at")


class FeedSecretSerializer(FeedSerializer):
    """A feed and its new secret, returned only by create and by rotate-secret."""

    secret = serializers.CharField(
        read_only=True, help_text="The feed's new secret. It is shown in this response only; store it now."
    )

    class Meta(FeedSerializer.Meta):
        fields = (*FeedSerializer.Meta.fields, "secret")


class DeliveryAttemptSerializer(serializers.ModelSerializer[DeliveryAttempt]):
    class Meta:
        model = DeliveryAttempt
        fields = ("number", "started_at", "duration_ms", "status_code", "error", "response_excerpt")


class DeliverySerializer(serializers.ModelSerializer[Delivery]):
    """A delivery and its attempts, without the payload."""

    attempts = DeliveryAttemptSerializer(many=True, read_only=True)

    class Meta:
        model = Delivery
        fields: tuple[str, ...] = (
            "id",
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
            "attempts",
        )


class DeliveryDetailSerializer(DeliverySerializer):
    """A delivery, its attempts and the payload exactly as POSTed."""

    class Meta(DeliverySerializer.Meta):
        fields = (*DeliverySerializer.Meta.fields, "payload")


# The largest primary key a 64-bit signed column holds; larger values cannot match any row.
MAX_ID = 2**63 - 1


class DeliveryFilterSerializer(serializers.Serializer[Any]):
    """The query parameters that filter the delivery list."""

    connection = serializers.IntegerField(
        required=False, min_value=1, max_value=MAX_ID, help_text="Only this connection's deliveries."
    )
    status = serializers.ChoiceField(
        choices=Delivery.Status.choices, required=False, help_text="Only deliveries in this status."
    )
    created_after = serializers.DateTimeField(required=False, help_text="Only deliveries created at or after this.")
    created_before = serializers.DateTimeField(required=False, help_text="Only deliveries created before this.")


class ReplayFilterSerializer(DeliveryFilterSerializer):
    """The filter that selects deliveries to replay. Only the failed and cancelled ones are queued again."""

    ids = serializers.ListField(
        child=serializers.IntegerField(min_value=1, max_value=MAX_ID),
        required=False,
        help_text="Only these deliveries.",
    )


class ReplayResultSerializer(serializers.Serializer[Any]):
    replayed = serializers.IntegerField(help_text="How many deliveries were queued again.")


class RoutingSerializer(serializers.ModelSerializer[Routing]):
    class Meta:
        model = Routing
        fields = (
            "connection",
            "routed_count",
            "filtered_count",
            "duplicate_count",
            "failed_count",
            "filter_reasons",
            "created_at",
        )


class InboundBatchSerializer(serializers.ModelSerializer[InboundBatch]):
    """A stored inbound batch without its body."""

    class Meta:
        model = InboundBatch
        fields: tuple[str, ...] = (
            "id",
            "feed",
            "source_request_id",
            "body_bytes",
            "received_at",
            "status",
            "routed_at",
            "event_count",
            "error",
        )


class InboundBatchDetailSerializer(InboundBatchSerializer):
    """A stored inbound batch, its body as received and how it was routed."""

    routings = RoutingSerializer(many=True, read_only=True)

    class Meta(InboundBatchSerializer.Meta):
        fields = (*InboundBatchSerializer.Meta.fields, "body", "routings")
