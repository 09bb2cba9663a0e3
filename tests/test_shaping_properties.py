"""Property-based tests: shaping never raises and keeps every value no setting removes.

Batches are generated as Python values, encoded and parsed back with
`jsontext`, so each input is exactly what the router receives. Text covers
the whole of Unicode except lone surrogates, which cannot be encoded (the
example tests cover them).
"""

import copy
from decimal import Decimal
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from events.event_types import RouteType
from integrations import jsontext, shaping
from integrations.metadata_fields import MetadataField
from integrations.shaping import ShapedEvent, ShapingSettings
from tests.test_shaping import (
    blank_events,
    parse_body,
    reference_envelope,
    reference_event,
    reference_routed,
    reference_sends_anything,
    send_batch,
    tagged,
)

EXAMPLES = settings(max_examples=200, deadline=None)

TEXT = st.one_of(
    st.text(st.characters(exclude_categories=["Cs"]), max_size=12),
    st.sampled_from(["", "Checkout 🍔", "\U0001d4b3", "Zürich", "テスト", "Москва", "\u2028", "\x00", "1.10", "-0"]),
)
INTEGERS = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**64),
    st.sampled_from([2**53 + 1, -(2**63), 2**63 - 1, 0, -1]),
)
DECIMALS = st.one_of(
    st.decimals(allow_nan=False, allow_infinity=False),
    st.sampled_from([Decimal("1.10"), Decimal("1e400"), Decimal("-0.0"), Decimal("2.5E-308")]),
)
LEAVES = st.one_of(st.none(), st.booleans(), INTEGERS, DECIMALS, TEXT)
JSON_VALUES = st.recursive(
    LEAVES,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(TEXT, children, max_size=4),
    max_leaves=8,
)
JSON_OBJECTS = st.dictionaries(TEXT, JSON_VALUES, max_size=4)

# The types a setting switches off come twice, so that they are drawn more often.
KNOWN_EVENT_TYPES = st.sampled_from(
    [*shaping.TYPE_TOGGLES, *shaping.TYPE_TOGGLES, *RouteType.values, "first_run", "Custom_Event"]
)
EVENT_TYPES = st.one_of(KNOWN_EVENT_TYPES, KNOWN_EVENT_TYPES, KNOWN_EVENT_TYPES, st.none(), INTEGERS, TEXT)
EVENT_NAMES = st.one_of(st.sampled_from(["Survey Eligible", "survey eligible", "123"]), st.none(), INTEGERS, TEXT)
CUSTOM_EVENT_TYPES = st.one_of(st.sampled_from(["navigation", "other", "transaction"]), st.none(), TEXT)


@st.composite
def shuffled_object(
    draw: Any, entries: dict[str, Any], *, required: frozenset[str] = frozenset(), extra_keys: bool = False
) -> dict[str, Any]:
    """Draw an object with the `required` keys and a random subset of the other `entries`, in random order.

    `entries` maps each key to the strategy for its value. With
    `extra_keys`, arbitrary keys are added after them.
    """
    chosen = [key for key in entries if key in required or draw(st.booleans())]
    chosen = draw(st.permutations(chosen))
    value = {key: draw(entries[key]) for key in chosen}
    if extra_keys:
        for key, item in draw(JSON_OBJECTS).items():
            value.setdefault(key, item)
    return value


def _data_objects() -> Any:
    return shuffled_object(
        {
            "event_name": EVENT_NAMES,
            "custom_event_type": CUSTOM_EVENT_TYPES,
            "location": JSON_VALUES,
            "custom_attributes": st.one_of(st.none(), JSON_OBJECTS),
            "timestamp_unixtime_ms": st.one_of(INTEGERS, TEXT, st.none()),
            "event_id": st.one_of(INTEGERS, TEXT),
        },
        extra_keys=True,
    )


EVENT_OBJECTS = shuffled_object(
    {"event_type": EVENT_TYPES, "data": st.one_of(_data_objects(), _data_objects(), st.none())},
    required=frozenset({"event_type", "data"}),
)
# Mostly well-formed events: listing a strategy several times in one_of weights it.
EVENTS = st.one_of(EVENT_OBJECTS, EVENT_OBJECTS, EVENT_OBJECTS, shuffled_object({"data": _data_objects()}), JSON_VALUES)
DEVICE_INFO = st.one_of(
    st.none(),
    shuffled_object(
        {field.value.removeprefix("device_info."): JSON_VALUES for field in MetadataField if field != "ip"}
    ),
)
IDENTITY_LISTS = st.lists(
    st.one_of(
        shuffled_object(
            {
                "identity_type": st.one_of(st.sampled_from(["customer_id", "email", "other_id_2"]), TEXT, st.none()),
                "identity": JSON_VALUES,
            },
        ),
        JSON_VALUES,
    ),
    max_size=4,
)
IDENTITIES = st.one_of(IDENTITY_LISTS, st.dictionaries(TEXT, JSON_VALUES, max_size=3), st.none())
NOTIFICATIONS = st.one_of(
    st.lists(
        st.one_of(
            st.fixed_dictionaries(
                {"type": st.sampled_from(["gdpr_change", "ccpa_change", "audience_change"]), "data": JSON_VALUES}
            ),
            JSON_VALUES,
        ),
        max_size=3,
    ),
    st.none(),
)
ENVIRONMENTS = st.sampled_from(["production", "development"])
BATCH_ENTRIES = {
    "events": st.one_of(st.lists(EVENTS, min_size=1, max_size=6), st.lists(EVENTS, max_size=6), st.none()),
    "environment": st.one_of(ENVIRONMENTS, ENVIRONMENTS, ENVIRONMENTS, TEXT, st.none()),
    "mpid": INTEGERS,
    "mp_deviceid": st.one_of(TEXT, st.none()),
    "unique_id": TEXT,
    "ip": st.one_of(TEXT, st.none()),
    "device_info": DEVICE_INFO,
    "application_info": st.one_of(st.none(), JSON_OBJECTS),
    "source_info": st.one_of(st.none(), JSON_OBJECTS),
    "context": st.one_of(shuffled_object({"location": JSON_VALUES, "data_plan": JSON_VALUES}), st.none(), JSON_VALUES),
    "user_identities": IDENTITIES,
    "user_attributes": st.one_of(st.none(), JSON_OBJECTS),
    "system_notifications": NOTIFICATIONS,
    "batch_id": st.one_of(INTEGERS, TEXT),
    "timestamp_unixtime_ms": st.one_of(INTEGERS, TEXT, st.none()),
}


def _as_received(value: Any) -> Any:
    """Return `value` encoded and parsed back, which is the form the router receives."""
    return jsontext.parse(jsontext.encode(value).decode("utf-8"))


# The keys that a setting changes are always drawn; their values may still be null or malformed.
ALWAYS_PRESENT = frozenset(
    {"events", "environment", "mp_deviceid", "device_info", "context", "user_identities", "system_notifications"}
)


@st.composite
def batches(draw: Any) -> Any:
    """Draw a batch as received; about one in eight is an alias request."""
    batch = draw(shuffled_object(BATCH_ENTRIES, required=ALWAYS_PRESENT, extra_keys=True))
    if draw(st.sampled_from(range(8))) == 7:
        batch["request_type"] = "alias"
    return _as_received(batch)


BATCHES = batches()
CONNECTION_SETTINGS = st.builds(
    ShapingSettings,
    event_types=st.one_of(st.just(frozenset(RouteType.values)), st.frozensets(st.sampled_from(RouteType.values))),
    include_mp_deviceid=st.booleans(),
    unique_id=st.sampled_from(["", "survey-shop", "Zürich 🍔"]),
    metadata_exclusions=st.lists(st.sampled_from(MetadataField.values), unique=True).map(tuple),
    send_crash_events=st.booleans(),
    include_location=st.booleans(),
    send_network_performance_events=st.booleans(),
    include_metadata=st.booleans(),
    include_user_attribute_change_events=st.booleans(),
    include_user_identity_change_events=st.booleans(),
    send_batches_without_events=st.booleans(),
    include_event_batch_location=st.booleans(),
    send_alias_requests=st.booleans(),
    send_validation_results=st.booleans(),
    raw_data_feed=st.booleans(),
    custom_event_names=st.frozensets(st.sampled_from(["Survey Eligible", "survey eligible", "123"])),
    custom_event_types=st.frozensets(st.sampled_from(["navigation", "other"])),
    environment=st.sampled_from(["both", "production", "development"]),
)


@EXAMPLES
@given(BATCHES, CONNECTION_SETTINGS)
def test_routing_matches_reference(batch, connection_settings):
    sent = send_batch(batch, connection_settings)

    assert sorted(sent.indexes + sent.set_aside) == reference_routed(batch, connection_settings)
    assert bool(sent.envelopes or sent.set_aside) is reference_sends_anything(batch, connection_settings)


@EXAMPLES
@given(BATCHES, CONNECTION_SETTINGS)
def test_events_keep_every_value(batch, connection_settings):
    sent = send_batch(batch, connection_settings)

    expected = [reference_event(batch["events"][index], connection_settings) for index in sent.indexes]

    assert tagged(sent.events) == tagged(expected)


@EXAMPLES
@given(BATCHES, CONNECTION_SETTINGS)
def test_envelope_keeps_every_value(batch, connection_settings):
    expected = tagged(blank_events(reference_envelope(batch, connection_settings)))

    for envelope in send_batch(batch, connection_settings).envelopes:
        assert tagged(envelope) == expected


@EXAMPLES
@given(BATCHES, CONNECTION_SETTINGS)
def test_shaping_leaves_batch_unchanged(batch, connection_settings):
    original = copy.deepcopy(batch)

    send_batch(batch, connection_settings)

    assert tagged(batch) == tagged(original)


@EXAMPLES
@given(
    st.lists(JSON_OBJECTS, max_size=8),
    st.dictionaries(TEXT, JSON_VALUES, max_size=4).map(_as_received),
    st.integers(min_value=50, max_value=3_000),
)
def test_split_fits_limit_and_keeps_order(events, envelope, max_bytes):
    shaped = [ShapedEvent(index, "custom_event", _as_received(event)) for index, event in enumerate(events)]
    encoded, failed = shaping.encode_events(shaped)
    prefix, suffix = shaping.encode_envelope_parts(envelope)
    too_large = [event.index for event in encoded if len(prefix) + len(suffix) + 2 + len(event.body) > max_bytes]

    payloads = shaping.build_payloads(envelope, encoded, max_bytes)
    sent = [event for body, _ in payloads.bodies for event in parse_body(body)["events"]]
    kept = [shaped_event for _, included in payloads.bodies for shaped_event in included]

    assert failed == []
    assert [event.index for event in payloads.too_large] == too_large
    assert [event.index for event in kept] == [index for index in range(len(events)) if index not in too_large]
    assert tagged(sent) == tagged([event.event for event in kept])
    assert all(len(body) <= max_bytes for body, _ in payloads.bodies) or not events
    assert all(tagged(blank_events(parse_body(body))) == tagged(blank_events(envelope)) for body, _ in payloads.bodies)


@EXAMPLES
@given(JSON_VALUES)
def test_jsontext_round_trip(value):
    received = _as_received(value)

    assert tagged(_as_received(received)) == tagged(received)


@EXAMPLES
@given(st.from_regex(r"-?(0|[1-9][0-9]{0,40})(\.[0-9]{1,40})?([eE][+-]?[0-9]{1,4})?", fullmatch=True))
def test_number_text_keeps_value(text):
    encoded = jsontext.encode(jsontext.parse(text)).decode()

    assert Decimal(encoded) == Decimal(text)
    assert Decimal(encoded).as_tuple().digits == Decimal(text).as_tuple().digits
    assert Decimal(encoded).is_signed() == Decimal(text).is_signed()
