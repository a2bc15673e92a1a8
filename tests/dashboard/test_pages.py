"""Every dashboard page for every role: owner, admin, member, viewer, outsider, staff, anonymous."""

from __future__ import annotations

import pytest
from django.test import Client

pytestmark = pytest.mark.django_db

ROLES = ["owner", "admin", "member", "viewer"]


def tenant_pages(job_id: str) -> list[str]:
    return ["/t/acme/", "/t/acme/jobs/", f"/t/acme/jobs/{job_id}/", "/t/acme/jobs/?status=queued&kind=video",
            "/t/acme/playground/", f"/t/acme/playground/?job={job_id}", "/t/acme/usage.csv",
            "/t/acme/keys/", "/t/acme/members/", "/t/acme/webhooks/"]


def as_user(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


@pytest.mark.parametrize("role", ROLES)
def test_every_member_role_sees_every_tenant_page(cast, video_job, role):
    client = as_user(getattr(cast, role).user)
    for page in tenant_pages(video_job.pk):
        assert client.get(page).status_code == 200, page


def test_outsider_gets_404_on_every_page_and_action(cast, video_job):
    client = as_user(cast.outsider.user)
    for page in tenant_pages(video_job.pk) + [f"/t/acme/jobs/{video_job.pk}/content/"]:
        assert client.get(page).status_code == 404, page
    assert client.post(f"/t/acme/jobs/{video_job.pk}/cancel/").status_code == 404
    assert client.post("/t/acme/playground/", {"model": "sluice-video-tiny", "prompt": "x"}).status_code == 404
    # Through the outsider's own tenant, acme's job does not exist either.
    for page in [f"/t/globex/jobs/{video_job.pk}/", f"/t/globex/playground/?job={video_job.pk}",
                 f"/t/globex/jobs/{video_job.pk}/content/"]:
        assert client.get(page).status_code == 404, page
    assert client.post(f"/t/globex/jobs/{video_job.pk}/cancel/").status_code == 404
    video_job.refresh_from_db()
    assert video_job.status == "queued" and video_job.cancel_requested_at is None


def test_staff_without_membership_gets_404_on_tenant_pages(cast, video_job, staff):
    client = as_user(staff)
    for page in tenant_pages(video_job.pk):
        assert client.get(page).status_code == 404, page


def test_anonymous_is_sent_to_login(cast, video_job):
    for page in tenant_pages(video_job.pk) + ["/ops/"]:
        response = Client().get(page)
        assert response.status_code == 302 and "/accounts/login/" in response["Location"], page


def test_operator_console_is_staff_only(cast, staff):
    assert as_user(staff).get("/ops/").status_code == 200
    for role in ROLES + ["outsider"]:
        assert as_user(getattr(cast, role).user).get("/ops/").status_code == 404, role


def test_tabs_link_every_tenant_page_and_staff_see_the_console_link(cast, staff):
    html = as_user(cast.viewer.user).get("/t/acme/").content.decode()
    for href in ["/t/acme/jobs/", "/t/acme/playground/", "/t/acme/keys/", "/t/acme/members/",
                 "/t/acme/webhooks/"]:
        assert f'href="{href}' in html, href
    assert 'action="/t/acme/usage.csv"' in html
    assert "/ops/" not in html
    cast.viewer.user.is_staff = True
    cast.viewer.user.save(update_fields=["is_staff"])
    assert 'href="/ops/"' in as_user(cast.viewer.user).get("/t/acme/").content.decode()


def test_pages_load_vendored_scripts_from_static_not_a_cdn(cast):
    html = as_user(cast.owner.user).get("/t/acme/").content.decode()
    assert "/static/vendor/htmx/htmx.min.js" in html and "/static/vendor/chartjs/chart.umd.min.js" in html
    assert "cdn" not in html.lower() and "unpkg" not in html and "jsdelivr" not in html
    assert Client().get("/static/vendor/htmx/htmx.min.js").status_code == 200


def test_every_page_links_a_favicon_that_static_serves(cast):
    """Without one, each page load logged a 404 for /favicon.ico in the browser's console."""
    for html in (Client().get("/accounts/login/").content.decode(),
                 as_user(cast.owner.user).get("/t/acme/").content.decode()):
        assert '<link rel="icon" href="/static/sluice/favicon.svg" type="image/svg+xml">' in html
    icon = Client().get("/static/sluice/favicon.svg")
    assert icon.status_code == 200 and icon["Content-Type"] == "image/svg+xml"
    assert b"<svg" in b"".join(icon.streaming_content if icon.streaming else [icon.content])
