"""Turning one mParticle batch into what one Qualtrics connection receives.

Shaping is pure: plain data in, plain data out, no database, network or
clock. The steps are

1. decide for every event (and every GDPR or CCPA consent notification)
   whether the connection receives it, or why not;
2. apply the connection's settings to the batch envelope and to each event;
3. encode the result into POST bodies of at most `max_bytes` each.

Matching rules. Every comparison is exact and case-sensitive, and only a
JSON string ever matches a string: no trimming, case folding or number to
text conversion.

- An event is routed when all of these hold:

  - its route type is in the connection's routing. The route type is its
    `event_type` when that is one of mParticle's sixteen type names, and
    `other` for anything else, including a missing, null or non-string
    `event_type`;
  - no setting switches its `event_type` off: Send Crash Events
    (`crash_report`), Send Network Performance Events
    (`network_performance`), Include User Attribute Change Events
    (`user_attribute_change`), Include User Identity Change Events
    (`user_identity_change`), Send Validation Results (`validation_result`)
    and Send Alias Requests (`alias`). The last two route as `other`, so
    they need both `other` in the routing and their setting on;
  - for a `custom_event` only: when the connection lists custom event
    names, `data.event_name` is a string equal to one of them, and when it
    lists custom event types, `data.custom_event_type` is a string equal
    to one of them. A missing, null or numeric value never matches. Other
    event types, `commerce_event` included, ignore both lists.

  An entry of `events` that is not a JSON object is never routed.
- A connection limited to one environment (`production` or `development`)
  receives only batches whose `environment` is exactly that string. A
  batch without an `environment` matches only connections that take both.
- A consent notification (a `system_notifications` entry whose `type` is
  `gdpr_change` or `ccpa_change`) is kept in the envelope and routed when
  its type is in the routing, and removed from the envelope otherwise.
  Other notifications are kept and are not routed on their own.
- A batch whose `events` is missing, null, not a list or empty on arrival
  is an eventless batch. It is sent whole, with the settings applied, when
  Send Batches without Events is on. When the setting is off, it is sent
  only if it carries a routed consent notification. A batch whose events
  were all filtered out is not an eventless batch: it is sent only if it
  carries a routed consent notification, whatever the setting.
- A body with `request_type: "alias"` is an alias request. It is sent
  exactly as received, with no setting applied, when Send Alias Requests
  is on and the environment matches; the routing does not apply to it.

Every filtered event, and every batch that sends nothing for a setting,
is counted in `ShapedBatch.filtered` under its reason.
"""

import hashlib
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from events.event_types import RouteType, route_type_of_event, route_type_of_notification
from integrations import jsontext

# Event types switched off by a connection setting unless it is on.
TYPE_TOGGLES = {
    "crash_report": "send_crash_events",
    "network_performance": "send_network_performance_events",
    "user_attribute_change": "include_user_attribute_change_events",
    "user_identity_change": "include_user_identity_change_events",
    "validation_result": "send_validation_results",
    "alias": "send_alias_requests",
}
METADATA_KEYS = ("application_info", "device_info", "source_info")
DEVICE_KEY_LENGTH = 200


@dataclass(frozen=True)
class ShapingSettings:
    """A connection's routing and mParticle settings, as plain values."""

    event_types: frozenset[str] = frozenset()
    include_mp_deviceid: bool = True
    unique_id: str = ""
    metadata_exclusions: tuple[str, ...] = ()
    send_crash_events: bool = True
    include_location: bool = True
    send_network_performance_events: bool = True
    include_metadata: bool = True
    include_user_attribute_change_events: bool = False
    include_user_identity_change_events: bool = False
    send_batches_without_events: bool = True
    include_event_batch_location: bool = False
    send_alias_requests: bool = False
    send_validation_results: bool = False
    raw_data_feed: bool = False
    custom_event_names: frozenset[str] = frozenset()
    custom_event_types: frozenset[str] = frozenset()
    environment: str = "both"


@dataclass
class ShapedEvent:
    """One routed event with the connection's settings applied."""

    index: int
    route_type: str
    event: Any
    body: bytes = b""


@dataclass
class ShapedBatch:
    """The part of one batch that one connection receives, with counts of what it does not."""

    envelope: dict[str, Any]
    events: list[ShapedEvent] = field(default_factory=list)
    notifications: list[Any] = field(default_factory=list)
    filtered: Counter[str] = field(default_factory=Counter)
    failed: list[tuple[int, str]] = field(default_factory=list)
    send_without_events: bool = False

    @property
    def has_content(self) -> bool:
        """Whether anything is to be sent: routed events, routed notifications, or an eventless batch."""
        return bool(self.events or self.notifications or self.send_without_events)


@dataclass
class EncodedPayloads:
    """POST bodies for a list of events, split so that each fits the size limit."""

    bodies: list[tuple[bytes, list[ShapedEvent]]] = field(default_factory=list)
    too_large: list[ShapedEvent] = field(default_factory=list)


def is_alias_request(batch: Mapping[str, Any]) -> bool:
    return batch.get("request_type") == "alias"


def batch_events(batch: Mapping[str, Any]) -> list[Any]:
    """Return the batch's events; a missing, null or non-list `events` means none."""
    events = batch.get("events")
    return events if isinstance(events, list) else []


def device_key(batch: Mapping[str, Any]) -> str | None:
    """Return the key that groups events under Send as Batch: the device and the user, or None without either.

    The user is part of the key because a window is sent under one batch's
    envelope, identities included: events of two users of a shared device
    must not go out under one user's identities. A batch with neither id
    has no key, so its events are never merged with another batch's. Keys
    longer than the column are hashed, and NUL, which PostgreSQL text
    cannot hold, is replaced.
    """
    parts = [f"{name}:{batch[name]}" for name in ("mp_deviceid", "mpid") if batch.get(name) not in (None, "")]
    if not parts:
        return None
    key = "|".join(parts).replace("\x00", "\ufffd")
    if len(key) > DEVICE_KEY_LENGTH:
        key = "sha256:" + hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
    return key


def filter_reason(event: Any, settings: ShapingSettings) -> str | None:
    """Return why `event` is not routed to the connection, or None when it is."""
    if not isinstance(event, Mapping):
        return "event is not a JSON object"
    event_type = event.get("event_type")
    route_type = route_type_of_event(event_type)
    if route_type not in settings.event_types:
        return f"event type {route_type} not routed"
    toggle = TYPE_TOGGLES.get(event_type) if isinstance(event_type, str) else None
    if toggle and not getattr(settings, toggle):
        return f"{toggle} is off"
    if event_type == RouteType.CUSTOM_EVENT:
        return _custom_event_filter_reason(event.get("data"), settings)
    return None


def _custom_event_filter_reason(data: Any, settings: ShapingSettings) -> str | None:
    data = data if isinstance(data, Mapping) else {}
    name = data.get("event_name")
    if settings.custom_event_names and not (isinstance(name, str) and name in settings.custom_event_names):
        return "custom event name not in allowlist"
    kind = data.get("custom_event_type")
    if settings.custom_event_types and not (isinstance(kind, str) and kind in settings.custom_event_types):
        return "custom event type not in allowlist"
    return None


def environment_matches(batch: Mapping[str, Any], settings: ShapingSettings) -> bool:
    return settings.environment == "both" or batch.get("environment") == settings.environment


def shape_batch(batch: Mapping[str, Any], settings: ShapingSettings) -> ShapedBatch:
    """Route and shape one batch for one connection. It raises on no JSON object, as the property tests check."""
    shaped = shape_batch_without_events(batch, settings)
    shaped.events, filtered = shape_events(batch, settings)
    shaped.filtered.update(filtered)
    return shaped


def shape_batch_without_events(batch: Mapping[str, Any], settings: ShapingSettings) -> ShapedBatch:
    """Route and shape all of one batch but its events, which `shape_events` takes in parts of any size.

    The result counts only the reasons that concern the whole batch: another
    environment, an eventless batch with its setting off, or an alias request.
    """
    events = batch_events(batch)
    if is_alias_request(batch):
        return _shape_alias_request(batch, settings)

    envelope, notifications = shape_envelope(batch, settings)
    shaped = ShapedBatch(envelope=envelope, notifications=notifications)
    if not environment_matches(batch, settings):
        shaped.notifications = []
        shaped.filtered["environment does not match"] = len(events) or 1
    elif not events:
        if settings.send_batches_without_events:
            shaped.send_without_events = True
        elif not shaped.notifications:
            shaped.filtered["send_batches_without_events is off"] += 1
    return shaped


def shape_events(
    batch: Mapping[str, Any], settings: ShapingSettings, start: int = 0, stop: int | None = None
) -> tuple[list[ShapedEvent], Counter[str]]:
    """Route and shape the batch's events from `start` up to `stop`; return them and the filtered ones by reason.

    Indexes count from the start of the batch. An alias request or a batch
    from another environment routes no event on its own; `shape_batch_without_events`
    counts those.
    """
    routed: list[ShapedEvent] = []
    filtered: Counter[str] = Counter()
    if is_alias_request(batch) or not environment_matches(batch, settings):
        return routed, filtered
    events = batch_events(batch)
    for index in range(start, len(events) if stop is None else min(stop, len(events))):
        event = events[index]
        reason = filter_reason(event, settings)
        if reason:
            filtered[reason] += 1
            continue
        route_type = route_type_of_event(event.get("event_type"))
        routed.append(ShapedEvent(index, route_type, shape_event(event, settings)))
    return routed, filtered


def _shape_alias_request(batch: Mapping[str, Any], settings: ShapingSettings) -> ShapedBatch:
    shaped = ShapedBatch(envelope=dict(batch))
    if not settings.send_alias_requests:
        shaped.filtered["send_alias_requests is off"] += 1
    elif not environment_matches(batch, settings):
        shaped.filtered["environment does not match"] += 1
    else:
        shaped.send_without_events = True
    return shaped


def shape_envelope(batch: Mapping[str, Any], settings: ShapingSettings) -> tuple[dict[str, Any], list[Any]]:
    """Apply the envelope settings; return the envelope and its routed consent notifications.

    Keys keep their order; nested objects are copied before a key is removed,
    so the input is never changed.
    """
    envelope = dict(batch)
    if not settings.include_mp_deviceid:
        envelope.pop("mp_deviceid", None)
    if settings.unique_id:
        envelope["unique_id"] = settings.unique_id
    if not settings.include_metadata:
        for key in METADATA_KEYS:
            envelope.pop(key, None)
    for path in settings.metadata_exclusions:
        _remove_path(envelope, path.split("."))
    if not settings.include_event_batch_location:
        _remove_path(envelope, ["context", "location"])
    if settings.raw_data_feed and "user_identities" in envelope:
        envelope["user_identities"] = identities_as_map(envelope["user_identities"])

    routed_notifications: list[Any] = []
    notifications = envelope.get("system_notifications")
    if isinstance(notifications, list):
        kept = []
        for notification in notifications:
            route_type = route_type_of_notification(
                notification.get("type") if isinstance(notification, Mapping) else None
            )
            if route_type is None:
                kept.append(notification)
            elif route_type in settings.event_types:
                kept.append(notification)
                routed_notifications.append(notification)
        envelope["system_notifications"] = kept
    return envelope, routed_notifications


def shape_event(event: Mapping[str, Any], settings: ShapingSettings) -> dict[str, Any]:
    """Apply the event settings (only Include Location Information) to a copy of `event`."""
    shaped = dict(event)
    if not settings.include_location:
        _remove_path(shaped, ["data", "location"])
    return shaped


def identities_as_map(identities: Any) -> Any:
    """Return outbound `user_identities` (a list of identity objects) as the inbound object map.

    A map, null or any other value is returned unchanged. List entries
    without a string `identity_type` cannot be keyed, so they are left out,
    and of several entries with one `identity_type` the last one wins.
    """
    if not isinstance(identities, list):
        return identities
    mapped: dict[str, Any] = {}
    for entry in identities:
        if isinstance(entry, Mapping) and isinstance(entry.get("identity_type"), str):
            mapped[entry["identity_type"]] = entry.get("identity")
    return mapped


def _remove_path(container: dict[str, Any], path: Sequence[str]) -> None:
    """Remove the key at `path` in place, copying each nested object on the way down."""
    head, *rest = path
    if head not in container:
        return
    if not rest:
        del container[head]
        return
    child = container[head]
    if isinstance(child, Mapping) and rest[0] in child:
        copy = dict(child)
        _remove_path(copy, rest)
        container[head] = copy


def encode_events(events: Iterable[ShapedEvent]) -> tuple[list[ShapedEvent], list[tuple[ShapedEvent, str]]]:
    """Encode each event's JSON; return the encoded events and those that cannot be encoded, with why."""
    encoded: list[ShapedEvent] = []
    failed: list[tuple[ShapedEvent, str]] = []
    for shaped in events:
        try:
            shaped.body = jsontext.encode(shaped.event)
        except (UnicodeEncodeError, TypeError, ValueError) as error:
            failed.append((shaped, f"not representable as UTF-8 JSON: {error.__class__.__name__}"))
            continue
        encoded.append(shaped)
    return encoded, failed


def build_payloads(
    envelope: Mapping[str, Any], events: Sequence[ShapedEvent], max_bytes: int, *, one_per_event: bool = False
) -> EncodedPayloads:
    """Join the envelope and encoded events into POST bodies of at most `max_bytes`.

    Bodies split only between events, each a valid batch with the same
    envelope. An event too large even alone lands in `too_large`. With
    `one_per_event`, every event gets its own body. An empty `events` gives
    one body with an empty events list. The envelope must encode (see
    `encode_envelope_parts`).

    NOTE: that one body for an empty `events` is returned even when the
    envelope alone exceeds `max_bytes`, because `EncodedPayloads` has no
    place to report it and dropping it would lose it silently. It is the
    only body that can exceed the limit.
    """
    prefix, suffix = encode_envelope_parts(envelope)
    result = EncodedPayloads()
    overhead = len(prefix) + len(suffix) + 2
    if not events:
        result.bodies.append((prefix + b"[]" + suffix, []))
        return result

    current: list[ShapedEvent] = []
    size = overhead
    for shaped in events:
        if overhead + len(shaped.body) > max_bytes:
            result.too_large.append(shaped)
            continue
        added = len(shaped.body) + (1 if current else 0)
        if current and (one_per_event or size + added > max_bytes):
            result.bodies.append((_join(prefix, current, suffix), current))
            current, size, added = [], overhead, len(shaped.body)
        current.append(shaped)
        size += added
    if current:
        result.bodies.append((_join(prefix, current, suffix), current))
    return result


class PayloadPlan:
    """Follows `build_payloads` one event at a time, to show where its bodies start.

    Events handed to `build_payloads` in parts, each part cut where a body
    starts, give exactly the bodies that one call with all of them gives.
    This lets a caller encode a long list of events in bounded memory.
    """

    def __init__(self, envelope: Mapping[str, Any], max_bytes: int, *, one_per_event: bool = False) -> None:
        self.overhead = payload_overhead(envelope)
        self.max_bytes = max_bytes
        self.one_per_event = one_per_event
        self._size: int | None = None

    def fits(self, size: int) -> bool:
        """Return whether an event of `size` bytes fits in a body on its own."""
        return self.overhead + size <= self.max_bytes

    def starts_body(self, size: int) -> bool:
        """Add an event of `size` bytes; return whether it starts a body. An event too large alone starts none."""
        if not self.fits(size):
            return False
        if self._size is None or self.one_per_event or self._size + size + 1 > self.max_bytes:
            self._size = self.overhead + size
            return True
        self._size += size + 1
        return False


def payload_overhead(envelope: Mapping[str, Any]) -> int:
    """Return the bytes a body spends on its envelope, as `build_payloads` counts them.

    An envelope with a lone surrogate is counted as delivery code sends it,
    with U+FFFD in place of the surrogate.
    """
    try:
        prefix, suffix = encode_envelope_parts(envelope)
    except UnicodeEncodeError:
        prefix, suffix = encode_envelope_parts(jsontext.replace_lone_surrogates(envelope))
    return len(prefix) + len(suffix) + 2


def _join(prefix: bytes, events: Sequence[ShapedEvent], suffix: bytes) -> bytes:
    return prefix + b"[" + b",".join(shaped.body for shaped in events) + b"]" + suffix


def encode_envelope_parts(envelope: Mapping[str, Any]) -> tuple[bytes, bytes]:
    """Encode the envelope around its `events` list: the bytes before the list and after it.

    The list goes where `events` stood in the received batch, or last when it
    was absent. Raises UnicodeEncodeError when the envelope contains a lone surrogate.
    """
    marker = f"__portal_events_{uuid.uuid4().hex}__"
    body = dict(envelope)
    body["events"] = [marker]
    encoded = jsontext.encode(body)
    placeholder = b'["' + marker.encode("ascii") + b'"]'
    prefix, _, suffix = encoded.partition(placeholder)
    return prefix, suffix


def encode_whole(envelope: Mapping[str, Any]) -> bytes:
    """Encode a body sent as received apart from its settings: alias requests and eventless batches."""
    return jsontext.encode(envelope)
