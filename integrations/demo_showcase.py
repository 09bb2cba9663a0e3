"""The demo's settings showcase: one connection per mParticle setting, and what each changed in what was sent.

Every showcase connection routes every type, one POST per event unless the
case is Send as Batch, with one setting changed from its default. After the
run, each case counts the recorded request bodies that show the setting's
effect, beside the same count for the connection with all defaults.
"""

import json
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from events.event_types import RouteType
from integrations.metadata_fields import MetadataField

Body = dict[str, Any]


@dataclass(frozen=True)
class SettingCase:
    """One setting in its non-default state, and a question about each body that shows its effect."""

    setting: str
    value: object
    question: str
    probe: Callable[[Body], bool]

    @property
    def connection_name(self) -> str:
        return f"Showcase: {self.setting} = {self.value!r}"


def _events(body: Body) -> list[Any]:
    events = body.get("events")
    return events if isinstance(events, list) else []


def _has_event(event_type: str) -> Callable[[Body], bool]:
    return lambda body: any(isinstance(e, dict) and e.get("event_type") == event_type for e in _events(body))


def _event_location(body: Body) -> bool:
    return any(isinstance(e, dict) and "location" in (e.get("data") or {}) for e in _events(body))


def _batch_location(body: Body) -> bool:
    context = body.get("context")
    return isinstance(context, dict) and "location" in context


BASELINE_NAME = "Showcase: all defaults"
UNIQUE_ID = "demo-unique-id"
CASES = (
    SettingCase("include_mp_deviceid", False, "bodies with a top-level mp_deviceid", lambda b: "mp_deviceid" in b),
    SettingCase(
        "unique_id", UNIQUE_ID, f"bodies with unique_id {UNIQUE_ID!r}", lambda b: b.get("unique_id") == UNIQUE_ID
    ),
    SettingCase(
        "metadata_exclusions",
        [MetadataField.IP_ADDRESS.value, MetadataField.DEVICE_NAME.value],
        "bodies with a top-level ip",
        lambda b: "ip" in b,
    ),
    SettingCase("send_crash_events", False, "bodies with a crash_report", _has_event("crash_report")),
    SettingCase("include_location", False, "bodies with an event's data.location", _event_location),
    SettingCase(
        "send_network_performance_events",
        False,
        "bodies with a network_performance event",
        _has_event("network_performance"),
    ),
    SettingCase("include_metadata", False, "bodies with device_info", lambda b: "device_info" in b),
    SettingCase(
        "include_user_attribute_change_events",
        True,
        "bodies with a user_attribute_change",
        _has_event("user_attribute_change"),
    ),
    SettingCase(
        "include_user_identity_change_events",
        True,
        "bodies with a user_identity_change",
        _has_event("user_identity_change"),
    ),
    SettingCase("include_event_batch_location", True, "bodies with context.location", _batch_location),
    SettingCase(
        "raw_data_feed",
        True,
        "bodies with user_identities as an object",
        lambda b: isinstance(b.get("user_identities"), dict),
    ),
    SettingCase("send_as_batch", True, "bodies with more than one event", lambda b: len(_events(b)) > 1),
)
ALL_ROUTE_TYPES = tuple(RouteType)


def url_token(connection_name: str) -> str:
    """Return the urlTokenId of a connection's stand-in URL, which identifies its requests in the record file."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"portal-demo:{connection_name}"))


def bodies_by_connection(record_path: Path, names: Iterable[str]) -> dict[str, list[Body]]:
    """Return the JSON bodies the stand-in recorded, by connection name."""
    by_token = {url_token(name): name for name in names}
    found: dict[str, list[Body]] = {name: [] for name in by_token.values()}
    for line in record_path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        token = str(record.get("path", "")).rpartition("urlTokenId=")[2].split("&")[0]
        if token in by_token and record.get("status") == 200:
            found[by_token[token]].append(json.loads(record["body"]))
    return found


@dataclass(frozen=True)
class CaseResult:
    case: SettingCase
    matching: int
    total: int
    baseline_matching: int
    baseline_total: int

    def line(self) -> str:
        return (
            f"  {self.case.setting} = {self.case.value!r}: {self.case.question}: {self.matching} of {self.total}"
            f" (all defaults: {self.baseline_matching} of {self.baseline_total})"
        )


def compare(bodies: Mapping[str, Sequence[Body]]) -> list[CaseResult]:
    """Count, for each case and for the all-defaults connection, the bodies its question holds for."""
    baseline = bodies.get(BASELINE_NAME, [])
    return [
        CaseResult(
            case,
            sum(1 for body in bodies.get(case.connection_name, []) if case.probe(body)),
            len(bodies.get(case.connection_name, [])),
            sum(1 for body in baseline if case.probe(body)),
            len(baseline),
        )
        for case in CASES
    ]
