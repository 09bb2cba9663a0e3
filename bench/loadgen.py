"""The HTTP load generator: aiohttp on loopback, closed loop for the ceiling rate, open loop for latency.

Closed loop keeps `concurrency` requests in flight for a fixed time, which
finds the highest rate a server sustains. Open loop starts requests on a
fixed schedule whatever the server does, and measures each latency from
the moment its request was due, so a stalled server shows as latency
instead of as fewer requests (no coordinated omission).
"""

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp  # type: ignore[import-not-found, unused-ignore]  # the bench extra, absent from make test

Body = Callable[[], bytes]
ACCEPTED = 202


@dataclass
class LoadResult:
    """The outcome of one load run; latencies are in milliseconds."""

    seconds: float
    accepted: int = 0
    rejected: int = 0
    errors: int = 0
    latencies_ms: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        """Accepted requests per second."""
        return self.accepted / self.seconds if self.seconds else 0.0

    def percentile(self, share: float) -> float:
        """Return the latency below which `share` (0 to 1) of the requests fell, nearest rank."""
        if not self.latencies_ms:
            return math.nan
        ordered = sorted(self.latencies_ms)
        rank = max(math.ceil(share * len(ordered)) - 1, 0)
        return ordered[rank]


@dataclass(frozen=True)
class Target:
    url: str
    headers: dict[str, str]
    body: Body


async def _post(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str], body: bytes, result: LoadResult, due: float
) -> None:
    try:
        async with session.post(url, data=body, headers=headers) as response:
            await response.read()
            status = response.status
    except (aiohttp.ClientError, TimeoutError):
        result.errors += 1
        return
    result.latencies_ms.append((time.perf_counter() - due) * 1000)
    if status == ACCEPTED:
        result.accepted += 1
    else:
        result.rejected += 1


def _session(connections: int) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=connections, force_close=False)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60))


async def closed_loop(target: Target, concurrency: int, seconds: float) -> LoadResult:
    """Keep `concurrency` POSTs in flight for `seconds`; requests still running at the end are awaited, not counted."""
    result = LoadResult(seconds=seconds)
    deadline = time.perf_counter() + seconds

    async def client(session: aiohttp.ClientSession) -> None:
        while time.perf_counter() < deadline:
            await _post(session, target.url, target.headers, target.body(), result, time.perf_counter())

    async with _session(concurrency) as session:
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
    return result


async def open_loop(target: Target, rate: float, seconds: float, max_in_flight: int = 256) -> LoadResult:
    """Start a POST every 1/`rate` seconds for `seconds` and wait for them all."""
    result = LoadResult(seconds=seconds)
    interval = 1.0 / rate
    started = time.perf_counter()
    tasks: set[asyncio.Task[None]] = set()
    async with _session(max_in_flight) as session:
        for number in range(int(rate * seconds)):
            due = started + number * interval
            await asyncio.sleep(max(due - time.perf_counter(), 0))
            task = asyncio.create_task(_post(session, target.url, target.headers, target.body(), result, due))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)
    return result


async def post_each(url: str, headers: dict[str, str], bodies: list[bytes], concurrency: int) -> LoadResult:
    """POST every body once, `concurrency` at a time, and return when every response has arrived."""
    started = time.perf_counter()
    result = LoadResult(seconds=0.0)
    queue = list(reversed(bodies))

    async def client(session: aiohttp.ClientSession) -> None:
        while queue:
            await _post(session, url, headers, queue.pop(), result, time.perf_counter())

    async with _session(concurrency) as session:
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
    result.seconds = time.perf_counter() - started
    return result
