"""`python manage.py import_connections FILE`: create or update connections from `export_connections` JSON.

Connections are matched by name. Each field in the file is set; a field
the file leaves out keeps its value, or its default on a new connection.
Secrets are not exported, so an operator who wants to set one adds a
`post_url` or `authorization` key. Without it an existing connection keeps
its secret and a new one has none. A new connection without a POST URL is
created inactive, since it has nowhere to POST to. Feeds are matched by
name and must exist: a connection with no feeds receives from all of them,
so a missing feed must not silently widen it. The import is all or nothing.
"""

import json
import sys
from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction

from events.models import Feed
from integrations.management.commands.export_connections import SECRET_FIELDS, exported_fields
from integrations.models import Connection


def read_entries(path: str) -> list[dict[str, Any]]:
    """Return the connection objects of the file (`-` for standard input); raise CommandError when it is malformed."""
    try:
        if path == "-":
            data = json.load(sys.stdin)
        else:
            with open(path, encoding="utf-8") as file:
                data = json.load(file)
    except (OSError, ValueError) as error:
        raise CommandError(f"Cannot read {path}: {error}") from error
    entries = data.get("connections") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not all(
        isinstance(e, dict) and isinstance(e.get("name"), str) for e in entries
    ):
        raise CommandError(f'{path} is not an export: expected {{"connections": [{{"name": ..., ...}}, ...]}}.')
    return entries


def check_keys(entry: dict[str, Any]) -> None:
    known = {field.name for field in exported_fields()} | SECRET_FIELDS | {"feeds"}
    unknown = set(entry) - known
    if unknown:
        raise CommandError(f"Connection {entry['name']!r}: unknown fields {', '.join(sorted(unknown))}.")


def resolve_feeds(entry: dict[str, Any]) -> list[Feed] | None:
    """Return the entry's feeds, or None when it names none; raise CommandError for a feed that does not exist."""
    names = entry.get("feeds")
    if names is None:
        return None
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise CommandError(f"Connection {entry['name']!r}: feeds must be a list of feed names.")
    feeds = list(Feed.objects.filter(name__in=names))
    missing = set(names) - {feed.name for feed in feeds}
    if missing:
        raise CommandError(f"Connection {entry['name']!r}: no feed named {', '.join(sorted(missing))}.")
    return feeds


def import_entry(entry: dict[str, Any]) -> tuple[Connection, bool]:
    """Create or update the connection named in `entry`; return it and whether it was created."""
    check_keys(entry)
    feeds = resolve_feeds(entry)
    connection = Connection.objects.filter(name=entry["name"]).first()
    created = connection is None
    connection = connection or Connection()
    for name, value in entry.items():
        if name != "feeds":
            setattr(connection, name, value)
    if not connection.post_url:
        connection.active = False

    try:
        connection.full_clean(exclude=[] if connection.post_url else ["post_url"])
    except ValidationError as error:
        raise CommandError(f"Connection {entry['name']!r}: {'; '.join(error.messages)}") from error
    connection.save()
    if feeds is not None:
        connection.feeds.set(feeds)
    return connection, created


class Command(BaseCommand):
    help = (
        "Create or update connections, matched by name, from the JSON that export_connections writes. "
        "Secrets are set only when the file gives them; new connections without a POST URL are created inactive."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("file", help="The JSON file, or - for standard input.")
        parser.add_argument("--dry-run", action="store_true", help="Check the file and report; change nothing.")

    def handle(self, *args: Any, **options: Any) -> None:
        """Import every connection or none; raise CommandError naming the first connection that fails."""
        entries = read_entries(options["file"])
        with transaction.atomic():
            results = [import_entry(entry) for entry in entries]
            if options["dry_run"]:
                transaction.set_rollback(True)
        for connection, created in results:
            self.stdout.write(self.describe(connection, created))
        if options["dry_run"]:
            self.stdout.write("Dry run: nothing was changed.")

    @staticmethod
    def describe(connection: Connection, created: bool) -> str:
        line = f"{'created' if created else 'updated'} {connection.name!r}"
        if not connection.post_url:
            line += " (inactive: set its POST URL in the admin, then activate it)"
        return line
