"""The inbound endpoint mParticle's Webhook output POSTs its batches to.

The request path only validates, stores and enqueues: it never makes an
outbound call, so it responds quickly whatever Qualtrics does. mParticle
retries timeouts and 5xx responses, so a 2xx is sent only once the batch is
committed, and 4xx only for input that can never succeed.
"""

import hashlib
import logging
import zlib
from typing import Any

from django.db import IntegrityError, transaction
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema, inline_serializer
from rest_framework import serializers, status
from rest_framework.permissions import IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from events.authentication import FeedSecretAuthentication
from events.models import Feed, InboundBatch
from integrations import jsontext
from portal import metrics
from portal.conf import portal_setting
from portal.logging import inbound_request_id

logger = logging.getLogger(__name__)


class InboundError(Exception):
    """Input that can never be accepted, with the HTTP status that explains why."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message


AcceptedSerializer = inline_serializer(
    "InboundAccepted",
    {
        "batch_id": serializers.IntegerField(),
        "status": serializers.CharField(),
        "duplicate": serializers.BooleanField(),
    },
)
ErrorSerializer = inline_serializer("InboundError", {"detail": serializers.CharField()})


class InboundBatchView(APIView):
    authentication_classes = [FeedSecretAuthentication]
    permission_classes = [IsAuthenticated]

    @extend_schema(
        request=OpenApiTypes.OBJECT,
        responses={
            202: AcceptedSerializer,
            400: OpenApiResponse(ErrorSerializer, description="The body is not a UTF-8 JSON object."),
            401: OpenApiResponse(ErrorSerializer, description="Missing or invalid feed secret."),
            413: OpenApiResponse(ErrorSerializer, description="The body exceeds the size limit."),
            415: OpenApiResponse(ErrorSerializer, description="Unsupported Content-Encoding."),
        },
        summary="Accept an mParticle batch",
    )
    def post(self, request: Request) -> Response:
        feed = request.auth
        assert isinstance(feed, Feed)
        request_id = inbound_request_id(request.headers.get("X-Request-Id"))
        headers = {"X-Request-Id": request_id}
        try:
            text, batch_object = read_json_object(request)
        except InboundError as error:
            metrics.count_batch(feed.name, "rejected")
            return Response({"detail": error.message}, status=error.status_code, headers=headers)

        batch, duplicate = store_batch(feed, text, _source_request_id(batch_object), request_id=request_id)
        metrics.count_batch(feed.name, "duplicate" if duplicate else "accepted")
        logger.info(
            "inbound.accepted",
            extra={"feed_id": feed.pk, "batch_id": batch.pk, "duplicate": duplicate, "request_id": request_id},
        )
        return Response(
            {"batch_id": batch.pk, "status": "accepted", "duplicate": duplicate},
            status=status.HTTP_202_ACCEPTED,
            headers=headers,
        )


def read_json_object(request: Request) -> tuple[str, dict[str, Any]]:
    """Return the body as text and parsed, after checking size, encoding and that it is a JSON object."""
    limit = portal_setting("MAX_BODY_BYTES")
    raw = read_limited(request, limit)
    raw = decode_content(raw, request.META.get("HTTP_CONTENT_ENCODING", ""), limit)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InboundError(400, f"The body is not valid UTF-8 (invalid byte at offset {error.start}).") from error
    text = text.removeprefix("\ufeff")
    try:
        value = jsontext.parse(text)
    except jsontext.InvalidJSON as error:
        raise InboundError(400, f"The body is not valid JSON: {error}.") from error
    if not isinstance(value, dict):
        raise InboundError(400, "The body must be a JSON object (an mParticle batch).")
    return text, value


def read_limited(request: Request, limit: int) -> bytes:
    declared = request.META.get("CONTENT_LENGTH") or "0"
    if declared.isdigit() and int(declared) > limit:
        raise InboundError(413, f"The body exceeds the limit of {limit} bytes.")
    body = request._request.read(limit + 1)
    if len(body) > limit:
        raise InboundError(413, f"The body exceeds the limit of {limit} bytes.")
    return body


def decode_content(raw: bytes, encoding: str, limit: int) -> bytes:
    """Inflate a gzip or deflate body, stopping at `limit` bytes of output."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return raw
    if encoding not in ("gzip", "deflate"):
        raise InboundError(415, f"Unsupported Content-Encoding {encoding!r}; use gzip, deflate or none.")
    wbits = 31 if encoding == "gzip" else 15
    try:
        inflater = zlib.decompressobj(wbits)
        inflated = inflater.decompress(raw, limit + 1)
        if len(inflated) > limit or inflater.unconsumed_tail:
            raise InboundError(413, f"The decompressed body exceeds the limit of {limit} bytes.")
        if not inflater.eof:
            raise InboundError(400, f"The body is not complete {encoding} data.")
    except zlib.error as error:
        raise InboundError(400, f"The body is not valid {encoding} data.") from error
    return inflated


def store_batch(
    feed: Feed, text: str, source_request_id: str | None, *, request_id: str | None = None
) -> tuple[InboundBatch, bool]:
    """Store the batch and queue its routing; a repeated source_request_id returns the first batch.

    `request_id` is passed to the routing task, whose logs carry it.
    """
    if source_request_id is not None:
        existing = InboundBatch.objects.filter(feed=feed, source_request_id=source_request_id).first()
        if existing is not None:
            return existing, True
    try:
        with transaction.atomic():
            batch = InboundBatch.objects.create(
                feed=feed, source_request_id=source_request_id, body=text, body_bytes=len(text.encode("utf-8"))
            )
            transaction.on_commit(lambda: enqueue_routing(batch.pk, request_id))
    except IntegrityError:
        return InboundBatch.objects.get(feed=feed, source_request_id=source_request_id), True
    return batch, False


def _source_request_id(batch: dict[str, Any]) -> str | None:
    """Return the de-duplication key: the id as text, or its SHA-256 when it does not fit the column or contains NUL."""
    value = batch.get("source_request_id")
    if value is None or value == "":
        return None
    text = str(value)
    if len(text) > 200 or "\x00" in text:
        return "sha256:" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    return text


def enqueue_routing(batch_id: int, request_id: str | None = None) -> None:
    """Queue routing; if the broker is down the batch stays stored and the sweeper queues it later."""
    from events.tasks import route_batch

    try:
        route_batch.delay(batch_id, request_id=request_id)
    except Exception:
        logger.exception("inbound.enqueue_failed", extra={"batch_id": batch_id, "request_id": request_id})
