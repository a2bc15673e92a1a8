"""Writes for moderation: screening with a tenant's policy, cases, decisions, strikes, rules.

Call points for the generation paths (text and video):
* `safety_screen_input(tenant=, api_key=, text=, endpoint=, request_id=)` before admission;
  `safety_screen_input_async` is the same for `asyncio.gather` with tokenisation/cost
  estimation. Returns the verdict (put `verdict.timings_ms["total"]` in the
  `x-safety-latency-ms` header) or raises SafetyRejection (400). Opens a case on block/review.
* `safety_screen_output_window(tenant=, api_key=, text_so_far=, endpoint=, request_id=)` from a
  stream (or use cascade.OutputModerator and call `case_open` when it stops).
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from datetime import timedelta

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import F
from django.utils import timezone

from moderation import selectors
from moderation.cascade import SafetyVerdict, safety_check_input, safety_check_inputs
from moderation.cascade import safety_check_output_window as _check_output_window
from moderation.errors import SafetyRejection
from moderation.models import (
    CaseDecision,
    ModerationCase,
    SafetyPolicy,
    SafetyPolicyAssignment,
    SafetyRule,
    TenantSuspension,
)
from moderation.rules import rules_cache_clear
from portal.errors import InvalidParameter, NotFound, PermissionDenied, SluiceError
from portal.models import ApiKey, Tenant
from portal.services import tenant_suspend, tenant_unsuspend

logger = logging.getLogger(__name__)

REVIEW_PERMISSION = "moderation.review_case"
SENIOR_REVIEW_PERMISSION = "moderation.review_escalated"
CASE_OPENED_EVENT = "moderation.case_opened"
_API_KEY = re.compile(r"\bsk-[A-Za-z0-9_\-]{8,}")
_EMAIL = re.compile(r"\b[A-Za-z0-9._%+\-]+@[A-Za-z0-9.\-]+\.[A-Za-z]{2,}\b")


# --- screening ------------------------------------------------------------------------------


def safety_screen_input(
    *,
    tenant: Tenant,
    text: str,
    endpoint: str,
    api_key: ApiKey | None = None,
    request_id: str = "",
    policy: SafetyPolicy | None = None,
    idempotency_key: str | None = None,
) -> SafetyVerdict:
    """The input gate: the tenant's policy (or `policy`, already resolved for this request), a
    case for block/review (one per request: see case_open), SafetyRejection on block."""
    policy = policy if policy is not None else selectors.safety_policy_for_tenant(tenant=tenant)
    verdict = safety_check_input(text=text, policy=policy)
    return safety_verdict_enforce(tenant=tenant, api_key=api_key, verdict=verdict, text=text,
                                  endpoint=endpoint, request_id=request_id,
                                  idempotency_key=idempotency_key)


def safety_verdict_enforce(
    *,
    tenant: Tenant,
    verdict: SafetyVerdict,
    text: str,
    endpoint: str,
    api_key: ApiKey | None = None,
    request_id: str = "",
    idempotency_key: str | None = None,
) -> SafetyVerdict:
    """The gate's writes for a verdict reached elsewhere (a thread that only classifies, so it
    holds no database connection): a case for block/review, SafetyRejection on block."""
    if verdict.needs_case:
        case_open(
            tenant=tenant,
            api_key=api_key,
            verdict=verdict,
            text=text,
            source=ModerationCase.Source.INPUT,
            endpoint=endpoint,
            request_id=request_id,
            idempotency_key=idempotency_key,
        )
    if verdict.blocked:
        raise SafetyRejection(categories=verdict.categories)
    return verdict


# Not thread-sensitive: the screen must run beside tokenisation, not queue behind sync work.
safety_screen_input_async = sync_to_async(safety_screen_input, thread_sensitive=False)


def safety_screen_output_window(
    *,
    tenant: Tenant,
    text_so_far: str,
    endpoint: str,
    api_key: ApiKey | None = None,
    request_id: str = "",
) -> SafetyVerdict:
    """For a stream: check the trailing window; a block opens a case and the caller stops."""
    policy = selectors.safety_policy_for_tenant(tenant=tenant)
    verdict = _check_output_window(text_so_far=text_so_far, policy=policy)
    if verdict.blocked:
        case_open(
            tenant=tenant,
            api_key=api_key,
            verdict=verdict,
            text=text_so_far,
            source=ModerationCase.Source.OUTPUT,
            endpoint=endpoint,
            request_id=request_id,
        )
    return verdict


@dataclass(frozen=True)
class ModerationResult:
    model: str
    verdicts: list[SafetyVerdict]


MODERATION_MODEL = "sluice-safety-1"


def moderation_classify(*, tenant: Tenant, inputs: list[str]) -> ModerationResult:
    """POST /v1/moderations: scores only. It opens no case and counts no strike, so tenants
    can screen their own users' content with it freely."""
    policy = selectors.safety_policy_for_tenant(tenant=tenant)
    return ModerationResult(
        model=MODERATION_MODEL,
        # Counted apart from the prompt gate ("input"): tenants' own screening is not our traffic.
        verdicts=safety_check_inputs(texts=inputs, policy=policy, direction="api"),
    )


# --- cases ----------------------------------------------------------------------------------


def prompt_redact(*, text: str) -> str:
    """API keys and email addresses never reach the case table."""
    return _EMAIL.sub("[email]", _API_KEY.sub("sk-[redacted]", text))


def moderation_event_publish(*, tenant: Tenant, event_type: str, payload: dict) -> None:
    """Tell the tenant's webhook endpoints (`moderation.case_opened`). Callers invoke it after
    commit, so a delivery never announces a case that was rolled back."""
    from inference.webhooks import webhook_event_publish

    try:
        webhook_event_publish(tenant=tenant, event_type=event_type, data=payload)
    except Exception:  # the case stands; a webhook problem must not fail the request
        logger.exception("could not record the %s webhook for tenant %s", event_type, tenant.slug)


def _request_digest(*, idempotency_key: str | None, text: str, job_id: str | None) -> str:
    """What one_case_per_request dedups on; empty: no deduplication."""
    if job_id:
        # The job id alone: a redelivered job samples its output again, so the text differs.
        return hashlib.sha256(f"job\x01{job_id}".encode()).hexdigest()
    if idempotency_key:
        return hashlib.sha256(f"{idempotency_key}\0{text}".encode()).hexdigest()
    return ""


def case_open(
    *,
    tenant: Tenant,
    verdict: SafetyVerdict,
    text: str,
    source: str,
    endpoint: str = "",
    api_key: ApiKey | None = None,
    request_id: str = "",
    idempotency_key: str | None = None,
    job_id: str | None = None,
) -> ModerationCase:
    """A case for a verdict that needs one. With an Idempotency-Key, the same text sent again
    under it (a client's retry, a double-clicked form) is the same request: its first case is
    returned, so one request never counts as several strikes. A job's output case is one per
    job (`job_id`), whatever text a redelivered run sampled."""
    now = timezone.now()
    digest = _request_digest(idempotency_key=idempotency_key, text=text, job_id=job_id)
    try:
        with transaction.atomic():
            case = ModerationCase.objects.create(
                tenant=tenant,
                api_key=api_key,
                source=source,
                endpoint=endpoint[:64],
                request_id=request_id[:128],
                action=(
                    ModerationCase.Action.BLOCKED if verdict.blocked else ModerationCase.Action.BORDERLINE
                ),
                category=verdict.categories[0] if verdict.categories else verdict.top_category,
                score=verdict.unsafe_score,
                category_scores=verdict.category_scores,
                matched_rule=verdict.rule.name if verdict.rule else "",
                tricks=sorted(verdict.tricks),
                policy_slug=verdict.policy_slug,
                prompt=prompt_redact(text=text),
                prompt_expires_at=now + timedelta(days=settings.SLUICE_MODERATION_PROMPT_RETENTION_DAYS),
                created_at=now,
                request_digest=digest,
            )
    except IntegrityError:  # the same request again (one_case_per_request): its first case
        return ModerationCase.objects.get(tenant=tenant, request_digest=digest)
    payload = {
        "case_id": case.pk,
        "action": case.action,
        "category": case.category,
        "categories": list(verdict.categories),
        "source": case.source,
        "request_id": case.request_id,
    }
    transaction.on_commit(
        lambda: moderation_event_publish(tenant=tenant, event_type=CASE_OPENED_EVENT, payload=payload)
    )
    return case


def moderator_require(*, user) -> None:
    if not (user.is_authenticated and user.is_active and user.has_perm(REVIEW_PERMISSION)):
        raise PermissionDenied("Reviewing moderation cases needs the moderator permission.")


_NEXT_STATUS = {
    CaseDecision.Decision.UPHOLD: ModerationCase.Status.UPHELD,
    CaseDecision.Decision.OVERTURN: ModerationCase.Status.OVERTURNED,
    CaseDecision.Decision.ESCALATE: ModerationCase.Status.ESCALATED,
}
# Escalating hands a case to a senior reviewer (_decision_refusal): it stays undecided, and
# cannot bounce back. A senior may also overturn an upheld case (a strike given in error).
_DECIDABLE_FROM = {
    CaseDecision.Decision.UPHOLD: [ModerationCase.Status.OPEN, ModerationCase.Status.ESCALATED],
    CaseDecision.Decision.OVERTURN: [ModerationCase.Status.OPEN, ModerationCase.Status.ESCALATED,
                                     ModerationCase.Status.UPHELD],
    CaseDecision.Decision.ESCALATE: [ModerationCase.Status.OPEN],
}


def _decision_refusal(*, case_id: int, status: str, moderator, decision: str) -> SluiceError | None:
    """Why `moderator` may not record `decision` on a case in `status` now; None: they may."""
    if status not in _DECIDABLE_FROM[decision]:
        if (status == ModerationCase.Status.ESCALATED
                and decision == CaseDecision.Decision.ESCALATE):
            return InvalidParameter("This case was already escalated.", param="decision")
        return InvalidParameter("This case was already decided.", param="decision")
    if status == ModerationCase.Status.UPHELD and not moderator.has_perm(SENIOR_REVIEW_PERMISSION):
        return PermissionDenied("Overturning an upheld case is for a senior reviewer "
                                f"(the permission {SENIOR_REVIEW_PERMISSION}).")
    if status == ModerationCase.Status.ESCALATED:
        # Escalating hands the case to a senior reviewer, and a second pair of eyes.
        if not moderator.has_perm(SENIOR_REVIEW_PERMISSION):
            return PermissionDenied("An escalated case is decided by a senior reviewer "
                                    f"(the permission {SENIOR_REVIEW_PERMISSION}).")
        escalated_by = (
            CaseDecision.objects.filter(case_id=case_id, decision=CaseDecision.Decision.ESCALATE)
            .order_by("-created_at", "-pk").values_list("moderator_id", flat=True).first()
        )
        if escalated_by == moderator.pk:
            return PermissionDenied("A case you escalated is decided by another senior reviewer.")
    return None


def case_decisions_allowed(*, case: ModerationCase, moderator) -> list[str]:
    """What case_decide would accept from `moderator` on the case as read: the case page offers
    only these."""
    return [decision for decision in CaseDecision.Decision.values
            if _decision_refusal(case_id=case.pk, status=case.status, moderator=moderator,
                                 decision=decision) is None]


def case_decide(*, case: ModerationCase, moderator, decision: str, note: str = "") -> CaseDecision:
    """Record a decision (audited). Uphold counts a strike and may suspend the tenant."""
    moderator_require(user=moderator)
    if decision not in _NEXT_STATUS:
        raise InvalidParameter(f"Unknown decision {decision!r}.", param="decision")
    now = timezone.now()
    final = decision != CaseDecision.Decision.ESCALATE
    with transaction.atomic():
        # The case's row lock: two moderators deciding at once cannot both win, and who may
        # decide is judged on the status as it is now, not as the page showed it.
        status = (ModerationCase.objects.select_for_update().filter(pk=case.pk)
                  .values_list("status", flat=True).get())
        refusal = _decision_refusal(case_id=case.pk, status=status, moderator=moderator,
                                    decision=decision)
        if refusal is not None:
            raise refusal
        if final and not note.strip():  # the audit trail says why a strike stands or falls
            raise InvalidParameter("Say why in the note: upholding or overturning a case needs one.",
                                   param="note")
        ModerationCase.objects.filter(pk=case.pk).update(
            status=_NEXT_STATUS[decision], decided_at=now if final else None)
        entry = CaseDecision.objects.create(
            case=case, moderator=moderator, decision=decision, note=note.strip(), created_at=now
        )
        case.refresh_from_db(fields=["status", "decided_at"])
        if decision == CaseDecision.Decision.UPHOLD:
            # In the decision's transaction rather than after it commits: the strike and the
            # suspension it triggers commit together or not at all, so a failure leaves no
            # strike standing without its suspension (the moderator sees the error and decides
            # again). A beat task recounting every tenant would instead leave a tenant over the
            # threshold working until its next run. The tenant's row lock (taken after the
            # case's) counts concurrent upholds one after the other, so neither misses the other.
            tenant_strikes_enforce(case=case, now=now)
        elif status == ModerationCase.Status.UPHELD:  # a strike taken back
            tenant_strikes_recount(case=case, overturn=entry, now=now)
    logger.info("case %s %s by %s", case.pk, decision, moderator)
    return entry


def tenant_strikes_enforce(*, case: ModerationCase, now) -> TenantSuspension | None:
    """In case_decide's transaction, for the case just upheld: N upheld strikes within the
    window (since the last suspension a moderator lifted) suspend, and the suspension links
    the cases it counted; a strike while one is open joins it."""
    tenant = case.tenant
    _tenant_lock(tenant=tenant)
    pending = selectors.suspension_active_for_tenant(tenant=tenant)
    if pending is not None:
        # Already pending review: the reviewer sees this strike too, and a tenant with an open
        # suspension stays suspended (this also mends a status set back by hand).
        pending.cases.add(case)
        TenantSuspension.objects.filter(pk=pending.pk).update(strike_count=F("strike_count") + 1)
        tenant_suspend(tenant=tenant, reason="moderation strikes")
        return None
    since = now - timedelta(hours=settings.SLUICE_MODERATION_STRIKE_WINDOW_HOURS)
    lifted_at = selectors.suspension_last_lifted_at(tenant=tenant)
    if lifted_at is not None and lifted_at > since:
        since = lifted_at  # strikes already reviewed by whoever lifted the suspension
    strikes = list(selectors.strikes(tenant=tenant, since=since))
    if len(strikes) < settings.SLUICE_MODERATION_STRIKES_TO_SUSPEND:
        return None
    suspension = TenantSuspension.objects.create(
        tenant=tenant,
        reason=f"{len(strikes)} upheld moderation strikes since {since:%Y-%m-%d %H:%M} UTC",
        strike_count=len(strikes),
        created_at=now,
    )
    suspension.cases.set(strikes)
    tenant_suspend(tenant=tenant, reason=f"{len(strikes)} moderation strikes")
    logger.warning("tenant %s suspended after %s strikes", tenant.slug, len(strikes))
    return suspension


def tenant_strikes_recount(*, case: ModerationCase, overturn: CaseDecision, now) -> TenantSuspension | None:
    """In case_decide's transaction, for an upheld case just overturned: the open strikes
    suspension that counted it is lifted, by that overturn, when fewer of its strikes stand than
    suspend. Only that reason: a tenant staff also suspended stays suspended."""
    tenant = case.tenant
    _tenant_lock(tenant=tenant)
    pending = selectors.suspension_active_for_tenant(tenant=tenant)
    if pending is None or not pending.cases.filter(pk=case.pk).exists():
        return None
    standing = pending.cases.filter(status=ModerationCase.Status.UPHELD).count()
    needed = settings.SLUICE_MODERATION_STRIKES_TO_SUSPEND
    if standing >= needed:
        return None
    TenantSuspension.objects.filter(pk=pending.pk, lifted_at__isnull=True).update(
        lifted_at=now, lifted_by=overturn.moderator, lifted_by_decision=overturn,
        lift_note=f"Case {case.pk} overturned: {standing} of its strikes stand, under the "
                  f"{needed} that suspend.",
    )
    _tenant_unsuspend_if_clear(tenant=tenant, actor=overturn.moderator,
                               reason=f"case {case.pk} overturned")
    logger.info("tenant %s: suspension lifted by the overturn of case %s", tenant.slug, case.pk)
    return pending


def _tenant_lock(*, tenant: Tenant) -> None:
    """Serialises the writes that add or lift a tenant's suspension reasons, so a lift that
    finds no reason left cannot race a new one. NO KEY: inserts that reference the tenant
    (cases, jobs) do not wait for it."""
    Tenant.objects.select_for_update(no_key=True).filter(pk=tenant.pk).exists()


def _tenant_unsuspend_if_clear(*, tenant: Tenant, actor, reason: str) -> bool:
    """Under _tenant_lock: the tenant stays suspended while any of its reasons is open (staff
    suspending it in the admin, strikes pending review); lifting one leaves the others."""
    if TenantSuspension.objects.filter(tenant=tenant, lifted_at__isnull=True).exists():
        return False
    return tenant_unsuspend(tenant=tenant, actor=actor, reason=reason)


def tenant_suspension_lift(*, tenant: Tenant, moderator, note: str = "") -> TenantSuspension:
    """Lift the strikes' suspension after review. Audited on the suspension row (who, when,
    why). A tenant staff also suspended stays suspended."""
    moderator_require(user=moderator)
    suspension = selectors.suspension_active_for_tenant(tenant=tenant)
    if suspension is None:
        raise NotFound("This tenant has no suspension pending review.")
    if not note.strip():  # the audit trail says why the tenant works again
        raise InvalidParameter("Say why in the note: lifting a suspension needs one.", param="note")
    now = timezone.now()
    with transaction.atomic():
        _tenant_lock(tenant=tenant)
        lifted = TenantSuspension.objects.filter(pk=suspension.pk, lifted_at__isnull=True).update(
            lifted_at=now, lifted_by=moderator, lift_note=note.strip()
        )
        if lifted != 1:
            raise InvalidParameter("This suspension was already lifted.")
        _tenant_unsuspend_if_clear(tenant=tenant, actor=moderator,
                                   reason="moderation suspension lifted after review")
    suspension.refresh_from_db(fields=["lifted_at", "lifted_by", "lift_note"])
    logger.info("tenant %s: suspension lifted by %s", tenant.slug, moderator)
    return suspension


def tenant_staff_suspend(*, tenant: Tenant, user) -> bool:
    """The admin's Suspend: recorded as its own reason, so lifting a moderation suspension
    later does not undo it. False: staff had suspended it already."""
    with transaction.atomic():
        _tenant_lock(tenant=tenant)
        try:
            with transaction.atomic():
                TenantSuspension.objects.create(
                    tenant=tenant, kind=TenantSuspension.Kind.STAFF, created_at=timezone.now(),
                    reason=f"Suspended by {user.get_username()} in the admin",
                )
        except IntegrityError:  # one open suspension per tenant and kind
            return False
        tenant_suspend(tenant=tenant, actor=user, reason="suspended by Sluice staff")
    return True


def tenant_staff_unsuspend(*, tenant: Tenant, user) -> bool:
    """The admin's Unsuspend: lifts staff's reason only; a suspension pending moderation review
    stays (lifted in the review queue). False: there was nothing of staff's to lift."""
    with transaction.atomic():
        _tenant_lock(tenant=tenant)
        lifted = TenantSuspension.objects.filter(
            tenant=tenant, kind=TenantSuspension.Kind.STAFF, lifted_at__isnull=True
        ).update(lifted_at=timezone.now(), lifted_by=user, lift_note="Unsuspended in the admin")
        unsuspended = _tenant_unsuspend_if_clear(tenant=tenant, actor=user,
                                                 reason="unsuspended by Sluice staff")
    return bool(lifted) or unsuspended


def case_prompts_purge(*, now=None) -> int:
    """Empty the prompts whose retention ended; the case and its decisions stay."""
    now = now or timezone.now()
    return ModerationCase.objects.filter(
        selectors.case_prompt_expired(now=now), prompt_purged=False
    ).update(prompt="", prompt_purged=True)


# --- rules ----------------------------------------------------------------------------------


def safety_rule_save(*, rule: SafetyRule) -> SafetyRule:
    """Create or edit a rule; this process sees it at once, others within the cache TTL."""
    rule.full_clean()
    rule.updated_at = timezone.now()
    rule.save()
    rules_cache_clear()
    return rule


def safety_rule_delete(*, rule: SafetyRule) -> None:
    rule.delete()
    rules_cache_clear()


# --- policies -------------------------------------------------------------------------------


def safety_policy_save(*, policy: SafetyPolicy | SafetyPolicyAssignment) -> None:
    """Create or edit a policy or an assignment; this process applies it at once, others
    within SLUICE_SAFETY_POLICY_TTL_S."""
    policy.full_clean()
    policy.save()
    selectors.safety_policy_cache_clear()


def safety_policy_delete(*, policy: SafetyPolicy | SafetyPolicyAssignment) -> None:
    policy.delete()
    selectors.safety_policy_cache_clear()
