from __future__ import annotations

import pytest
from django.contrib.auth.models import Permission

from moderation.cascade import safety_check_input
from moderation.models import SafetyPolicy
from moderation.rules import rules_cache_clear
from tests.factories import UserFactory


@pytest.fixture(autouse=True)
def fresh_rules_cache():
    # Rules are cached per process; every test starts from the database's rules.
    rules_cache_clear()
    yield
    rules_cache_clear()


@pytest.fixture
def moderator(db):
    user = UserFactory(username="moderator")
    user.user_permissions.add(Permission.objects.get(codename="review_case"))
    return user


@pytest.fixture
def senior(db):
    """A senior reviewer: decides escalated cases."""
    user = UserFactory(username="senior")
    user.user_permissions.add(*Permission.objects.filter(codename__in=["review_case", "review_escalated"]))
    return user


def policy(slug: str = "standard", block_fpr: float = 0.01, review_fpr: float = 0.02):
    """An unsaved policy: the cascade only reads its fields."""
    return SafetyPolicy(slug=slug, name=slug, block_fpr=block_fpr, review_fpr=review_fpr)


def check(text: str, **kwargs):
    return safety_check_input(text=text, policy=kwargs.pop("policy", policy()), **kwargs)
