"""`python manage.py rotate_encryption_key`: re-encrypt every connection's secrets with the first key.

Rotation: put the new key first in `PORTAL_ENCRYPTION_KEYS`, keep the old
ones after it, restart the processes, run this command, and only then
remove the old keys. Values are read with any listed key and written with
the first, all in one transaction, so a value that no listed key decrypts
stops the command with nothing changed.
"""

from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from integrations.models import Connection
from portal.conf import portal_setting


def reencrypt_all() -> int:
    """Write each connection's POST URL and Authorization header again with the first key; return how many."""
    count = 0
    with transaction.atomic():
        # Connections number in the tens or hundreds, so one list is enough.
        for connection in list(Connection.objects.order_by("pk")):
            # update() writes the two columns alone: no signal, no updated_at, no other field touched.
            Connection.objects.filter(pk=connection.pk).update(
                post_url=connection.post_url, authorization=connection.authorization
            )
            count += 1
    return count


class Command(BaseCommand):
    help = (
        "Re-encrypt every connection's POST URL and Authorization header with the first key of "
        "PORTAL_ENCRYPTION_KEYS, so that the older keys can then be removed."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        """Re-encrypt; raise CommandError when no key is configured or a stored value cannot be decrypted."""
        if not portal_setting("ENCRYPTION_KEYS"):
            raise CommandError("PORTAL_ENCRYPTION_KEYS is empty: put the new key first and the old keys after it.")
        try:
            count = reencrypt_all()
        except ImproperlyConfigured as error:
            raise CommandError(f"{error} Nothing was changed.") from error
        self.stdout.write(f"Re-encrypted the secrets of {count} connections with the first key.")
