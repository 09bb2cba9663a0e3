"""The Docker files, checked as text since no Docker engine runs here: services, commands, health checks, user."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cryptography.fernet import Fernet

REPO = Path(__file__).resolve().parents[1]
PORTAL_SERVICES = ("web", "worker", "beat")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO / "docker" / "compose.yaml").read_text("utf-8"))


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def dockerfile_instructions() -> list[tuple[str, str]]:
    """Return the Dockerfile's instructions as (keyword, arguments), continuation lines joined."""
    text = re.sub(r"\\\n", " ", (REPO / "docker" / "Dockerfile").read_text("utf-8"))
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def env_example_names() -> set[str]:
    """Return every variable .env.example sets or shows commented out."""
    text = (REPO / ".env.example").read_text("utf-8")
    return set(re.findall(r"^#? ?([A-Z][A-Z0-9_]+)=", text, re.MULTILINE))


def configuration_table_names() -> set[str]:
    readme = (REPO / "README.md").read_text("utf-8")
    table = readme.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([A-Z][A-Z0-9_]+)` \|", table, re.MULTILINE))


def test_compose_has_every_service(services):
    assert {"web", "worker", "beat", "postgres", "redis"} <= set(services)


def test_every_long_running_service_has_a_health_check(services):
    for name in (*PORTAL_SERVICES, "postgres", "redis"):
        assert services[name]["healthcheck"]["test"], name


def test_portal_services_share_image_and_env(services):
    for name in (*PORTAL_SERVICES, "migrate"):
        service = services[name]
        assert service["build"]["dockerfile"] == "docker/Dockerfile"
        assert [entry["path"] for entry in service["env_file"]] == ["../.env.example", "../.env"]
        assert service["environment"]["PROMETHEUS_MULTIPROC_DIR"] == "/app/var/metrics"
        assert "metrics:/app/var/metrics" in service["volumes"]
        assert service["environment"]["DATABASE_URL"].startswith("postgres://")
        assert service["environment"]["CELERY_BROKER_URL"].startswith("redis://")


def test_portal_services_wait_for_their_dependencies(services):
    for name in PORTAL_SERVICES:
        depends_on = services[name]["depends_on"]
        assert depends_on["postgres"]["condition"] == "service_healthy"
        assert depends_on["redis"]["condition"] == "service_healthy"
        assert depends_on["migrate"]["condition"] == "service_completed_successfully"
    assert services["migrate"]["command"] == ["python", "manage.py", "migrate", "--noinput"]


def test_web_runs_gunicorn_and_checks_liveness(services):
    web = services["web"]

    assert web["command"][:2] == ["gunicorn", "portal.wsgi"]
    assert "0.0.0.0:8000" in web["command"]
    assert "/healthz" in " ".join(web["healthcheck"]["test"])


def test_worker_consumes_every_queue(services):
    command = services["worker"]["command"]

    assert command[:3] == ["celery", "--app=portal", "worker"]
    assert "--queues=routing,deliveries,maintenance" in command
    assert "inspect ping" in services["worker"]["healthcheck"]["test"][1]


def test_beat_runs_once_and_checks_heartbeats(services):
    assert services["beat"]["command"][:3] == ["celery", "--app=portal", "beat"]
    assert "replicas" not in services["beat"].get("deploy", {})
    assert services["beat"]["healthcheck"]["test"] == ["CMD", "python", "-m", "portal.health"]


def test_dockerfile_runs_as_a_non_root_user():
    instructions = dockerfile_instructions()
    users = [arguments for keyword, arguments in instructions if keyword == "USER"]

    assert users
    assert users[-1].split(":")[0] not in ("root", "0")
    assert [keyword for keyword, _ in instructions].index("USER") > max(
        index for index, (keyword, _) in enumerate(instructions) if keyword in ("RUN", "COPY")
    )


def test_dockerfile_installs_from_pyproject_and_collects_static_files():
    instructions = dockerfile_instructions()
    runs = " ".join(arguments for keyword, arguments in instructions if keyword == "RUN")

    assert instructions[0] == ("FROM", "python:3.11-slim")
    assert ("COPY", "pyproject.toml README.md ./") in instructions
    assert "pip install ." in runs
    assert "collectstatic --noinput" in runs


def test_env_example_variables_are_documented():
    assert env_example_names() - configuration_table_names() == set()


def test_env_example_has_the_required_production_values():
    text = (REPO / ".env.example").read_text("utf-8")

    for name in ("PORTAL_PRODUCTION", "DJANGO_SECRET_KEY", "DJANGO_ALLOWED_HOSTS", "PORTAL_ENCRYPTION_KEYS"):
        assert re.search(rf"^{name}=", text, re.MULTILINE), name
    assert re.search(r"^DJANGO_SECRET_KEY=$", text, re.MULTILINE), "a secret must not have a usable example value"
    assert re.search(r"^PORTAL_ENCRYPTION_KEYS=$", text, re.MULTILINE)


def example_environment(**changes: str) -> dict[str, str]:
    """Return the environment a container gets from .env.example with `changes` as .env, as compose builds it."""
    text = (REPO / ".env.example").read_text("utf-8")
    values = dict(re.findall(r"^([A-Z][A-Z0-9_]+)=(.*)$", text, re.MULTILINE))
    inherited = {key: value for key, value in os.environ.items() if not key.startswith(("PORTAL_", "DJANGO_"))}
    return {**inherited, **values, **changes}


def manage_check(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_unfilled_example_environment_refuses_to_start():
    result = manage_check(example_environment())

    assert result.returncode != 0
    assert "DJANGO_SECRET_KEY, PORTAL_ENCRYPTION_KEYS is missing" in result.stderr


def test_filled_example_environment_passes_the_deploy_check():
    secret_key = "k" * 20 + "7Qz!pL9#vR2@xW5$mN8^bT1&cY4*hJ6(dF3)gS0"
    env = example_environment(DJANGO_SECRET_KEY=secret_key, PORTAL_ENCRYPTION_KEYS=Fernet.generate_key().decode())

    result = manage_check(env)

    assert result.returncode == 0, result.stderr
