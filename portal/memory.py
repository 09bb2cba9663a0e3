"""Keeping a worker's memory in check under the GNU C library's allocator.

By default glibc gives each thread that allocates its own memory arena, up
to eight per core, and memory freed in one arena is not reused by another.
In a Celery worker with the thread pool, two large batches routed by two
threads therefore each leave their own high-water mark. Limiting the arenas
lets them share freed memory, and trimming after a large batch hands it
back to the operating system. Elsewhere than glibc these calls do nothing.
"""

import ctypes
import logging

logger = logging.getLogger(__name__)

# mallopt's parameter number for the arena limit, from glibc's malloc.h.
M_ARENA_MAX = -8


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    if not hasattr(libc, "mallopt") or not hasattr(libc, "malloc_trim"):
        return None
    return libc


def limit_arenas(count: int) -> bool:
    """Allow at most `count` malloc arenas in this process; return whether the allocator took the setting.

    Call it before the threads start, because arenas already made stay.
    """
    libc = _glibc()
    if libc is None or count <= 0:
        return False
    return bool(libc.mallopt(M_ARENA_MAX, count))


def release_free_memory() -> bool:
    """Return freed heap memory to the operating system; return whether any was released."""
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.malloc_trim(0))
