"""Shaping over mParticle's published sample batches, with default settings and with each setting flipped.

The samples live in the `shared/samples/mparticle` folder beside the
repository checkout. Only files that hold a batch with events are used:
fragments, data-planning responses and the different "Firehose" format are
left out because none of them is a batch that reaches a Webhook output.
"""

from functools import cache
from pathlib import Path
from typing import Any

import pytest

from integrations import jsontext
from integrations.metadata_fields import MetadataField
from integrations.shaping import ShapingSettings
from tests.test_shaping import (
    MAX_BYTES,
    SentOutput,
    blank_events,
    make_settings,
    reference_envelope,
    reference_event,
    reference_routed,
    reference_sends_anything,
    send_batch,
    tagged,
)

SAMPLES_DIR = Path(__file__).resolve().parents[2] / "shared" / "samples" / "mparticle"
LARGE_SAMPLE = "synthetic_large_commerce_purchase_outbound_batch.json"

pytestmark = pytest.mark.skipif(not SAMPLES_DIR.is_dir(), reason=f"mParticle samples folder not found at {SAMPLES_DIR}")


def _holds_batch_with_events(value: Any) -> bool:
    if not isinstance(value, dict):
        return False
    events = value.get("events")
    return isinstance(events, list) and any(isinstance(e, dict) and "event_type" in e for e in events)


def _sample_names() -> list[str]:
    if not SAMPLES_DIR.is_dir():
        return []
    names = []
    for path in sorted(SAMPLES_DIR.glob("*.json")):
        if _holds_batch_with_events(jsontext.parse(path.read_text(encoding="utf-8"))):
            names.append(path.name)
    return names


SAMPLE_NAMES = _sample_names()

BOOLEAN_SETTINGS = [
    name for name, spec in ShapingSettings.__dataclass_fields__.items() if isinstance(spec.default, bool)
]
VARIANTS: dict[str, dict[str, Any]] = {"defaults": {}}
VARIANTS |= {
    f"{name}={not ShapingSettings.__dataclass_fields__[name].default}": {
        name: not ShapingSettings.__dataclass_fields__[name].default
    }
    for name in BOOLEAN_SETTINGS
}
VARIANTS |= {
    "unique_id": {"unique_id": "survey-shop-ios"},
    "metadata_exclusions": {"metadata_exclusions": list(MetadataField.values)},
    "custom_event_names": {"custom_event_names": ["Survey Eligible", "eCommerce - Purchase"]},
    "custom_event_types": {"custom_event_types": ["navigation", "other"]},
    "environment=production": {"environment": "production"},
    "environment=development": {"environment": "development"},
    "everything_flipped": {
        **{name: not ShapingSettings.__dataclass_fields__[name].default for name in BOOLEAN_SETTINGS},
        "unique_id": "survey-shop-ios",
        "metadata_exclusions": list(MetadataField.values),
    },
}
CASES = [pytest.param(name, variant, id=f"{name}-{variant}") for name in SAMPLE_NAMES for variant in VARIANTS]


@cache
def _sample(name: str) -> Any:
    return jsontext.parse((SAMPLES_DIR / name).read_text(encoding="utf-8"))


@cache
def _sent(name: str, variant: str) -> SentOutput:
    return send_batch(_sample(name), make_settings(**VARIANTS[variant]))


def test_samples_found():
    assert len(SAMPLE_NAMES) >= 8
    assert LARGE_SAMPLE in SAMPLE_NAMES


@pytest.mark.parametrize(("name", "variant"), CASES)
def test_sample_sends_when_expected(name, variant):
    settings = make_settings(**VARIANTS[variant])

    assert bool(_sent(name, variant).envelopes or _sent(name, variant).set_aside) is reference_sends_anything(
        _sample(name), settings
    )


@pytest.mark.parametrize(("name", "variant"), CASES)
def test_sample_routes_expected_events(name, variant):
    sent = _sent(name, variant)

    assert sorted(sent.indexes + sent.set_aside) == reference_routed(_sample(name), make_settings(**VARIANTS[variant]))


@pytest.mark.parametrize(("name", "variant"), CASES)
def test_sample_events_kept_exactly(name, variant):
    batch, settings = _sample(name), make_settings(**VARIANTS[variant])
    sent = _sent(name, variant)

    expected = [reference_event(batch["events"][index], settings) for index in sent.indexes]

    assert tagged(sent.events) == tagged(expected)


@pytest.mark.parametrize(("name", "variant"), CASES)
def test_sample_envelope_kept_exactly(name, variant):
    expected = tagged(blank_events(reference_envelope(_sample(name), make_settings(**VARIANTS[variant]))))

    for envelope in _sent(name, variant).envelopes:
        assert tagged(envelope) == expected


@pytest.mark.parametrize(("name", "variant"), CASES)
def test_sample_bodies_within_limit(name, variant):
    assert all(size <= MAX_BYTES for size in _sent(name, variant).body_sizes)


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_sample_one_body_per_event(name):
    sent = send_batch(_sample(name), make_settings(), one_per_event=True)

    assert len(sent.envelopes) == len(sent.indexes)
    assert all(size <= MAX_BYTES for size in sent.body_sizes)


def test_large_sample_marked_too_large():
    sent = _sent(LARGE_SAMPLE, "defaults")

    assert sent.set_aside == [0]
    assert sent.envelopes == []


def test_large_sample_fits_larger_limit():
    sent = send_batch(_sample(LARGE_SAMPLE), make_settings(), max_bytes=250_000)

    assert sent.indexes == [0]
    assert tagged(sent.events[0]) == tagged(_sample(LARGE_SAMPLE)["events"][0])
