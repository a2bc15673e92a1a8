"""Django's system checks. `make run` skips them at start-up (they import the text stack
through the URLconf), so they run here."""

from __future__ import annotations

import pytest
from django.core.management import call_command


@pytest.mark.django_db
def test_the_project_passes_djangos_system_checks():
    # Raises SystemCheckError, listing them, on any error (the database's checks included).
    call_command("check", "--database", "default", verbosity=0)
