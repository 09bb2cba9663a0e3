"""The HTTP client that POSTs payloads to Qualtrics. It imports no models.

`post_json` takes a URL, headers and bytes and returns an `Outcome`; it
never raises for anything the network or the server does. Every attempt is
bounded by a connect timeout and a total deadline. The deadline also holds
against a server that trickles bytes, because a watchdog shuts the socket
down when it passes. Redirects are never followed, and the target's
resolved addresses are checked before each attempt.
"""

import contextlib
import heapq
import itertools
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

import requests
from django.views.decorators.debug import sensitive_variables
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError
from urllib3.util.connection import create_connection

from integrations.url_policy import UnsafeTargetError, check_resolved_addresses

USER_AGENT = "mparticle-qualtrics-portal/1.0"

# urllib3 logs each request line, trigger URL and token included, at DEBUG.
# The token is a credential, so that logger never goes below INFO.
logging.getLogger("urllib3.connectionpool").setLevel(logging.INFO)
EXCERPT_BYTES = 512


@dataclass(frozen=True)
class Outcome:
    """The result of one attempt: a status code, or an error without one."""

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
    """Connects to the address the policy checked, and registers each socket with the attempt's watchdog.

    Connecting to the checked address, rather than resolving the name again,
    closes the window in which a DNS answer could change to a private
    address. TLS still verifies the certificate against the host name.
    """

    sock: socket.socket | None
    host: str
    port: int
    timeout: Any
    source_address: Any
    socket_options: Any

    def _new_conn(self) -> socket.socket:
        pinned = getattr(_watched, "pinned", {}).get(self.host)
        if not pinned:
            return super()._new_conn()  # type: ignore[misc]
        try:
            return create_connection(
                (pinned, self.port),
                self.timeout,
                source_address=self.source_address,
                socket_options=self.socket_options,
            )
        except TimeoutError as error:
            raise ConnectTimeoutError(self, f"Connection to {self.host} timed out") from error
        except OSError as error:
            raise NewConnectionError(self, f"Failed to establish a new connection: {error}") from error  # type: ignore[arg-type]

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


class _DeadlineKeeper:
    """One thread per process that fires every attempt's watchdog when its deadline passes.

    Starting a timer thread per attempt took about a fifth of the CPU of a
    POST to a fast receiver on loopback (measured with cProfile). Firing and cancelling take
    the same lock, so a watchdog never fires after its attempt has ended
    and handed its socket back to the pool.
    """

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._deadlines: list[tuple[float, int, _Watchdog]] = []
        self._order = itertools.count()
        self._owner_pid: int | None = None

    def add(self, watchdog: "_Watchdog", deadline: float) -> None:
        with self._lock:
            if self._owner_pid != os.getpid():
                # No thread yet, or this is a forked child, which inherits none.
                self._deadlines.clear()
                threading.Thread(target=self._watch, name="attempt-deadlines", daemon=True).start()
                self._owner_pid = os.getpid()
            heapq.heappush(self._deadlines, (deadline, next(self._order), watchdog))
            self._lock.notify()

    def cancel(self, watchdog: "_Watchdog") -> None:
        with self._lock:
            watchdog.ended = True

    def _watch(self) -> None:
        with self._lock:
            while True:
                while self._deadlines and self._deadlines[0][2].ended:
                    heapq.heappop(self._deadlines)
                if not self._deadlines:
                    self._lock.wait()
                    continue
                delay = self._deadlines[0][0] - time.monotonic()
                if delay > 0:
                    self._lock.wait(delay)
                    continue
                _, _, watchdog = heapq.heappop(self._deadlines)
                watchdog.fire()


_deadlines = _DeadlineKeeper()


class _Watchdog:
    """Shuts down the attempt's sockets when the deadline passes, ending any blocked read."""

    def __init__(self, seconds: float, pinned: dict[str, str]) -> None:
        self.sockets: list[socket.socket] = []
        self.pinned = pinned
        self.seconds = seconds
        self.fired = False
        self.ended = False

    def __enter__(self) -> "_Watchdog":
        _watched.sockets = self.sockets
        _watched.pinned = self.pinned
        _deadlines.add(self, time.monotonic() + self.seconds)
        return self

    def __exit__(self, *exc: object) -> None:
        _deadlines.cancel(self)
        _watched.sockets = None
        _watched.pinned = {}

    def fire(self) -> None:
        self.fired = True
        self.ended = True
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


@sensitive_variables("url", "headers", "request_headers")
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
    host = parts.hostname or ""
    try:
        address = check_resolved_addresses(host, parts.port or (443 if parts.scheme == "https" else 80))
    except UnsafeTargetError as error:
        return Outcome(None, _elapsed_ms(started), error=f"unsafe target: {error}")

    request_headers = {"Content-Type": "application/json; charset=utf-8", "User-Agent": USER_AGENT, **headers}
    watchdog = _Watchdog(total_timeout, pinned={host: address})
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
        return Outcome(None, _elapsed_ms(started), error=f"TLS error: {_reason(error, url)}")
    except (requests.exceptions.RequestException, OSError) as error:
        if watchdog.fired or isinstance(error, requests.exceptions.ReadTimeout):
            return Outcome(None, _elapsed_ms(started), error=f"timed out after {total_timeout:g} s")
        return Outcome(None, _elapsed_ms(started), error=f"connection failed: {_reason(error, url)}")

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


def _reason(error: BaseException, url: str) -> str:
    """Return the innermost cause's class and message, which names the real failure, without the URL's secrets."""
    while error.__context__ is not None and error.__context__ is not error:
        error = error.__context__
    text = f"{error.__class__.__name__}: {error}"
    parts = urlsplit(url)
    for secret in (url, f"{parts.path}?{parts.query}", parts.query):
        if secret and secret != "?":
            text = text.replace(secret, "[URL]")
    return text[:300]


def _elapsed_ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)
