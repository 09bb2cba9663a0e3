"""The production settings: deploy checks pass, and missing required values stop the start."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

REPO = Path(__file__).resolve().parents[1]
PRODUCTION_ENV = {
    "PORTAL_PRODUCTION": "1",
    "DJANGO_SECRET_KEY": "q8Zr3vX1mK7pW2nL9sT4yB6cF0hJ5dG8aE1uR3iO7kP2xV9zN4mQ6wS0tY5bC8",
    "DJANGO_ALLOWED_HOSTS": "portal.example.com",
    "PORTAL_ENCRYPTION_KEYS": Fernet.generate_key().decode(),
}


def manage(*args, **env_changes):
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PORTAL_", "DJANGO_"))}
    env.update({key: value for key, value in env_changes.items() if value is not None})
    return subprocess.run(
        [sys.executable, "manage.py", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )


def test_deploy_check_is_clean():
    result = manage("check", "--deploy", "--fail-level", "WARNING", **PRODUCTION_ENV)

    assert result.returncode == 0, result.stderr
    assert "no issues" in result.stdout


@pytest.mark.parametrize("missing", ["DJANGO_SECRET_KEY", "DJANGO_ALLOWED_HOSTS", "PORTAL_ENCRYPTION_KEYS"])
def test_missing_value_refuses_start(missing):
    result = manage("check", **{**PRODUCTION_ENV, missing: None})

    assert result.returncode != 0
    assert f"{missing} is missing" in result.stderr


def test_loopback_targets_refused_in_production():
    result = manage("check", **PRODUCTION_ENV, PORTAL_ALLOW_LOOPBACK_TARGETS="1")

    assert result.returncode != 0
    assert "PORTAL_ALLOW_LOOPBACK_TARGETS must not be set" in result.stderr
