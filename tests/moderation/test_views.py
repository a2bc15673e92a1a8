import pytest
from django.contrib.auth.models import Permission
from django.urls import reverse

from moderation import services
from moderation.cascade import SafetyVerdict
from moderation.models import CaseDecision, ModerationCase, SafetyRule
from moderation.rules import rules_active
from portal.models import Tenant
from portal.services import tenant_suspend
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db


def make_case(tenant, *, category="jailbreak", score=0.9) -> ModerationCase:
    verdict = SafetyVerdict(
        action="block", category_scores={"jailbreak": 0.0, "injection": 0.0, "harmful": 0.0} | {category: score},
        unsafe_score=score, categories=(category,), stage="classifier", policy_slug="standard",
    )
    return services.case_open(tenant=tenant, verdict=verdict, text=f"{tenant.slug} prompt", source="input")


@pytest.fixture
def cases(cast):
    return {
        "acme_jb": make_case(cast.tenant, category="jailbreak", score=0.95),
        "acme_harm": make_case(cast.tenant, category="harmful", score=0.4),
        "globex": make_case(cast.outsider_tenant, category="injection", score=0.8),
    }


def test_anonymous_is_sent_to_login(client, cases):
    response = client.get(reverse("moderation-queue"))
    assert response.status_code == 302 and "/accounts/login/" in response["Location"]


@pytest.mark.parametrize("who", ["owner", "admin", "viewer", "outsider"])
def test_tenant_roles_cannot_see_the_queue(client, cast, cases, who):
    client.force_login(getattr(cast, who).user)
    case = cases["globex" if who == "outsider" else "acme_jb"]
    for url in (reverse("moderation-queue"), reverse("moderation-case", args=[case.pk]),
                reverse("moderation-export")):
        assert client.get(url).status_code == 403
    assert client.post(reverse("moderation-case", args=[case.pk]), {"decision": "overturn"}).status_code == 403
    assert not CaseDecision.objects.exists()
    assert "Review queue" not in client.get(reverse("tenant-overview", args=[
        cast.outsider_tenant.slug if who == "outsider" else cast.tenant.slug])).content.decode()


def test_moderator_sees_and_filters_the_queue(client, moderator, cases):
    client.force_login(moderator)
    page = client.get(reverse("moderation-queue")).content.decode()
    assert "acme" in page and "globex" in page and "Review queue" in page

    def listed(**params):
        response = client.get(reverse("moderation-queue"), params)
        return {case.pk for case in response.context["page"]}

    assert listed(tenant="globex") == {cases["globex"].pk}
    assert listed(category="harmful") == {cases["acme_harm"].pk}
    assert listed(min_score="0.85") == {cases["acme_jb"].pk}
    assert listed(tenant="no-such-tenant") == set()
    # A filter that does not parse narrows to nothing rather than widening to every case.
    assert listed(tenant="globex", min_score="1.5") == set()
    assert listed(tenant="glo bex") == set()
    assert listed(status="closed") == set()
    assert "Ensure this value is less than or equal to 1" in client.get(
        reverse("moderation-queue"), {"min_score": "1.5"}).content.decode()


def test_the_queue_is_oldest_first_and_its_page_links_carry_one_page(client, moderator, cast):
    import html
    import re
    from datetime import timedelta

    from django.utils import timezone

    cases = [make_case(cast.tenant) for _ in range(101)]
    start = timezone.now() - timedelta(days=1)
    for minutes, case in enumerate(reversed(cases)):  # the last one made is the oldest
        ModerationCase.objects.filter(pk=case.pk).update(created_at=start + timedelta(minutes=minutes))
    client.force_login(moderator)

    def links(page):
        return {name: html.unescape(href) for href, name in
                re.findall(r'<a href="(\?[^"]*)">(Previous|Next)</a>', page.content.decode())}

    first = client.get(reverse("moderation-queue"), {"status": "open"})
    assert [case.pk for case in first.context["page"]][:2] == [cases[-1].pk, cases[-2].pk]
    assert links(first) == {"Next": "?status=open&page=2"}
    middle = client.get(reverse("moderation-queue") + links(first)["Next"])
    assert links(middle) == {"Previous": "?status=open&page=1", "Next": "?status=open&page=3"}
    last = client.get(reverse("moderation-queue") + links(middle)["Next"])
    assert [case.pk for case in last.context["page"]] == [cases[0].pk]  # the newest
    assert links(client.get(reverse("moderation-queue"), {"page": "2"})) == {"Previous": "?page=1",
                                                                             "Next": "?page=3"}


def test_moderator_decides_from_the_case_page_and_it_is_audited(client, moderator, cases):
    client.force_login(moderator)
    case = cases["acme_jb"]
    detail = client.get(reverse("moderation-case", args=[case.pk]))
    assert detail.status_code == 200 and "acme prompt" in detail.content.decode()
    response = client.post(reverse("moderation-case", args=[case.pk]), {"decision": "overturn", "note": "fp"})
    assert response.status_code == 302
    decision = CaseDecision.objects.get()
    assert (decision.moderator, decision.decision, decision.note) == (moderator, "overturn", "fp")
    assert "needs one" in client.post(reverse("moderation-case", args=[cases["acme_harm"].pk]),
                                      {"decision": "uphold", "note": ""}).content.decode()
    again = client.post(reverse("moderation-case", args=[case.pk]), {"decision": "uphold"})
    assert again.status_code == 200 and "already decided" in again.content.decode()
    assert CaseDecision.objects.count() == 1
    assert client.get(reverse("moderation-case", args=[999999])).status_code == 404


def test_moderator_exports_overturned_cases(client, moderator, cases):
    services.case_decide(case=cases["globex"], moderator=moderator, decision="overturn", note="a false positive")
    client.force_login(moderator)
    response = client.get(reverse("moderation-export"))
    body = b"".join(response.streaming_content).decode()
    assert response.status_code == 200 and '"label": "benign"' in body and "globex prompt" in body
    assert "acme prompt" not in body


def test_moderator_unsuspends_from_the_queue(client, moderator, cast, settings):
    settings.SLUICE_MODERATION_STRIKES_TO_SUSPEND = 1
    services.case_decide(case=make_case(cast.tenant), moderator=moderator, decision="uphold", note="a strike")
    assert Tenant.objects.get(pk=cast.tenant.pk).is_suspended
    client.force_login(cast.admin.user)
    assert client.post(reverse("moderation-unsuspend", args=["acme"]), {"note": "x"}).status_code == 403
    client.force_login(moderator)
    assert "Suspended tenants" in client.get(reverse("moderation-queue")).content.decode()
    response = client.post(reverse("moderation-unsuspend", args=["acme"]), {"note": "reviewed"})
    assert response.status_code == 302
    assert not Tenant.objects.get(pk=cast.tenant.pk).is_suspended
    assert client.post(reverse("moderation-unsuspend", args=["acme"]), {"note": "x"}).status_code == 404


def test_moderator_edits_rules_in_the_admin_and_they_apply_at_once(client, db):
    staff = UserFactory(username="ruler", is_staff=True)
    staff.user_permissions.add(*Permission.objects.filter(codename__in=["add_safetyrule", "change_safetyrule"]))
    client.force_login(staff)
    assert rules_active().first_hit(["the zebra gambit"]) is None
    response = client.post(reverse("admin:moderation_safetyrule_add"), {
        "name": "zebra", "family": "custom", "label": "jailbreak", "pattern": r"zebra\s+gambit",
        "enabled": "on", "description": "",
    })
    assert response.status_code == 302, response.content.decode()[:2000]
    assert SafetyRule.objects.filter(name="zebra").exists()
    assert rules_active().first_hit(["the zebra gambit"]).name == "zebra"


def test_suspended_status_does_not_block_the_moderator_pages(client, moderator, cast):
    tenant_suspend(tenant=cast.tenant)
    client.force_login(moderator)
    assert client.get(reverse("moderation-queue")).status_code == 200


def test_lifting_needs_a_note_and_a_suspension_lifted_meanwhile_is_a_message(client, moderator, cast,
                                                                              settings, monkeypatch):
    from moderation import selectors

    settings.SLUICE_MODERATION_STRIKES_TO_SUSPEND = 1
    services.case_decide(case=make_case(cast.tenant), moderator=moderator, decision="uphold", note="a strike")
    client.force_login(moderator)
    url = reverse("moderation-unsuspend", args=["acme"])
    page = client.post(url, {"note": "  "}, follow=True).content.decode()
    assert "a note is required" in page and Tenant.objects.get(pk=cast.tenant.pk).is_suspended

    # Both moderators found it open; the other one's lift commits first.
    seen_open = selectors.suspension_active_for_tenant(tenant=cast.tenant)
    services.tenant_suspension_lift(tenant=cast.tenant, moderator=moderator, note="first")
    monkeypatch.setattr(services.selectors, "suspension_active_for_tenant", lambda tenant: seen_open)
    response = client.post(url, {"note": "second"}, follow=True)
    assert response.status_code == 200 and "already lifted" in response.content.decode()
    assert not Tenant.objects.get(pk=cast.tenant.pk).is_suspended


def test_an_escalated_case_offers_no_escalate_and_says_already_escalated(client, moderator, cases, db):
    from django.contrib.auth.models import Permission

    senior = UserFactory(username="senior")
    senior.user_permissions.add(*Permission.objects.filter(codename__in=["review_case", "review_escalated"]))
    case = cases["acme_jb"]
    url = reverse("moderation-case", args=[case.pk])
    client.force_login(moderator)
    assert 'value="escalate"' in client.get(url).content.decode()
    services.case_decide(case=case, moderator=moderator, decision="escalate", note="unsure")
    page = client.get(url).content.decode()
    assert "<h2>Decide</h2>" not in page and "a senior reviewer" in page  # not theirs to decide
    again = client.post(url, {"decision": "escalate", "note": "still unsure"}).content.decode()
    assert "already escalated" in again and "already decided" not in again

    client.force_login(senior)
    page = client.get(url).content.decode()
    assert 'value="uphold"' in page and 'value="overturn"' in page and 'value="escalate"' not in page
    assert CaseDecision.objects.filter(case=case).count() == 1


def test_a_decision_lost_to_another_moderator_shows_the_case_as_it_is_now(client, moderator, cases,
                                                                          monkeypatch):
    from moderation import selectors

    case = cases["acme_jb"]
    other = UserFactory(username="other")
    other.user_permissions.add(Permission.objects.get(codename="review_case"))
    read_case = selectors.case_get
    reads = []

    def read_then_lose_the_race(*, case_id):
        found = read_case(case_id=case_id)
        if not reads:  # the other moderator's decision commits just after this request read it
            services.case_decide(case=read_case(case_id=case_id), moderator=other,
                                 decision="overturn", note="a false positive")
        reads.append(case_id)
        return found

    monkeypatch.setattr(selectors, "case_get", read_then_lose_the_race)
    client.force_login(moderator)
    response = client.post(reverse("moderation-case", args=[case.pk]),
                           {"decision": "uphold", "note": "an attack"})
    page = response.content.decode()
    assert response.status_code == 200 and "already decided" in page
    assert "<small>overturned</small>" in page and "<h2>Decide</h2>" not in page


def test_a_prompt_past_its_retention_is_shown_nowhere_before_the_purge_empties_it(
        client, admin_client, moderator, cast, settings):
    from datetime import timedelta

    from django.utils import timezone

    settings.SLUICE_MODERATION_PROMPT_RETENTION_DAYS = 30
    expired, shortened, kept = (make_case(cast.tenant) for _ in range(3))
    ModerationCase.objects.filter(pk=expired.pk).update(prompt_expires_at=timezone.now())
    ModerationCase.objects.filter(pk=shortened.pk).update(created_at=timezone.now() - timedelta(days=10))
    settings.SLUICE_MODERATION_PROMPT_RETENTION_DAYS = 7  # applies to the cases already stored
    client.force_login(moderator)
    for case, shown in ((expired, False), (shortened, False), (kept, True)):
        assert not ModerationCase.objects.get(pk=case.pk).prompt_purged  # the beat has not run
        page = client.get(reverse("moderation-case", args=[case.pk])).content.decode()
        assert ("acme prompt" in page) is shown, case
        assert ("retention period ended" in page) is not shown
        admin_page = admin_client.get(reverse("admin:moderation_moderationcase_change",
                                              args=[case.pk])).content.decode()
        assert ("acme prompt" in admin_page) is shown, case
