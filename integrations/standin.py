"""Stand-in for a Qualtrics JSON Event trigger, for local development and tests.

This is not Qualtrics. It is a small HTTP server that accepts POST requests on
any path, responds with the JSON `meta` block that Qualtrics API responses carry,
and records every request so a demo or a test can inspect what the portal sent.
It can be configured to check the Authorization header, to respond slowly and to
respond with chosen statuses, so retry and timeout paths can be exercised.

The module imports nothing from Django, so tests can run the server in a thread
(`running_standin`) or in a subprocess (`python -m integrations.standin`).
`python manage.py qualtrics_standin` wraps the same entry point.
"""

import argparse
import hmac
import json
import logging
import math
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import Any, TextIO, TypedDict, Unpack
from urllib.parse import parse_qsl, urlencode, urlsplit

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
DEFAULT_FAIL_STATUS = 503
TRIGGER_PATH = "/inbound-event/v1/events/json/triggers"
EXAMPLE_URL_TOKEN_ID = "00000000-0000-4000-8000-000000000000"

# Seconds between shutdown checks in `running_standin`. Shutdown waits up to this long, so tests keep it short.
_TEST_POLL_INTERVAL = 0.05
_BODYLESS_STATUSES = frozenset({HTTPStatus.NO_CONTENT, HTTPStatus.RESET_CONTENT, HTTPStatus.NOT_MODIFIED})


@dataclass(frozen=True)
class Behaviour:
    """Response settings of the stand-in, which `QualtricsStandin.configure` replaces at runtime.

    `status` forces every authorized response to that status. `fail_first` sends
    `fail_status` to the next that many authorized requests, before `status` or the
    normal response applies. `delay` is in seconds and is slept after the request body
    is read. `retry_after` is sent as the Retry-After header on every non-2xx response.
    `expect_authorization`, when set, is the exact Authorization header value required.
    """

    status: int | None = None
    delay: float = 0.0
    fail_first: int = 0
    fail_status: int = DEFAULT_FAIL_STATUS
    retry_after: str | None = None
    expect_authorization: str | None = None

    def __post_init__(self) -> None:
        """Raise ValueError when a field has a value the server cannot respond with."""
        if self.status is not None:
            _check_status("status", self.status)
        _check_status("fail_status", self.fail_status)
        if not (math.isfinite(self.delay) and self.delay >= 0):
            raise ValueError(f"delay must be a finite number of seconds >= 0, not {self.delay!r}.")
        if self.fail_first < 0:
            raise ValueError(f"fail_first must be >= 0, not {self.fail_first!r}.")
        for name in ("retry_after", "expect_authorization"):
            value = getattr(self, name)
            if value is not None and not _is_header_safe(value):
                raise ValueError(f"{name} must be non-empty printable ASCII so it can be used as an HTTP header value.")


class BehaviourChanges(TypedDict, total=False):
    """Keyword arguments of `QualtricsStandin.configure`, with the meanings given on `Behaviour`."""

    status: int | None
    delay: float
    fail_first: int
    fail_status: int
    retry_after: str | None
    expect_authorization: str | None


def _check_status(name: str, code: int) -> None:
    if isinstance(code, bool) or not isinstance(code, int) or not 200 <= code <= 599:
        raise ValueError(f"{name} must be an HTTP status code from 200 to 599, not {code!r}.")


def _is_header_safe(value: str) -> bool:
    return bool(value) and all(32 <= ord(character) < 127 for character in value)


def status_line(code: int) -> str:
    """Return the `httpStatus` text Qualtrics uses, such as "200 - OK"."""
    try:
        phrase = HTTPStatus(code).phrase
    except ValueError:
        phrase = "Unknown"
    return f"{code} - {phrase}"


def response_body(code: int, request_id: str, error_message: str | None = None) -> dict[str, Any]:
    """Build the JSON response body for `code`: a `result` object on 2xx, an `error` block inside `meta` otherwise.

    NOTE: the error block (`meta.error.errorMessage`) is modeled on Qualtrics API
    errors in general. It is not checked against a documented JSON Event trigger error.
    """
    meta: dict[str, Any] = {"httpStatus": status_line(code), "requestId": request_id}
    if 200 <= code < 300:
        return {"meta": meta, "result": {}}
    meta["error"] = {"errorMessage": error_message or HTTPStatus(code).description or status_line(code)}
    return {"meta": meta}


def redact_query(path: str) -> str:
    """Return `path` with every query value replaced by `***`, because a urlTokenId works like a password."""
    parts = urlsplit(path)
    if not parts.query:
        return parts.path
    names = [(name, "***") for name, _value in parse_qsl(parts.query, keep_blank_values=True)]
    return f"{parts.path}?{urlencode(names, safe='*')}"


class QualtricsStandin(ThreadingHTTPServer):
    """Threaded HTTP server that replaces a Qualtrics JSON Event trigger in development and tests.

    `records` lists one dict per request, in the order they were stored,
    with the keys written to the `record_path` JSON Lines file. A record is stored
    before its response is sent, so a client that has its response can read it.
    Header values are stored as received, Authorization included, so the record
    file contains any secret sent to the stand-in.
    NOTE: `records` grows without limit, which suits tests and demos but not a long soak.
    """

    daemon_threads = True

    def __init__(
        self,
        host: str = DEFAULT_HOST,
        port: int = 0,
        *,
        record_path: str | Path | None = None,
        quiet: bool = False,
        behaviour: Behaviour | None = None,
    ) -> None:
        """Bind to `host`:`port` (0 picks a free port) without serving yet.

        Raise ValueError when `port` is outside 0-65535, and OSError when the port cannot be bound
        or `record_path` cannot be opened for appending.
        """
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be from 0 to 65535, not {port!r}.")
        self.behaviour = behaviour or Behaviour()
        self.quiet = quiet
        self.records: list[dict[str, Any]] = []
        self.record_path = Path(record_path) if record_path is not None else None
        self._lock = threading.Lock()
        self._failures_remaining = self.behaviour.fail_first
        self._record_file: TextIO | None = None
        super().__init__((host, port), StandinRequestHandler)
        bound_host, bound_port = self.socket.getsockname()[:2]
        self.host: str = bound_host
        self.port: int = bound_port
        if self.record_path is not None:
            try:
                self._record_file = self.record_path.open("a", encoding="utf-8")
            except OSError:
                super().server_close()
                raise

    @property
    def base_url(self) -> str:
        """The server root, such as `http://127.0.0.1:8765`."""
        return f"http://{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """A trigger URL on this server in the Qualtrics format, with a fixed example urlTokenId."""
        return f"{self.base_url}{TRIGGER_PATH}?urlTokenId={EXAMPLE_URL_TOKEN_ID}"

    def configure(self, **changes: Unpack[BehaviourChanges]) -> None:
        """Replace the named behaviour fields, or raise ValueError and keep the old ones when a value is invalid.

        Passing `fail_first` resets the number of failure responses still to send.
        """
        behaviour = replace(self.behaviour, **changes)
        with self._lock:
            self.behaviour = behaviour
            if "fail_first" in changes:
                self._failures_remaining = behaviour.fail_first

    def take_injected_status(self) -> int | None:
        """Return the status forced on the next authorized request, or None for the normal response."""
        with self._lock:
            if self._failures_remaining > 0:
                self._failures_remaining -= 1
                return self.behaviour.fail_status
            return self.behaviour.status

    def store_record(self, record: dict[str, Any]) -> None:
        """Append `record` to `records` and, when configured, as one flushed line to the record file."""
        line = json.dumps(record, ensure_ascii=False)
        with self._lock:
            self.records.append(record)
            if self._record_file is not None:
                self._record_file.write(line + "\n")
                self._record_file.flush()

    def server_close(self) -> None:
        """Close the listening socket and the record file."""
        super().server_close()
        with self._lock:
            if self._record_file is not None:
                self._record_file.close()
                self._record_file = None


class StandinRequestHandler(BaseHTTPRequestHandler):
    """Handle the requests of one connection for a `QualtricsStandin`."""

    server: QualtricsStandin
    protocol_version = "HTTP/1.1"
    server_version = "QualtricsStandin/1.0"
    timeout = 30

    def do_POST(self) -> None:
        self._handle(allowed=True)

    def do_GET(self) -> None:
        self._handle(allowed=False)

    def do_PUT(self) -> None:
        self._handle(allowed=False)

    def do_PATCH(self) -> None:
        self._handle(allowed=False)

    def do_DELETE(self) -> None:
        self._handle(allowed=False)

    def _handle(self, *, allowed: bool) -> None:
        received_at = datetime.now(UTC).isoformat()
        started = time.monotonic()
        body = self._read_body()
        behaviour = self.server.behaviour
        if behaviour.delay:
            time.sleep(behaviour.delay)

        code, error_message = self._choose_status(allowed, behaviour, body)
        self.server.store_record(
            {
                "method": self.command,
                "path": self.path,
                "headers": dict(self.headers.items()),
                "body": body.decode("utf-8", errors="replace") if body is not None else "",
                "status": code,
                "received_at": received_at,
            }
        )
        self._send_json(code, error_message, behaviour, allow_header=not allowed)
        self._log_request(code, len(body or b""), time.monotonic() - started)

    def _choose_status(self, allowed: bool, behaviour: Behaviour, body: bytes | None) -> tuple[int, str | None]:
        """Return the response status and its error message.

        The checks run in this order: body framing (400), method (405), Authorization (401),
        `fail_first` and `status` from the behaviour, JSON body (400), and otherwise 200.
        """
        if body is None:
            return HTTPStatus.BAD_REQUEST, "The Content-Length or chunked encoding of the request is invalid."
        if not allowed:
            return HTTPStatus.METHOD_NOT_ALLOWED, f"{self.command} is not supported. Send a POST request."
        if not self._is_authorized(behaviour.expect_authorization):
            return HTTPStatus.UNAUTHORIZED, "The Authorization header is missing or does not match."
        injected = self.server.take_injected_status()
        if injected is not None:
            return injected, f"The stand-in was configured to respond with {injected}."
        if not _is_json(body):
            return HTTPStatus.BAD_REQUEST, "The request body is not valid UTF-8 JSON."
        return HTTPStatus.OK, None

    def _is_authorized(self, expected: str | None) -> bool:
        if expected is None:
            return True
        received = self.headers.get("Authorization")
        if received is None:
            return False
        return hmac.compare_digest(received.encode("latin-1"), expected.encode("ascii"))

    def _read_body(self) -> bytes | None:
        """Return the request body, or None when its framing is invalid (the connection is then closed)."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked_body()
        length_header = self.headers.get("Content-Length", "0")
        try:
            length = int(length_header)
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            return None
        return self.rfile.read(length)

    def _read_chunked_body(self) -> bytes | None:
        chunks: list[bytes] = []
        while True:
            size_line = self.rfile.readline(65537).split(b";", 1)[0].strip()
            try:
                size = int(size_line, 16)
            except ValueError:
                self.close_connection = True
                return None
            if size == 0:
                break
            chunks.append(self.rfile.read(size))
            self.rfile.readline(65537)
        while self.rfile.readline(65537).strip():
            pass
        return b"".join(chunks)

    def _send_json(self, code: int, error_message: str | None, behaviour: Behaviour, *, allow_header: bool) -> None:
        self.send_response(code)
        if allow_header:
            self.send_header("Allow", "POST")
        if behaviour.retry_after is not None and not 200 <= code < 300:
            self.send_header("Retry-After", behaviour.retry_after)
        if code in _BODYLESS_STATUSES:
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        payload = json.dumps(response_body(code, str(uuid.uuid4()), error_message)).encode("utf-8")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _log_request(self, code: int, body_size: int, seconds: float) -> None:
        """Log one line per request without the Authorization value or query values."""
        if self.server.quiet:
            return
        authorization = "present" if "Authorization" in self.headers else "absent"
        logger.info(
            "%s %s -> %d (%d body bytes, Authorization %s, %.3f s)",
            self.command,
            redact_query(self.path),
            code,
            body_size,
            authorization,
            seconds,
        )

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """Skip the base class access line because `_log_request` writes a redacted one."""

    def log_error(self, format: str, *args: Any) -> None:
        if not self.server.quiet:
            logger.warning("Request from %s failed: " + format, self.address_string(), *args)


def _is_json(body: bytes) -> bool:
    try:
        json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return False
    return True


@contextmanager
def running_standin(
    *, record_path: str | Path | None = None, quiet: bool = True, **changes: Unpack[BehaviourChanges]
) -> Iterator[QualtricsStandin]:
    """Serve a stand-in on 127.0.0.1 on a free port in a daemon thread, yield it, then shut it down."""
    server = QualtricsStandin(DEFAULT_HOST, 0, record_path=record_path, quiet=quiet, behaviour=Behaviour(**changes))
    thread = threading.Thread(
        target=server.serve_forever,
        kwargs={"poll_interval": _TEST_POLL_INTERVAL},
        name=f"qualtrics-standin-{server.port}",
        daemon=True,
    )
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the stand-in's command-line options to `parser`, for both `main` and the management command."""
    parser.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help=(
            "IPv4 address to listen on (default: %(default)s). "
            "Any non-loopback address makes the stand-in reachable from other hosts."
        ),
    )
    parser.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help="TCP port to listen on, where 0 picks a free port (default: %(default)s).",
    )
    parser.add_argument(
        "--expect-authorization",
        metavar="VALUE",
        help=(
            "Respond 401 unless the Authorization header equals VALUE exactly (default: no check). "
            "VALUE is visible in the process list, so use a test credential."
        ),
    )
    parser.add_argument("--record", metavar="FILE", help="Append each request as one JSON line to FILE.")
    parser.add_argument(
        "--delay", type=float, default=0.0, metavar="SECONDS", help="Seconds to wait before each response (default: 0)."
    )
    parser.add_argument(
        "--status", type=int, metavar="CODE", help="Respond to every authorized request with this HTTP status."
    )
    parser.add_argument(
        "--fail-first",
        type=int,
        default=0,
        metavar="N",
        help="Respond with --fail-status to the first N authorized requests.",
    )
    parser.add_argument(
        "--fail-status",
        type=int,
        default=DEFAULT_FAIL_STATUS,
        metavar="CODE",
        help="HTTP status for the --fail-first requests (default: %(default)s).",
    )
    parser.add_argument(
        "--retry-after", metavar="VALUE", help="Send this Retry-After header value on every non-2xx response."
    )
    parser.add_argument("--quiet", action="store_true", help="Do not log a line per request to stderr.")


def create_server(options: Mapping[str, Any]) -> QualtricsStandin:
    """Bind a server from parsed `add_arguments` options.

    Raise ValueError on an invalid option and OSError when binding or opening the record file fails.
    """
    behaviour = Behaviour(
        status=options.get("status"),
        delay=options.get("delay", 0.0),
        fail_first=options.get("fail_first", 0),
        fail_status=options.get("fail_status", DEFAULT_FAIL_STATUS),
        retry_after=options.get("retry_after"),
        expect_authorization=options.get("expect_authorization"),
    )
    return QualtricsStandin(
        options.get("host", DEFAULT_HOST),
        options.get("port", DEFAULT_PORT),
        record_path=options.get("record"),
        quiet=options.get("quiet", False),
        behaviour=behaviour,
    )


class _StderrHandler(logging.StreamHandler[TextIO]):
    """Stream handler that `attach_stderr_handler` recognises, so it never adds a second one."""


def attach_stderr_handler() -> None:
    """Send this module's INFO and higher records to stderr, whatever the root logger's level.

    Calling it again adds no second handler.
    """
    if any(isinstance(handler, _StderrHandler) for handler in logger.handlers):
        return
    handler = _StderrHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def serve_until_stopped(server: QualtricsStandin, write_line: Callable[[str], None]) -> None:
    """Serve until SIGTERM, SIGINT or Ctrl-C, then shut down and close the server.

    Passes `listening on <base_url>` to `write_line` once the socket accepts connections.
    Signal handlers are installed only when called from the main thread.
    """
    stop = threading.Event()
    previous = _install_stop_handlers(stop)
    thread = threading.Thread(target=server.serve_forever, name="qualtrics-standin", daemon=True)
    thread.start()
    write_line(f"listening on {server.base_url}")
    logger.info("Qualtrics stand-in for development and tests started on %s", server.base_url)
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
        _restore_handlers(previous)
        logger.info("Qualtrics stand-in on %s stopped after %d requests", server.base_url, len(server.records))


def _install_stop_handlers(stop: threading.Event) -> dict[int, Any]:
    if threading.current_thread() is not threading.main_thread():
        return {}

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    return {signum: signal.signal(signum, request_stop) for signum in (signal.SIGTERM, signal.SIGINT)}


def _restore_handlers(previous: Mapping[int, Any]) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def _print_flushed(line: str) -> None:
    print(line, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the stand-in from the command line and return the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m integrations.standin",
        description="Qualtrics JSON Event trigger stand-in for local development and tests. It is not Qualtrics.",
    )
    add_arguments(parser)
    options = vars(parser.parse_args(argv))
    try:
        server = create_server(options)
    except (ValueError, OSError) as error:
        parser.error(f"cannot start the stand-in: {error}")
    attach_stderr_handler()
    serve_until_stopped(server, _print_flushed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
