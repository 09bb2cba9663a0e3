"""Fuzzing the inbound endpoint: no body yields a 500, and every 202 has its batch stored."""

import gzip
import json
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from events.models import InboundBatch
from tests.factories import FeedFactory

pytestmark = pytest.mark.django_db

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
BATCHES = st.dictionaries(st.text(max_size=10), JSON_VALUES, max_size=6).map(lambda value: json.dumps(value).encode())


def nested(depth):
    return ("[" * depth + "]" * depth).encode()


BODIES = st.one_of(
    BATCHES,
    BATCHES.flatmap(lambda body: st.integers(0, len(body)).map(lambda cut: body[:cut])),
    st.binary(max_size=300),
    st.integers(1, 200_000).map(nested),
    st.integers(1, 20_000).map(lambda depth: b'{"a":' * depth + b"1" + b"}" * depth),
    st.text(max_size=100).map(lambda text: text.encode("utf-16")),
    st.sampled_from([b"", b"null", b"[]", b'"x"', b"1e999", b'{"a": NaN}', b"\xef\xbb\xbf{}", b'{"a": "\\ud83d"}']),
)
ENCODINGS = st.sampled_from(["", "gzip", "deflate", "br", "identity", "gzip, deflate"])


def encode(body, encoding):
    if encoding == "gzip":
        return gzip.compress(body)
    if encoding == "deflate":
        return zlib.compress(body)
    return body


@given(body=BODIES, encoding=ENCODINGS, compress=st.booleans())
@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_inbound_never_500_and_keeps_accepted(client, body, encoding, compress):
    feed = FeedFactory()
    sent = encode(body, encoding) if compress else body
    headers = {"HTTP_CONTENT_ENCODING": encoding} if encoding else {}

    response = client.post(
        "/api/v1/mparticle/", sent, content_type="application/json", HTTP_AUTHORIZATION=feed.plain_secret, **headers
    )

    assert response.status_code in (202, 400, 413, 415), response.content[:200]
    assert response["Content-Type"] == "application/json"
    if response.status_code == 202:
        stored = InboundBatch.objects.get(pk=response.json()["batch_id"])
        assert stored.body == body.decode("utf-8").removeprefix("\ufeff")
        assert stored.feed == feed


def test_huge_body_rejected(client, settings):
    settings.PORTAL = {**settings.PORTAL, "MAX_BODY_BYTES": 1_000_000}
    feed = FeedFactory()

    response = client.post(
        "/api/v1/mparticle/",
        b"{" + b" " * 2_000_000 + b"}",
        content_type="application/json",
        HTTP_AUTHORIZATION=feed.plain_secret,
    )

    assert response.status_code == 413
