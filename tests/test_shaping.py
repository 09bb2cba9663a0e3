"""Shaping: routing decisions, every connection setting, value fidelity and body size.

The expected payloads of the settings table are JSON files under
`fixtures/shaping/`, one file per setting, each case naming its input batch
under `fixtures/mparticle/`. The helpers at the top are also used by the
sample and property tests.
"""

import copy
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from events.event_types import EVENT_ROUTE_TYPES, RouteType
from integrations import jsontext, shaping
from integrations.metadata_fields import MetadataField
from integrations.shaping import ShapedBatch, ShapedEvent, ShapingSettings

FIXTURES = Path(__file__).resolve().parent / "fixtures"
ALL_ROUTE_TYPES = frozenset(RouteType.values)
MAX_BYTES = 100_000
# Settings that name sets of values rather than switch something on or off.
SET_VALUED = {"event_types", "custom_event_names", "custom_event_types"}


def load_batch(name: str) -> Any:
    return jsontext.parse((FIXTURES / "mparticle" / name).read_text(encoding="utf-8"))


def make_settings(**overrides: Any) -> ShapingSettings:
    """Return settings that route every type, with `overrides` applied; lists become the field's type."""
    values: dict[str, Any] = {"event_types": ALL_ROUTE_TYPES, **overrides}
    for name in SET_VALUED & values.keys():
        values[name] = frozenset(values[name])
    if "metadata_exclusions" in values:
        values["metadata_exclusions"] = tuple(values["metadata_exclusions"])
    return ShapingSettings(**values)


def connection_bodies(
    batch: Any, settings: ShapingSettings, max_bytes: int = MAX_BYTES, *, one_per_event: bool = False
) -> tuple[ShapedBatch, list[bytes]]:
    """Shape `batch` and build the POST bodies the router would store for it, for one inbound batch."""
    shaped = shaping.shape_batch(batch, settings)
    if not shaped.has_content:
        return shaped, []
    if shaping.is_alias_request(batch) or (shaped.send_without_events and not shaped.events):
        return shaped, [shaping.encode_whole(shaped.envelope)]
    encoded, _ = shaping.encode_events(shaped.events)
    payloads = shaping.build_payloads(shaped.envelope, encoded, max_bytes, one_per_event=one_per_event)
    return shaped, [body for body, _ in payloads.bodies]


def parse_body(body: bytes) -> Any:
    return jsontext.parse(body.decode("utf-8"))


def tagged(value: Any) -> Any:
    """Return `value` with every JSON type made explicit and key order kept, for exact comparison.

    Plain equality treats 1, 1.0, Decimal("1.00") and True as equal and
    ignores key order; this form does not.
    """
    if isinstance(value, dict):
        return ("object", [(key, tagged(item)) for key, item in value.items()])
    if isinstance(value, list):
        return ("array", [tagged(item) for item in value])
    if isinstance(value, bool):
        return ("boolean", value)
    if isinstance(value, int):
        return ("integer", value)
    if isinstance(value, Decimal):
        return ("decimal", str(value))
    if isinstance(value, str):
        return ("string", value)
    if value is None:
        return ("null", None)
    raise TypeError(f"not a parsed JSON value: {value!r}")


def key_orders(value: Any, path: str = "$") -> Iterator[tuple[str, list[str]]]:
    """Yield the path and key list of every object inside `value`."""
    if isinstance(value, dict):
        yield path, list(value)
        for key, item in value.items():
            yield from key_orders(item, f"{path}.{key}")
    elif isinstance(value, list):
        for position, item in enumerate(value):
            yield from key_orders(item, f"{path}[{position}]")


def without_path(value: dict[str, Any], path: str) -> dict[str, Any]:
    """Return a deep copy of `value` without the key at the dotted `path`."""
    copied = copy.deepcopy(value)
    *parents, last = path.split(".")
    container = copied
    for key in parents:
        container = container[key]
    del container[last]
    return copied


def routed_indexes(shaped: ShapedBatch) -> list[int]:
    return [event.index for event in shaped.events]


# A reference model of the settings, written from the product rules rather
# than from shaping's code, for tests over many inputs.

TOGGLE_SETTINGS = {
    "crash_report": "send_crash_events",
    "network_performance": "send_network_performance_events",
    "user_attribute_change": "include_user_attribute_change_events",
    "user_identity_change": "include_user_identity_change_events",
    "validation_result": "send_validation_results",
    "alias": "send_alias_requests",
}
CONSENT_TYPES = {"gdpr_change", "ccpa_change"}


def reference_routed(batch: dict[str, Any], settings: ShapingSettings) -> list[int]:
    """Return the indexes of the events the connection receives."""
    if batch.get("request_type") == "alias":
        return []
    if settings.environment != "both" and batch.get("environment") != settings.environment:
        return []
    events = batch.get("events")
    routed = []
    for index, event in enumerate(events if isinstance(events, list) else []):
        if not isinstance(event, dict):
            continue
        event_type = event.get("event_type")
        route_type = event_type if isinstance(event_type, str) and event_type in EVENT_ROUTE_TYPES else "other"
        if route_type not in settings.event_types:
            continue
        toggle = TOGGLE_SETTINGS.get(event_type) if isinstance(event_type, str) else None
        if toggle is not None and not getattr(settings, toggle):
            continue
        if event_type == "custom_event" and not _passes_allowlists(event.get("data"), settings):
            continue
        routed.append(index)
    return routed


def _passes_allowlists(data: Any, settings: ShapingSettings) -> bool:
    data = data if isinstance(data, dict) else {}
    name, kind = data.get("event_name"), data.get("custom_event_type")
    if settings.custom_event_names and not (isinstance(name, str) and name in settings.custom_event_names):
        return False
    return not settings.custom_event_types or (isinstance(kind, str) and kind in settings.custom_event_types)


def reference_envelope(batch: dict[str, Any], settings: ShapingSettings) -> dict[str, Any]:
    """Return the batch with the envelope settings applied, its `events` untouched."""
    envelope = copy.deepcopy(batch)
    if batch.get("request_type") == "alias":
        return envelope

    if not settings.include_mp_deviceid:
        envelope.pop("mp_deviceid", None)
    if settings.unique_id:
        envelope["unique_id"] = settings.unique_id
    if not settings.include_metadata:
        for key in ("application_info", "device_info", "source_info"):
            envelope.pop(key, None)
    removed = list(settings.metadata_exclusions)
    if not settings.include_event_batch_location:
        removed.append("context.location")
    for path in removed:
        parent, _, key = path.rpartition(".")
        container = envelope.get(parent) if parent else envelope
        if isinstance(container, dict):
            container.pop(key, None)

    identities = envelope.get("user_identities")
    if settings.raw_data_feed and isinstance(identities, list):
        envelope["user_identities"] = {
            entry["identity_type"]: entry.get("identity")
            for entry in identities
            if isinstance(entry, dict) and isinstance(entry.get("identity_type"), str)
        }

    notifications = envelope.get("system_notifications")
    if isinstance(notifications, list):
        envelope["system_notifications"] = [
            notification
            for notification in notifications
            if _consent_type(notification) is None or _consent_type(notification) in settings.event_types
        ]
    return envelope


def _consent_type(notification: Any) -> str | None:
    kind = notification.get("type") if isinstance(notification, dict) else None
    return kind if isinstance(kind, str) and kind in CONSENT_TYPES else None


def reference_event(event: dict[str, Any], settings: ShapingSettings) -> dict[str, Any]:
    shaped = copy.deepcopy(event)
    if not settings.include_location and isinstance(shaped.get("data"), dict):
        shaped["data"].pop("location", None)
    return shaped


def reference_sends_anything(batch: dict[str, Any], settings: ShapingSettings) -> bool:
    """Return whether the connection receives any body for the batch."""
    if settings.environment != "both" and batch.get("environment") != settings.environment:
        return False
    if batch.get("request_type") == "alias":
        return settings.send_alias_requests
    notifications = batch.get("system_notifications")
    routed_consent = isinstance(notifications, list) and any(
        _consent_type(notification) in settings.event_types for notification in notifications
    )
    events = batch.get("events")
    eventless = not (isinstance(events, list) and events)
    return (
        bool(reference_routed(batch, settings))
        or routed_consent
        or (eventless and settings.send_batches_without_events)
    )


@dataclass
class SentOutput:
    """What one connection receives from one batch, parsed back from the bodies."""

    envelopes: list[Any] = field(default_factory=list)
    events: list[Any] = field(default_factory=list)
    indexes: list[int] = field(default_factory=list)
    set_aside: list[int] = field(default_factory=list)
    body_sizes: list[int] = field(default_factory=list)


def blank_events(value: Any) -> Any:
    """Return `value` with its `events` replaced by null, added last when absent, to compare envelopes."""
    return {**value, "events": None}


def send_batch(
    batch: Any, settings: ShapingSettings, max_bytes: int = MAX_BYTES, *, one_per_event: bool = False
) -> SentOutput:
    """Shape and encode `batch` as the router does, and parse every body back."""
    shaped = shaping.shape_batch(batch, settings)
    output = SentOutput()
    if not shaped.has_content:
        return output
    whole = shaping.is_alias_request(batch) or (shaped.send_without_events and not shaped.events)
    if whole:
        bodies = [shaping.encode_whole(shaped.envelope)]
    else:
        encoded, failed = shaping.encode_events(shaped.events)
        payloads = shaping.build_payloads(shaped.envelope, encoded, max_bytes, one_per_event=one_per_event)
        bodies = [body for body, _ in payloads.bodies]
        output.indexes = [event.index for _, included in payloads.bodies for event in included]
        output.set_aside = sorted([event.index for event in payloads.too_large] + [event.index for event, _ in failed])
    for body in bodies:
        parsed = parse_body(body)
        output.body_sizes.append(len(body))
        output.envelopes.append(blank_events(parsed))
        if not whole:
            output.events += parsed["events"]
    return output


# The settings table.


def _table_cases() -> list[Any]:
    cases = []
    for path in sorted((FIXTURES / "shaping").glob("*.json")):
        table = jsontext.parse(path.read_text(encoding="utf-8"))
        for case in table["cases"]:
            cases.append(pytest.param(case, id=f"{table['setting']}-{case['name'].replace(' ', '_')}"))
    return cases


TABLE_CASES = _table_cases()


@pytest.mark.parametrize("case", TABLE_CASES)
def test_setting_gives_expected_bodies(case):
    _, bodies = connection_bodies(load_batch(case["batch"]), make_settings(**case["settings"]))

    assert len(bodies) == len(case["bodies"])
    for body, expected in zip(bodies, case["bodies"], strict=True):
        parsed = parse_body(body)
        assert parsed == expected
        assert list(key_orders(parsed)) == list(key_orders(expected))
        assert tagged(parsed) == tagged(expected)


@pytest.mark.parametrize("case", TABLE_CASES)
def test_setting_counts_filtered_reasons(case):
    shaped = shaping.shape_batch(load_batch(case["batch"]), make_settings(**case["settings"]))

    assert dict(shaped.filtered) == case["filtered"]


def test_table_covers_every_setting_both_ways():
    seen: dict[str, set[str]] = {}
    for param in TABLE_CASES:
        for name, value in param.values[0]["settings"].items():
            seen.setdefault(name, set()).add(repr(bool(value)))
    settings_fields = set(ShapingSettings.__dataclass_fields__) - SET_VALUED - {"environment"}

    for name in settings_fields:
        assert seen.get(name) == {"True", "False"}, name


def test_table_raw_feed_covers_identity_map():
    batches = {param.values[0]["batch"] for param in TABLE_CASES if param.values[0]["settings"].get("raw_data_feed")}

    assert "inbound_identity_map.json" in batches


def test_shaping_leaves_input_unchanged():
    batch = load_batch("settings_batch.json")
    original = copy.deepcopy(batch)
    settings = make_settings(
        include_mp_deviceid=False,
        unique_id="survey-shop-android",
        metadata_exclusions=list(MetadataField.values),
        include_location=False,
        include_metadata=False,
        raw_data_feed=True,
    )

    connection_bodies(batch, settings)

    assert tagged(batch) == tagged(original)


@pytest.mark.parametrize("field", MetadataField.values)
def test_metadata_field_removes_its_path(field):
    batch = load_batch("all_event_types.json")
    settings = make_settings(
        metadata_exclusions=[field],
        include_event_batch_location=True,
        include_user_attribute_change_events=True,
        include_user_identity_change_events=True,
    )
    expected = without_path(batch, field)

    _, bodies = connection_bodies(batch, settings)

    assert tagged(expected) != tagged(batch)
    assert len(bodies) == 1
    assert tagged(parse_body(bodies[0])) == tagged(expected)


def test_metadata_exclusion_with_null_device_info():
    batch = load_batch("null_event_fields.json")

    _, bodies = connection_bodies(batch, make_settings(metadata_exclusions=list(MetadataField.values)))

    assert parse_body(bodies[0])["device_info"] is None


def test_unique_id_replaces_received_value_in_place():
    batch = {"unique_id": "from-mparticle", "events": [], "mpid": 1}

    envelope, _ = shaping.shape_envelope(batch, make_settings(unique_id="from-connection"))

    assert list(envelope) == ["unique_id", "events", "mpid"]
    assert envelope["unique_id"] == "from-connection"


def test_unique_id_unset_keeps_received_value():
    batch = {"unique_id": "from-mparticle", "events": []}

    envelope, _ = shaping.shape_envelope(batch, make_settings())

    assert envelope["unique_id"] == "from-mparticle"


def test_location_off_keeps_other_event_data():
    batch = load_batch("all_event_types.json")

    shaped = shaping.shape_batch(batch, make_settings(include_location=False))

    for shaped_event in shaped.events:
        data = batch["events"][shaped_event.index]["data"]
        assert shaped_event.event["data"] == {key: value for key, value in data.items() if key != "location"}


# Raw Data Feed: outbound identity list to inbound map.


def test_identities_list_becomes_map():
    identities = [
        {"identity_type": "customer_id", "identity": "C-1", "timestamp_unixtime_ms": 1, "created_this_batch": False},
        {"identity_type": "email", "identity": "a@example.com", "timestamp_unixtime_ms": 2},
    ]

    assert shaping.identities_as_map(identities) == {"customer_id": "C-1", "email": "a@example.com"}


@pytest.mark.parametrize("identities", [{"customer_id": "C-1"}, None, "C-1", 7, {}])
def test_identities_non_list_unchanged(identities):
    assert shaping.identities_as_map(identities) == identities


def test_identities_without_type_left_out():
    identities = [{"identity": "orphan"}, {"identity_type": 7, "identity": "x"}, None, {"identity_type": "other"}]

    assert shaping.identities_as_map(identities) == {"other": None}


def test_identities_last_of_type_wins():
    identities = [
        {"identity_type": "email", "identity": "old@example.com"},
        {"identity_type": "email", "identity": "new@example.com"},
    ]

    assert shaping.identities_as_map(identities) == {"email": "new@example.com"}


def test_raw_feed_null_identities_unchanged():
    batch = load_batch("null_event_fields.json")

    envelope, _ = shaping.shape_envelope(batch, make_settings(raw_data_feed=True))

    assert envelope["user_identities"] is None


# Routing by type.


@pytest.mark.parametrize("route_type", sorted(EVENT_ROUTE_TYPES))
def test_event_type_routes_only_itself(route_type):
    settings = make_settings(
        event_types={route_type},
        include_user_attribute_change_events=True,
        include_user_identity_change_events=True,
    )

    shaped = shaping.shape_batch(load_batch("all_event_types.json"), settings)

    assert [event.route_type for event in shaped.events] == [route_type]
    assert shaped.events[0].event["event_type"] == route_type
    assert shaped.notifications == []
    assert sum(shaped.filtered.values()) == 15


def test_all_event_types_fixture_has_each_type_once():
    types = [event["event_type"] for event in load_batch("all_event_types.json")["events"]]

    assert sorted(types) == sorted(EVENT_ROUTE_TYPES)


@pytest.mark.parametrize("route_type", [RouteType.GDPR_CHANGE.value, RouteType.CCPA_CHANGE.value])
def test_consent_type_routes_its_notification(route_type):
    shaped = shaping.shape_batch(load_batch("all_event_types.json"), make_settings(event_types={route_type}))

    assert [notification["type"] for notification in shaped.notifications] == [route_type]
    assert [notification["type"] for notification in shaped.envelope["system_notifications"]] == [route_type]
    assert shaped.events == []


def test_consent_notification_order_kept():
    shaped = shaping.shape_batch(load_batch("all_event_types.json"), make_settings())

    assert [n["type"] for n in shaped.notifications] == ["gdpr_change", "ccpa_change"]


def test_non_consent_notification_kept_unrouted():
    batch = {"events": [], "system_notifications": [{"type": "audience_change"}, 5, {"type": "gdpr_change"}]}

    shaped = shaping.shape_batch(batch, make_settings(event_types={"custom_event"}))

    assert shaped.envelope["system_notifications"] == [{"type": "audience_change"}, 5]
    assert shaped.notifications == []


def test_other_routes_unknown_types():
    settings = make_settings(event_types={"other"}, send_validation_results=True, send_alias_requests=True)

    shaped = shaping.shape_batch(load_batch("other_event_types.json"), settings)

    assert routed_indexes(shaped) == [0, 1, 2, 3, 4, 5, 6, 7]
    assert {event.route_type for event in shaped.events} == {"other"}
    assert dict(shaped.filtered) == {"event is not a JSON object": 2}


def test_event_without_type_routes_as_other():
    shaped = shaping.shape_batch({"events": [{"data": {"event_id": 1}}]}, make_settings(event_types={"other"}))

    assert [event.route_type for event in shaped.events] == ["other"]


def test_unknown_types_need_other_routed():
    settings = make_settings(event_types=EVENT_ROUTE_TYPES, send_validation_results=True, send_alias_requests=True)

    shaped = shaping.shape_batch(load_batch("other_event_types.json"), settings)

    assert shaped.events == []
    assert shaped.filtered["event type other not routed"] == 8


@pytest.mark.parametrize(("event_type", "toggle"), sorted(shaping.TYPE_TOGGLES.items()))
def test_toggle_off_overrides_routing(event_type, toggle):
    batch = {"events": [{"event_type": event_type, "data": {}}]}
    settings = make_settings(**{toggle: False})

    shaped = shaping.shape_batch(batch, settings)

    assert shaped.events == []
    assert dict(shaped.filtered) == {f"{toggle} is off": 1}


@pytest.mark.parametrize(("event_type", "toggle"), sorted(shaping.TYPE_TOGGLES.items()))
def test_toggle_on_needs_routing(event_type, toggle):
    batch = {"events": [{"event_type": event_type, "data": {}}]}
    settings = make_settings(event_types={"screen_view"}, **{toggle: True})

    shaped = shaping.shape_batch(batch, settings)

    assert shaped.events == []
    assert sum(shaped.filtered.values()) == 1


def test_type_match_is_case_sensitive():
    shaped = shaping.shape_batch(
        {"events": [{"event_type": "Custom_Event"}]}, make_settings(event_types={"custom_event"})
    )

    assert shaped.events == []
    assert dict(shaped.filtered) == {"event type other not routed": 1}


@pytest.mark.parametrize("event", [None, "custom_event", 5, ["custom_event"], True])
def test_non_object_event_filtered(event):
    assert shaping.filter_reason(event, make_settings()) == "event is not a JSON object"


# Custom event allowlists.


def test_name_allowlist_passes_exact_match_only():
    settings = make_settings(custom_event_names={"Survey Eligible"})

    shaped = shaping.shape_batch(load_batch("custom_event_names.json"), settings)

    assert routed_indexes(shaped) == [0]
    assert dict(shaped.filtered) == {"custom event name not in allowlist": 4}


def test_name_allowlist_does_not_stringify_numbers():
    shaped = shaping.shape_batch(load_batch("custom_event_names.json"), make_settings(custom_event_names={"123"}))

    assert shaped.events == []


def test_name_allowlist_unset_passes_all():
    shaped = shaping.shape_batch(load_batch("custom_event_names.json"), make_settings())

    assert routed_indexes(shaped) == [0, 1, 2, 3, 4]


def test_type_allowlist_filters_custom_events():
    settings = make_settings(custom_event_types={"navigation"})

    shaped = shaping.shape_batch(load_batch("all_event_types.json"), settings)

    assert "custom_event" not in {event.route_type for event in shaped.events}
    assert shaped.filtered["custom event type not in allowlist"] == 1


def test_type_allowlist_passes_listed_type():
    shaped = shaping.shape_batch(load_batch("all_event_types.json"), make_settings(custom_event_types={"other"}))

    assert "custom_event" in {event.route_type for event in shaped.events}


def test_allowlists_ignore_commerce_events():
    settings = make_settings(custom_event_names={"Survey Eligible"}, custom_event_types={"navigation"})

    shaped = shaping.shape_batch(load_batch("all_event_types.json"), settings)

    assert "commerce_event" in {event.route_type for event in shaped.events}


def test_allowlist_filters_null_data():
    batch = {"events": [{"event_type": "custom_event", "data": None}]}

    shaped = shaping.shape_batch(batch, make_settings(custom_event_names={"Survey Eligible"}))

    assert dict(shaped.filtered) == {"custom event name not in allowlist": 1}


def test_both_allowlists_must_match():
    batch = {
        "events": [
            {"event_type": "custom_event", "data": {"event_name": "Survey Eligible", "custom_event_type": "other"}}
        ]
    }
    settings = make_settings(custom_event_names={"Survey Eligible"}, custom_event_types={"navigation"})

    shaped = shaping.shape_batch(batch, settings)

    assert dict(shaped.filtered) == {"custom event type not in allowlist": 1}


# Environment filter.

ENVIRONMENT_CASES = [
    ("both", "production", True),
    ("both", "development", True),
    ("both", None, True),
    ("production", "production", True),
    ("production", "development", False),
    ("production", None, False),
    ("production", "Production", False),
    ("development", "development", True),
    ("development", "production", False),
    ("development", None, False),
]


@pytest.mark.parametrize(("connection_environment", "batch_environment", "routed"), ENVIRONMENT_CASES)
def test_environment_filter(connection_environment, batch_environment, routed):
    batch = load_batch("settings_batch.json")
    if batch_environment is None:
        del batch["environment"]
    else:
        batch["environment"] = batch_environment

    shaped = shaping.shape_batch(batch, make_settings(environment=connection_environment))

    assert bool(shaped.events) is routed
    assert bool(shaped.notifications) is routed


def test_environment_mismatch_counts_every_event():
    shaped = shaping.shape_batch(load_batch("settings_batch.json"), make_settings(environment="development"))

    assert dict(shaped.filtered) == {"environment does not match": 8}
    assert not shaped.has_content


def test_environment_mismatch_blocks_eventless_batch():
    shaped = shaping.shape_batch(load_batch("eventless_batch.json"), make_settings(environment="development"))

    assert not shaped.send_without_events
    assert dict(shaped.filtered) == {"environment does not match": 1}


def test_environment_mismatch_blocks_alias_request():
    shaped = shaping.shape_batch(
        load_batch("alias_request.json"), make_settings(environment="development", send_alias_requests=True)
    )

    assert not shaped.has_content
    assert dict(shaped.filtered) == {"environment does not match": 1}


# Eventless batches and null containers.


@pytest.mark.parametrize("events", [[], None, "none", {"event_type": "custom_event"}])
def test_batch_events_non_list_is_empty(events):
    assert shaping.batch_events({"events": events}) == []


def test_batch_events_missing_is_empty():
    assert shaping.batch_events({}) == []


def test_null_events_sent_as_received():
    batch = load_batch("null_containers.json")

    shaped, bodies = connection_bodies(batch, make_settings())

    assert shaped.send_without_events
    assert tagged(parse_body(bodies[0])) == tagged(batch)


def test_null_containers_survive_every_setting():
    batch = load_batch("null_containers.json")
    settings = make_settings(
        include_mp_deviceid=False,
        metadata_exclusions=list(MetadataField.values),
        include_location=False,
        include_metadata=False,
        include_event_batch_location=True,
        raw_data_feed=True,
    )

    removed = {"mp_deviceid", "device_info", "application_info", "source_info"}

    _, bodies = connection_bodies(batch, settings)

    assert tagged(parse_body(bodies[0])) == tagged({k: v for k, v in batch.items() if k not in removed})


def test_null_event_fields_forwarded():
    batch = load_batch("null_event_fields.json")

    shaped, bodies = connection_bodies(batch, make_settings(include_location=False))
    sent = parse_body(bodies[0])

    assert routed_indexes(shaped) == [0, 1, 2, 3]
    assert sent["events"][0]["data"]["custom_attributes"] is None
    assert sent["events"][1]["data"] is None
    assert sent["events"][2]["data"]["screen_name"] is None
    assert "data" not in sent["events"][3]
    assert sent["context"] == {"data_plan": None}


def test_absent_events_key_sent_whole():
    batch = {"mpid": 1, "user_attributes": {"plan": "free"}}

    shaped, bodies = connection_bodies(batch, make_settings())

    assert shaped.send_without_events
    assert bodies == [b'{"mpid":1,"user_attributes":{"plan":"free"}}']


# Alias requests.


def test_alias_request_detected():
    assert shaping.is_alias_request(load_batch("alias_request.json"))


@pytest.mark.parametrize("request_type", ["Alias", "aliases", None, 1])
def test_other_request_type_not_alias(request_type):
    assert not shaping.is_alias_request({"request_type": request_type})


def test_alias_request_ignores_routing():
    batch = load_batch("alias_request.json")

    shaped = shaping.shape_batch(batch, make_settings(event_types=set(), send_alias_requests=True))

    assert shaped.send_without_events
    assert tagged(shaped.envelope) == tagged(batch)


# Device key for Send as Batch.


def test_device_key_names_device_and_user():
    assert shaping.device_key({"mp_deviceid": "abc", "mpid": 5}) == "mp_deviceid:abc|mpid:5"


def test_device_key_separates_users_of_device():
    assert shaping.device_key({"mp_deviceid": "abc", "mpid": 5}) != shaping.device_key(
        {"mp_deviceid": "abc", "mpid": 6}
    )


@pytest.mark.parametrize("mp_deviceid", [None, ""])
def test_device_key_falls_back_to_mpid(mp_deviceid):
    assert shaping.device_key({"mp_deviceid": mp_deviceid, "mpid": -8183290287123456789}) == "mpid:-8183290287123456789"


def test_device_key_none_without_ids():
    assert shaping.device_key({"mpid": None}) is None


def test_device_key_fits_column_without_nul():
    key = shaping.device_key({"mp_deviceid": "d\x00" + "x" * 500})

    assert key is not None
    assert len(key) <= 200
    assert "\x00" not in key


# Value fidelity.


def _sent_events(name: str, **overrides: Any) -> list[Any]:
    _, bodies = connection_bodies(load_batch(name), make_settings(**overrides))
    return [event for body in bodies for event in parse_body(body)["events"]]


def test_numbers_keep_type_and_digits():
    batch = load_batch("numbers.json")

    _, bodies = connection_bodies(batch, make_settings())

    assert tagged(parse_body(bodies[0])) == tagged(batch)


@pytest.mark.parametrize(
    "fragment",
    [
        b'"event_id":9223372036854775807',
        b'"session_id":-9223372036854775808',
        b'"mpid":-8183290287123456789',
        b'"batch_id":18446744073709551615',
        b'"source_request_id":9007199254740993',
        b'"total":1.10',
        b'"huge":1E+400',
        b'"negative_zero":-0.0',
        b'"integer_negative_zero":-0,',
        b'"long_fraction":3.14159265358979323846264338327950288419716939937510',
        b'"event_id":"9223372036854775807"',
        b'"total":"1.10"',
        b'"timestamp_unixtime_ms":"1717236013000"',
    ],
)
def test_number_text_in_body(fragment):
    _, bodies = connection_bodies(load_batch("numbers.json"), make_settings())

    assert fragment in bodies[0]


def test_attribute_types_preserved():
    batch = load_batch("attribute_types.json")

    _, bodies = connection_bodies(batch, make_settings())
    sent = parse_body(bodies[0])

    assert tagged(sent["events"][0]["data"]["custom_attributes"]) == tagged(
        batch["events"][0]["data"]["custom_attributes"]
    )
    assert tagged(sent["user_attributes"]) == tagged(batch["user_attributes"])


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("score", ("integer", 9)),
        ("score_s", ("string", "9")),
        ("vip", ("boolean", True)),
        ("churned", ("boolean", False)),
        ("note", ("string", "")),
        ("tags", ("array", [("string", "a"), ("string", "b")])),
        ("cart", ("string", '{"items":2}')),
        ("ratio", ("decimal", "0.75")),
        ("referrer", ("null", None)),
        ("empty_object", ("object", [])),
    ],
)
def test_attribute_value_type(key, expected):
    sent = _sent_events("attribute_types.json")

    assert tagged(sent[0]["data"]["custom_attributes"][key]) == expected


def test_odd_timestamps_forwarded_unchanged():
    batch = load_batch("odd_timestamps.json")

    _, bodies = connection_bodies(batch, make_settings())

    assert tagged(parse_body(bodies[0])) == tagged(batch)


def test_odd_timestamps_none_dropped():
    assert len(_sent_events("odd_timestamps.json")) == 6


def test_surrogate_pair_sent_as_utf8():
    _, bodies = connection_bodies(load_batch("unicode_text.json"), make_settings())

    assert '"event_name":"Checkout 🍔"'.encode() in bodies[0]
    assert parse_body(bodies[0])["events"][0]["data"]["event_name"] == "Checkout \U0001f354"


def test_non_ascii_text_kept_raw():
    _, bodies = connection_bodies(load_batch("unicode_text.json"), make_settings())

    for text in ("Zürich", "テスト", "Café ☕ 🍔", "Москва", "\U0001d4b3 key", "Bestätigung", "Zoë"):
        assert text.encode("utf-8") in bodies[0], text


def test_unicode_values_preserved():
    batch = load_batch("unicode_text.json")

    sent = _sent_events("unicode_text.json")

    assert tagged(sent[0]) == tagged(batch["events"][0])
    assert tagged(sent[1]) == tagged(batch["events"][2])


def test_lone_surrogate_fails_only_its_event():
    shaped = shaping.shape_batch(load_batch("unicode_text.json"), make_settings())

    encoded, failed = shaping.encode_events(shaped.events)

    assert [event.index for event in encoded] == [0, 2]
    assert [event.index for event, _ in failed] == [1]
    assert "not representable as UTF-8 JSON" in failed[0][1]


def test_lone_surrogate_rest_still_sent():
    _, bodies = connection_bodies(load_batch("unicode_text.json"), make_settings())

    assert len(bodies) == 1
    assert [event["data"]["event_id"] for event in parse_body(bodies[0])["events"]] == [701, 703]


def test_lone_surrogate_in_envelope_raises():
    with pytest.raises(UnicodeEncodeError):
        shaping.encode_envelope_parts({"user_attributes": {"name": "\ud83d"}, "events": []})


def test_key_order_kept_everywhere():
    batch = load_batch("all_event_types.json")
    settings = make_settings(
        include_event_batch_location=True,
        include_user_attribute_change_events=True,
        include_user_identity_change_events=True,
    )

    _, bodies = connection_bodies(batch, settings)

    assert list(key_orders(parse_body(bodies[0]))) == list(key_orders(batch))


# Body size and splitting.


def _encoded_events(count: int, size: int) -> list[ShapedEvent]:
    """Return `count` encoded custom events, each about `size` bytes."""
    events = [
        {"event_type": "custom_event", "data": {"event_id": index, "custom_attributes": {"pad": "x" * size}}}
        for index in range(count)
    ]
    encoded, _ = shaping.encode_events(ShapedEvent(index, "custom_event", event) for index, event in enumerate(events))
    return encoded


ENVELOPE = {"mpid": 264200868161219981, "events": [], "user_attributes": {"city": "Zürich"}}


@pytest.mark.parametrize("max_bytes", [600, 1_000, 2_500, 10_000])
def test_bodies_never_exceed_max_bytes(max_bytes):
    payloads = shaping.build_payloads(ENVELOPE, _encoded_events(30, 200), max_bytes)

    assert max(len(body) for body, _ in payloads.bodies) <= max_bytes
    assert payloads.too_large == []


@pytest.mark.parametrize("max_bytes", [600, 1_000, 2_500])
def test_split_keeps_events_in_order(max_bytes):
    events = _encoded_events(30, 200)

    payloads = shaping.build_payloads(ENVELOPE, events, max_bytes)
    sent = [event for body, _ in payloads.bodies for event in parse_body(body)["events"]]

    assert len(payloads.bodies) > 1
    assert [event["data"]["event_id"] for event in sent] == list(range(30))
    assert [shaped.index for _, included in payloads.bodies for shaped in included] == list(range(30))


def test_split_bodies_share_envelope():
    payloads = shaping.build_payloads(ENVELOPE, _encoded_events(30, 200), 1_000)

    envelopes = [tagged({**parse_body(body), "events": []}) for body, _ in payloads.bodies]

    assert envelopes == [tagged(ENVELOPE)] * len(payloads.bodies)


def test_split_body_lists_its_events():
    payloads = shaping.build_payloads(ENVELOPE, _encoded_events(30, 200), 1_000)

    for body, included in payloads.bodies:
        assert [e["data"]["event_id"] for e in parse_body(body)["events"]] == [shaped.index for shaped in included]


def test_body_at_exact_limit_not_split():
    events = _encoded_events(5, 100)
    whole = shaping.build_payloads(ENVELOPE, events, MAX_BYTES).bodies[0][0]

    assert len(shaping.build_payloads(ENVELOPE, events, len(whole)).bodies) == 1
    assert len(shaping.build_payloads(ENVELOPE, events, len(whole) - 1).bodies) == 2


def test_event_too_large_alone_set_aside():
    events = _encoded_events(3, 100) + _encoded_events(1, 5_000)
    events[3].index = 3

    payloads = shaping.build_payloads(ENVELOPE, events, 2_000)

    assert [shaped.index for shaped in payloads.too_large] == [3]
    assert [shaped.index for _, included in payloads.bodies for shaped in included] == [0, 1, 2]


def test_event_fitting_exactly_alone_is_sent():
    events = _encoded_events(1, 500)
    prefix, suffix = shaping.encode_envelope_parts(ENVELOPE)
    exact = len(prefix) + len(suffix) + 2 + len(events[0].body)

    payloads = shaping.build_payloads(ENVELOPE, events, exact)

    assert payloads.too_large == []
    assert len(payloads.bodies[0][0]) == exact


def test_event_one_byte_over_set_aside():
    events = _encoded_events(1, 500)
    prefix, suffix = shaping.encode_envelope_parts(ENVELOPE)
    exact = len(prefix) + len(suffix) + 2 + len(events[0].body)

    payloads = shaping.build_payloads(ENVELOPE, events, exact - 1)

    assert [shaped.index for shaped in payloads.too_large] == [0]
    assert payloads.bodies == []


def test_one_per_event_gives_body_per_event():
    payloads = shaping.build_payloads(ENVELOPE, _encoded_events(4, 10), MAX_BYTES, one_per_event=True)

    assert [[shaped.index for shaped in included] for _, included in payloads.bodies] == [[0], [1], [2], [3]]
    assert [len(parse_body(body)["events"]) for body, _ in payloads.bodies] == [1, 1, 1, 1]


def test_empty_events_gives_one_body():
    payloads = shaping.build_payloads(ENVELOPE, [], MAX_BYTES)

    assert [body for body, _ in payloads.bodies] == [jsontext.encode(ENVELOPE)]


def test_oversized_envelope_without_events_kept():
    envelope = {"user_attributes": {"note": "x" * 2_000}, "events": []}

    payloads = shaping.build_payloads(envelope, [], 1_000)

    assert [len(body) > 1_000 for body, _ in payloads.bodies] == [True]


def test_oversized_envelope_sets_events_aside():
    envelope = {"user_attributes": {"note": "x" * 2_000}, "events": []}

    payloads = shaping.build_payloads(envelope, _encoded_events(2, 10), 1_000)

    assert payloads.bodies == []
    assert [shaped.index for shaped in payloads.too_large] == [0, 1]


def test_events_list_stays_in_place():
    prefix, suffix = shaping.encode_envelope_parts({"a": 1, "events": None, "b": 2})

    assert prefix == b'{"a":1,"events":'
    assert suffix == b',"b":2}'


def test_events_list_appended_when_absent():
    prefix, suffix = shaping.encode_envelope_parts({"a": 1})

    assert prefix == b'{"a":1,"events":'
    assert suffix == b"}"


def test_large_batch_splits_under_limit():
    batch = load_batch("all_event_types.json")
    batch["events"] = batch["events"] * 200

    _, bodies = connection_bodies(batch, make_settings())

    assert len(bodies) > 1
    assert max(len(body) for body in bodies) <= MAX_BYTES
    assert sum(len(parse_body(body)["events"]) for body in bodies) == 14 * 200
