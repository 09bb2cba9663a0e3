"""The staff-only management API: connections, feeds, deliveries and stored batches.

Every view uses the project's default permission, IsAdminUser.
"""

from typing import Any

from django.db.models import ProtectedError, QuerySet
from drf_spectacular.utils import OpenApiResponse, extend_schema, extend_schema_view
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from events.models import Feed, InboundBatch
from integrations.api.serializers import (
    ConnectionSerializer,
    DeliveryDetailSerializer,
    DeliveryFilterSerializer,
    DeliverySerializer,
    FeedSecretSerializer,
    FeedSerializer,
    InboundBatchDetailSerializer,
    InboundBatchSerializer,
)
from integrations.models import Connection, Delivery


class ConnectionViewSet(viewsets.ModelViewSet[Connection]):
    queryset = Connection.objects.prefetch_related("feeds").order_by("name")
    serializer_class = ConnectionSerializer


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
    @action(detail=True, methods=["post"], url_path="rotate-secret")
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

    def get_serializer_class(self) -> type[serializers.BaseSerializer[Delivery]]:
        return DeliveryDetailSerializer if self.action == "retrieve" else DeliverySerializer

    def get_queryset(self) -> QuerySet[Delivery]:
        """Return the deliveries, filtering the list by the `connection` and `status` query parameters.

        An invalid parameter value raises a 400 response.
        """
        queryset = super().get_queryset()
        if self.action != "list":
            return queryset
        params = DeliveryFilterSerializer(data=self.request.query_params)
        params.is_valid(raise_exception=True)
        return queryset.defer("payload").filter(**params.validated_data)


class InboundBatchViewSet(viewsets.ReadOnlyModelViewSet[InboundBatch]):
    """Stored inbound batches, newest first. Only the detail includes the body and the routings."""

    queryset = InboundBatch.objects.order_by("-received_at", "-id")

    def get_serializer_class(self) -> type[serializers.BaseSerializer[InboundBatch]]:
        return InboundBatchDetailSerializer if self.action == "retrieve" else InboundBatchSerializer

    def get_queryset(self) -> QuerySet[InboundBatch]:
        queryset = super().get_queryset()
        if self.action == "retrieve":
            return queryset.prefetch_related("routings")
        return queryset.defer("body")
