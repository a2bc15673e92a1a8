"""Writes for tenancy: tenants, memberships and API keys."""

from __future__ import annotations

import logging
import smtplib
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.apps import apps
from django.conf import settings
from django.contrib.admin.models import LogEntry
from django.contrib.auth import get_user_model
from django.contrib.auth.tokens import default_token_generator
from django.core.mail import send_mail
from django.db import IntegrityError, router, transaction
from django.db.models import ProtectedError, Q
from django.db.models.deletion import Collector
from django.urls import reverse
from django.utils import timezone
from django.utils.encoding import force_bytes
from django.utils.http import urlsafe_base64_encode
from django.utils.text import slugify

from portal.audit import STAFF_LABEL, Actor, audit_record, user_label
from portal.errors import (
    InvalidApiKey,
    InvalidParameter,
    NotFound,
    PermissionDenied,
    TenantSuspended,
)
from portal.keys import key_material_generate, key_material_parse, secret_digest, secret_matches
from portal.logs import log_context_bind
from portal.models import ApiKey, AuditEvent, Membership, Role, Tenant, Tier
from portal.signals import tenant_suspended

logger = logging.getLogger(__name__)
User = get_user_model()
_USERNAME_MAX_LENGTH = User._meta.get_field(User.USERNAME_FIELD).max_length

# Compared against when a prefix is unknown, so that path costs the same as a wrong secret.
_UNKNOWN_KEY_DIGEST = "0" * 64


def tenant_create(*, name: str, tier: Tier, owner=None, slug: str | None = None) -> Tenant:
    slug = slug or slugify(name)[:64]
    if not slug:
        raise InvalidParameter("A tenant needs a name with letters or digits.", param="name")
    with transaction.atomic():
        try:
            tenant = Tenant.objects.create(name=name, slug=slug, tier=tier)
        except IntegrityError as exc:
            raise InvalidParameter(f"The slug {slug!r} is taken.", param="slug") from exc
        if owner is not None:
            Membership.objects.create(user=owner, tenant=tenant, role=Role.OWNER)
    return tenant


# --- API keys -------------------------------------------------------------------------------


@dataclass(frozen=True)
class IssuedKey:
    api_key: ApiKey
    full_key: str  # shown to the caller exactly once, never stored


def api_key_issue(
    *,
    tenant: Tenant,
    name: str,
    created_by=None,
    expires_at: datetime | None = None,
    cu_cap: int | None = None,
    cu_per_minute: int | None = None,
) -> IssuedKey:
    name = name.strip()
    if not name:
        raise InvalidParameter("Give the key a name.", param="name")
    if expires_at is not None and expires_at <= timezone.now():
        raise InvalidParameter("The expiry must be in the future.", param="expires_at")
    if cu_cap is not None and cu_cap <= 0:
        raise InvalidParameter("The CU cap must be positive.", param="cu_cap")
    if cu_per_minute is not None and cu_per_minute <= 0:
        raise InvalidParameter("The CU/minute limit must be positive.", param="cu_per_minute")
    material = key_material_generate()
    with transaction.atomic():
        if created_by is not None and not User.objects.select_for_update().filter(
                pk=created_by.pk, is_active=True).exists():
            # The issuer's row, locked: a key issued while user_deactivate runs waits for it and
            # is refused, instead of landing after the revocation and outliving the account.
            raise PermissionDenied("This account is deactivated: it issues no keys.")
        api_key = ApiKey.objects.create(
            tenant=tenant,
            name=name[:120],
            prefix=material.prefix,
            secret_digest=secret_digest(material.secret),
            created_by=created_by,
            expires_at=expires_at,
            cu_cap=cu_cap,
            cu_per_minute=cu_per_minute,
        )
        audit_record(tenant=tenant, action=AuditEvent.Action.KEY_ISSUED, actor=created_by,
                     target=f"{api_key.masked} {api_key.name}",
                     detail={"expires_at": expires_at, "cu_cap": cu_cap,
                             "cu_per_minute": cu_per_minute})
    logger.info("api key issued tenant=%s key=%s", tenant.slug, api_key.masked)
    return IssuedKey(api_key=api_key, full_key=material.full_key)


def api_key_revoke(*, api_key: ApiKey, actor: Actor = None, reason: str = "") -> ApiKey:
    # Conditional update: revoking twice keeps the first revocation time (and one audit entry).
    with transaction.atomic():
        if ApiKey.objects.filter(pk=api_key.pk, revoked_at__isnull=True).update(
                revoked_at=timezone.now()):
            audit_record(tenant=api_key.tenant_id, action=AuditEvent.Action.KEY_REVOKED,
                         actor=actor, target=f"{api_key.masked} {api_key.name}",
                         detail={"reason": reason} if reason else {})
    api_key.refresh_from_db(fields=["revoked_at"])
    logger.info("api key revoked tenant=%s key=%s", api_key.tenant_id, api_key.masked)
    return api_key


def _api_keys_revoke(api_keys, *, actor: Actor, reason: str) -> list[ApiKey]:
    """Revoke those of `api_keys` (a queryset) that still work, in pk order, each as
    api_key_revoke does (audit-logged with `reason`). Returns them."""
    return [api_key_revoke(api_key=api_key, actor=actor, reason=reason)
            for api_key in api_keys.filter(revoked_at__isnull=True).order_by("pk")]


def api_key_authenticate(*, raw_key: str) -> ApiKey:
    """Resolve a presented key to its ApiKey, or raise the same InvalidApiKey for every cause."""
    material = key_material_parse(raw_key.strip())
    if material is None:
        raise InvalidApiKey()
    api_key = (
        ApiKey.objects.select_related("tenant", "tenant__tier")
        .filter(prefix=material.prefix)
        .first()
    )
    matches = secret_matches(
        material.secret, api_key.secret_digest if api_key else _UNKNOWN_KEY_DIGEST
    )
    if api_key is None or not matches or not api_key.is_usable:
        raise InvalidApiKey()
    # Every API entry point authenticates here: the rest of the request logs as this tenant.
    log_context_bind(tenant_id=api_key.tenant_id)
    if api_key.tenant.is_suspended:
        raise TenantSuspended()
    _api_key_touch(api_key=api_key)
    return api_key


def _api_key_touch(*, api_key: ApiKey) -> None:
    now = timezone.now()
    stale_before = now - timedelta(seconds=settings.API_KEY_LAST_USED_RESOLUTION_S)
    if api_key.last_used_at is None or api_key.last_used_at < stale_before:
        ApiKey.objects.filter(pk=api_key.pk).update(last_used_at=now)
        api_key.last_used_at = now


# --- role checks ------------------------------------------------------------------------------


def require_role(*, membership: Membership, role: str) -> None:
    if not membership.has_role_at_least(role):
        raise PermissionDenied()


def api_key_revoke_as(*, actor: Membership, api_key: ApiKey) -> ApiKey:
    """Admins revoke any key of their tenant; members only the keys they created."""
    if not (
        actor.has_role_at_least(Role.ADMIN)
        or (actor.has_role_at_least(Role.MEMBER) and api_key.created_by_id == actor.user_id)
    ):
        raise PermissionDenied()
    return api_key_revoke(api_key=api_key, actor=actor)


# --- dashboard playground ------------------------------------------------------------------------

PLAYGROUND_KEY_NAME = "Dashboard playground"


def playground_api_key(*, tenant: Tenant) -> ApiKey:
    """The tenant's key for work submitted from the dashboard: made on first use, its secret
    never shown (the dashboard submits on the member's behalf; nobody types it). Jobs need a
    key, and a dedicated one keeps playground usage apart in the ledger and the key list."""
    api_key = (
        # No issuer: a member may name a key of their own "Dashboard playground" (and cap it),
        # and the playground ran everyone's jobs on it, under that member's cap and name.
        ApiKey.objects.filter(tenant=tenant, name=PLAYGROUND_KEY_NAME, created_by__isnull=True,
                              revoked_at__isnull=True, expires_at__isnull=True)
        .select_related("tenant__tier").order_by("pk").first()
    )
    if api_key is None:
        api_key = api_key_issue(tenant=tenant, name=PLAYGROUND_KEY_NAME).api_key
    return api_key


def playground_submit(*, actor: Membership, payload: dict, form_token: str | None = None):
    """Submit a job from the playground as `actor` (members and up): a video, or a code
    completion whose tokens the page follows live. `form_token` is the rendered form's one-time
    token: submitting the same form twice returns the first job."""
    from inference.registry import model_get
    from inference.services import text_job_create, video_job_create

    require_role(membership=actor, role=Role.MEMBER)
    tenant_ensure_active(tenant=actor.tenant)
    create = text_job_create if model_get(payload.get("model", "")).kind == "text" else video_job_create
    return create(api_key=playground_api_key(tenant=actor.tenant), payload=payload,
                  idempotency_key=f"playground:{form_token}" if form_token else None,
                  endpoint="playground")


# --- memberships ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Invitation:
    membership: Membership
    # The person was already a member who has not chosen a password yet: a fresh link was
    # mailed, and the membership (its role too) is as it was.
    resent: bool
    emailed: bool  # False: the mail could not be sent (inviting again resends it)


def _check_role_grant(*, actor: Membership, role: str) -> None:
    require_role(membership=actor, role=Role.ADMIN)
    if role not in Role.values:
        raise InvalidParameter(f"Unknown role {role!r}.", param="role")
    if role not in actor.roles_grantable():
        raise PermissionDenied("Only an owner can make someone an owner.")


def membership_invite(*, actor: Membership, email: str, role: str, site_url: str) -> Invitation:
    """Add the person to the actor's tenant (making an account for an address that has none)
    and mail them. A set-password link goes to the address only, never to the inviter: whoever
    holds it owns the account, and every later invitation to that address, from any tenant,
    joins that account. Inviting again someone who has not chosen a password yet mails a fresh
    link (a lost mail, or an expired link: they last PASSWORD_RESET_TIMEOUT)."""
    _check_role_grant(actor=actor, role=role)
    email = User.objects.normalize_email(email.strip())
    if "@" not in email:
        raise InvalidParameter("Enter an email address.", param="email")
    with transaction.atomic():
        user = User.objects.filter(email__iexact=email).first()
        if user is None:
            if len(email) > _USERNAME_MAX_LENGTH:  # the new account's user name is the address
                raise InvalidParameter(f"An address of more than {_USERNAME_MAX_LENGTH} characters "
                                       "cannot get an account here.", param="email")
            try:
                with transaction.atomic():
                    user = User.objects.create_user(username=email.lower(), email=email)
            except IntegrityError as exc:
                # Another account has the address as its user name: one whose address has
                # changed since, or a concurrent invitation's. Neither is this person's to join.
                raise InvalidParameter(f"{email} is another account's user name; invite it "
                                       "again in a moment, or ask Sluice's staff.", param="email"
                                       ) from exc
            user.set_unusable_password()
            user.save(update_fields=["password"])
        membership, created = Membership.objects.get_or_create(
            user=user, tenant=actor.tenant, defaults={"role": role}
        )
        if not created and user.has_usable_password():
            raise InvalidParameter(f"{email} is already a member.", param="email")
        audit_record(tenant=actor.tenant, action=AuditEvent.Action.MEMBER_INVITED, actor=actor,
                     target=email, detail={"role": membership.role, "again": not created})
    emailed = _invitation_mail(membership=membership, inviter=actor.user, site_url=site_url)
    return Invitation(membership=membership, resent=not created, emailed=emailed)


def _invitation_mail(*, membership: Membership, inviter, site_url: str) -> bool:
    user, tenant = membership.user, membership.tenant
    site_url = site_url.rstrip("/")
    if user.has_usable_password():
        action = f"Sign in at {site_url}{reverse('login')}"
    else:
        path = reverse(
            "password_reset_confirm",
            kwargs={
                "uidb64": urlsafe_base64_encode(force_bytes(user.pk)),
                "token": default_token_generator.make_token(user),
            },
        )
        action = (f"Choose your password (the link works once): {site_url}{path}\n"
                  f"Your user name is {user.get_username()}.")
    body = (f"{inviter.email or inviter.get_username()} added you to {tenant.name} on Sluice "
            f"as {membership.get_role_display().lower()}.\n\n{action}\n")
    try:
        send_mail(f"You were added to {tenant.name} on Sluice", body, None, [user.email])
    except (OSError, smtplib.SMTPException):
        # The membership stands; inviting the address again resends. No address in the log.
        logger.warning("invitation mail for membership %s could not be sent", membership.pk,
                       exc_info=True)
        return False
    return True


def _owners_left_after(*, membership: Membership) -> int:
    return (
        Membership.objects.filter(tenant_id=membership.tenant_id, role=Role.OWNER)
        .exclude(pk=membership.pk)
        .count()
    )


def _memberships_lock(*, membership: Membership, actor: Membership | None = None
                      ) -> tuple[Membership | None, Membership]:
    """The target's row (and the actor's) as they are now, locked together with the tenant's
    owners in pk order (one order, so two changes wait for each other instead of deadlocking).
    The rows the caller holds were read before the lock: another request may have changed a
    role, demoted the actor or removed either since, and the checks must see that."""
    pks = [membership.pk] if actor is None else [membership.pk, actor.pk]
    locked = {
        row.pk: row
        for row in Membership.objects.select_for_update()
        .filter(tenant_id=membership.tenant_id)
        .filter(Q(role=Role.OWNER) | Q(pk__in=pks))
        .order_by("pk")
    }
    if actor is not None and actor.pk not in locked:
        raise PermissionDenied()
    if membership.pk not in locked:
        raise NotFound()
    return (None if actor is None else locked[actor.pk]), locked[membership.pk]


def membership_lock(*, membership: Membership) -> Membership:
    """The membership as it is now, locked with its tenant's owners until the caller's
    transaction ends (NotFound: it was removed). For a caller that checks the last-owner rule
    itself before saving through the services (the Django admin's form): its check must see
    the owners the save will."""
    _, locked = _memberships_lock(membership=membership)
    return locked


def membership_owner_rule_check(*, membership: Membership, role: str | None) -> None:
    """A tenant keeps an owner: refuse making the last one `role` (None: removing it). Decides
    under _memberships_lock; the admin's form asks it first too (under membership_lock), to show
    the refusal on the form."""
    if membership.role == Role.OWNER and role != Role.OWNER and _owners_left_after(membership=membership) == 0:
        raise InvalidParameter("A tenant needs at least one owner.",
                               param="membership" if role is None else "role")


def _membership_role_write(*, membership: Membership, role: str, actor: Actor) -> Membership:
    membership_owner_rule_check(membership=membership, role=role)
    if role != membership.role:
        audit_record(tenant=membership.tenant_id, action=AuditEvent.Action.MEMBER_ROLE_CHANGED,
                     actor=actor, target=user_label(membership.user),
                     detail={"from": membership.role, "to": role})
    membership.role = role
    membership.save(update_fields=["role"])
    return membership


def _membership_delete(*, membership: Membership, actor: Actor) -> list[ApiKey]:
    """Also revokes the tenant's keys the member created: they saw each in full and may still
    hold it. Returns those keys."""
    membership_owner_rule_check(membership=membership, role=None)
    membership.delete()
    revoked = _api_keys_revoke(
        ApiKey.objects.filter(tenant_id=membership.tenant_id, created_by_id=membership.user_id),
        actor=actor, reason="its issuer was removed")
    audit_record(tenant=membership.tenant_id, action=AuditEvent.Action.MEMBER_REMOVED,
                 actor=actor, target=user_label(membership.user),
                 detail={"role": membership.role, "keys_revoked": [k.masked for k in revoked]})
    return revoked


def membership_role_change(*, actor: Membership, membership: Membership, role: str) -> Membership:
    with transaction.atomic():
        actor, membership = _memberships_lock(membership=membership, actor=actor)
        _check_role_grant(actor=actor, role=role)
        if not actor.may_manage(membership):
            raise PermissionDenied("Only an owner can change an owner's role.")
        return _membership_role_write(membership=membership, role=role, actor=actor)


def membership_remove(*, actor: Membership, membership: Membership) -> list[ApiKey]:
    """Remove the member and revoke the keys they created (returned)."""
    with transaction.atomic():
        actor, membership = _memberships_lock(membership=membership, actor=actor)
        require_role(membership=actor, role=Role.ADMIN)
        if not actor.may_manage(membership):
            raise PermissionDenied("Only an owner can remove an owner.")
        return _membership_delete(membership=membership, actor=actor)


def membership_role_set_as_staff(*, membership: Membership, role: str, user=None) -> Membership:
    """Platform staff (`user`, in the Django admin) need no role in the tenant; the last-owner
    rule holds."""
    if role not in Role.values:
        raise InvalidParameter(f"Unknown role {role!r}.", param="role")
    with transaction.atomic():
        _, locked = _memberships_lock(membership=membership)
        # The admin's form has already set the new role on its instance: compare with the row.
        return _membership_role_write(membership=locked, role=role, actor=user)


def membership_remove_as_staff(*, membership: Membership, user=None) -> list[ApiKey]:
    """As membership_remove, for platform staff (`user`, in the Django admin)."""
    with transaction.atomic():
        _, membership = _memberships_lock(membership=membership)
        return _membership_delete(membership=membership, actor=user)


# --- accounts ---------------------------------------------------------------------------------


def _user_history(*, user) -> list[str]:
    """The records that say the user acted and would lose it with the account: the admin's log
    (deleted with its user), audit events labelled as staff (only actor_user says who), and
    whatever holds the user with PROTECT (a moderator's case decisions, lifted suspensions)."""
    counts = {
        str(LogEntry._meta.verbose_name_plural): LogEntry.objects.filter(user=user).count(),
        "audit events as staff": AuditEvent.objects.filter(actor_user=user, actor=STAFF_LABEL).count(),
    }
    try:
        Collector(using=router.db_for_write(type(user)), origin=user).collect([user])
    except ProtectedError as exc:
        for record in exc.protected_objects:
            name = str(record._meta.verbose_name_plural)
            counts[name] = counts.get(name, 0) + 1
    return [f"{name} ({count})" for name, count in counts.items() if count]


def user_delete_refusals(*, users) -> list[str]:
    """Why these accounts may not be deleted (together): the tenants that would be left without
    an owner, and the users whose history names them. Empty: they may. For the admin's
    confirmation page; user_delete decides again under the owners' lock."""
    users = list(users)
    user_ids = [user.pk for user in users]
    owners_kept = Membership.objects.filter(role=Role.OWNER).exclude(user_id__in=user_ids)
    ownerless = (Tenant.objects.filter(memberships__role=Role.OWNER, memberships__user_id__in=user_ids)
                 .exclude(pk__in=owners_kept.values("tenant_id")).distinct().order_by("name"))
    refusals = [f"{tenant.name} ({tenant.slug}) would be left without an owner: a tenant needs "
                f"at least one owner, so make someone else its owner first." for tenant in ownerless]
    for user in users:
        history = _user_history(user=user)
        if history:
            refusals.append(f"{user_label(user)} is named as who acted in {', '.join(history)}: "
                            f"deleting the account would lose that. Deactivate it instead "
                            f"(untick Active).")
    return refusals


def user_delete(*, user, actor: Actor = None) -> list[ApiKey]:
    """Delete a person's account (platform staff `actor`: the admin, a command). Each of their
    memberships goes as membership_remove_as_staff removes it (the keys they created revoked,
    audit-logged in each tenant), then any other key of theirs that still works (from a tenant
    they had left), then the account. Refused (InvalidParameter) when user_delete_refusals has
    reasons. Returns the revoked keys."""
    with transaction.atomic():
        memberships = []
        # Each tenant's owners locked, tenants in pk order (one order, as every other writer
        # locks one tenant): the last-owner rule is decided on what the removals will see.
        for membership in Membership.objects.filter(user=user).order_by("tenant_id", "pk"):
            try:
                memberships.append(membership_lock(membership=membership))
            except NotFound:  # another request removed it since
                continue
        refusals = user_delete_refusals(users=[user])
        if refusals:
            raise InvalidParameter(" ".join(refusals), param="user")
        revoked = [api_key for membership in memberships
                   for api_key in _membership_delete(membership=membership, actor=actor)]
        revoked += _api_keys_revoke(ApiKey.objects.filter(created_by=user), actor=actor,
                                    reason="its issuer's account was deleted")
        user_id = user.pk
        user.delete()
    logger.info("user %s deleted; %d key(s) revoked", user_id, len(revoked))
    return revoked


def user_deactivate(*, user, actor: Actor = None) -> list[ApiKey]:
    """Deactivate a person's account (platform staff `actor`: the admin's change form and its
    action, a command). It signs in no more (Django's login and its session backend refuse an
    inactive user, sessions already open included), and every key it created that still works is
    revoked, in every tenant, audit-logged there: the person saw each in full and may still hold
    it. One transaction; the account's row is written first, so a key issued meanwhile
    (api_key_issue locks its issuer's row) waits and is refused. Idempotent: on an inactive
    account it revokes only what is left (nothing, once it ran), and records nothing else.
    Reactivating the account (ticking Active again) restores none: revoked keys stay revoked, and
    the person issues new ones. Returns the keys this call revoked."""
    with transaction.atomic():
        User.objects.filter(pk=user.pk).update(is_active=False)
        user.is_active = False
        revoked = _api_keys_revoke(ApiKey.objects.filter(created_by=user), actor=actor,
                                   reason="its issuer's account was deactivated")
    logger.info("user %s deactivated; %d key(s) revoked", user.pk, len(revoked))
    return revoked


def user_delete_guard(sender, instance, **kwargs) -> None:
    """pre_delete of every user (portal/apps.py). A delete that did not come through user_delete
    (the shell, a command, Django's own admin actions) would cascade to the memberships past
    the services (a tenant left without an owner, the member's keys still working) and to the
    admin log of what they did: it is refused, so that user_delete is the only way."""
    memberships = set(Membership.objects.filter(user=instance))
    if memberships:
        raise ProtectedError(f"{user_label(instance)} is a member of tenants: delete the account "
                             "with portal.services.user_delete, which removes the memberships "
                             "through the services first.", memberships)
    history = _user_history(user=instance)
    if history:
        raise ProtectedError(f"{user_label(instance)} is named as who acted in {', '.join(history)}: "
                             "deactivate the account instead.", set(LogEntry.objects.filter(user=instance)))


def tenant_suspend(*, tenant: Tenant, actor: Actor = None, reason: str = "") -> bool:
    """Its keys stop working at once (api_key_authenticate); the apps stop its work when the
    change commits (portal.signals.tenant_suspended). False: it was suspended already.
    The suspension stands once committed: a receiver that fails then (Redis down while
    inference cancels the jobs) is logged, not raised to the moderator or admin, and the
    reconciliation (inference/reconcile.py) cancels what it left."""
    with transaction.atomic():
        changed = _tenant_status_set(tenant=tenant, status=Tenant.Status.SUSPENDED, actor=actor,
                                     reason=reason, action=AuditEvent.Action.TENANT_SUSPENDED)
        if changed:
            transaction.on_commit(lambda: tenant_suspended.send(sender=Tenant, tenant=tenant),
                                  robust=True)
    return changed


def tenant_unsuspend(*, tenant: Tenant, actor: Actor = None, reason: str = "") -> bool:
    """False: it was active already."""
    with transaction.atomic():
        return _tenant_status_set(tenant=tenant, status=Tenant.Status.ACTIVE, actor=actor,
                                  reason=reason, action=AuditEvent.Action.TENANT_UNSUSPENDED)


def _tenant_status_set(*, tenant: Tenant, status: str, actor: Actor, reason: str,
                       action: str) -> bool:
    """A conditional update, recorded in the audit log when it changed anything."""
    changed = Tenant.objects.filter(pk=tenant.pk).exclude(status=status).update(status=status)
    if changed:
        audit_record(tenant=tenant, action=action, actor=actor,
                     detail={"reason": reason} if reason else {})
    return bool(changed)


# --- deleting a tenant -----------------------------------------------------------------------

# What a tenant leaves that must outlive any decision to be rid of it, each related to it by a
# `tenant` foreign key (CASCADE: deleted, it would go too): its bill (the ledger is the truth,
# its reservations and jobs the usage the ledger and the usage reports refer to) and its
# standing (moderation cases are strikes and the audit trail, with their decisions and its
# suspensions). Its audit log, keys, members and webhooks go with it (AuditEvent: "kept for as
# long as the tenant"). By app label (portal is the base the other apps build on), with the
# name a refusal gives each.
TENANT_HISTORY = {
    "quotas.LedgerEntry": "ledger entries",
    "quotas.Reservation": "budget reservations",
    "inference.Job": "jobs",
    "moderation.ModerationCase": "moderation cases",
    "moderation.TenantSuspension": "suspensions",
}


def _tenant_history(*, tenant: Tenant) -> list[str]:
    """The kinds of history the tenant has (one indexed EXISTS each)."""
    return [name for label, name in TENANT_HISTORY.items()
            if apps.get_model(label)._default_manager.filter(tenant_id=tenant.pk).exists()]


def tenant_delete_refusals(*, tenants) -> list[str]:
    """Why these tenants may not be deleted: the history each has. Empty: they may (a tenant
    created by mistake, or one that never used anything). For the admin's confirmation page;
    tenant_delete decides again under the tenant's lock."""
    refusals = []
    for tenant in tenants:
        history = _tenant_history(tenant=tenant)
        if history:
            refusals.append(f"{tenant.name} ({tenant.slug}) has {', '.join(history)}: deleting the "
                            f"tenant would delete them with it, and they must be kept. Suspend it "
                            f"instead (the Suspend action): its keys stop working and its work stops.")
    return refusals


def tenant_delete(*, tenant: Tenant, actor: Actor = None) -> list[ApiKey]:
    """Delete a tenant that has no history (platform staff `actor`: the admin, a command): its
    keys are revoked first, as any revocation is (api_key_revoke: the platform's log names each
    key that stopped), then it goes with its members, keys, audit log and webhooks. Refused (InvalidParameter)
    when tenant_delete_refusals has reasons: suspend it instead. The tenant's row is locked
    first, so a job or reservation being written for it (its foreign key waits for that lock)
    is either seen by the check or waits, and then fails, on a tenant that is gone. Returns the
    revoked keys."""
    with transaction.atomic():
        locked = Tenant.objects.select_for_update().filter(pk=tenant.pk).first()
        if locked is None:
            raise NotFound()  # deleted by another request since it was read
        refusals = tenant_delete_refusals(tenants=[locked])
        if refusals:
            raise InvalidParameter(" ".join(refusals), param="tenant")
        revoked = _api_keys_revoke(ApiKey.objects.filter(tenant=locked), actor=actor,
                                   reason="its tenant was deleted")
        locked.delete()
    logger.info("tenant %s (%s) deleted; %d key(s) revoked", tenant.pk, tenant.slug, len(revoked))
    return revoked


def tenant_delete_guard(sender, instance, **kwargs) -> None:
    """pre_delete of every tenant (portal/apps.py). A delete that did not come through
    tenant_delete (the shell, a command, a bulk delete) would cascade to the tenant's ledger,
    jobs, moderation cases and suspensions: it is refused while any is there."""
    history = _tenant_history(tenant=instance)
    if history:
        raise ProtectedError(f"{instance.name} ({instance.slug}) has {', '.join(history)}, which "
                             "must be kept: suspend the tenant instead of deleting it.", {instance})


def tenant_ensure_active(*, tenant: Tenant) -> None:
    if tenant.is_suspended:
        raise TenantSuspended()


def membership_visit(*, membership: Membership) -> None:
    """Record that the user switched to this tenant, so their next login lands there."""
    Membership.objects.filter(pk=membership.pk).update(last_visited_at=timezone.now())
