"""Previews of a batch per connection: the bodies it would get, why each event is in or out, and JSONPaths.

Like shaping, this is pure: a parsed batch and a connection's settings in,
plain data out. It does not know which events the connection has already
received, so per-event de-duplication is not reflected.
"""

from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from integrations import jsontext, shaping

SAMPLE_BATCH_RESOURCE = "data/sample_batch.json"


@dataclass
class EventDecision:
    index: int
    event_type: str
    reason: str


@dataclass
class Preview:
    """The bodies one connection would receive for one batch, with the reasons behind them."""

    decisions: list[EventDecision] = field(default_factory=list)
    bodies: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    jsonpaths: list[str] = field(default_factory=list)


def sample_batch() -> dict[str, Any]:
    """Return the built-in fully populated batch: every event type, both consent changes, every metadata field."""
    text = resources.files("integrations").joinpath(SAMPLE_BATCH_RESOURCE).read_text(encoding="utf-8")
    batch: dict[str, Any] = jsontext.parse(text)
    return batch


def preview(batch: dict[str, Any], settings: shaping.ShapingSettings, max_bytes: int, *, as_batch: bool) -> Preview:
    """Shape `batch` for a connection; `as_batch` sends all routed events in one body, as Send as Batch does."""
    result = Preview(decisions=_decisions(batch, settings))
    shaped = shaping.shape_batch(batch, settings)
    if not shaped.has_content:
        return result
    # The portal sends lone surrogates in the envelope as U+FFFD; see delivery.create_deliveries.
    shaped.envelope = jsontext.replace_lone_surrogates(shaped.envelope)

    if shaping.is_alias_request(batch) or (shaped.send_without_events and not shaped.events):
        result.bodies = [shaping.encode_whole(shaped.envelope).decode()]
    else:
        encoded, unsendable = shaping.encode_events(shaped.events)
        result.failures = [f"event {item.index}: {reason}" for item, reason in unsendable]
        payloads = shaping.build_payloads(shaped.envelope, encoded, max_bytes, one_per_event=not as_batch)
        result.bodies = [body.decode() for body, _ in payloads.bodies]
        result.failures += [f"event {item.index}: too large" for item in payloads.too_large]
    result.jsonpaths = sorted(set().union(*(jsonpaths(jsontext.parse(body)) for body in result.bodies)))
    return result


def _decisions(batch: dict[str, Any], settings: shaping.ShapingSettings) -> list[EventDecision]:
    environment_ok = shaping.environment_matches(batch, settings)
    decisions = []
    for index, event in enumerate(shaping.batch_events(batch)):
        event_type = event.get("event_type") if isinstance(event, dict) else None
        reason = shaping.filter_reason(event, settings) if environment_ok else "environment does not match"
        decisions.append(EventDecision(index, str(event_type), reason or "routed"))
    return decisions


def jsonpaths(value: Any, path: str = "$") -> Iterator[str]:
    """Yield the JSONPath of every leaf value, as Qualtrics' JSON Event field mapping takes it."""
    if isinstance(value, dict) and value:
        for key, child in value.items():
            yield from jsonpaths(child, f"{path}.{key}" if _plain_key(key) else f"{path}['{key}']")
    elif isinstance(value, list) and value:
        for index, child in enumerate(value):
            yield from jsonpaths(child, f"{path}[{index}]")
    else:
        yield path


def _plain_key(key: str) -> bool:
    return key.replace("_", "a").replace("$", "a").isalnum()
