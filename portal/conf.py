"""Typed access to the portal's own settings, the `PORTAL` dict in settings."""

from typing import Any

from django.conf import settings


def portal_setting(name: str) -> Any:
    """Return the `PORTAL[name]` setting, read at call time so tests can override it."""
    return settings.PORTAL[name]
