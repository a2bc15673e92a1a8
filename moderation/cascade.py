"""The safety cascade: normalise -> rules -> classifier, cheapest first.

Pure checks, no database writes: `moderation.services.safety_screen_input` wraps these with the
tenant's policy, opens cases and raises SafetyRejection. Call points for the generation paths:

* `safety_check_input(text=, policy=)`: one prompt (chat/completions messages joined, or a
  video prompt). `safety_check_input_async` runs it in a worker thread so a caller can
  `asyncio.gather` it with tokenisation and cost estimation: the latency added is then the max
  of the two, not the sum. `safety_check_inputs` scores a batch in one encoder pass.
* `safety_check_output_window(text_so_far=, policy=)`: a streamed generation, checked on its
  trailing window (for a caller that keeps no state). `OutputModerator` does the windowing for a
  stream: feed it each delta and send the client only what it releases; once `stopped`, end the
  stream with finish_reason `content_filter` and settle CU for the tokens actually produced.

Every verdict carries per-stage latencies (`timings_ms`); callers put `timings_ms["total"]` in
the `x-safety-latency-ms` response header.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from moderation.classifier import (
    LABELS,
    UNSAFE_LABELS,
    Thresholds,
    attack_scores,
    classifier_get,
    harmful_scores,
)
from moderation.normalize import NormalizedText, text_normalize
from moderation.rules import RuleHit, RuleSet, rules_active
from portal.metrics import safety_verdict_observe

SAFETY_LATENCY_HEADER = "x-safety-latency-ms"
ALLOW, REVIEW, BLOCK = "allow", "review", "block"
# Decoded payloads the classifier also embeds. Leetspeak and spaced-out variants only go to the
# rules: they fire on ordinary code ("utf8", "x1") and embedding them would double the latency.
_EMBEDDED_VARIANTS = {"base64", "hex", "url", "rot13", "tags"}
# A stateless output check reads this many windows back, so a phrase split across two windows
# is still seen.
_OUTPUT_OVERLAP = 2
OUTPUT_SECOND_WINDOW_CHARS = 48
# OutputModerator reads what it has not released plus this much of what it has: a phrase up to
# this long that straddles two windows is read whole once. A quarter window, and never less.
OUTPUT_MIN_OVERLAP_CHARS = 64
# Shorter than this, a text gives the classifier nothing to judge: scored alone, the 4- and
# 8-character openings of dev's and test_ood's rows ("Well", "How can ", "Show me ") score as
# harmful as real requests (72 of 1,323 distinct 8-character openings over the default block
# threshold), while at 16 characters real requests begin to read as such ("How can I poison").
# A stream's short first window is therefore screened by the rules alone, and the classifier
# reads its text with the next window, whose overlap always covers it.
OUTPUT_CLASSIFIER_MIN_CHARS = 16


def output_overlap_chars(policy: Policy) -> int:
    return max(OUTPUT_MIN_OVERLAP_CHARS, policy.output_window_chars // 4)


class Policy(Protocol):
    """What the cascade needs of a policy (moderation.models.SafetyPolicy has it)."""

    slug: str
    block_fpr: float
    review_fpr: float
    output_window_chars: int
    output_first_window_chars: int


@dataclass(frozen=True)
class SafetyVerdict:
    action: str  # allow | review | block
    category_scores: dict[str, float]  # jailbreak / injection / harmful, calibrated
    # max(attack score, harmful score) of the most unsafe reading; 1.0 on a rule hit.
    unsafe_score: float
    categories: tuple[str, ...]  # what to name in a rejection or a case; empty on allow
    stage: str  # the stage that decided: "rules" | "classifier" | "empty"
    policy_slug: str
    rule: RuleHit | None = None  # internal: for moderators, never for API callers
    tricks: frozenset[str] = frozenset()
    timings_ms: dict[str, float] = field(default_factory=dict)

    @property
    def blocked(self) -> bool:
        return self.action == BLOCK

    @property
    def needs_case(self) -> bool:
        return self.action in {BLOCK, REVIEW}

    @property
    def top_category(self) -> str:
        return max(self.category_scores, key=self.category_scores.__getitem__)


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)


def _decide(attack: float, harmful: float, policy: Policy, thresholds: Thresholds) -> str:
    """`attack` is 0.0 where attacks are not judged (model output, see the window checker)."""
    if attack >= thresholds.attack(policy.block_fpr) or harmful >= thresholds.harmful(
        policy.block_fpr
    ):
        return BLOCK
    if attack >= thresholds.attack(policy.review_fpr) or harmful >= thresholds.harmful(
        policy.review_fpr
    ):
        return REVIEW
    return ALLOW


def _categories(
    scores: dict[str, float], action: str, policy: Policy, thresholds: Thresholds
) -> tuple[str, ...]:
    """The categories over the policy's threshold for `action` (block or review)."""
    if action == ALLOW:
        return ()
    fpr = policy.block_fpr if action == BLOCK else policy.review_fpr
    named = []
    if scores["jailbreak"] + scores["injection"] >= thresholds.attack(fpr):
        top, other = sorted(("jailbreak", "injection"), key=lambda label: -scores[label])
        named.append(top)
        # Both are named when the attack mass is shared (an injected persona prompt).
        if scores[other] >= 0.5 * scores[top]:
            named.append(other)
    if scores["harmful"] >= thresholds.harmful(fpr):
        named.append("harmful")
    return tuple(named)


@dataclass
class _Prepared:
    normalized: NormalizedText
    hit: RuleHit | None
    timings_ms: dict[str, float]


def _prepare(text: str, rules: RuleSet) -> _Prepared:
    started = time.perf_counter()
    normalized = text_normalize(text)
    timings = {"normalize": _ms_since(started)}
    started = time.perf_counter()
    hit = rules.first_hit(normalized.all_texts())
    timings["rules"] = _ms_since(started)
    return _Prepared(normalized=normalized, hit=hit, timings_ms=timings)


def _rule_verdict(prepared: _Prepared, policy: Policy) -> SafetyVerdict:
    hit = prepared.hit
    scores = {label: 1.0 if label == hit.label else 0.0 for label in UNSAFE_LABELS}
    return SafetyVerdict(
        action=BLOCK,
        category_scores=scores,
        unsafe_score=1.0,
        categories=(hit.label,),
        stage="rules",
        policy_slug=policy.slug,
        rule=hit,
        tricks=prepared.normalized.tricks,
        timings_ms=prepared.timings_ms,
    )


def _unscored_allow(prepared: _Prepared, policy: Policy, *, stage: str) -> SafetyVerdict:
    """An allow the classifier did not score (nothing to read, or a window too short for it)."""
    return SafetyVerdict(
        action=ALLOW,
        category_scores=dict.fromkeys(UNSAFE_LABELS, 0.0),
        unsafe_score=0.0,
        categories=(),
        stage=stage,
        policy_slug=policy.slug,
        tricks=prepared.normalized.tricks,
        timings_ms=prepared.timings_ms,
    )


SAFETY_DIRECTIONS = ("input", "output", "api")


def safety_check_inputs(
    *,
    texts: Sequence[str],
    policy: Policy,
    rules: RuleSet | None = None,
    judge_attacks: bool = True,
    classify: bool = True,
    direction: str | None = None,
) -> list[SafetyVerdict]:
    """The cascade for several prompts (one call, one classifier load, shared timings).

    direction labels the metrics: "input" (the prompt gate, the default) or "output" (the
    default with judge_attacks=False), or "api" for /v1/moderations, tenants screening their
    own content, whose traffic must not move the gate's block rate and latency.

    judge_attacks=False scores jailbreak/injection but decides on harmful content and rules
    only: for model output, where "an attack on the model" is not the question.
    classify=False stops after the rules (an output window too short for the classifier,
    OUTPUT_CLASSIFIER_MIN_CHARS): what they let through is an unscored allow.
    """
    if direction is None:
        direction = "input" if judge_attacks else "output"
    if direction not in SAFETY_DIRECTIONS:  # a metrics label: a fixed few values
        raise ValueError(f"direction must be one of {SAFETY_DIRECTIONS}, not {direction!r}")
    rules = rules if rules is not None else rules_active()
    batch_started = time.perf_counter()
    prepared = [_prepare(text, rules) for text in texts]
    verdicts: list[SafetyVerdict | None] = [None] * len(texts)
    # Which embedded texts belong to which prompt: the canonical text plus decoded payloads.
    owners: list[int] = []
    to_embed: list[str] = []
    for index, item in enumerate(prepared):
        if item.hit is not None:
            verdicts[index] = _rule_verdict(item, policy)
            continue
        if not item.normalized.text and not item.normalized.variants:
            verdicts[index] = _unscored_allow(item, policy, stage="empty")
            continue
        if not classify:
            verdicts[index] = _unscored_allow(item, policy, stage="rules")
            continue
        candidates = [item.normalized.text] + [
            variant.text
            for variant in item.normalized.variants
            if variant.kind in _EMBEDDED_VARIANTS
        ]
        for candidate in candidates:
            owners.append(index)
            to_embed.append(candidate)

    if to_embed:
        classifier = classifier_get()
        started = time.perf_counter()
        # A long prompt is read whole, in overlapping windows of 256 word pieces after its head
        # (up to SLUICE_SAFETY_MAX_WINDOWS, beyond which they are spread over it).
        for owner, text in list(zip(owners, to_embed, strict=True)):
            for window in classifier.encoder.windows(text):
                owners.append(owner)
                to_embed.append(window)
        probabilities = classifier.probabilities(to_embed)
        attack, harmful = attack_scores(probabilities), harmful_scores(probabilities)
        # In a batch the encoder pass is shared: each prompt is charged its share.
        classifier_ms = _ms_since(started) / len(set(owners))
        # A prompt is as unsafe as its most unsafe reading (text, decoded payload, window).
        worst_attack: dict[int, int] = {}
        worst_harmful: dict[int, int] = {}
        for row, owner in enumerate(owners):
            if owner not in worst_attack or attack[row] > attack[worst_attack[owner]]:
                worst_attack[owner] = row
            if owner not in worst_harmful or harmful[row] > harmful[worst_harmful[owner]]:
                worst_harmful[owner] = row
        for owner, row in worst_attack.items():
            scores = {
                "jailbreak": round(float(probabilities[row, LABELS.index("jailbreak")]), 6),
                "injection": round(float(probabilities[row, LABELS.index("injection")]), 6),
                "harmful": round(float(harmful[worst_harmful[owner]]), 6),
            }
            judged_attack = float(attack[row]) if judge_attacks else 0.0
            action = _decide(judged_attack, scores["harmful"], policy, classifier.thresholds)
            timings = dict(prepared[owner].timings_ms, classifier=round(classifier_ms, 3))
            verdicts[owner] = SafetyVerdict(
                action=action,
                category_scores=scores,
                unsafe_score=round(max(float(attack[row]), scores["harmful"]), 6),
                categories=_categories(
                    scores if judge_attacks else scores | {"jailbreak": 0.0, "injection": 0.0},
                    action,
                    policy,
                    classifier.thresholds,
                ),
                stage="classifier",
                policy_slug=policy.slug,
                tricks=prepared[owner].normalized.tricks,
                timings_ms=timings,
            )

    # Per prompt: a batch's wall time is shared by its prompts.
    total_ms = _ms_since(batch_started) / max(len(texts), 1)
    for verdict in verdicts:
            verdict.timings_ms["total"] = round(total_ms, 3)
            safety_verdict_observe(direction=direction, action=verdict.action, stage=verdict.stage,
                                   timings_ms=verdict.timings_ms)
    return verdicts  # type: ignore[return-value]


def safety_check_input(*, text: str, policy: Policy, rules: RuleSet | None = None) -> SafetyVerdict:
    """One prompt through the cascade. Short-circuits at the first confident stage."""
    return safety_check_inputs(texts=[text], policy=policy, rules=rules)[0]


async def safety_check_input_async(*, text: str, policy: Policy) -> SafetyVerdict:
    """For `asyncio.gather(safety_check_input_async(...), estimate_cost(...))`.

    The encoder releases the GIL inside torch, so the two really overlap.
    """
    return await asyncio.to_thread(safety_check_input, text=text, policy=policy)


def safety_check_output_window(*, text_so_far: str, policy: Policy) -> SafetyVerdict:
    """Check a streamed generation on its trailing window (two windows long).

    The window bounds the cost of each check however long the stream grows; the overlap makes
    sure text cut at a window boundary is read whole at least once. Output is blocked on rules
    and on harmful content; the attack scores are reported but do not block, because ordinary
    generated code reads like the code contexts that carry injections in the training data.
    """
    window = text_so_far[-policy.output_window_chars * _OUTPUT_OVERLAP :]
    return _output_text_check(window, policy)


def _output_text_check(text: str, policy: Policy, *, classify: bool = True) -> SafetyVerdict:
    return safety_check_inputs(texts=[text], policy=policy, judge_attacks=False,
                               classify=classify)[0]


class OutputModerator:
    """Holds a stream back one window at a time; only checked text is released.

    feed(delta) -> text now safe to send; finish() -> the checked remainder. After a violation
    `stopped` is True, `verdict` says why, and nothing more is released: the caller ends the
    stream with finish_reason "content_filter".
    """

    def __init__(self, *, policy: Policy) -> None:
        self.policy = policy
        self.text = ""
        self.released = 0
        self.stopped = False
        self.verdict: SafetyVerdict | None = None
        self.checks = 0
        # text[:classified] has been read by the classifier; only a short first window, released
        # on the rules alone, is ever ahead of it.
        self.classified = 0

    # Each check reads the text not yet released and the overlap before it, where a trailing
    # window of two windows re-read every character twice on a long stream (and 800 characters
    # of code can pass the encoder's 256 word pieces, read as three): the classifier's cost is
    # per word piece read (moderation.classifier), so a stream's moderation now costs about
    # 1.3 passes over its text instead of 2. Short streams read as before: the overlap covers
    # all of their earlier text.
    def _window(self) -> str:
        return self.text[max(0, self.released - output_overlap_chars(self.policy)) :]

    def _check(self, *, last: bool = False) -> str:
        self.checks += 1
        window = self._window()
        classify = last or len(window) >= OUTPUT_CLASSIFIER_MIN_CHARS
        verdict = _output_text_check(window, self.policy, classify=classify)
        if classify:
            self.classified = len(self.text)
        if verdict.blocked:
            self.stopped, self.verdict = True, verdict
            return ""
        chunk, self.released = self.text[self.released :], len(self.text)
        return chunk

    # The first window is short (the policy's first window: what the client waits for before
    # its first token); the next ones double from twice that, and never from less than
    # OUTPUT_SECOND_WINDOW_CHARS, up to the policy's window. A classifier pass costs about two
    # milliseconds before it reads any text, so a short first window buys time to first token
    # without adding a pass for every doubling after it; one shorter than
    # OUTPUT_CLASSIFIER_MIN_CHARS adds no pass at all (the rules screen it).
    def _window_due(self) -> int:
        first = self.policy.output_first_window_chars
        if self.checks == 0:
            return first
        second = max(2 * first, OUTPUT_SECOND_WINDOW_CHARS)
        return min(self.policy.output_window_chars, second * 2 ** (self.checks - 1))

    def feed(self, delta: str) -> str:
        if self.stopped:
            return ""
        self.text += delta
        if len(self.text) - self.released < self._window_due():
            return ""
        return self._check()

    def finish(self) -> str:
        """The last check: the classifier reads whatever it has not, even text already released
        on the rules alone (a stream that ended inside its first window)."""
        if self.stopped or self.classified == len(self.text):
            return ""
        return self._check(last=True)
