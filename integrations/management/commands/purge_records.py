"""`python manage.py purge_records --older-than-days N`: delete old inbound batches and delivery records.

Deletes in chunks of primary keys, each chunk in its own short transaction,
so that a large purge never holds long locks or loads a table into memory.
Only what nothing still needs goes: deliveries in a final state (with their
attempts), flushed batch windows (with their items), and batches that are
routed or failed and that no open window still collects (with their
routings). A delivery still waiting keeps its row; its batch may go, which
leaves the delivery's `batch` empty.
"""

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction
from django.db.models import Model, QuerySet
from django.utils import timezone

from events.models import InboundBatch
from integrations.models import BatchWindow, Delivery
from portal.conf import portal_setting

FINAL = (Delivery.Status.DELIVERED, Delivery.Status.FAILED, Delivery.Status.CANCELLED)
CHUNK_SIZE = 1000


def purgeable_deliveries(cutoff: datetime) -> QuerySet[Delivery]:
    return Delivery.objects.filter(created_at__lt=cutoff, status__in=FINAL)


def purgeable_windows(cutoff: datetime) -> QuerySet[BatchWindow]:
    return BatchWindow.objects.filter(status=BatchWindow.Status.FLUSHED, flushed_at__lt=cutoff)


def purgeable_batches(cutoff: datetime) -> QuerySet[InboundBatch]:
    return (
        InboundBatch.objects.filter(received_at__lt=cutoff)
        .exclude(status=InboundBatch.Status.RECEIVED)
        .exclude(window_items__window__status=BatchWindow.Status.OPEN)
    )


# Deliveries first, then windows, then batches, so that each step finds fewer references to clear.
STEPS: tuple[tuple[str, Callable[[datetime], QuerySet[Any]]], ...] = (
    ("deliveries", purgeable_deliveries),
    ("batch windows", purgeable_windows),
    ("inbound batches", purgeable_batches),
)


def delete_in_chunks(records: "QuerySet[Model]", chunk_size: int) -> int:
    """Delete the queryset's records `chunk_size` at a time, a transaction per chunk; return how many."""
    total = 0
    while ids := list(records.order_by("pk").values_list("pk", flat=True)[:chunk_size]):
        with transaction.atomic():
            records.model._default_manager.filter(pk__in=ids).delete()
        total += len(ids)
    return total


class Command(BaseCommand):
    help = (
        "Delete inbound batches and delivery records older than N days, in chunks: final deliveries with their "
        "attempts, flushed batch windows, and batches that are routed and in no open window."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--older-than-days", type=int, required=True, metavar="N", help="Delete records older than N days."
        )
        parser.add_argument(
            "--chunk-size", type=int, default=CHUNK_SIZE, help="Rows per transaction (default: %(default)s)."
        )
        parser.add_argument("--dry-run", action="store_true", help="Count what would be deleted; delete nothing.")

    def handle(self, *args: Any, **options: Any) -> None:
        """Purge and print the count per kind of record; raise CommandError for a period the dedup window needs."""
        cutoff = timezone.now() - timedelta(days=self.checked_days(options["older_than_days"]))
        if options["chunk_size"] < 1:
            raise CommandError("--chunk-size must be at least 1.")
        for label, select in STEPS:
            records = select(cutoff)
            if options["dry_run"]:
                self.stdout.write(f"{records.count()} {label} would be deleted.")
            else:
                self.stdout.write(f"{delete_in_chunks(records, options['chunk_size'])} {label} deleted.")

    @staticmethod
    def checked_days(days: int) -> int:
        # A batch's rows in the de-duplication table go with it, so a shorter
        # period would let repeated events through again.
        dedup_days = portal_setting("EVENT_DEDUP_SECONDS") / 86400
        if days < 1 or days < dedup_days:
            raise CommandError(
                f"--older-than-days must be at least 1 and cover PORTAL_EVENT_DEDUP_SECONDS ({dedup_days:g} days)."
            )
        return days
