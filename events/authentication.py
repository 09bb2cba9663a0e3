"""Authentication of mParticle's POSTs by the secret of a feed."""

import time
from typing import Any

from django.contrib.auth.models import AnonymousUser
from django.core.cache import cache
from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver
from rest_framework import authentication, exceptions
from rest_framework.request import Request

from events.models import Feed, hash_feed_secret
from portal.conf import portal_setting

FAILURE_WINDOW_SECONDS = 60
# Feeds this process authenticated recently, by secret hash, with the monotonic time their entry expires.
_recent_feeds: dict[str, tuple[Feed, float]] = {}
# The cache is emptied when it reaches this many entries, far more than a deployment has feeds.
_RECENT_FEEDS_LIMIT = 1000


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
        feed = authenticate_feed(secret) if secret else None
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


def authenticate_feed(secret: str) -> Feed | None:
    """Return the active feed whose secret is `secret`, or None, using this process's recent lookups.

    A feed found in the database is kept for `PORTAL_FEED_AUTH_CACHE_SECONDS`
    (0 turns the cache off). So when another process rotates a secret or
    deactivates or deletes a feed, the old secret keeps working here for at
    most that long. Saving or deleting a feed in this process empties the
    cache at once. Failed lookups are not kept, so a new feed works at once.
    """
    digest = hash_feed_secret(secret)
    now = time.monotonic()
    recent = _recent_feeds.get(digest)
    if recent is not None and recent[1] > now:
        return recent[0]
    feed = Feed.objects.authenticate_digest(digest)
    seconds = portal_setting("FEED_AUTH_CACHE_SECONDS")
    if feed is None or seconds <= 0:
        _recent_feeds.pop(digest, None)
        return feed
    if len(_recent_feeds) >= _RECENT_FEEDS_LIMIT:
        _recent_feeds.clear()
    _recent_feeds[digest] = (feed, now + seconds)
    return feed


@receiver([post_save, post_delete], sender=Feed, dispatch_uid="events.forget_recent_feeds")
def forget_recent_feeds(**kwargs: Any) -> None:
    """Empty this process's feed cache when a feed changes, so that a rotated secret fails here at once."""
    _recent_feeds.clear()


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
