"""Figures, the targets they are held to, and the printed table.

A figure is measured in several rounds and reported as the median with the
minimum and maximum. A target compares one figure's median with a bound,
or with a ceiling measured in the same run.
"""

import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Figure:
    """One measured quantity: its rounds, unit, and notes on how it was measured."""

    key: str
    label: str
    unit: str
    values: list[float] = field(default_factory=list)
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else math.nan

    @property
    def low(self) -> float:
        return min(self.values) if self.values else math.nan

    @property
    def high(self) -> float:
        return max(self.values) if self.values else math.nan


@dataclass(frozen=True)
class Target:
    """`figure` compared with `bound`, or with `share` of the ceiling figure when `ceiling` is set."""

    label: str
    figure: str
    bound: float = 0.0
    ceiling: str = ""
    share: float = 1.0
    below: bool = False

    def limit(self, figures: dict[str, Figure]) -> float:
        return figures[self.ceiling].median * self.share if self.ceiling else self.bound

    def holds(self, figures: dict[str, Figure]) -> bool:
        value, limit = figures[self.figure].median, self.limit(figures)
        return value < limit if self.below else value >= limit


# Load outside the benchmark above which a step's rates are marked as disturbed.
BUSY_MACHINE_CORES = 0.25

TARGETS = (
    Target("Ingest >= 70% of the bare-insert ceiling", "ingest_rate", ceiling="ceiling_rate", share=0.7),
    Target("Ingest p99 < 50 ms at half the maximum rate", "ingest_p99", bound=50.0, below=True),
    Target("One POST per event >= 1,000 events/s", "e2e_rate", bound=1000.0),
    Target("One POST per event >= 50% of the plain-requests ceiling", "e2e_rate", ceiling="post_ceiling", share=0.5),
    Target("Send as Batch >= 20,000 events/s", "batched_rate", bound=20000.0),
    Target("Celery worker peak RSS < 200 MB", "worker_peak_mb", bound=200.0, below=True),
    Target("Web worker growth for a 10 MB batch < 5x the body", "web_growth_x", bound=5.0, below=True),
    # Linear: the cost per event at 1,000 events stays within 1.5x of that at 100.
    Target("Routing cost grows linearly with the batch", "route_growth", bound=1.5, below=True),
    # Due windows only: 100x more open windows may not double a flush run.
    Target("A flush run depends on the due windows only", "flush_growth", bound=2.0, below=True),
)


def formatted(value: float) -> str:
    """Format a figure with the precision that its size deserves."""
    if math.isnan(value):
        return "n/a"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def table(figures: dict[str, Figure]) -> list[str]:
    """Return the figures as aligned lines: label, median, min, max, unit."""
    width = max([len("figure")] + [len(figure.label) for figure in figures.values()])
    lines = [f"{'figure':<{width}}  {'median':>10}  {'min':>10}  {'max':>10}  unit"]
    for figure in figures.values():
        lines.append(
            f"{figure.label:<{width}}  {formatted(figure.median):>10}  {formatted(figure.low):>10}  "
            f"{formatted(figure.high):>10}  {figure.unit}"
        )
    return lines


def target_lines(figures: dict[str, Figure]) -> list[str]:
    """Return one line per target whose figures were measured: value, limit, ratio and verdict."""
    lines = []
    for target in TARGETS:
        needed = [target.figure] + ([target.ceiling] if target.ceiling else [])
        if not all(name in figures and figures[name].values for name in needed):
            lines.append(f"  n/a    {target.label}: not measured")
            continue
        value, limit = figures[target.figure].median, target.limit(figures)
        verdict = "holds" if target.holds(figures) else "FALLS SHORT"
        ratio = f", {value / figures[target.ceiling].median:.0%} of the ceiling" if target.ceiling else ""
        lines.append(f"  {verdict:<11} {target.label}: {formatted(value)} against {formatted(limit)}{ratio}")
    return lines


def context_lines(context: dict[str, Any]) -> list[str]:
    """Return the CPU use per step and the round trips per unit of work as text lines.

    The bound "at most N per second" divides the machine's cores by the CPU
    one unit costs all of the benchmark's processes together: a ceiling no
    amount of concurrency can pass on this machine, whatever else runs.
    """
    cores_available = context.get("machine", {}).get("cores") or 1
    lines = ["CPU per step: cores busy (CPU seconds per second), and CPU milliseconds per unit handled."]
    lines.append("'other' is load outside the benchmark; PostgreSQL counts this database's backends only.")
    for step, entry in context.get("cpu", {}).items():
        rounds = entry["rounds"]
        groups = [group for group in rounds[0]["cores"] if group not in ("other", "machine")]
        cores = {group: statistics.mean(r["cores"][group] for r in rounds) for group in [*groups, "other", "machine"]}
        units = sum(r["units"] for r in rounds)
        per_unit = {g: sum(r["cores"][g] * r["wall"] for r in rounds) / units * 1000 for g in groups} if units else {}
        busy = ", ".join(f"{group} {value:.2f}" for group, value in cores.items() if value >= 0.005)
        cost = ", ".join(f"{group} {value:.2f}" for group, value in per_unit.items() if value >= 0.005)
        lines.append(f"  {step}: {busy}")
        if cores["other"] >= BUSY_MACHINE_CORES:
            lines.append(
                f"    NOTE: {cores['other']:.2f} cores went to other processes; the rates above are lower for it"
            )
        total = sum(per_unit.values())
        lines.append(f"    ms per {entry['unit']}: {cost}; all of the benchmark's processes {total:.2f}")
        if total:
            bound = cores_available * 1000 / total
            plural = "batches" if entry["unit"] == "batch" else entry["unit"] + "s"
            lines.append(f"    so at most {bound:,.0f} {plural}/s if all {cores_available} cores were free")
    trips = context.get("round_trips", [])
    if trips:
        width = max(len(trip["step"]) for trip in trips)
        lines += ["", f"{'round trips and CPU per unit of work':<{width}}  {'SQL':>4}  {'Redis':>5}  {'CPU ms':>6}"]
        lines += [
            f"{trip['step']:<{width}}  {trip['sql']:>4}  {trip['redis']:>5}  {trip['cpu_ms']:>6.2f}" for trip in trips
        ]
    return lines + [f"  NOTE: {note}" for note in context.get("notes", [])]


def write_results(path: Path, figures: dict[str, Figure], context: dict[str, Any]) -> None:
    """Write the figures, the target verdicts and the run's context as JSON."""
    verdicts = {
        target.label: target.holds(figures)
        for target in TARGETS
        if target.figure in figures and (not target.ceiling or target.ceiling in figures)
    }
    document = {
        "context": context,
        "figures": {key: {**asdict(f), "median": f.median, "min": f.low, "max": f.high} for key, f in figures.items()},
        "targets": verdicts,
    }
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")
