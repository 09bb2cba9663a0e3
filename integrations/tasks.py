"""Celery tasks of the delivery side. Each loads ids and calls one step."""

from celery import shared_task

from integrations import batcher, delivery


@shared_task(name="integrations.tasks.deliver")
def deliver(delivery_id: int) -> None:
    delivery.deliver(delivery_id)


@shared_task(name="integrations.tasks.flush_due_windows")
def flush_due_windows() -> None:
    batcher.flush_due_windows()


@shared_task(name="integrations.tasks.sweep_deliveries")
def sweep_deliveries() -> None:
    delivery.sweep()
