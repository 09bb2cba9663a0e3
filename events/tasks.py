"""Celery tasks of the inbound side. Each loads ids and calls the router."""

import time

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


# Seconds a routing run goes on before it hands over to a fresh task, so
# that a worker shutting down waits for no more than this.
ROUTE_RUN_SECONDS = 5.0


@shared_task(name="events.tasks.route_received")
def route_received() -> None:
    """Route received batches oldest first until none is left; each run's logs carry its batch's request id.

    A batch whose routing raises is recorded and left to the sweeper, and
    the others go on being routed.
    """
    started = time.monotonic()
    while router.route_next() is not None:
        if time.monotonic() - started > ROUTE_RUN_SECONDS:
            route_received.delay()
            return


@shared_task(name="events.tasks.sweep_unrouted_batches")
def sweep_unrouted_batches() -> None:
    """Queue routing again for batches whose task was lost (a broker restart, say)."""
    for batch_id in router.sweep_unrouted(portal_setting("REQUEUE_AFTER_SECONDS")):
        route_batch.delay(batch_id)
    dedup.purge_expired()
