"""The rules for a connection's POST URL, checked when it is saved and again before each send.

Qualtrics JSON Event trigger URLs look like
`https://<datacenter>.qualtrics.com/inbound-event/v1/events/json/triggers?urlTokenId=<uuid>`,
or carry `contextId`, `userId`, `brandId` and `triggerId` instead of
`urlTokenId`. The host may have an organisation prefix and the path is seen
with both `json` and `JSON`. Anything else is rejected unless
`PORTAL_ALLOW_LOOPBACK_TARGETS` is set, which also admits http and https URLs
whose host is a loopback address, for development and tests.
"""

import ipaddress
import re
import socket
from urllib.parse import parse_qs, urlsplit

from django.core.exceptions import ValidationError

from portal.conf import portal_setting

QUALTRICS_PATH = re.compile(r"^/inbound-event/v1/events/json/triggers/?$", re.IGNORECASE)
QUALTRICS_HOST = re.compile(r"^(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+qualtrics\.com$")
LEGACY_QUERY_KEYS = ("contextId", "userId", "brandId", "triggerId")
UUID_PATTERN = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


class UnsafeTargetError(Exception):
    """The POST URL's host resolves to an address the portal must not call."""


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def validate_post_url(url: str) -> None:
    """Raise ValidationError unless `url` is a Qualtrics trigger URL (or an allowed loopback URL)."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as error:
        raise ValidationError(f"Enter a valid URL ({error}).") from error
    host = (parts.hostname or "").lower()
    if not host:
        raise ValidationError("Enter a full URL, starting with https://.")
    if parts.username or parts.password:
        raise ValidationError("The POST URL must not contain a user name or password; use the Authorization header.")

    if portal_setting("ALLOW_LOOPBACK_TARGETS") and is_loopback_host(host):
        if parts.scheme not in ("http", "https"):
            raise ValidationError("A loopback POST URL must use http or https.")
        return

    if parts.scheme != "https":
        raise ValidationError("The POST URL must use https.")
    if port not in (None, 443):
        raise ValidationError("The POST URL must use the default https port.")
    if not QUALTRICS_HOST.match(host):
        raise ValidationError(f"The host {host!r} is not a Qualtrics host (expected <datacenter>.qualtrics.com).")
    if not QUALTRICS_PATH.match(parts.path):
        raise ValidationError("The path must be /inbound-event/v1/events/json/triggers, as Qualtrics shows it.")
    _validate_trigger_query(parts.query)


def _validate_trigger_query(query: str) -> None:
    params = parse_qs(query)
    token = params.get("urlTokenId", [""])[0]
    if token:
        if not UUID_PATTERN.match(token):
            raise ValidationError("urlTokenId must be a UUID, as in the URL Qualtrics shows.")
        return
    missing = [key for key in LEGACY_QUERY_KEYS if not params.get(key, [""])[0]]
    if missing:
        raise ValidationError(
            "The URL needs urlTokenId, or all of contextId, userId, brandId and triggerId "
            f"(missing: {', '.join(missing)})."
        )


def check_resolved_addresses(host: str, port: int) -> str:
    """Return the address to connect to; raise UnsafeTargetError when `host` resolves to a non-public one.

    Loopback addresses pass only when loopback targets are allowed. The
    check runs right before each send, so a name re-pointed after it was
    saved is caught, and the transport connects to the returned address
    instead of resolving the name again.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise UnsafeTargetError(f"could not resolve {host}: {error}") from error
    allow_loopback = portal_setting("ALLOW_LOOPBACK_TARGETS")
    for info in infos:
        address = ipaddress.ip_address(info[4][0])
        if address.is_loopback and allow_loopback:
            continue
        if not address.is_global:
            raise UnsafeTargetError(f"{host} resolves to the non-public address {address}")
    return str(infos[0][4][0])


def rate_limit_key(url: str) -> str | None:
    """Return `brand@host` for a Qualtrics URL, the scope of Qualtrics' per-brand rate limit.

    The legacy URL shape names the brand in `brandId`; the organisation
    prefix of the host (`org.iad1.qualtrics.com`) names it otherwise. Returns
    None when the URL shows neither.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    host = (parts.hostname or "").lower()
    brand = parse_qs(parts.query).get("brandId", [""])[0]
    labels = host.split(".")
    if not brand and host.endswith(".qualtrics.com") and len(labels) > 3:
        brand = labels[0]
    return f"{brand}@{host}" if brand else None
