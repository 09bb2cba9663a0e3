"""Routes of the management API, included under /api/v1/."""

from rest_framework.routers import DefaultRouter

from integrations.api.views import ConnectionViewSet, DeliveryViewSet, FeedViewSet, InboundBatchViewSet

router = DefaultRouter()
router.register("connections", ConnectionViewSet, basename="connection")
router.register("feeds", FeedViewSet, basename="feed")
router.register("deliveries", DeliveryViewSet, basename="delivery")
router.register("batches", InboundBatchViewSet, basename="batch")

urlpatterns = router.urls
