"""Profiles of the hot paths: py-spy on the running web and Celery workers, and summaries of what it sampled.

py-spy samples a process from outside, so the profiled server runs
unchanged. It records only threads that hold the GIL (`--gil`), not those
waiting on the database, the broker, the network or the GIL itself. The
shares are therefore shares of Python CPU time, which one process cannot
spread beyond one core.
The summary groups samples by the package of the innermost frame (where
the CPU went) and counts, per function of the portal, the samples it was
on the stack for (what the CPU was spent for).
"""

import subprocess
from collections import Counter
from pathlib import Path

from bench.services import executable

PROJECT_PACKAGES = ("events", "integrations", "portal")
# Packages grouped into the layers the summary names.
LAYERS = {
    "psycopg": "PostgreSQL driver (psycopg)",
    "psycopg_binary": "PostgreSQL driver (psycopg)",
    "kombu": "Celery, kombu and the Redis client",
    "celery": "Celery, kombu and the Redis client",
    "redis": "Celery, kombu and the Redis client",
    "billiard": "Celery, kombu and the Redis client",
    "vine": "Celery, kombu and the Redis client",
    "requests": "HTTP client (requests, urllib3, http.client)",
    "urllib3": "HTTP client (requests, urllib3, http.client)",
    "http": "HTTP client (requests, urllib3, http.client)",
    "simplejson": "JSON (simplejson, json)",
    "json": "JSON (simplejson, json)",
    "logging": "logging",
    "cryptography": "Fernet decryption (cryptography)",
    "rest_framework": "Django REST framework",
    "gunicorn": "gunicorn",
    "socket": "sockets",
    "selectors": "sockets",
    "ssl": "sockets",
    "threading": "threads and locks",
    "queue": "threads and locks",
    "uuid": "uuid",
    "copy": "copy",
}


def record(pid: int, seconds: float, output: Path, *, subprocesses: bool = False) -> subprocess.Popen[bytes]:
    """Start py-spy on `pid` for `seconds`, writing collapsed stacks to `output`; the caller waits for it."""
    argv = [executable("py-spy"), "record", "--pid", str(pid), "--duration", str(int(seconds))]
    argv += ["--rate", "200", "--gil", "--format", "raw", "--output", str(output), "--nonblocking"]
    if subprocesses:
        argv.append("--subprocesses")
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _frames(stack: str) -> list[tuple[str, str]]:
    """Return (function, file) per frame of one collapsed stack, outermost first."""
    frames = []
    for frame in stack.split(";"):
        name, _, location = frame.rpartition(" (")
        if name and ":" in location:
            frames.append((name, location.rsplit(":", 1)[0]))
    return frames


def _package(path: str) -> str:
    first = path.split("/", 1)[0]
    return first.removesuffix(".py")


def _layer(path: str) -> str:
    package = _package(path)
    if package == "django":
        return "Django ORM" if path.startswith("django/db/") else "Django (request, URL, middleware, other)"
    if package in PROJECT_PACKAGES:
        return "portal code (events, integrations, portal)"
    return LAYERS.get(package, package)


def summarize(raw: Path, top: int = 20) -> list[str]:
    """Return a text summary of a py-spy raw file: CPU by layer, and portal functions by inclusive share."""
    by_layer: Counter[str] = Counter()
    by_function: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        frames = _frames(stack)
        if not frames:
            continue
        total += count
        by_layer[_layer(frames[-1][1])] += count
        portal = {f"{name} ({path})" for name, path in frames if _package(path) in PROJECT_PACKAGES}
        for function in portal:
            by_function[function] += count
    if not total:
        return [f"{raw.name}: no samples"]
    lines = [f"{raw.name}: {total} samples of threads holding the GIL", "  CPU by layer (innermost frame):"]
    lines += [f"    {count / total:6.1%}  {layer}" for layer, count in by_layer.most_common(top)]
    lines.append("  portal functions, share of samples on the stack:")
    lines += [f"    {count / total:6.1%}  {function}" for function, count in by_function.most_common(top)]
    return lines
