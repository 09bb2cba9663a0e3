"""`python manage.py replay_deliveries`: queue failed or cancelled deliveries again with a fresh attempt budget.

Selects by connection, status and creation time, then calls
`integrations.delivery.replay`, the same step as the admin's replay action.
"""

import argparse
from datetime import UTC, datetime, time
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db.models import QuerySet
from django.utils import timezone
from django.utils.dateparse import parse_date, parse_datetime

from integrations import delivery
from integrations.models import Connection, Delivery

REPLAYABLE = (Delivery.Status.FAILED, Delivery.Status.CANCELLED)


def moment(value: str) -> datetime:
    """Parse an ISO 8601 date or date and time; a date means its midnight, and no offset means UTC."""
    parsed = parse_datetime(value)
    if parsed is None:
        day = parse_date(value)
        if day is None:
            raise argparse.ArgumentTypeError(f"{value!r} is not an ISO 8601 date or date and time")
        parsed = datetime.combine(day, time.min)
    return parsed if timezone.is_aware(parsed) else timezone.make_aware(parsed, UTC)


class Command(BaseCommand):
    help = (
        "Queue failed or cancelled deliveries again with a fresh attempt budget, selected by connection, "
        "status and creation time. Prints how many were queued."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--connection",
            action="append",
            default=[],
            metavar="NAME",
            help="Only this connection's deliveries; repeat for several. Default: every connection.",
        )
        parser.add_argument(
            "--status",
            action="append",
            choices=REPLAYABLE,
            default=[],
            help="Only deliveries in this status; repeat for both. Default: failed and cancelled.",
        )
        parser.add_argument("--since", type=moment, help="Only deliveries created at or after this time (ISO 8601).")
        parser.add_argument("--until", type=moment, help="Only deliveries created before this time (ISO 8601).")
        parser.add_argument("--dry-run", action="store_true", help="Count the deliveries without queueing them.")

    def handle(self, *args: Any, **options: Any) -> None:
        """Replay the selected deliveries; raise CommandError for an unknown connection name."""
        selected = select(options["connection"], options["status"] or REPLAYABLE, options["since"], options["until"])
        if options["dry_run"]:
            self.stdout.write(f"{selected.exclude(payload='').count()} deliveries would be replayed.")
            return
        self.stdout.write(f"{delivery.replay(selected)} deliveries queued again.")


def select(
    names: list[str], statuses: tuple[str, ...] | list[str], since: datetime | None, until: datetime | None
) -> QuerySet[Delivery]:
    """Return the deliveries the options select; raise CommandError when a named connection does not exist."""
    deliveries = Delivery.objects.filter(status__in=statuses)
    if names:
        connections = list(Connection.objects.filter(name__in=names))
        missing = set(names) - {connection.name for connection in connections}
        if missing:
            raise CommandError(f"No connection named {', '.join(sorted(missing))}.")
        deliveries = deliveries.filter(connection__in=connections)
    if since is not None:
        deliveries = deliveries.filter(created_at__gte=since)
    if until is not None:
        deliveries = deliveries.filter(created_at__lt=until)
    return deliveries
