"""Authentication of mParticle's POSTs by the secret of a feed."""

import time
from typing import Any

from django.contrib.auth.models import AnonymousUser
from django.core.cache import cache
from rest_framework import authentication, exceptions
from rest_framework.request import Request

from events.models import Feed
from portal.conf import portal_setting

FAILURE_WINDOW_SECONDS = 60


class FeedUser(AnonymousUser):
    """The sender of an inbound batch: no Django user, only a feed."""

    def __init__(self, feed: Feed) -> None:
        super().__init__()
        self.feed = feed

    @property
    def is_authenticated(self) -> bool:  # type: ignore[override]
        return True


class FeedSecretAuthentication(authentication.BaseAuthentication):
    """Accepts `Authorization: <secret>` or `Authorization: Bearer <secret>`, as set in mParticle's Webhook output.

    Session authentication is never used on this endpoint, so CSRF does not
    apply. A client address with more than `PORTAL_AUTH_FAILURES_PER_MINUTE`
    failed attempts in the current minute gets 429 instead of 401 until the
    minute ends. A valid secret always passes: behind a proxy every sender
    shares one address, and mParticle must not be locked out by another
    sender's failures. Secrets are 256-bit random, so the throttle limits
    noise, not guessing.
    """

    def authenticate(self, request: Request) -> tuple[FeedUser, Feed]:
        address = request.META.get("REMOTE_ADDR", "unknown")
        header = request.META.get("HTTP_AUTHORIZATION", "").strip()
        scheme, _, rest = header.partition(" ")
        secret = rest.strip() if scheme.lower() == "bearer" else header
        feed = Feed.objects.authenticate(secret) if secret else None
        if feed is not None:
            return FeedUser(feed), feed

        wait = _throttled_for(address)
        if wait:
            raise exceptions.Throttled(wait, "Too many failed authentications from this address.")
        _count_failure(address)
        if not secret:
            raise exceptions.NotAuthenticated("Missing Authorization header with the feed secret.")
        raise exceptions.AuthenticationFailed("Invalid feed secret.")

    def authenticate_header(self, request: Any) -> str:
        return 'Bearer realm="mparticle-feed"'


def _failure_key(address: str) -> str:
    return f"inbound-auth-failures:{address}:{int(time.time() // FAILURE_WINDOW_SECONDS)}"


def _throttled_for(address: str) -> float:
    """Return the seconds until the address may try again, or 0."""
    failures = cache.get(_failure_key(address), 0)
    if failures < portal_setting("AUTH_FAILURES_PER_MINUTE"):
        return 0.0
    return FAILURE_WINDOW_SECONDS - time.time() % FAILURE_WINDOW_SECONDS


def _count_failure(address: str) -> None:
    key = _failure_key(address)
    cache.add(key, 0, timeout=FAILURE_WINDOW_SECONDS * 2)
    try:
        cache.incr(key)
    except ValueError:
        cache.set(key, 1, timeout=FAILURE_WINDOW_SECONDS * 2)
