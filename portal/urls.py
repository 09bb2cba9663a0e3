from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from events.views import InboundBatchView
from portal.health import healthz, readyz
from portal.metrics import metrics_view

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/v1/mparticle/", InboundBatchView.as_view(), name="inbound-batch"),
    path("api/v1/", include("integrations.api.urls")),
    path("api/schema/", SpectacularAPIView.as_view(), name="api-schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="api-schema"), name="api-docs"),
    path("healthz", healthz, name="healthz"),
    path("readyz", readyz, name="readyz"),
    path("metrics", metrics_view, name="metrics"),
]
