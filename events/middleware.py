"""Body-size limits of the inbound endpoint, enforced before any other code reads the body."""

from collections.abc import Callable

from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.urls import reverse

from portal.conf import portal_setting


def too_large(limit: int) -> JsonResponse:
    return JsonResponse({"detail": f"The body exceeds the limit of {limit} bytes."}, status=413)


class InboundBodyLimitMiddleware:
    """Return 413 with a JSON error for inbound bodies over `PORTAL_MAX_BODY_BYTES`.

    A declared Content-Length over the limit is rejected before the body is
    read. Should anything read the body through Django's own limit
    (`DATA_UPLOAD_MAX_MEMORY_SIZE`), that error becomes the same 413.
    """

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if request.path == reverse("inbound-batch"):
            limit = portal_setting("MAX_BODY_BYTES")
            declared = request.META.get("CONTENT_LENGTH") or "0"
            if declared.isdigit() and int(declared) > limit:
                return too_large(limit)
        return self.get_response(request)

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        if isinstance(exception, RequestDataTooBig):
            return too_large(portal_setting("MAX_BODY_BYTES"))
        return None
