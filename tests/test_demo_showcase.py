"""The demo's settings showcase: each changed setting shows its effect in the bodies sent."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from integrations import demo_showcase
from tests.test_demo import PROJECT_ROOT, free_port

REMOVING = {"include_mp_deviceid", "metadata_exclusions", "send_crash_events", "include_location"}
REMOVING |= {"send_network_performance_events", "include_metadata"}


def record(name, body, status=200):
    path = f"/inbound-event/v1/events/json/triggers?urlTokenId={demo_showcase.url_token(name)}"
    return json.dumps({"path": path, "status": status, "body": json.dumps(body)})


def test_bodies_grouped_by_connection(tmp_path):
    records = tmp_path / "standin.jsonl"
    records.write_text(
        "\n".join(
            [
                record(demo_showcase.BASELINE_NAME, {"mp_deviceid": "d", "events": []}),
                record(demo_showcase.CASES[0].connection_name, {"events": []}),
                record(demo_showcase.CASES[0].connection_name, {"mp_deviceid": "d"}, status=500),
            ]
        )
    )

    bodies = demo_showcase.bodies_by_connection(
        records, [demo_showcase.BASELINE_NAME, demo_showcase.CASES[0].connection_name]
    )
    (first, *_) = demo_showcase.compare(bodies)

    assert (first.matching, first.total, first.baseline_matching, first.baseline_total) == (0, 1, 1, 1)


@pytest.mark.timeout(180)
def test_showcase_run_shows_every_effect(tmp_path: Path) -> None:
    environment = {
        **os.environ,
        "DATABASE_URL": f"sqlite:///{tmp_path / 'demo.sqlite3'}",
        "CELERY_BROKER_URL": "filesystem://",
        "PORTAL_FILESYSTEM_BROKER_DIR": str(tmp_path / "broker"),
        "PORTAL_ALLOW_LOOPBACK_TARGETS": "1",
    }
    argv = [sys.executable, "manage.py", "demo", "--stop-after-summary", "--showcase-settings", "--timeout", "90"]
    argv += ["--port", str(free_port()), "--var-dir", str(tmp_path / "var")]

    result = subprocess.run(argv, cwd=PROJECT_ROOT, env=environment, capture_output=True, text=True, timeout=170)

    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for case in demo_showcase.CASES:
        line = next(line for line in result.stdout.splitlines() if line.startswith(f"  {case.setting} = "))
        matching, total, baseline, _baseline_total = map(
            int, re.findall(r"(\d+) of (\d+)", line)[0] + re.findall(r"(\d+) of (\d+)", line)[1]
        )
        assert total > 0, line
        if case.setting in REMOVING:
            assert (matching, baseline > 0) == (0, True), line
        else:
            assert (matching > 0, baseline) == (True, 0), line
