"""The HTTP client against real servers on loopback."""

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest

from integrations.transport import _Watchdog, post_json

AUTH = "Basic dGVzdDp0ZXN0LXRva2Vu"


def send(url, body=b'{"events":[]}', total=2.0):
    return post_json(url, body, {"Authorization": AUTH}, connect_timeout=1.0, total_timeout=total)


@pytest.fixture
def raw_server():
    """A TCP server on loopback whose per-connection behaviour each test sets."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    state = {"handler": None, "connections": []}

    def serve():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            state["connections"].append(conn)
            threading.Thread(target=state["handler"], args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    yield state, f"http://127.0.0.1:{listener.getsockname()[1]}/"
    listener.close()
    for conn in state["connections"]:
        conn.close()


pytestmark = pytest.mark.usefixtures("allow_loopback")


def test_success_returns_status(standin):
    outcome = send(standin.url)

    assert outcome.status_code == 200
    assert outcome.succeeded
    assert '"httpStatus"' in outcome.response_excerpt


def test_utf8_body_and_length(standin):
    body = '{"name":"Café ☕ 🍔","city":"Москва"}'.encode()

    send(standin.url, body)

    record = standin.records[0]
    assert record["body"] == body.decode()
    assert int(record["headers"]["Content-Length"]) == len(body)
    assert record["headers"]["Content-Type"] == "application/json; charset=utf-8"


def test_status_and_retry_after_reported(standin):
    standin.configure(status=429, retry_after="120")

    outcome = send(standin.url)

    assert outcome.status_code == 429
    assert outcome.retry_after == "120"


def test_redirect_not_followed(raw_server):
    state, url = raw_server

    def redirect(conn):
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:1/\r\nContent-Length: 0\r\n\r\n")

    state["handler"] = redirect

    outcome = send(url)

    assert outcome.status_code == 302
    assert outcome.location == "http://127.0.0.1:1/"


def test_silent_server_times_out(raw_server):
    state, url = raw_server
    state["handler"] = lambda conn: conn.recv(65536) and time.sleep(30)

    started = time.monotonic()
    outcome = send(url, total=1.0)

    assert outcome.status_code is None
    assert outcome.error == "timed out after 1 s"
    assert time.monotonic() - started < 3


def test_trickling_server_times_out(raw_server):
    state, url = raw_server

    def trickle(conn):
        conn.recv(65536)
        for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 100:
            try:
                conn.sendall(bytes([byte]))
            except OSError:
                return
            time.sleep(0.2)

    state["handler"] = trickle

    started = time.monotonic()
    outcome = send(url, total=1.5)

    assert outcome.status_code is None
    assert "timed out" in outcome.error
    assert time.monotonic() - started < 3.5


def test_refused_connection_reported():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    outcome = send(f"http://127.0.0.1:{port}/")

    assert outcome.status_code is None
    assert outcome.error.startswith("connection failed")


def test_private_target_never_contacted(settings):
    settings.PORTAL = {**settings.PORTAL, "ALLOW_LOOPBACK_TARGETS": False}

    outcome = send("http://127.0.0.1:9/")

    assert outcome.error.startswith("unsafe target")


def test_connects_to_checked_address(standin, monkeypatch):
    monkeypatch.setattr("integrations.transport.check_resolved_addresses", lambda host, port: "127.0.0.1")
    url = standin.url.replace("127.0.0.1", "qualtrics-pinning.invalid")

    outcome = send(url)

    assert outcome.status_code == 200
    assert standin.records[0]["headers"]["Host"].startswith("qualtrics-pinning.invalid")


def test_error_text_hides_url_token():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    outcome = send(f"http://127.0.0.1:{port}/inbound-event/v1/events/json/triggers?urlTokenId=FAKE123")

    assert "FAKE123" not in outcome.error


class _KeepAliveHandler(BaseHTTPRequestHandler):
    """HTTP/1.1 with keep-alive; an idle connection is closed after `timeout` seconds."""

    protocol_version = "HTTP/1.1"
    timeout = 1.0
    connections: ClassVar[set[int]] = set()
    requests: ClassVar[list[str]] = []

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        type(self).connections.add(self.client_address[1])
        type(self).requests.append(self.headers["X-Delivery-Id"])
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


class _RoomyServer(ThreadingHTTPServer):
    # The default listen backlog of 5 drops SYNs from a 20-thread burst on a
    # busy machine, and the client's retransmit comes after a second.
    request_queue_size = 64


def test_stale_keepalive_connections():
    server = _RoomyServer(("127.0.0.1", 0), _KeepAliveHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"

    def deliver(n):
        return post_json(url, b"{}", {"X-Delivery-Id": str(n)}, connect_timeout=5, total_timeout=10)

    try:
        first = deliver(0)
        time.sleep(1.5)
        second = deliver(1)
        with ThreadPoolExecutor(max_workers=20) as pool:
            burst = list(pool.map(deliver, range(2, 22)))
    finally:
        server.shutdown()
        server.server_close()

    assert first.succeeded
    assert second.succeeded, second.error
    assert [outcome.error for outcome in burst if not outcome.succeeded] == []
    assert sorted(_KeepAliveHandler.requests, key=int) == [str(n) for n in range(22)]


def test_attempts_share_one_deadline_thread(standin):
    for _ in range(5):
        send(standin.url)

    keepers = [thread for thread in threading.enumerate() if thread.name == "attempt-deadlines"]
    assert len(keepers) == 1


def test_ended_watchdog_never_fires():
    watchdog = _Watchdog(0.05, pinned={})
    with watchdog:
        pass

    time.sleep(0.2)

    assert watchdog.fired is False
