"""Celery tasks of the delivery side. Each loads ids and calls one step."""

from celery import shared_task

from integrations import batcher, delivery, retention, runs


@shared_task(name="integrations.tasks.deliver")
def deliver(delivery_id: int) -> None:
    runs.run_for_delivery(delivery_id)


@shared_task(name="integrations.tasks.send_due")
def send_due(connection_id: int) -> None:
    runs.run(connection_id)


@shared_task(name="integrations.tasks.flush_due_windows")
def flush_due_windows() -> None:
    batcher.flush_due_windows()


@shared_task(name="integrations.tasks.sweep_deliveries")
def sweep_deliveries() -> None:
    delivery.sweep()


# Seconds before a purge that stopped at its chunk limit goes on, leaving the database room for other work.
PURGE_CONTINUE_SECONDS = 60


@shared_task(name="integrations.tasks.purge_old_records")
def purge_old_records() -> None:
    """Purge records past the retention period; queue another run while some remain."""
    if not retention.run().finished:
        purge_old_records.apply_async(countdown=PURGE_CONTINUE_SECONDS)
