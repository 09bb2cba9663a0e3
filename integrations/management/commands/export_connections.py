"""`python manage.py export_connections`: write every connection's configuration as JSON, without secrets.

The POST URL and the Authorization header are left out, as is the state
the portal keeps itself (pauses, last errors, timestamps). Feeds are listed
by name. `import_connections` reads the same format.
"""

import json
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandParser
from django.db.models import Field

from integrations.models import Connection

SECRET_FIELDS = frozenset({"post_url", "authorization"})
FORMAT_VERSION = 1


def exported_fields() -> "list[Field[Any, Any]]":
    """Return the connection fields an operator sets, other than the secrets and many-to-many feeds."""
    return [
        field
        for field in Connection._meta.concrete_fields
        if field.editable and not field.primary_key and field.name not in SECRET_FIELDS
    ]


def export_connection(connection: Connection) -> dict[str, Any]:
    values: dict[str, Any] = {field.name: field.value_from_object(connection) for field in exported_fields()}
    values["feeds"] = sorted(feed.name for feed in connection.feeds.all())
    return values


def export_all() -> dict[str, Any]:
    connections = Connection.objects.prefetch_related("feeds").order_by("name")
    return {"version": FORMAT_VERSION, "connections": [export_connection(c) for c in connections]}


class Command(BaseCommand):
    help = "Write every connection's configuration as JSON, without its POST URL or Authorization header."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--output", type=Path, help="Write to this file instead of standard output.")

    def handle(self, *args: Any, **options: Any) -> None:
        exported = export_all()
        text = json.dumps(exported, indent=2, ensure_ascii=False) + "\n"
        if options["output"] is None:
            self.stdout.write(text, ending="")
            return
        options["output"].write_text(text, encoding="utf-8")
        self.stderr.write(f"Wrote {len(exported['connections'])} connections to {options['output']}.")
