"""A text field stored encrypted with Fernet (AES-128-CBC with HMAC-SHA256)."""

import base64
import hashlib
from functools import cache
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import models

from portal.conf import portal_setting


@cache
def _fernet(keys: tuple[str, ...], secret_key: str) -> MultiFernet:
    if not keys:
        derived = base64.urlsafe_b64encode(hashlib.sha256(("portal-fields:" + secret_key).encode()).digest())
        return MultiFernet([Fernet(derived)])
    try:
        return MultiFernet([Fernet(key.encode()) for key in keys])
    except ValueError as error:
        raise ImproperlyConfigured(f"PORTAL_ENCRYPTION_KEYS contains an invalid Fernet key: {error}") from error


def field_cipher() -> MultiFernet:
    """Return the cipher for the configured keys; the first key encrypts, all keys decrypt."""
    return _fernet(tuple(portal_setting("ENCRYPTION_KEYS")), settings.SECRET_KEY)


class EncryptedTextField(models.TextField):  # type: ignore[type-arg]
    """Stores its value Fernet-encrypted; Python code only reads and writes plain text.

    Lookups other than isnull cannot work on ciphertext, so do not filter on it.
    """

    def get_prep_value(self, value: Any) -> Any:
        value = super().get_prep_value(value)
        if value is None or value == "":
            return value
        return field_cipher().encrypt(str(value).encode("utf-8")).decode("ascii")

    def from_db_value(self, value: str | None, expression: Any, connection: Any) -> str | None:
        if value is None or value == "":
            return value
        try:
            return field_cipher().decrypt(value.encode("ascii")).decode("utf-8")
        except InvalidToken as error:
            raise ImproperlyConfigured(
                "A stored secret cannot be decrypted with PORTAL_ENCRYPTION_KEYS; keep the old key in the list."
            ) from error
