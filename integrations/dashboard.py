"""The data of the operator's cockpit: connection health, traffic over time, latency and retention.

Every query here is an aggregate that the database computes over a bounded
range of a time column (`InboundBatch.received_at`, `Routing.created_at`,
`Delivery.created_at`, `DeliveryAttempt.started_at`), grouped by truncated
time, so no query returns more rows than a chart has points. Events are
counted by when they arrived: a delivery's events sit in the bucket of the
delivery's creation, in the state the delivery is in now.

Covering indexes on those columns (`delivery_created_outcome`,
`routing_created_counts`, `attempt_started_at`) let the counts read the
index alone; BENCHMARKS.md ("Admin pages") has the timings with and
without them.

The two-week chart would otherwise scan two weeks of rows on every view.
So each closed day is kept in the cache for `CLOSED_DAY_SECONDS`, plus a
random spread that makes the days expire at different times. The current
day and the day and hour charts are counted live.
"""

import math
import random
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.core.cache import cache
from django.db import connection as db_connection
from django.db.models import (
    Aggregate,
    Count,
    DateTimeField,
    DurationField,
    ExpressionWrapper,
    F,
    FilteredRelation,
    OuterRef,
    Q,
    QuerySet,
    Subquery,
    Sum,
)
from django.db.models.functions import Coalesce, Trunc
from django.utils import timezone

from events.models import InboundBatch
from integrations.models import Connection, Delivery, DeliveryAttempt, Routing

HEALTH_WINDOW = timedelta(hours=24)
RATE_WINDOW = timedelta(minutes=1)
WAITING = (Delivery.Status.PENDING, Delivery.Status.IN_FLIGHT, Delivery.Status.RETRY_SCHEDULED)
CLAIMABLE = (Delivery.Status.PENDING, Delivery.Status.RETRY_SCHEDULED)
PERCENTILES = (0.5, 0.9, 0.99)
# Without an ordered-set aggregate (SQLite), latencies are sorted in Python:
# at most this many, the newest, so the page stays bounded.
PYTHON_LATENCY_SAMPLE = 20_000
# A closed day still changes while its retries finish or an operator replays,
# so it is counted again after this many seconds.
CLOSED_DAY_SECONDS = 600
CLOSED_DAY_SPREAD_SECONDS = 300
DAY_CACHE_PREFIX = "portal:dashboard:day:"
# Latency percentiles sort a day of deliveries, so they are kept this long.
LATENCY_CACHE_SECONDS = 60


class UngroupedCoalesce(Coalesce):
    """COALESCE of a scalar subquery that is correlated only on the outer primary key.

    Beside `GROUP BY pk` such a subquery is valid as it is; Django would
    otherwise add it to the GROUP BY, and PostgreSQL would then run it once
    per joined row instead of once per group.
    """

    def get_group_by_cols(self) -> list[Any]:
        return []


def with_health(connections: QuerySet[Connection], now: datetime) -> QuerySet[Connection]:
    """Annotate each connection with its last 24 hours and its current rate, in the one query of the list.

    Adds `delivered_24h`, `waiting_24h` and `failed_24h` (events in deliveries
    created in the last 24 hours, by their state now), `posts_last_minute`
    (attempts started in the last minute) and `waiting_now` (deliveries of
    any age waiting to be sent).
    """
    recent = FilteredRelation("deliveries", condition=Q(deliveries__created_at__gte=now - HEALTH_WINDOW))
    attempts = DeliveryAttempt.objects.filter(delivery__connection=OuterRef("pk"), started_at__gte=now - RATE_WINDOW)
    waiting = Delivery.objects.filter(connection=OuterRef("pk"), status__in=CLAIMABLE)
    return connections.annotate(recent=recent).annotate(
        delivered_24h=_recent_events(Q(recent__status=Delivery.Status.DELIVERED)),
        waiting_24h=_recent_events(Q(recent__status__in=WAITING)),
        failed_24h=_recent_events(Q(recent__status=Delivery.Status.FAILED)),
        posts_last_minute=_count_subquery(attempts, "delivery__connection"),
        waiting_now=_count_subquery(waiting, "connection"),
    )


def _recent_events(condition: Q) -> Coalesce:
    return Coalesce(Sum("recent__event_count", filter=condition), 0)


def _count_subquery(rows: QuerySet[Any], group: str) -> Coalesce:
    """Return `COUNT(*)` of `rows`, which are filtered on an OuterRef, as a scalar subquery; 0 when none."""
    counted = rows.order_by().values(group).annotate(total=Count("*")).values("total")
    return UngroupedCoalesce(Subquery(counted[:1]), 0)


@dataclass(frozen=True)
class Range:
    """One chart's span: `buckets` consecutive buckets of one `unit`, the last one holding now."""

    key: str
    label: str
    unit: str
    buckets: int

    def starts(self, now: datetime) -> list[datetime]:
        last = truncate(now, self.unit)
        step = {"minute": timedelta(minutes=1), "hour": timedelta(hours=1), "day": timedelta(days=1)}[self.unit]
        return [last - step * (self.buckets - 1 - index) for index in range(self.buckets)]


HOUR = Range("hour", "Last hour, by minute", "minute", 60)
DAY = Range("day", "Last day, by hour", "hour", 24)
TWO_WEEKS = Range("two_weeks", "Last two weeks, by day", "day", 14)


@dataclass(frozen=True)
class Series:
    key: str
    label: str
    color: str


SERIES = (
    Series("received", "Received", "#6b7280"),
    Series("routed", "Routed", "#2563eb"),
    Series("filtered", "Filtered", "#9333ea"),
    Series("delivered", "Delivered", "#16a34a"),
    Series("waiting", "Pending or retrying", "#d97706"),
    Series("failed", "Failed", "#dc2626"),
)
STATUS_SERIES = {
    Delivery.Status.DELIVERED: "delivered",
    Delivery.Status.PENDING: "waiting",
    Delivery.Status.IN_FLIGHT: "waiting",
    Delivery.Status.RETRY_SCHEDULED: "waiting",
    Delivery.Status.FAILED: "failed",
    Delivery.Status.CANCELLED: "cancelled",
}

# Event counts by series, per connection id; received events belong to no connection (None).
Counts = dict[int | None, dict[str, int]]
Buckets = dict[datetime, Counts]


def _empty_buckets() -> Buckets:
    return defaultdict(lambda: defaultdict(lambda: defaultdict(int)))


def truncate(moment: datetime, unit: str) -> datetime:
    """Return the start of the minute, hour or day holding `moment`, in the current time zone."""
    local = timezone.localtime(moment)
    if unit == "minute":
        return local.replace(second=0, microsecond=0)
    if unit == "hour":
        return local.replace(minute=0, second=0, microsecond=0)
    return local.replace(hour=0, minute=0, second=0, microsecond=0)


def scan(since: datetime, until: datetime | None, unit: str) -> Buckets:
    """Count events per `unit` bucket in [since, until) from the three tables, per connection and series."""
    buckets = _empty_buckets()
    bounds = {"gte": since} | ({"lt": until} if until else {})

    batches = InboundBatch.objects.filter(**{f"received_at__{op}": value for op, value in bounds.items()})
    for start, events in _grouped(batches, "received_at", unit, events=Sum("event_count")):
        buckets[start][None]["received"] += events or 0

    routings = Routing.objects.filter(**{f"created_at__{op}": value for op, value in bounds.items()})
    sums = {"routed": Sum("routed_count"), "filtered": Sum("filtered_count")}
    for start, connection_id, routed, filtered in _grouped(routings, "created_at", unit, "connection", **sums):
        buckets[start][connection_id]["routed"] += routed or 0
        buckets[start][connection_id]["filtered"] += filtered or 0

    deliveries = Delivery.objects.filter(**{f"created_at__{op}": value for op, value in bounds.items()})
    for start, connection_id, status, events in _grouped(
        deliveries, "created_at", unit, "connection", "status", events=Sum("event_count")
    ):
        buckets[start][connection_id][STATUS_SERIES[status]] += events or 0
    return buckets


def _grouped(rows: QuerySet[Any], column: str, unit: str, *group: str, **aggregates: Any) -> Iterable[tuple[Any, ...]]:
    """Return (bucket start, *group values, *aggregates) rows, grouped in the database."""
    bucketed = rows.order_by().annotate(bucket=Trunc(column, unit, output_field=DateTimeField()))
    grouped = bucketed.values("bucket", *group).annotate(**aggregates)
    return grouped.values_list("bucket", *group, *aggregates)


def closed_days(days: list[datetime]) -> Buckets:
    """Return the counts of whole past days, from the cache where it has them, counting the others in one scan."""
    keys = {day: f"{DAY_CACHE_PREFIX}{day.isoformat()}" for day in days}
    cached = cache.get_many(keys.values())
    buckets: Buckets = {day: cached[key] for day, key in keys.items() if key in cached}
    missing = [day for day in days if day not in buckets]
    if missing:
        counted = scan(min(missing), max(missing) + timedelta(days=1), "day")
        for day in missing:
            buckets[day] = _plain(counted.get(day, {}))
            timeout = CLOSED_DAY_SECONDS + random.randint(0, CLOSED_DAY_SPREAD_SECONDS)
            cache.set(keys[day], buckets[day], timeout=timeout)
    return buckets


def _plain(counts: Mapping[int | None, Mapping[str, int]]) -> Counts:
    return {connection_id: dict(series) for connection_id, series in counts.items()}


@dataclass
class Snapshot:
    """The counts behind every chart and the per-connection totals, read once per page."""

    now: datetime
    minutes: Buckets
    hours: Buckets
    days: Buckets


def snapshot(now: datetime) -> Snapshot:
    """Count the last hour by minute and the last day by hour live, and add the cached closed days."""
    minutes = scan(HOUR.starts(now)[0], None, "minute")
    hours = scan(DAY.starts(now)[0], None, "hour")
    day_starts = TWO_WEEKS.starts(now)
    days = closed_days(day_starts[:-1])
    today = day_starts[-1]
    days[today] = _sum_buckets(counts for start, counts in hours.items() if start >= today)
    return Snapshot(now, minutes, hours, days)


def _sum_buckets(buckets: Iterable[Counts]) -> Counts:
    total: Counts = defaultdict(lambda: defaultdict(int))
    for counts in buckets:
        for connection_id, series in counts.items():
            for key, value in series.items():
                total[connection_id][key] += value
    return total


@dataclass
class Chart:
    """Event counts per series for each bucket of a range."""

    range: Range
    starts: list[datetime]
    values: dict[str, list[int]] = field(default_factory=dict)

    @property
    def series(self) -> list[Series]:
        return [series for series in SERIES if series.key in self.values]

    def rows(self) -> list[tuple[datetime, list[int]]]:
        """Return each bucket's start with its values in series order, for the table under the chart."""
        keys = [series.key for series in self.series]
        return [(start, [self.values[key][index] for key in keys]) for index, start in enumerate(self.starts)]


def charts(data: Snapshot, connection_id: int | None = None) -> list[Chart]:
    """Return the hour, day and two-week charts of one connection, or of all when `connection_id` is None.

    Received events belong to feeds, not connections, so they are charted
    only for all connections.
    """
    keys = [series.key for series in SERIES if connection_id is None or series.key != "received"]
    sources = ((HOUR, data.minutes), (DAY, data.hours), (TWO_WEEKS, data.days))
    charts = []
    for chart_range, buckets in sources:
        starts = chart_range.starts(data.now)
        values = {key: [_value(buckets.get(start, {}), key, connection_id) for start in starts] for key in keys}
        charts.append(Chart(chart_range, starts, values))
    return charts


def _value(counts: Counts, key: str, connection_id: int | None) -> int:
    if connection_id is not None:
        return counts.get(connection_id, {}).get(key, 0)
    return sum(series.get(key, 0) for series in counts.values())


def totals(data: Snapshot) -> dict[int, dict[str, int]]:
    """Return each connection's events by series over the day chart's 24 buckets."""
    summed = _sum_buckets(data.hours.values())
    return {connection_id: dict(series) for connection_id, series in summed.items() if connection_id is not None}


class PercentileCont(Aggregate):
    """PostgreSQL's `percentile_cont(fraction) WITHIN GROUP (ORDER BY expression)`, on an interval."""

    function = "PERCENTILE_CONT"
    template = "%(function)s(%(fraction)s) WITHIN GROUP (ORDER BY %(expressions)s)"

    def __init__(self, expression: Any, fraction: float) -> None:
        super().__init__(expression, fraction=float(fraction), output_field=DurationField())


@dataclass(frozen=True)
class Latency:
    """End-to-end latency percentiles over one span; a percentile is None when nothing was delivered."""

    label: str
    count: int
    percentiles: dict[str, timedelta | None]


def latency(now: datetime, span: timedelta, label: str, connection_id: int | None = None) -> Latency:
    """Return p50, p90 and p99 of the time from a batch's arrival to its delivery, cached LATENCY_CACHE_SECONDS.

    The start is the batch's `received_at`, or with Send as Batch the
    window's `opened_at`, the arrival of its first event. Deliveries created
    within `span` before `now` and delivered count. PostgreSQL interpolates
    (`percentile_cont`); elsewhere the newest PYTHON_LATENCY_SAMPLE are
    ranked in Python (nearest rank).
    """
    key = f"portal:dashboard:latency:{span.total_seconds():.0f}:{connection_id}"
    cached = cache.get(key)
    if isinstance(cached, Latency) and cached.label == label:
        return cached
    result = _latency(now, span, label, connection_id)
    cache.set(key, result, timeout=LATENCY_CACHE_SECONDS)
    return result


def _latency(now: datetime, span: timedelta, label: str, connection_id: int | None) -> Latency:
    delivered = Delivery.objects.filter(
        created_at__gte=now - span, status=Delivery.Status.DELIVERED, delivered_at__isnull=False
    ).filter(Q(window__isnull=False) | Q(batch__isnull=False))
    if connection_id is not None:
        delivered = delivered.filter(connection_id=connection_id)
    started = Coalesce(F("window__opened_at"), F("batch__received_at"))
    timed = delivered.order_by().annotate(latency=ExpressionWrapper(F("delivered_at") - started, DurationField()))
    names = {f"p{round(fraction * 100)}": fraction for fraction in PERCENTILES}
    if db_connection.vendor == "postgresql":
        aggregates = {name: PercentileCont(F("latency"), fraction) for name, fraction in names.items()}
        result = timed.aggregate(count=Count("*"), **aggregates)
        count = result.pop("count")
        return Latency(label, count, result)
    values = sorted(timed.order_by("-created_at").values_list("latency", flat=True)[:PYTHON_LATENCY_SAMPLE])
    return Latency(label, len(values), {name: nearest_rank(values, fraction) for name, fraction in names.items()})


def nearest_rank(values: list[timedelta], fraction: float) -> timedelta | None:
    """Return the nearest-rank percentile of the sorted `values`, None when there are none."""
    if not values:
        return None
    return values[max(1, math.ceil(len(values) * fraction)) - 1]


# The SVG drawing: coordinates are computed here, the markup is in the template.
PLOT_WIDTH = 760
PLOT_HEIGHT = 240
PLOT_LEFT = 64
PLOT_RIGHT = PLOT_WIDTH - 16
PLOT_TOP = 16
PLOT_BOTTOM = PLOT_HEIGHT - 32
# Per unit: how a bucket's start is labelled on the x axis, and every how many buckets.
X_LABELS = {"minute": ("%H:%M", 10), "hour": ("%H:00", 3), "day": ("%b %d", 2)}
NICE_STEPS = (1, 2, 4, 6, 8, 10)


@dataclass(frozen=True)
class Tick:
    position: str
    label: str


@dataclass(frozen=True)
class Point:
    x: str
    y: str
    title: str


@dataclass(frozen=True)
class Line:
    series: Series
    points: str
    dots: list[Point]


@dataclass(frozen=True)
class Plot:
    """A chart laid out for an inline SVG of PLOT_WIDTH by PLOT_HEIGHT user units."""

    chart: Chart
    lines: list[Line]
    x_ticks: list[Tick]
    y_ticks: list[Tick]
    width: int = PLOT_WIDTH
    height: int = PLOT_HEIGHT
    left: int = PLOT_LEFT
    right: int = PLOT_RIGHT
    top: int = PLOT_TOP
    bottom: int = PLOT_BOTTOM


def nice_ceiling(value: int) -> int:
    """Return the smallest axis maximum of the form (1, 2, 4, 6, 8 or 10) * 10^k that is at least `value`.

    The result is at least 2, and half of it is a whole number too, so every
    tick label is one.
    """
    if value <= 2:
        return 2
    scale = 10 ** math.floor(math.log10(value))
    return next(step * scale for step in NICE_STEPS if step * scale >= value)


def plot(chart: Chart) -> Plot:
    """Return the polylines, points and axis ticks that draw `chart`."""
    top_value = nice_ceiling(max((max(values) for values in chart.values.values() if values), default=0))
    count = len(chart.starts)
    step = (PLOT_RIGHT - PLOT_LEFT) / max(1, count - 1)
    xs = [PLOT_LEFT + index * step for index in range(count)]

    def y(value: int) -> float:
        return PLOT_BOTTOM - value / top_value * (PLOT_BOTTOM - PLOT_TOP)

    label_format, every = X_LABELS[chart.range.unit]
    lines = []
    for series in chart.series:
        values = chart.values[series.key]
        dots = [
            Point(f"{x:.1f}", f"{y(value):.1f}", f"{series.label}, {start.strftime(label_format)}: {value:,}")
            for x, start, value in zip(xs, chart.starts, values, strict=True)
        ]
        lines.append(Line(series, " ".join(f"{dot.x},{dot.y}" for dot in dots), dots))
    x_ticks = [
        Tick(f"{xs[index]:.1f}", start.strftime(label_format))
        for index, start in enumerate(chart.starts)
        if (count - 1 - index) % every == 0
    ]
    y_ticks = [Tick(f"{y(value):.1f}", f"{value:,}") for value in (0, top_value // 2, top_value)]
    return Plot(chart, lines, x_ticks, y_ticks)
