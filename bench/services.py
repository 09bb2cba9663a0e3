"""The services and processes the benchmark runs: PostgreSQL, Redis, its children, and their CPU and memory.

PostgreSQL and Redis are started only when they do not respond, with the
commands CI uses, and never stopped. Children (gunicorn, Celery, the
receiver) each lead their own process group with their output in a log
file, and are stopped by their group id on the way out. CPU and memory are
read from /proc, so this module works on Linux only.
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import requests

REPO = Path(__file__).resolve().parents[1]
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
STARTUP_SECONDS = 60.0


class BenchError(Exception):
    """A step of the benchmark that cannot go on; the message names the step and the log to read."""


def ensure_postgres(database_url: str) -> None:
    """Start the local PostgreSQL cluster if it does not respond, then create the database if it is missing."""
    parts = urlsplit(database_url)
    host, port, user = parts.hostname or "127.0.0.1", str(parts.port or 5432), parts.username or "postgres"
    if not _answers(["pg_isready", "-h", host, "-p", port, "-q"]):
        versions = sorted(os.listdir("/etc/postgresql"))
        subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1], "main", "start"], check=True)
        _wait_until(lambda: _answers(["pg_isready", "-h", host, "-p", port, "-q"]), "PostgreSQL")
    name = parts.path.lstrip("/")
    listed = subprocess.run(
        ["psql", "-h", host, "-p", port, "-U", user, "-Atc", f"SELECT 1 FROM pg_database WHERE datname = '{name}'"],
        capture_output=True,
        text=True,
        check=True,
    )
    if listed.stdout.strip() != "1":
        subprocess.run(["createdb", "-h", host, "-p", port, "-U", user, name], check=True)


def ensure_redis(broker_url: str) -> None:
    """Start a local Redis without persistence if none responds on the broker's port."""
    parts = urlsplit(broker_url)
    host, port = parts.hostname or "127.0.0.1", str(parts.port or 6379)
    if _answers(["redis-cli", "-h", host, "-p", port, "ping"]):
        return
    subprocess.run(
        [
            "redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "-::1", "--port", port,
            "--save", "", "--appendonly", "no", "--dir", "/var/lib/redis", "--logfile", "/var/log/redis/ci.log",
        ],
        check=True,
    )  # fmt: skip
    _wait_until(lambda: _answers(["redis-cli", "-h", host, "-p", port, "ping"]), "Redis")


def _answers(argv: Sequence[str]) -> bool:
    if shutil.which(argv[0]) is None:
        raise BenchError(f"{argv[0]} is not installed; the benchmark needs PostgreSQL and Redis on this machine.")
    return subprocess.run(argv, capture_output=True, check=False).returncode == 0


def _wait_until(condition: Callable[[], bool], what: str, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise BenchError(f"{what} did not respond within {seconds:.0f} s after it was started.")
        time.sleep(0.2)


@dataclass
class Child:
    name: str
    process: "subprocess.Popen[bytes]"
    log_path: Path


@dataclass
class Children:
    """The benchmark's child processes; each leads its own process group."""

    log_dir: Path
    started: list[Child] = field(default_factory=list)

    def start(self, name: str, argv: Sequence[str], environment: Mapping[str, str]) -> Child:
        log_path = self.log_dir / f"{name}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                list(argv),
                cwd=REPO,
                env=dict(environment),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        child = Child(name, process, log_path)
        self.started.append(child)
        return child

    def check_alive(self) -> None:
        for child in self.started:
            if child.process.poll() is not None:
                raise BenchError(f"{child.name} exited with status {child.process.returncode}; see {child.log_path}.")

    def stop(self, name: str, grace_seconds: float = 10.0) -> None:
        """Stop the named child's process group: SIGTERM, then SIGKILL after the grace."""
        for child in [c for c in self.started if c.name == name]:
            _stop_group(child, grace_seconds)
            self.started.remove(child)

    def stop_all(self) -> None:
        for child in reversed(list(self.started)):
            self.stop(child.name)


def _stop_group(child: Child, grace_seconds: float) -> None:
    with suppress(ProcessLookupError):
        os.killpg(child.process.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_seconds
    while time.monotonic() < deadline and _group_alive(child.process):
        time.sleep(0.05)
    if _group_alive(child.process):
        with suppress(ProcessLookupError):
            os.killpg(child.process.pid, signal.SIGKILL)
        child.process.wait()


def _group_alive(process: "subprocess.Popen[bytes]") -> bool:
    process.poll()
    try:
        os.killpg(process.pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_for_http(url: str, children: Children, expect: int = 200) -> None:
    """Return once GET `url` responds with status `expect`; raise BenchError when a child exits or a minute passes."""
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        children.check_alive()
        with suppress(requests.RequestException):
            if requests.get(url, timeout=2).status_code == expect:
                return
        time.sleep(0.2)
    raise BenchError(
        f"{url} did not respond with {expect} within {STARTUP_SECONDS:.0f} s; see the logs in {children.log_dir}"
    )


def executable(name: str) -> str:
    """Return the path of a console script installed beside the running Python."""
    return str(Path(sys.executable).parent / name)


# Process statistics from /proc.


def _stat_fields(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    # The command name may hold spaces; the fields after it are space-separated.
    return text[text.rindex(")") + 2 :].split()


def parent_of(pid: int) -> int:
    return int(_stat_fields(pid)[1])


def cpu_seconds(pid: int) -> float:
    """Return the user and system CPU seconds the process has used, 0 if it has gone."""
    try:
        fields = _stat_fields(pid)
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def all_pids() -> list[int]:
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def descendants(pid: int) -> list[int]:
    """Return the process and every process below it."""
    parents: dict[int, int] = {}
    for other in all_pids():
        with suppress(FileNotFoundError, ProcessLookupError, ValueError):
            parents[other] = parent_of(other)
    found = [pid]
    for candidate in found:
        found += [child for child, parent in parents.items() if parent == candidate]
    return found


def pids_named(command: str) -> list[int]:
    """Return the processes whose command name (`/proc/PID/comm`) starts with `command`."""
    found = []
    for pid in all_pids():
        with suppress(FileNotFoundError, ProcessLookupError):
            if Path(f"/proc/{pid}/comm").read_text().startswith(command):
                found.append(pid)
    return found


def machine_cpu_seconds() -> float:
    """Return the CPU seconds all cores have spent busy since boot."""
    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / CLOCK_TICKS


def memory_kib(pid: int, field_name: str) -> int:
    """Return a memory figure of /proc/PID/status in KiB: VmRSS (resident now) or VmHWM (peak resident)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise BenchError(f"/proc/{pid}/status has no {field_name}.")


def reset_peak_memory(pid: int) -> None:
    """Reset the process's VmHWM to its current resident size (Linux 4.0+)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


class CpuMeter:
    """CPU time per group of processes over an interval, in cores (CPU seconds per second).

    Each group is a function that lists its processes, asked again at the
    end so that processes started meanwhile (PostgreSQL backends) count
    from their start. CPU of a process that ended in between is lost.
    """

    def __init__(self, groups: Mapping[str, Callable[[], Sequence[int]]]) -> None:
        self.groups = dict(groups)
        self._start: dict[int, float] = {}
        self._machine = 0.0
        self._wall = 0.0
        self.seconds = 0.0

    def start(self) -> None:
        self._start = {pid: cpu_seconds(pid) for pids in self.groups.values() for pid in pids()}
        self._machine = machine_cpu_seconds()
        self._wall = time.monotonic()

    def stop(self) -> dict[str, float]:
        """Return the cores each group used since `start`, plus `other` (the rest of the machine) and `machine`."""
        wall = self.seconds = time.monotonic() - self._wall
        used = {
            name: sum(cpu_seconds(pid) - self._start.get(pid, 0.0) for pid in pids()) / wall
            for name, pids in self.groups.items()
        }
        machine = (machine_cpu_seconds() - self._machine) / wall
        used["other"] = max(machine - sum(used.values()), 0.0)
        used["machine"] = machine
        return used
