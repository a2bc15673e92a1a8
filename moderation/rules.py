"""Stage 2 of the input cascade: signatures of known attack families (SafetyRule rows).

Rules are precise by construction (each seeded pattern matches no benign row of the training
set), so a hit is a confident verdict and the cascade stops there. Moderators edit the rows in
the admin; the compiled set is cached per process for `SLUICE_SAFETY_RULES_TTL_S` seconds, and
the service that edits rules clears this process's cache at once (`rules_cache_clear`).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from django.conf import settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompiledRule:
    name: str
    family: str
    label: str
    regex: re.Pattern


@dataclass(frozen=True)
class RuleHit:
    name: str
    family: str
    label: str


class RuleSet:
    def __init__(self, rules: Sequence[CompiledRule]) -> None:
        self.rules = tuple(rules)

    @classmethod
    def compile(cls, specs: Iterable[tuple[str, str, str, str]]) -> RuleSet:
        """From (name, family, label, pattern); a pattern that does not compile is skipped."""
        compiled = []
        for name, family, label, pattern in specs:
            try:
                regex = re.compile(pattern, re.IGNORECASE | re.DOTALL)
            except re.error:
                # SafetyRule.clean() refuses these; a row written around it must not stop traffic.
                logger.error("safety rule %r has an invalid pattern; skipped", name)
                continue
            compiled.append(CompiledRule(name=name, family=family, label=label, regex=regex))
        return cls(compiled)

    def first_hit(self, texts: Sequence[str]) -> RuleHit | None:
        for rule in self.rules:
            for text in texts:
                if rule.regex.search(text):
                    return RuleHit(name=rule.name, family=rule.family, label=rule.label)
        return None


_lock = threading.Lock()
_cached: tuple[float, RuleSet] | None = None


def _load_enabled_rules() -> RuleSet:
    from moderation.models import SafetyRule

    rows = SafetyRule.objects.filter(enabled=True).values_list("name", "family", "label", "pattern")
    return RuleSet.compile(rows)


def rules_active() -> RuleSet:
    """The enabled rules, from this process's cache while it is fresh."""
    global _cached
    now = time.monotonic()
    cached = _cached
    if cached is not None and cached[0] > now:
        return cached[1]
    with _lock:
        if _cached is None or _cached[0] <= now:
            _cached = (now + settings.SLUICE_SAFETY_RULES_TTL_S, _load_enabled_rules())
        return _cached[1]


def rules_cache_clear() -> None:
    global _cached
    with _lock:
        _cached = None
