"""Tests of the Qualtrics JSON Event trigger stand-in itself, which need no database."""

import json
import logging
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
import requests

from integrations.standin import (
    EXAMPLE_URL_TOKEN_ID,
    TRIGGER_PATH,
    QualtricsStandin,
    create_server,
    redact_query,
    running_standin,
)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SECRET = "Bearer test-secret-value"
EVENT = {"event_name": "purchase", "value": 12.5}


@pytest.fixture
def standin() -> Iterator[QualtricsStandin]:
    with running_standin() as server:
        yield server


def post(url: str, **kwargs: object) -> requests.Response:
    kwargs.setdefault("timeout", 5)
    return requests.post(url, **kwargs)  # type: ignore[arg-type]


def read_line(process: subprocess.Popen[str], timeout: float = 15.0) -> str:
    """Return the next stdout line of `process`, or fail the test after `timeout` seconds."""
    assert process.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            pytest.fail(f"no output line within {timeout} s")
    return process.stdout.readline().strip()


def stop_process(process: subprocess.Popen[str]) -> int:
    """Send SIGTERM and return the exit status, killing the process if it does not stop within 10 s."""
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise


def test_post_returns_qualtrics_meta(standin: QualtricsStandin) -> None:
    response = post(standin.url, json=EVENT)

    assert response.status_code == 200
    body = response.json()
    assert body["meta"]["httpStatus"] == "200 - OK"
    assert body["result"] == {}
    assert uuid.UUID(body["meta"]["requestId"]).version == 4


def test_request_ids_differ(standin: QualtricsStandin) -> None:
    first = post(standin.url, json=EVENT).json()["meta"]["requestId"]
    second = post(standin.url, json=EVENT).json()["meta"]["requestId"]

    assert first != second


def test_any_path_accepted(standin: QualtricsStandin) -> None:
    response = post(f"{standin.base_url}/some/other/path?x=1", json=EVENT)

    assert response.status_code == 200


def test_url_has_trigger_format(standin: QualtricsStandin) -> None:
    assert standin.url == f"http://127.0.0.1:{standin.port}{TRIGGER_PATH}?urlTokenId={EXAMPLE_URL_TOKEN_ID}"
    assert standin.port != 0


def test_invalid_json_returns_400(standin: QualtricsStandin) -> None:
    response = post(standin.url, data=b"{not json", headers={"Content-Type": "application/json"})

    assert response.status_code == 400
    meta = response.json()["meta"]
    assert meta["httpStatus"] == "400 - Bad Request"
    assert "not valid UTF-8 JSON" in meta["error"]["errorMessage"]


def test_invalid_utf8_returns_400(standin: QualtricsStandin) -> None:
    response = post(standin.url, data=b'{"name": "\xff"}', headers={"Content-Type": "application/json"})

    assert response.status_code == 400


def test_empty_body_returns_400(standin: QualtricsStandin) -> None:
    response = post(standin.url, data=b"")

    assert response.status_code == 400


def test_get_returns_405(standin: QualtricsStandin) -> None:
    response = requests.get(standin.url, timeout=5)

    assert response.status_code == 405
    assert response.headers["Allow"] == "POST"


def test_invalid_content_length_returns_400(standin: QualtricsStandin) -> None:
    request = (
        f"POST {TRIGGER_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: nope\r\nConnection: close\r\n\r\n"
    ).encode("ascii")
    with socket.create_connection((standin.host, standin.port), timeout=5) as connection:
        connection.sendall(request)
        reply = connection.makefile("rb").readline()

    assert reply.startswith(b"HTTP/1.1 400")


def test_chunked_body_accepted(standin: QualtricsStandin) -> None:
    chunks = iter([b'{"event_name": ', b'"chunked"}'])

    response = post(standin.url, data=chunks, headers={"Content-Type": "application/json"})

    assert response.status_code == 200
    assert standin.records[-1]["body"] == '{"event_name": "chunked"}'


def test_missing_authorization_returns_401() -> None:
    with running_standin(expect_authorization=SECRET) as server:
        response = post(server.url, json=EVENT)

    assert response.status_code == 401
    meta = response.json()["meta"]
    assert meta["httpStatus"] == "401 - Unauthorized"
    assert meta["error"]["errorMessage"]


def test_wrong_authorization_returns_401() -> None:
    with running_standin(expect_authorization=SECRET) as server:
        response = post(server.url, json=EVENT, headers={"Authorization": SECRET + "x"})

    assert response.status_code == 401


def test_matching_authorization_returns_200() -> None:
    with running_standin(expect_authorization=SECRET) as server:
        response = post(server.url, json=EVENT, headers={"Authorization": SECRET})

    assert response.status_code == 200


def test_records_request_details(standin: QualtricsStandin) -> None:
    post(standin.url, json=EVENT, headers={"Authorization": SECRET, "X-Trace": "abc"})

    assert len(standin.records) == 1
    record = standin.records[0]
    assert record["method"] == "POST"
    assert record["path"] == f"{TRIGGER_PATH}?urlTokenId={EXAMPLE_URL_TOKEN_ID}"
    assert record["headers"]["Authorization"] == SECRET
    assert record["headers"]["X-Trace"] == "abc"
    assert json.loads(record["body"]) == EVENT
    assert record["status"] == 200
    assert datetime.fromisoformat(record["received_at"]).tzinfo is not None


def test_records_rejected_requests() -> None:
    with running_standin(expect_authorization=SECRET) as server:
        post(server.url, json=EVENT)

        assert [record["status"] for record in server.records] == [401]


def test_record_keeps_invalid_body(standin: QualtricsStandin) -> None:
    post(standin.url, data=b"\xffabc")

    assert standin.records[0]["body"] == "\ufffdabc"
    assert standin.records[0]["status"] == 400


def test_record_file_has_json_lines(tmp_path: Path) -> None:
    record_path = tmp_path / "requests.jsonl"
    with running_standin(record_path=record_path) as server:
        post(server.url, json=EVENT)
        post(server.url, data=b"{bad")
        in_memory = list(server.records)

    lines = record_path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == in_memory
    assert [record["status"] for record in in_memory] == [200, 400]


def test_record_file_written_immediately(tmp_path: Path) -> None:
    record_path = tmp_path / "requests.jsonl"
    with running_standin(record_path=record_path) as server:
        post(server.url, json=EVENT)

        assert len(record_path.read_text(encoding="utf-8").splitlines()) == 1


def test_record_file_appends(tmp_path: Path) -> None:
    record_path = tmp_path / "requests.jsonl"
    record_path.write_text('{"earlier": true}\n', encoding="utf-8")
    with running_standin(record_path=record_path) as server:
        post(server.url, json=EVENT)

    lines = record_path.read_text(encoding="utf-8").splitlines()
    assert json.loads(lines[0]) == {"earlier": True}
    assert len(lines) == 2


def test_missing_record_directory_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError), running_standin(record_path=tmp_path / "missing" / "requests.jsonl"):
        pass


def test_status_forces_response(standin: QualtricsStandin) -> None:
    standin.configure(status=503)

    response = post(standin.url, json=EVENT)

    assert response.status_code == 503
    meta = response.json()["meta"]
    assert meta["httpStatus"] == "503 - Service Unavailable"
    assert meta["error"]["errorMessage"]


def test_status_overrides_json_check(standin: QualtricsStandin) -> None:
    standin.configure(status=202)

    response = post(standin.url, data=b"{bad")

    assert response.status_code == 202


def test_status_204_has_no_body(standin: QualtricsStandin) -> None:
    standin.configure(status=204)

    response = post(standin.url, json=EVENT)

    assert response.status_code == 204
    assert response.content == b""


def test_status_keeps_authorization_check() -> None:
    with running_standin(expect_authorization=SECRET, status=503) as server:
        response = post(server.url, json=EVENT)

    assert response.status_code == 401


def test_fail_first_then_ok(standin: QualtricsStandin) -> None:
    standin.configure(fail_first=2, fail_status=429)

    statuses = [post(standin.url, json=EVENT).status_code for _ in range(4)]

    assert statuses == [429, 429, 200, 200]


def test_fail_first_default_status(standin: QualtricsStandin) -> None:
    standin.configure(fail_first=1)

    assert post(standin.url, json=EVENT).status_code == 503


def test_fail_first_skips_unauthorized() -> None:
    with running_standin(expect_authorization=SECRET, fail_first=1) as server:
        unauthorized = post(server.url, json=EVENT)
        first = post(server.url, json=EVENT, headers={"Authorization": SECRET})
        second = post(server.url, json=EVENT, headers={"Authorization": SECRET})

    assert [unauthorized.status_code, first.status_code, second.status_code] == [401, 503, 200]


def test_fail_first_falls_back_to_status(standin: QualtricsStandin) -> None:
    standin.configure(fail_first=1, fail_status=500, status=202)

    statuses = [post(standin.url, json=EVENT).status_code for _ in range(2)]

    assert statuses == [500, 202]


def test_configure_restarts_fail_count(standin: QualtricsStandin) -> None:
    standin.configure(fail_first=1)
    post(standin.url, json=EVENT)

    standin.configure(fail_first=1)

    assert post(standin.url, json=EVENT).status_code == 503


def test_configure_keeps_other_fields(standin: QualtricsStandin) -> None:
    standin.configure(status=503, retry_after="7")

    standin.configure(delay=0.01)

    assert standin.behaviour.status == 503
    assert standin.behaviour.retry_after == "7"


def test_retry_after_on_errors(standin: QualtricsStandin) -> None:
    standin.configure(status=503, retry_after="30")

    response = post(standin.url, json=EVENT)

    assert response.headers["Retry-After"] == "30"


def test_retry_after_absent_on_success(standin: QualtricsStandin) -> None:
    standin.configure(retry_after="30")

    response = post(standin.url, json=EVENT)

    assert response.status_code == 200
    assert "Retry-After" not in response.headers


@pytest.mark.parametrize(
    "changes",
    [
        {"status": 99},
        {"status": 600},
        {"status": True},
        {"fail_status": 100},
        {"fail_first": -1},
        {"delay": -0.1},
        {"delay": float("nan")},
        {"retry_after": ""},
        {"retry_after": "1\r\nX-Injected: yes"},
        {"expect_authorization": "Bearer caf\u00e9"},
    ],
)
def test_configure_rejects_invalid_values(standin: QualtricsStandin, changes: dict[str, object]) -> None:
    before = standin.behaviour

    with pytest.raises(ValueError, match=next(iter(changes))):
        standin.configure(**changes)  # type: ignore[arg-type]

    assert standin.behaviour == before


def test_delay_slows_response(standin: QualtricsStandin) -> None:
    standin.configure(delay=0.3)

    started = time.monotonic()
    post(standin.url, json=EVENT)

    assert time.monotonic() - started >= 0.3


def test_delay_causes_client_timeout(standin: QualtricsStandin) -> None:
    standin.configure(delay=1.0)

    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.post(standin.url, json=EVENT, timeout=0.2)


def test_delayed_requests_run_concurrently(standin: QualtricsStandin) -> None:
    standin.configure(delay=0.5)
    statuses: list[int] = []

    def send() -> None:
        statuses.append(post(standin.url, json=EVENT).status_code)

    threads = [threading.Thread(target=send) for _ in range(4)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)

    assert time.monotonic() - started < 1.5
    assert statuses == [200, 200, 200, 200]


def test_log_hides_secrets(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="integrations.standin")
    with running_standin(quiet=False) as server:
        post(server.url, json=EVENT, headers={"Authorization": SECRET})

    assert len(caplog.records) == 1
    assert SECRET not in caplog.text
    assert EXAMPLE_URL_TOKEN_ID not in caplog.text
    assert "urlTokenId=***" in caplog.text


def test_quiet_logs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="integrations.standin")
    with running_standin(quiet=True) as server:
        post(server.url, json=EVENT)

    assert caplog.records == []


def test_redact_query_masks_values() -> None:
    assert redact_query("/t?urlTokenId=abc&x=") == "/t?urlTokenId=***&x=***"
    assert redact_query("/t") == "/t"


def test_shutdown_frees_port() -> None:
    with running_standin() as server:
        url = server.url

    with pytest.raises(requests.exceptions.ConnectionError):
        requests.post(url, json=EVENT, timeout=2)


def test_create_server_maps_options(tmp_path: Path) -> None:
    options = {
        "host": "127.0.0.1",
        "port": 0,
        "record": str(tmp_path / "r.jsonl"),
        "quiet": True,
        "status": 502,
        "delay": 0.25,
        "fail_first": 3,
        "fail_status": 429,
        "retry_after": "5",
        "expect_authorization": SECRET,
    }

    server = create_server(options)
    server.server_close()

    assert server.record_path == tmp_path / "r.jsonl"
    assert server.quiet is True
    assert server.behaviour.status == 502
    assert server.behaviour.delay == 0.25
    assert server.behaviour.fail_first == 3
    assert server.behaviour.fail_status == 429
    assert server.behaviour.retry_after == "5"
    assert server.behaviour.expect_authorization == SECRET


def test_create_server_rejects_invalid_port() -> None:
    with pytest.raises(ValueError, match="port must be from 0 to 65535"):
        create_server({"port": 70000})


def test_create_server_port_in_use(standin: QualtricsStandin) -> None:
    with pytest.raises(OSError, match="in use"):
        create_server({"port": standin.port})


def run_standin_process(*command: str, cwd: Path = PROJECT_ROOT) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, *command],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def test_module_serves_and_stops() -> None:
    process = run_standin_process("-m", "integrations.standin", "--port", "0", "--expect-authorization", SECRET)
    try:
        line = read_line(process)
        assert line.startswith("listening on http://127.0.0.1:")
        response = post(
            line.removeprefix("listening on ") + TRIGGER_PATH, json=EVENT, headers={"Authorization": SECRET}
        )
    finally:
        exit_status = stop_process(process)
    assert process.stderr is not None
    stderr = process.stderr.read()

    assert response.status_code == 200
    assert exit_status == 0
    assert "POST /inbound-event/v1/events/json/triggers -> 200" in stderr
    assert SECRET not in stderr


def test_command_serves_and_stops(tmp_path: Path) -> None:
    record_path = tmp_path / "requests.jsonl"
    process = run_standin_process(
        "manage.py", "qualtrics_standin", "--port", "0", "--quiet", "--record", str(record_path)
    )
    try:
        line = read_line(process, timeout=30)
        assert line.startswith("listening on http://127.0.0.1:")
        response = post(line.removeprefix("listening on ") + "/any", json=EVENT)
    finally:
        exit_status = stop_process(process)

    assert response.status_code == 200
    assert exit_status == 0
    assert len(record_path.read_text(encoding="utf-8").splitlines()) == 1


def test_command_rejects_invalid_status() -> None:
    process = run_standin_process("manage.py", "qualtrics_standin", "--port", "0", "--status", "700")
    _stdout, stderr = process.communicate(timeout=30)

    assert process.returncode != 0
    assert "status must be an HTTP status code from 200 to 599" in stderr
