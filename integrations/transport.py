"""The HTTP client that POSTs payloads to Qualtrics. It knows no models.

`post_json` takes a URL, headers and bytes and returns an `Outcome`; it
never raises for anything the network or the server does. Every attempt is
bounded by a connect timeout and a total deadline. The deadline also holds
against a server that trickles bytes, because a watchdog shuts the socket
down when it passes. Redirects are never followed, and the target's
resolved addresses are checked before each attempt.
"""

import contextlib
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from integrations.url_policy import UnsafeTargetError, check_resolved_addresses

USER_AGENT = "mparticle-qualtrics-portal/1.0"
EXCERPT_BYTES = 512


@dataclass(frozen=True)
class Outcome:
    """What one attempt produced: a status code, or an error without one."""

    status_code: int | None
    duration_ms: int
    error: str = ""
    response_excerpt: str = ""
    retry_after: str | None = None
    location: str | None = None

    @property
    def succeeded(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


_watched = threading.local()


class _WatchedConnectionMixin:
    """Registers each socket used for a request with the current attempt's watchdog."""

    sock: socket.socket | None

    def request(self, *args: Any, **kwargs: Any) -> None:
        super().request(*args, **kwargs)  # type: ignore[misc]
        sockets = getattr(_watched, "sockets", None)
        if sockets is not None and self.sock is not None:
            sockets.append(self.sock)


class _WatchedHTTPConnection(_WatchedConnectionMixin, HTTPConnection):
    pass


class _WatchedHTTPSConnection(_WatchedConnectionMixin, HTTPSConnection):
    pass


class _WatchedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _WatchedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


class _WatchedAdapter(HTTPAdapter):
    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _WatchedHTTPPool, "https": _WatchedHTTPSPool}


_session_local = threading.local()


def _session() -> requests.Session:
    session = getattr(_session_local, "session", None)
    if session is None:
        session = requests.Session()
        adapter = _WatchedAdapter(pool_connections=16, pool_maxsize=16, max_retries=0)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        session.trust_env = False
        _session_local.session = session
    return session


class _Watchdog:
    """Shuts down the attempt's sockets when the deadline passes, ending any blocked read."""

    def __init__(self, seconds: float) -> None:
        self.sockets: list[socket.socket] = []
        self.fired = False
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True

    def __enter__(self) -> "_Watchdog":
        _watched.sockets = self.sockets
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()
        _watched.sockets = None

    def _fire(self) -> None:
        self.fired = True
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def post_json(
    url: str,
    body: bytes,
    headers: dict[str, str],
    *,
    connect_timeout: float,
    total_timeout: float,
    verify: Literal[True] | str = True,
) -> Outcome:
    """POST `body` as UTF-8 JSON to `url` and return the outcome of this one attempt.

    `verify` is True for the default CA bundle or the path of another; TLS
    verification cannot be turned off.
    """
    started = time.monotonic()
    parts = urlsplit(url)
    try:
        check_resolved_addresses(parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80))
    except UnsafeTargetError as error:
        return Outcome(None, _elapsed_ms(started), error=f"unsafe target: {error}")

    request_headers = {"Content-Type": "application/json; charset=utf-8", "User-Agent": USER_AGENT, **headers}
    watchdog = _Watchdog(total_timeout)
    try:
        with watchdog:
            response = _session().post(
                url,
                data=body,
                headers=request_headers,
                timeout=(connect_timeout, total_timeout),
                allow_redirects=False,
                stream=True,
                verify=verify,
            )
            excerpt = _read_excerpt(response)
    except requests.exceptions.ConnectTimeout:
        return Outcome(None, _elapsed_ms(started), error=f"connect timed out after {connect_timeout:g} s")
    except requests.exceptions.SSLError as error:
        return Outcome(None, _elapsed_ms(started), error=f"TLS error: {_reason(error)}")
    except (requests.exceptions.RequestException, OSError) as error:
        if watchdog.fired or isinstance(error, requests.exceptions.ReadTimeout):
            return Outcome(None, _elapsed_ms(started), error=f"timed out after {total_timeout:g} s")
        return Outcome(None, _elapsed_ms(started), error=f"connection failed: {_reason(error)}")

    return Outcome(
        status_code=response.status_code,
        duration_ms=_elapsed_ms(started),
        response_excerpt=excerpt,
        retry_after=response.headers.get("Retry-After"),
        location=response.headers.get("Location") if 300 <= response.status_code < 400 else None,
    )


def _read_excerpt(response: requests.Response) -> str:
    """Read the response body, keeping only its start; the connection returns to the pool."""
    kept = b""
    try:
        for chunk in response.iter_content(chunk_size=4096):
            if len(kept) < EXCERPT_BYTES:
                kept += chunk[: EXCERPT_BYTES - len(kept)]
    finally:
        response.close()
    return kept.decode("utf-8", errors="replace")


def _reason(error: BaseException) -> str:
    """Return the innermost cause's class and message, which names the real failure."""
    while error.__context__ is not None and error.__context__ is not error:
        error = error.__context__
    return f"{error.__class__.__name__}: {error}"[:300]


def _elapsed_ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)
