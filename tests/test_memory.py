"""The allocator settings that keep a worker's memory down after large batches."""

import ctypes.util

import pytest

from events import router
from portal import memory
from tests.factories import InboundBatchFactory

on_glibc = pytest.mark.skipif(
    memory._glibc() is None,
    reason=f"needs the GNU C library; this system's C library is {ctypes.util.find_library('c')}",
)

BODY = '{"events": [{"event_type": "custom_event", "data": {"event_name": "tap"}}]}'


@on_glibc
def test_arena_limit_accepted():
    assert memory.limit_arenas(2) is True


def test_arena_limit_of_zero_ignored():
    assert memory.limit_arenas(0) is False


@on_glibc
def test_trim_runs():
    scratch = [bytearray(64 * 1024) for _ in range(200)]
    del scratch

    assert isinstance(memory.release_free_memory(), bool)


@pytest.mark.django_db
@pytest.mark.parametrize(("body_bytes", "trims"), [(router.TRIM_AFTER_BYTES, 1), (router.TRIM_AFTER_BYTES - 1, 0)])
def test_large_batch_trims_after_routing(monkeypatch, django_capture_on_commit_callbacks, body_bytes, trims):
    calls = []
    monkeypatch.setattr(memory, "release_free_memory", lambda: calls.append(1))
    batch = InboundBatchFactory(body=BODY, body_bytes=body_bytes)

    with django_capture_on_commit_callbacks(execute=True):
        router.route_batch(batch.pk)

    assert len(calls) == trims
