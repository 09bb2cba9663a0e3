"""Celery tasks of the inbound side. Each loads ids and calls the router."""

from celery import shared_task

from events import dedup, router
from portal.conf import portal_setting
from portal.logging import bound_request_id


@shared_task(name="events.tasks.route_batch")
def route_batch(batch_id: int, request_id: str | None = None) -> None:
    """Route the batch; `request_id`, the inbound request's, tags the logs of the run."""
    with bound_request_id(request_id):
        try:
            router.route_batch(batch_id)
        except Exception as error:
            # Recorded so that a batch that can never be routed fails visibly
            # instead of being retried by the sweeper forever.
            router.record_failed_run(batch_id, error)
            raise


@shared_task(name="events.tasks.sweep_unrouted_batches")
def sweep_unrouted_batches() -> None:
    """Queue routing again for batches whose task was lost (a broker restart, say)."""
    for batch_id in router.sweep_unrouted(portal_setting("REQUEUE_AFTER_SECONDS")):
        route_batch.delay(batch_id)
    dedup.purge_expired()
