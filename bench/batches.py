"""Realistic mParticle batches for the benchmark, built from the demo's captured batches.

Every batch is the web app's envelope (`demo/batches/web-app.01-*`) around
events taken in a fixed order from the demo batches, the kinds a session
sends most. Each rendered batch gets a fresh `source_request_id` and every
event a fresh `source_message_id`, so the portal stores and routes it
instead of dropping it as a duplicate. Ten events make about 5 KB.

Rendering only joins pre-encoded text with new ids, so the load generator
spends microseconds, not milliseconds, per batch.
"""

import json
import re
import uuid
from pathlib import Path
from typing import Any

DEMO_BATCHES = Path(__file__).resolve().parents[1] / "demo" / "batches"
ENVELOPE_SOURCE = "web-app.01-landing-and-newsletter.json"
# The order of event kinds in a batch; every kind is routed by a connection that takes every type.
EVENT_KINDS = (
    "session_start",
    "screen_view",
    "custom_event",
    "screen_view",
    "custom_event",
    "breadcrumb",
    "network_performance",
    "screen_view",
    "custom_event",
    "session_end",
)
_PLACEHOLDER = re.compile(r"@@(request|message|device)@@")


class BatchTemplate:
    """A batch of `events` events, rendered with new ids for a given device."""

    def __init__(self, events: int) -> None:
        batch = _envelope()
        batch["source_request_id"] = "@@request@@"
        batch["mp_deviceid"] = "@@device@@"
        samples = _sample_events()
        batch["events"] = [_with_placeholder_id(samples[index % len(samples)]) for index in range(events)]
        text = json.dumps(batch, ensure_ascii=False, separators=(",", ":"))
        self._parts = _PLACEHOLDER.split(text)
        self.events = events

    def render(self, device: str) -> bytes:
        """Return the batch as UTF-8 JSON with new request and message ids, for the device `device`."""
        out = []
        for position, part in enumerate(self._parts):
            if position % 2 == 0:
                out.append(part)
            elif part == "device":
                out.append(device)
            else:
                out.append(str(uuid.uuid4()))
        return "".join(out).encode("utf-8")


def _envelope() -> dict[str, Any]:
    batch: dict[str, Any] = json.loads((DEMO_BATCHES / ENVELOPE_SOURCE).read_text("utf-8"))
    batch.pop("events", None)
    return batch


def _sample_events() -> list[dict[str, Any]]:
    """Return one demo event per entry of EVENT_KINDS, using each kind's demo events in turn."""
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(DEMO_BATCHES.glob("*.json")):
        for event in json.loads(path.read_text("utf-8")).get("events") or []:
            by_kind.setdefault(event["event_type"], []).append(event)
    used: dict[str, int] = {}
    samples = []
    for kind in EVENT_KINDS:
        position = used.get(kind, 0)
        samples.append(by_kind[kind][position % len(by_kind[kind])])
        used[kind] = position + 1
    return samples


def _with_placeholder_id(event: dict[str, Any]) -> dict[str, Any]:
    return {**event, "data": {**event["data"], "source_message_id": "@@message@@"}}
