"""POST URL validation and the send-time address check."""

import pytest
from django.core.exceptions import ValidationError

from integrations.url_policy import UnsafeTargetError, check_resolved_addresses, validate_post_url

TOKEN = "8c4e1f2a-6b3d-4e5f-9a7b-1c2d3e4f5a6b"


@pytest.mark.parametrize(
    "url",
    [
        f"https://iad1.qualtrics.com/inbound-event/v1/events/json/triggers?urlTokenId={TOKEN}",
        f"https://myorg.iad1.qualtrics.com/inbound-event/v1/events/JSON/triggers?urlTokenId={TOKEN}",
        f"https://fra1.qualtrics.com/inbound-event/v1/events/json/triggers?urlTokenId={TOKEN}&extra=1",
        "https://sjc1.qualtrics.com/inbound-event/v1/events/json/triggers"
        "?contextId=SV_1&userId=UR_2&brandId=acme&triggerId=OC_3",
    ],
)
def test_qualtrics_shapes_accepted(url):
    validate_post_url(url)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (f"http://iad1.qualtrics.com/inbound-event/v1/events/json/triggers?urlTokenId={TOKEN}", "https"),
        (f"https://qualtrics.com.evil.example/inbound-event/v1/events/json/triggers?urlTokenId={TOKEN}", "host"),
        (f"https://iad1.qualtrics.com/other/path?urlTokenId={TOKEN}", "path"),
        ("https://iad1.qualtrics.com/inbound-event/v1/events/json/triggers", "urlTokenId"),
        ("https://iad1.qualtrics.com/inbound-event/v1/events/json/triggers?urlTokenId=abc", "UUID"),
        (f"https://u:p@iad1.qualtrics.com/inbound-event/v1/events/json/triggers?urlTokenId={TOKEN}", "password"),
        (f"https://iad1.qualtrics.com:8443/inbound-event/v1/events/json/triggers?urlTokenId={TOKEN}", "port"),
        ("http://169.254.169.254/latest/meta-data/", "https"),
        ("https://169.254.169.254/latest/meta-data/", "host"),
        ("http://127.0.0.1:6379/", "https"),
        ("https://[::1]/", "host"),
        ("https://0x7f000001/", "host"),
        ("https://10.0.0.5/", "host"),
        ("not a url", "full URL"),
    ],
)
def test_unsafe_urls_rejected(url, message):
    with pytest.raises(ValidationError, match=message):
        validate_post_url(url)


def test_loopback_allowed_when_enabled(settings):
    settings.PORTAL = {**settings.PORTAL, "ALLOW_LOOPBACK_TARGETS": True}

    validate_post_url("http://127.0.0.1:8765/inbound-event/v1/events/json/triggers")
    validate_post_url("http://[::1]:8765/x")
    validate_post_url("http://localhost:8765/x")


@pytest.mark.parametrize("url", ["http://10.0.0.5/", "http://0x7f000001/", "http://169.254.169.254/"])
def test_loopback_setting_admits_only_loopback(settings, url):
    settings.PORTAL = {**settings.PORTAL, "ALLOW_LOOPBACK_TARGETS": True}

    with pytest.raises(ValidationError):
        validate_post_url(url)


def _resolve_to(address):
    def fake_getaddrinfo(host, port, type=0):
        return [(2, 1, 6, "", (address, port))]

    return fake_getaddrinfo


@pytest.mark.parametrize("address", ["10.0.0.5", "192.168.1.1", "169.254.169.254", "127.0.0.1", "0.0.0.0"])
def test_private_resolution_rejected_at_send(monkeypatch, address):
    monkeypatch.setattr("socket.getaddrinfo", _resolve_to(address))

    with pytest.raises(UnsafeTargetError, match="non-public"):
        check_resolved_addresses("iad1.qualtrics.com", 443)


def test_public_resolution_passes(monkeypatch):
    monkeypatch.setattr("socket.getaddrinfo", _resolve_to("93.184.216.34"))

    check_resolved_addresses("iad1.qualtrics.com", 443)
