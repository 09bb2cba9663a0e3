"""The inbound endpoint mParticle's Webhook output POSTs its batches to.

The request path only validates, stores and enqueues: it never makes an
outbound call, so it responds quickly whatever Qualtrics does. mParticle
retries timeouts and 5xx responses, so a 2xx is sent only once the batch is
committed, and 4xx only for input that can never succeed.
"""

import codecs
import hashlib
import logging
import zlib
from dataclasses import dataclass
from typing import Any

import simplejson
from django.db import IntegrityError, transaction
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema, inline_serializer
from rest_framework import exceptions, serializers, status
from rest_framework.permissions import IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from events.authentication import FeedSecretAuthentication, forget_recent_feeds
from events.models import Feed, InboundBatch
from events.wakeup import routing_wakeup
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
            body = read_json_object(request)
        except InboundError as error:
            metrics.count_batch(feed.name, "rejected")
            return Response({"detail": error.message}, status=error.status_code, headers=headers)

        try:
            batch_id, duplicate = store_batch(feed, body.data, body.source_request_id, request_id=request_id)
        except IntegrityError as error:
            # The feed's foreign key is the only constraint the INSERT can break, so the
            # feed was deleted after this process cached it. Without the cache this is a 401.
            forget_recent_feeds()
            logger.warning(
                "inbound.feed_deleted",
                extra={"feed_id": feed.pk, "request_id": request_id, "error": str(error).splitlines()[0]},
            )
            raise exceptions.AuthenticationFailed("Invalid feed secret.") from error
        del body
        metrics.count_batch(feed.name, "duplicate" if duplicate else "accepted")
        logger.info(
            "inbound.accepted",
            extra={"feed_id": feed.pk, "batch_id": batch_id, "duplicate": duplicate, "request_id": request_id},
        )
        return Response(
            {"batch_id": batch_id, "status": "accepted", "duplicate": duplicate},
            status=status.HTTP_202_ACCEPTED,
            headers=headers,
        )


@dataclass(frozen=True)
class InboundBody:
    """A body that is a UTF-8 JSON object, as bytes without a byte order mark, and its de-duplication key."""

    data: bytes
    source_request_id: str | None


def read_json_object(request: Request) -> InboundBody:
    """Read the body after checking its size, encoding and that it is a UTF-8 JSON object.

    The decoded text lives only while the JSON is checked, and the check
    keeps no parsed tree, so that a large body is held about once afterwards.
    """
    limit = portal_setting("MAX_BODY_BYTES")
    raw = read_limited(request, limit)
    raw = decode_content(raw, request.META.get("HTTP_CONTENT_ENCODING", ""), limit)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InboundError(400, f"The body is not valid UTF-8 (invalid byte at offset {error.start}).") from error
    source_request_id = _source_request_id(check_json_object(text.removeprefix("\ufeff")))
    del text
    return InboundBody(raw.removeprefix(codecs.BOM_UTF8), source_request_id)


class _Number(str):
    """The text of a JSON number, left unconverted while a body is checked."""


class _ObjectSummary:
    """Summary of a JSON object kept while a body is checked: its `source_request_id` value, or MISSING."""

    MISSING = object()
    __slots__ = ("source_request_id",)

    def __init__(self, pairs: list[tuple[str, Any]]) -> None:
        self.source_request_id = dict(pairs).get("source_request_id", self.MISSING)


def check_json_object(text: str) -> Any:
    """Check that `text` is a JSON object as `jsontext.parse` reads it, and return its `source_request_id` value.

    It runs the same simplejson decoder with NaN and Infinity rejected, so it
    accepts and rejects the same texts with the same messages. Numbers stay
    text and each object becomes a summary, so no parsed tree is built. The
    value is returned as `jsontext.parse` gives it, and None when missing.
    """
    try:
        value = simplejson.loads(
            text, allow_nan=False, parse_int=_Number, parse_float=_Number, object_pairs_hook=_ObjectSummary
        )
    except simplejson.JSONDecodeError as error:
        raise InboundError(
            400, f"The body is not valid JSON: {error.msg} at line {error.lineno} column {error.colno}."
        ) from error
    except RecursionError as error:
        raise InboundError(400, "The body is not valid JSON: nested too deeply.") from error
    if not isinstance(value, _ObjectSummary):
        raise InboundError(400, "The body must be a JSON object (an mParticle batch).")
    request_id = value.source_request_id
    if request_id is _ObjectSummary.MISSING:
        return None
    if isinstance(request_id, _Number):
        return jsontext.parse(request_id)
    if isinstance(request_id, (list, _ObjectSummary)):
        # A container: its text form needs every value, so parse the body in full.
        return jsontext.parse(text).get("source_request_id")
    return request_id


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
    feed: Feed, data: bytes, source_request_id: str | None, *, request_id: str | None = None
) -> tuple[int, bool]:
    """Store the batch (UTF-8 JSON text) and wake the routing workers, returning its id and whether it is a duplicate.

    A repeated source_request_id returns the first batch's id. `request_id`
    is stored with the batch, and routing's logs carry it. Outside a
    transaction the INSERT commits on its own and the wake-up is asked for at once.
    """
    for _ in range(3):
        batch_id = InboundBatch.objects.insert_received(
            feed_id=feed.pk, source_request_id=source_request_id, body=data, request_id=request_id or ""
        )
        if batch_id is not None:
            # With robust=True a failed wake-up is logged and the committed batch still gets 202.
            # The sweeper routes a batch whose wake-up was lost.
            transaction.on_commit(routing_wakeup.wake, robust=True)
            return batch_id, False
        assert source_request_id is not None
        existing = InboundBatch.objects.id_for_request(feed.pk, source_request_id)
        if existing is not None:
            return existing, True
        # The first batch was deleted between the two statements, so the INSERT can be tried again.
    raise RuntimeError(f"Batch {source_request_id!r} of feed {feed.pk} conflicts with one that cannot be found.")


def _source_request_id(value: Any) -> str | None:
    """Return the de-duplication key: the id as text, or its SHA-256 when it does not fit the column or contains NUL."""
    if value is None or value == "":
        return None
    text = str(value)
    if len(text) > 200 or "\x00" in text:
        return "sha256:" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    return text
