"""Round trips of the inbound endpoint, the feed cache's bound, and the body check against a full parse."""

import json
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from events.models import Feed, InboundBatch, hash_feed_secret
from events.views import InboundError, _source_request_id, check_json_object
from integrations import jsontext
from tests.factories import FeedFactory

URL = "/api/v1/mparticle/"


def post(client, secret, request_id="req-1"):
    body = json.dumps({"source_request_id": request_id, "events": [{"event_type": "custom_event"}]})
    return client.post(URL, body, content_type="application/json", HTTP_AUTHORIZATION=f"Bearer {secret}")


@pytest.fixture
def feed(db):
    return FeedFactory()


def test_accepted_post_runs_one_statement(client, feed, django_assert_num_queries):
    assert post(client, feed.plain_secret, "warm-up").status_code == 202

    with django_assert_num_queries(1):
        response = post(client, feed.plain_secret)

    assert response.status_code == 202
    assert response.json()["duplicate"] is False
    assert InboundBatch.objects.get(pk=response.json()["batch_id"]).source_request_id == "req-1"


def test_first_post_also_reads_the_feed(client, feed, django_assert_num_queries):
    with django_assert_num_queries(2):
        response = post(client, feed.plain_secret)

    assert response.status_code == 202


def test_duplicate_post_runs_two_statements(client, feed, django_assert_num_queries):
    first = post(client, feed.plain_secret)

    with django_assert_num_queries(2):
        second = post(client, feed.plain_secret)

    assert second.status_code == 202
    assert second.json() == {"batch_id": first.json()["batch_id"], "status": "accepted", "duplicate": True}
    assert InboundBatch.objects.count() == 1


def test_stored_size_and_body_without_bom(client, feed):
    body = '{"source_request_id": "bom", "name": "Zoë → ✓"}'

    response = client.post(
        URL, "\ufeff".encode() + body.encode(), content_type="application/json", HTTP_AUTHORIZATION=feed.plain_secret
    )

    stored = InboundBatch.objects.get(pk=response.json()["batch_id"])
    assert stored.body == body
    assert stored.body_bytes == len(body.encode())


def test_secret_rotated_elsewhere_fails_after_bound(client, feed, settings):
    settings.PORTAL = {**settings.PORTAL, "FEED_AUTH_CACHE_SECONDS": 0.5}
    assert post(client, feed.plain_secret, "before").status_code == 202
    new_secret = "mpf_rotated-by-another-process"
    # An UPDATE sends no signal, as when another web process rotates the secret.
    Feed.objects.filter(pk=feed.pk).update(secret_hash=hash_feed_secret(new_secret))

    within_bound = post(client, feed.plain_secret, "within")
    time.sleep(0.6)
    after_bound = post(client, feed.plain_secret, "after")

    assert within_bound.status_code == 202
    assert after_bound.status_code == 401
    assert post(client, new_secret, "new").status_code == 202


def test_feed_deactivated_elsewhere_fails_after_bound(client, feed, settings):
    settings.PORTAL = {**settings.PORTAL, "FEED_AUTH_CACHE_SECONDS": 0.5}
    assert post(client, feed.plain_secret, "before").status_code == 202
    Feed.objects.filter(pk=feed.pk).update(active=False)

    time.sleep(0.6)

    assert post(client, feed.plain_secret, "after").status_code == 401


def test_secret_rotated_here_fails_at_once(client, feed):
    assert post(client, feed.plain_secret, "before").status_code == 202
    old_secret = feed.plain_secret

    new_secret = feed.set_new_secret()
    feed.save()

    assert post(client, old_secret, "old").status_code == 401
    assert post(client, new_secret, "new").status_code == 202


@pytest.mark.django_db(transaction=True)
def test_feed_deleted_elsewhere_is_401(client):
    feed = FeedFactory()
    assert post(client, feed.plain_secret, "before").status_code == 202
    # A raw DELETE sends no signal, as when another web process deletes the feed.
    InboundBatch.objects.filter(feed=feed)._raw_delete(InboundBatch.objects.db)
    Feed.objects.filter(pk=feed.pk)._raw_delete(Feed.objects.db)

    response = post(client, feed.plain_secret, "after")

    assert response.status_code == 401
    assert response.json() == {"detail": "Invalid feed secret."}
    assert response["WWW-Authenticate"] == 'Bearer realm="mparticle-feed"'
    assert post(client, feed.plain_secret, "again").status_code == 401


def test_zero_seconds_turns_cache_off(client, feed, settings):
    settings.PORTAL = {**settings.PORTAL, "FEED_AUTH_CACHE_SECONDS": 0}
    assert post(client, feed.plain_secret, "first").status_code == 202
    Feed.objects.filter(pk=feed.pk).update(active=False)

    assert post(client, feed.plain_secret, "second").status_code == 401


# JSON text built token by token, so that numbers keep the spelling they were sent with.
NUMBERS = st.from_regex(r"-?(0|[1-9][0-9]{0,30})(\.[0-9]{1,20})?([eE][+-]?[0-9]{1,4})?", fullmatch=True)
ODD_TOKENS = st.sampled_from(
    ["true", "false", "null", "NaN", "Infinity", "-Infinity", '"\\ud83d"', '"a\\u0000b"', "-0", "1" * 5000, '""']
)
SCALARS = st.one_of(st.text(max_size=12).map(json.dumps), NUMBERS, ODD_TOKENS)
KEYS = st.one_of(st.just("source_request_id"), st.text(max_size=6)).map(json.dumps)


def json_object(pairs):
    return "{" + ",".join(f"{key}:{value}" for key, value in pairs) + "}"


VALUES = st.recursive(
    SCALARS,
    lambda children: (
        st.lists(children, max_size=4).map(lambda items: "[" + ",".join(items) + "]")
        | st.lists(st.tuples(KEYS, children), max_size=4).map(json_object)
    ),
    max_leaves=15,
)
OBJECTS = st.lists(st.tuples(KEYS, VALUES), max_size=5).map(json_object)
TEXTS = st.one_of(
    OBJECTS,
    VALUES,
    OBJECTS.flatmap(lambda text: st.integers(0, len(text)).map(lambda cut: text[:cut])),
    OBJECTS.map(lambda text: "\ufeff " + text + " "),
    st.text(max_size=40),
)


def full_parse_outcome(text):
    """Return what the endpoint made of `text` when it parsed the whole tree."""
    try:
        value = jsontext.parse(text)
    except jsontext.InvalidJSON as error:
        return ("error", f"The body is not valid JSON: {error}.")
    if not isinstance(value, dict):
        return ("error", "The body must be a JSON object (an mParticle batch).")
    request_id = value.get("source_request_id")
    return ("ok", repr(request_id), _source_request_id(request_id))


def check_outcome(text):
    try:
        request_id = check_json_object(text)
    except InboundError as error:
        return ("error", error.message)
    return ("ok", repr(request_id), _source_request_id(request_id))


@given(text=TEXTS)
@settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_check_matches_full_parse(text):
    assert check_outcome(text) == full_parse_outcome(text)


@pytest.mark.parametrize(
    "text",
    [
        '{"source_request_id": 1e5}',
        '{"source_request_id": -0}',
        '{"source_request_id": 1.50}',
        '{"source_request_id": ' + "9" * 5000 + "}",
        '{"source_request_id": [1, {"a": 2.0}]}',
        '{"source_request_id": {"b": [true]}}',
        '{"source_request_id": "a", "source_request_id": "b"}',
        '{"events": [{"source_request_id": "inner"}]}',
        '{"source_request_id": "\\ud83d"}',
        '{"source_request_id": false}',
        "[" * 100_000 + "]" * 100_000,
        '{"a": NaN}',
    ],
)
def test_check_matches_full_parse_cases(text):
    assert check_outcome(text) == full_parse_outcome(text)
