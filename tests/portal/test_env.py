"""portal/env.py: a setting that cannot be read stops start-up naming the variable, never its
secret."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PASSWORD = "s3cret"  # noqa: S105 - a test value


@pytest.mark.parametrize("database_url", [
    # An unknown scheme: django-environ took it for a backend module, and Django stopped with
    # "'foo' isn't an available database backend", naming neither the variable nor the value.
    f"foo://user:{PASSWORD}@host/db",
    # No scheme it can read: django-environ warned with the parsed URL, password included, on
    # stderr (the process's log), then settings failed with a KeyError: 'ENGINE'.
    f"//user:{PASSWORD}@host/db",
    f"postgres_x://user:{PASSWORD}@host/db",
    # No host: urllib read the password as the port, and its error quoted it.
    f"postgres://user:{PASSWORD}/db",
])
def test_a_database_url_that_cannot_be_read_is_named_without_its_password(database_url):
    env = dict(os.environ, DATABASE_URL=database_url, DJANGO_SETTINGS_MODULE="portal.settings")
    started = subprocess.run([sys.executable, "-c", "import django; django.setup()"], cwd=REPO,
                             env=env, capture_output=True, text=True, timeout=120)
    assert started.returncode != 0
    assert PASSWORD not in started.stdout + started.stderr, started.stderr[-2000:]
    last_line = started.stderr.strip().splitlines()[-1]
    assert last_line.startswith("django.core.exceptions.ImproperlyConfigured: DATABASE_URL ")
