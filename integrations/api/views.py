"""The staff-only management API: connections, feeds, deliveries and stored batches.

Every view requires a staff user with the matching Django model permission
(see `StaffModelPermissions`).
"""

from typing import Any

from django.db.models import ProtectedError, QuerySet
from drf_spectacular.utils import OpenApiResponse, extend_schema, extend_schema_view
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from events.models import Feed, InboundBatch
from integrations import delivery, protection
from integrations.api.permissions import StaffChangePermission, StaffModelPermissions
from integrations.api.serializers import (
    ConnectionSerializer,
    DeliveryDetailSerializer,
    DeliveryFilterSerializer,
    DeliverySerializer,
    FeedSecretSerializer,
    FeedSerializer,
    InboundBatchDetailSerializer,
    InboundBatchSerializer,
    ReplayFilterSerializer,
    ReplayResultSerializer,
)
from integrations.models import Connection, Delivery

# Primary keys as path parameters: up to 18 digits always fit a 64-bit column.
ID_PATTERN = "[0-9]{1,18}"


class ConnectionViewSet(viewsets.ModelViewSet[Connection]):
    queryset = Connection.objects.prefetch_related("feeds").order_by("name")
    serializer_class = ConnectionSerializer
    permission_classes = [StaffModelPermissions]
    lookup_value_regex = ID_PATTERN

    @extend_schema(request=None, responses={200: ConnectionSerializer})
    @action(detail=True, methods=["post"], permission_classes=[StaffChangePermission])
    def pause(self, request: Request, pk: str | None = None) -> Response:
        """Pause the connection until it is resumed; its deliveries wait meanwhile."""
        connection = self.get_object()
        protection.pause(connection, f"Paused by {request.user.get_username()} through the API.", auto_resume=False)
        connection.refresh_from_db()
        return Response(self.get_serializer(connection).data)

    @extend_schema(request=None, responses={200: ConnectionSerializer})
    @action(detail=True, methods=["post"], permission_classes=[StaffChangePermission])
    def resume(self, request: Request, pk: str | None = None) -> Response:
        """Resume the connection and queue the deliveries that waited for it."""
        connection = self.get_object()
        protection.resume(connection, reason=f"resumed by {request.user.get_username()} through the API")
        connection.refresh_from_db()
        return Response(self.get_serializer(connection).data)


def secret_response(feed: Feed, secret: str, status_code: int) -> Response:
    """Return the response that shows a feed's new secret, the only time it is ever shown."""
    return Response({**FeedSerializer(feed).data, "secret": secret}, status=status_code)


@extend_schema_view(
    create=extend_schema(responses={201: FeedSecretSerializer}),
    destroy=extend_schema(responses={204: None, 409: OpenApiResponse(description="The feed has stored batches.")}),
)
class FeedViewSet(
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.UpdateModelMixin,
    mixins.DestroyModelMixin,
    viewsets.GenericViewSet[Feed],
):
    """Feeds mParticle posts to. A secret is returned on create and rotate-secret only."""

    queryset = Feed.objects.order_by("name")
    serializer_class = FeedSerializer
    permission_classes = [StaffModelPermissions]
    lookup_value_regex = ID_PATTERN

    def create(self, request: Request) -> Response:
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        feed = Feed(**serializer.validated_data)
        secret = feed.set_new_secret()
        feed.save()
        return secret_response(feed, secret, status.HTTP_201_CREATED)

    def destroy(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        """Delete the feed, or return 409 when stored batches still reference it."""
        try:
            return super().destroy(request, *args, **kwargs)
        except ProtectedError:
            return Response(
                {"detail": "The feed has stored batches and cannot be deleted; set active to false instead."},
                status=status.HTTP_409_CONFLICT,
            )

    @extend_schema(request=None, responses={200: FeedSecretSerializer})
    @action(detail=True, methods=["post"], url_path="rotate-secret", permission_classes=[StaffChangePermission])
    def rotate_secret(self, request: Request, pk: str | None = None) -> Response:
        """Replace the feed's secret; the old secret stops working at once."""
        feed = self.get_object()
        secret = feed.set_new_secret()
        feed.save(update_fields=["secret_hash", "secret_hint"])
        return secret_response(feed, secret, status.HTTP_200_OK)


@extend_schema_view(list=extend_schema(parameters=[DeliveryFilterSerializer]))
class DeliveryViewSet(viewsets.ReadOnlyModelViewSet[Delivery]):
    """Deliveries with their attempts, newest first. Only the detail includes the payload."""

    queryset = Delivery.objects.prefetch_related("attempts").order_by("-created_at", "-id")
    permission_classes = [StaffModelPermissions]
    lookup_value_regex = ID_PATTERN

    def get_serializer_class(self) -> type[serializers.BaseSerializer[Delivery]]:
        return DeliveryDetailSerializer if self.action == "retrieve" else DeliverySerializer

    def get_queryset(self) -> QuerySet[Delivery]:
        """Return the deliveries, filtering the list by the `connection` and `status` query parameters.

        An invalid parameter value raises a 400 response.
        """
        queryset = super().get_queryset()
        if self.action != "list":
            return queryset
        return filter_deliveries(queryset.defer("payload"), self.request.query_params)

    @extend_schema(request=None, responses={200: ReplayResultSerializer})
    @action(detail=True, methods=["post"], permission_classes=[StaffChangePermission])
    def replay(self, request: Request, pk: str | None = None) -> Response:
        """Queue this failed or cancelled delivery again with a fresh attempt budget."""
        replayed = delivery.replay(Delivery.objects.filter(pk=self.get_object().pk))
        return Response({"replayed": replayed})

    @extend_schema(
        request=ReplayFilterSerializer,
        responses={200: ReplayResultSerializer},
        operation_id="v1_deliveries_replay_matching",
    )
    @action(detail=False, methods=["post"], url_path="replay", permission_classes=[StaffChangePermission])
    def replay_matching(self, request: Request) -> Response:
        """Replay every failed or cancelled delivery matching the filter in the body, across all pages."""
        params = ReplayFilterSerializer(data=request.data)
        params.is_valid(raise_exception=True)
        return Response({"replayed": delivery.replay(matching(Delivery.objects.all(), params.validated_data))})


def filter_deliveries(queryset: QuerySet[Delivery], query: Any) -> QuerySet[Delivery]:
    """Apply the list's query parameters; an invalid value raises a 400 response."""
    params = DeliveryFilterSerializer(data=query)
    params.is_valid(raise_exception=True)
    return matching(queryset, params.validated_data)


def matching(queryset: QuerySet[Delivery], filters: dict[str, Any]) -> QuerySet[Delivery]:
    lookups = {
        "ids": "pk__in",
        "connection": "connection_id",
        "status": "status",
        "created_after": "created_at__gte",
        "created_before": "created_at__lt",
    }
    return queryset.filter(**{lookups[name]: value for name, value in filters.items()})


class InboundBatchViewSet(viewsets.ReadOnlyModelViewSet[InboundBatch]):
    """Stored inbound batches, newest first. Only the detail includes the body and the routings."""

    queryset = InboundBatch.objects.order_by("-received_at", "-id")
    permission_classes = [StaffModelPermissions]
    lookup_value_regex = ID_PATTERN

    def get_serializer_class(self) -> type[serializers.BaseSerializer[InboundBatch]]:
        return InboundBatchDetailSerializer if self.action == "retrieve" else InboundBatchSerializer

    def get_queryset(self) -> QuerySet[InboundBatch]:
        queryset = super().get_queryset()
        if self.action == "retrieve":
            return queryset.prefetch_related("routings")
        return queryset.defer("body")
