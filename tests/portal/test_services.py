"""Membership changes decide on the rows as they are under the lock, not as the caller read them."""

from __future__ import annotations

import pytest

from portal.errors import InvalidParameter, PermissionDenied
from portal.models import Membership, Role
from portal.services import membership_remove, membership_role_change

pytestmark = pytest.mark.django_db


def handed_over(cast) -> tuple[Membership, Membership]:
    """The owner and the admin as a page read them, just before another request made the admin
    the only owner (and the owner an admin)."""
    stale_owner, stale_admin = (Membership.objects.get(pk=cast.owner.pk),
                                Membership.objects.get(pk=cast.admin.pk))
    Membership.objects.filter(pk=cast.admin.pk).update(role=Role.OWNER)
    Membership.objects.filter(pk=cast.owner.pk).update(role=Role.ADMIN)
    return stale_owner, stale_admin


def test_a_demoted_actor_can_no_longer_remove_or_demote_an_owner(cast):
    stale_owner, stale_admin = handed_over(cast)
    with pytest.raises(PermissionDenied):
        membership_remove(actor=stale_owner, membership=stale_admin)
    with pytest.raises(PermissionDenied):
        membership_role_change(actor=stale_owner, membership=stale_admin, role=Role.MEMBER)
    assert Membership.objects.get(pk=cast.admin.pk).role == Role.OWNER


def test_the_last_owner_is_kept_whatever_role_the_caller_read(cast):
    _, stale_target = handed_over(cast)  # read as an admin, now the only owner
    with pytest.raises(InvalidParameter):
        membership_remove(actor=Membership.objects.get(pk=cast.admin.pk), membership=stale_target)
    with pytest.raises(InvalidParameter):
        membership_role_change(actor=Membership.objects.get(pk=cast.admin.pk), membership=stale_target,
                               role=Role.MEMBER)
    assert Membership.objects.get(pk=cast.admin.pk).role == Role.OWNER


def test_a_removed_actor_changes_nothing(cast):
    stale_admin = Membership.objects.get(pk=cast.admin.pk)
    Membership.objects.filter(pk=cast.admin.pk).delete()
    with pytest.raises(PermissionDenied):
        membership_role_change(actor=stale_admin, membership=cast.viewer, role=Role.MEMBER)
    assert Membership.objects.get(pk=cast.viewer.pk).role == Role.VIEWER


def test_removing_a_member_revokes_the_keys_they_created_and_only_those(cast, api):
    from portal.models import ApiKey
    from tests.factories import api_key_for

    theirs = api_key_for(cast.tenant, name="member's laptop", created_by=cast.member.user)
    elsewhere = api_key_for(cast.outsider_tenant, name="their own tenant", created_by=cast.member.user)
    assert api.bearer(theirs).get("/v1/models").status_code == 200

    revoked = membership_remove(actor=cast.admin, membership=cast.member)

    assert [k.name for k in revoked] == ["member's laptop"]
    assert api.bearer(theirs).get("/v1/models").status_code == 401
    assert api.bearer(cast.owner_key).get("/v1/models").status_code == 200  # nobody's key
    assert api.bearer(elsewhere).get("/v1/models").status_code == 200
    assert ApiKey.objects.filter(tenant=cast.tenant, revoked_at__isnull=True).count() == 1


def test_a_refused_removal_revokes_nothing(cast):
    from portal.models import ApiKey
    from tests.factories import api_key_for

    api_key_for(cast.tenant, name="owner's", created_by=cast.owner.user)
    with pytest.raises(InvalidParameter):
        membership_remove(actor=cast.owner, membership=cast.owner)  # the last owner
    assert not ApiKey.objects.filter(revoked_at__isnull=False).exists()


def test_an_account_is_deleted_only_through_user_delete(cast, api):
    from django.contrib.auth import get_user_model
    from django.db import transaction
    from django.db.models import ProtectedError

    from portal.models import AuditEvent
    from tests.factories import api_key_for

    member = cast.member.user
    theirs = api_key_for(cast.tenant, name="member's laptop", created_by=member)
    with pytest.raises(ProtectedError, match="user_delete"), transaction.atomic():
        member.delete()  # the shell, a management command
    with pytest.raises(ProtectedError), transaction.atomic():
        get_user_model().objects.filter(pk=member.pk).delete()
    assert Membership.objects.filter(pk=cast.member.pk).exists()
    assert api.bearer(theirs).get("/v1/models").status_code == 200

    from portal.services import user_delete

    with pytest.raises(InvalidParameter, match=r"Acme \(acme\) would be left without an owner"):
        user_delete(user=cast.owner.user)
    assert Membership.objects.get(pk=cast.owner.pk).role == Role.OWNER

    assert [k.name for k in user_delete(user=member)] == ["member's laptop"]
    assert not get_user_model().objects.filter(pk=member.pk).exists()
    assert api.bearer(theirs).get("/v1/models").status_code == 401
    assert AuditEvent.objects.filter(tenant=cast.tenant, action=AuditEvent.Action.MEMBER_REMOVED,
                                     actor="Sluice").exists()
