"""The portal's Celery application, configured from Django settings (`CELERY_*`)."""

import os
from typing import Any

from celery import Celery
from celery.signals import worker_init

from portal import memory

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")

app = Celery("portal")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()

# Threads of a worker share this many malloc arenas, so that memory one
# thread freed after a large batch serves the next large batch on another.
WORKER_MALLOC_ARENAS = 2


@worker_init.connect
def _limit_malloc_arenas(**kwargs: Any) -> None:
    memory.limit_arenas(WORKER_MALLOC_ARENAS)
