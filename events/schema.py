"""OpenAPI description of the inbound endpoint's feed-secret authentication."""

from typing import Any

from drf_spectacular.extensions import OpenApiAuthenticationExtension


class FeedSecretScheme(OpenApiAuthenticationExtension):  # type: ignore[no-untyped-call]
    """Describes `FeedSecretAuthentication` as HTTP bearer authentication with the feed secret."""

    target_class = "events.authentication.FeedSecretAuthentication"
    name = "feedSecret"

    def get_security_definition(self, auto_schema: Any) -> dict[str, str]:
        return {
            "type": "http",
            "scheme": "bearer",
            "description": "The feed secret, sent as `Authorization: Bearer <secret>` or as the bare secret.",
        }
