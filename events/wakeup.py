"""Waking the routing workers after batches are stored: one task for many batches.

Publishing a Celery task per batch took about a quarter of the inbound
endpoint's CPU. The endpoint now only sets a flag, and a thread in each web
process publishes one `route_received` task at most every
`PORTAL_ROUTING_WAKE_SECONDS`. That task routes every batch still received.
A batch whose wake-up never goes out (the process dies, the broker is down)
stays stored as received, and the sweeper queues it after
`PORTAL_REQUEUE_AFTER_SECONDS`.
"""

import logging
import os
import threading
import time

from portal.conf import portal_setting

logger = logging.getLogger(__name__)

# Seconds the thread waits after a failed publish when the setting cannot be read either.
FALLBACK_PAUSE_SECONDS = 1.0


class RoutingWakeup:
    """A flag that a publishing thread, started in each process on first use, turns into `route_received` tasks."""

    def __init__(self) -> None:
        self._start_lock = threading.Lock()
        self._owner_pid: int | None = None
        self._pending = threading.Event()

    def wake(self) -> None:
        """Ask for a routing task soon; many calls close together give one task."""
        if self._owner_pid != os.getpid():
            self._start()
        self._pending.set()

    def _start(self) -> None:
        with self._start_lock:
            if self._owner_pid == os.getpid():
                return
            # A forked child inherits the flag but not the thread, so both are made anew.
            self._pending = threading.Event()
            threading.Thread(target=self._publish_forever, name="routing-wakeup", daemon=True).start()
            self._owner_pid = os.getpid()

    def _publish_forever(self) -> None:
        try:
            while True:
                self._pending.wait()
                self._pending.clear()
                try:
                    publish_wakeup()
                    pause = portal_setting("ROUTING_WAKE_SECONDS")
                except Exception:
                    logger.exception("inbound.wakeup_failed")
                    pause = FALLBACK_PAUSE_SECONDS
                time.sleep(pause)
        finally:
            # Whatever ended the thread, the next wake() starts another.
            with self._start_lock:
                if self._owner_pid == os.getpid():
                    self._owner_pid = None


def publish_wakeup() -> bool:
    """Queue one `route_received` task; return False, after logging why, if the broker is unreachable."""
    from events.tasks import route_received

    try:
        route_received.delay()
    except Exception:
        logger.exception("inbound.wakeup_failed")
        return False
    return True


routing_wakeup = RoutingWakeup()
