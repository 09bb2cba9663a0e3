"""Authentication of mParticle's POSTs by the secret of a feed."""

from typing import Any

from django.contrib.auth.models import AnonymousUser
from rest_framework import authentication, exceptions
from rest_framework.request import Request

from events.models import Feed


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

    Session authentication is never used on this endpoint, so CSRF does not apply.
    """

    def authenticate(self, request: Request) -> tuple[FeedUser, Feed]:
        header = request.META.get("HTTP_AUTHORIZATION", "").strip()
        scheme, _, rest = header.partition(" ")
        secret = rest.strip() if scheme.lower() == "bearer" else header
        if not secret:
            raise exceptions.NotAuthenticated("Missing Authorization header with the feed secret.")
        feed = Feed.objects.authenticate(secret)
        if feed is None:
            raise exceptions.AuthenticationFailed("Invalid feed secret.")
        return FeedUser(feed), feed

    def authenticate_header(self, request: Any) -> str:
        return 'Bearer realm="mparticle-feed"'
