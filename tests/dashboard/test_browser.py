"""The dashboard in a real browser: Debian's chromium driven by Playwright against the real
ASGI server (uvicorn subprocess) and a real Celery worker running the tiny video model.

The server (the text stack's, when the run has text tests; the engines are waited for by the
text test alone) and the worker are started once for the module and share the test database;
each test gets a fresh, logged-out browser context and saves a screenshot under
test-artifacts/ (phone-width ones too), from which docs/screenshots/ are refreshed.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import httpx
import pytest

from inference.models import Job
from tests.conftest import LiveServer, WorkerProcess

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PASSWORD = "a-browser-pass-phrase-9"
PHONE = {"width": 390, "height": 844}


@pytest.fixture(scope="module")
def server(request, django_db_setup, django_db_blocker):
    """The text stack's web server when this run starts it anyway (for the playground's text
    test below, and the text API tests): a server's start is ~15 s of the 2-core machine's CPU.
    Only that server, not the stack: the tests before the text one do not wait for the engines
    (they load meanwhile). Otherwise (that test deselected) a server of the module's own."""
    if any("text_server" in item.fixturenames for item in request.session.items):
        yield request.getfixturevalue("text_server")
        return
    with django_db_blocker.unblock():
        live = LiveServer().wait_ready()
    yield live.url
    live.stop()


@pytest.fixture(scope="module")
def video_worker(django_db_setup, django_db_blocker):
    with django_db_blocker.unblock():
        worker = WorkerProcess("video-hbm")
    yield worker
    worker.stop()


@pytest.fixture(scope="module")
def chromium():
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium (.ci/run does)")
    # Playwright's sync API runs an event loop in this thread; the tests' ORM calls are
    # still plain synchronous code (Playwright's own advice for Django).
    previous = os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    with sync_playwright() as playwright:
        # launch() gives the browser a fresh temporary profile (user data dir) of its own.
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                             args=CHROMIUM_ARGS)
        yield browser
        browser.close()
    if previous is None:
        os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE")


@pytest.fixture
def page(chromium, server):
    context = chromium.new_context(base_url=server, viewport={"width": 1100, "height": 900})
    context.set_default_timeout(15_000)
    tab = context.new_page()
    yield tab
    context.close()


@pytest.fixture
def browser_cast(cast, settings):
    """The cast with real (PBKDF2) passwords: the server only knows the production hashers."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.PBKDF2PasswordHasher"]
    for membership in (cast.owner, cast.member):
        membership.user.set_password(PASSWORD)
        membership.user.save(update_fields=["password"])
    return cast


def log_in(page, username: str, next_path: str = "/") -> None:
    page.goto(f"/accounts/login/?next={next_path}")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(re.compile(r"/t/|/ops/"))


def shot(page, name: str, *, phone: bool = False) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    if phone:
        page.set_viewport_size(PHONE)
        page.wait_for_timeout(200)
        # Nothing may stick out sideways at a phone's width (tables scroll inside themselves).
        assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"] + 1, name
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=phone)


def test_log_in_create_copy_and_revoke_a_key(page, browser_cast, server):
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    log_in(page, "owner")
    page.get_by_role("link", name="API keys").click()
    page.get_by_label("Key name").fill("browser key")
    page.get_by_role("button", name="Create key").click()
    new_key = page.get_by_label("New API key")
    full_key = new_key.input_value()
    assert full_key.startswith("sk-")
    page.get_by_role("button", name="Copy").click()
    page.get_by_text("Copied to the clipboard.").wait_for()
    assert page.evaluate("navigator.clipboard.readText()") == full_key
    assert httpx.get(f"{server}/v1/models",
                     headers={"Authorization": f"Bearer {full_key}"}).status_code == 200
    shot(page, "api-key-created")
    page.get_by_role("button", name="Revoke browser key").click()
    page.get_by_text("Revoked browser key").wait_for()
    assert httpx.get(f"{server}/v1/models",
                     headers={"Authorization": f"Bearer {full_key}"}).status_code == 401


def test_playground_video_reaches_100_percent_and_plays(page, browser_cast, video_worker):
    log_in(page, "member", "/t/acme/playground/")
    page.get_by_label("Model").select_option("sluice-video-tiny")
    page.get_by_label("Prompt", exact=True).fill("a red square sliding left over a blue sea")
    page.get_by_label("Size").select_option("64x64")
    page.get_by_label("Seconds").fill("1")
    page.get_by_label("Steps").fill("12")
    page.get_by_role("button", name="Generate video").click()
    page.wait_for_url(re.compile(r"\?job=job_"))
    progress = page.locator("#job-progress")
    # Mid-run: the step counter moves over the job's websocket (no reload).
    page.wait_for_function("document.querySelector('#job-progress').value > 0", timeout=120_000)
    shot(page, "playground-mid-run")
    page.wait_for_function("document.querySelector('#job-progress').value == 100", timeout=120_000)
    assert progress.get_attribute("value") == "100"
    # The last step is not the end: the worker still encodes the mp4, then completes the job.
    page.locator("#job-panel [data-field=status]").filter(has_text="succeeded").wait_for(timeout=60_000)
    assert page.locator("#job-panel [data-field=step]").inner_text() == "12"
    page.wait_for_function("document.querySelector('video').readyState >= 2", timeout=30_000)
    page.evaluate("document.querySelector('video').play()")
    page.wait_for_function("document.querySelector('video').currentTime > 0", timeout=15_000)
    job = Job.objects.get(tenant=browser_cast.tenant)
    assert job.status == "succeeded" and job.actual_mcu == job.estimated_mcu
    shot(page, "playground-done")
    page.goto("/t/acme/")
    page.wait_for_function("window.Chart && Chart.getChart('burn-chart')")
    shot(page, "overview")
    shot(page, "overview-phone", phone=True)


def test_jobs_table_updates_live_and_a_running_job_is_cancelled(page, browser_cast, video_worker):
    from portal.services import playground_submit

    log_in(page, "member", "/t/acme/jobs/")
    page.get_by_text("Live updates: on").wait_for()
    page.evaluate("window.loadedOnce = true")  # gone if the page reloads
    # Big enough that a warm worker is still at it when the cancel arrives.
    job = playground_submit(actor=browser_cast.member, payload={
        # 720p: each step takes long enough that an idle machine does not finish first.
        "model": "sluice-video-tiny", "prompt": "a long one", "size": "1280x720", "seconds": "1",
        "num_inference_steps": "50"}).job
    row_status = page.locator(f"#job-row-{job.pk} [data-field=status]")
    row_status.filter(has_text="running").wait_for(timeout=120_000)
    assert page.evaluate("window.loadedOnce") is True
    shot(page, "jobs-live")
    page.get_by_role("link", name=job.pk).click()
    page.wait_for_function("document.querySelector('#job-progress').value > 0", timeout=60_000)
    page.get_by_role("button", name="Cancel job").click()
    page.locator("#job-panel [data-field=status]").filter(has_text="cancelled").wait_for(timeout=60_000)
    job.refresh_from_db()
    assert job.status == "cancelled" and 0 < job.actual_mcu < job.estimated_mcu
    shot(page, "job-cancelled")
    shot(page, "job-cancelled-phone", phone=True)


def test_operator_console_shows_pools_and_live_workers(page, browser_cast, video_worker):
    browser_cast.owner.user.is_staff = True
    browser_cast.owner.user.save(update_fields=["is_staff"])
    log_in(page, "owner", "/ops/")
    page.get_by_role("heading", name="GPU pools").wait_for()
    assert page.locator("td.mono", has_text="video-hbm").count() == 1
    # The module's worker answers the console's ping.
    page.locator("section", has=page.get_by_role("heading", name="Workers alive")).get_by_text(
        "test-video-hbm").wait_for()
    shot(page, "ops")
    shot(page, "ops-phone", phone=True)


def test_moderator_reaches_the_review_queue_from_the_console_and_decides_a_case(page, browser_cast):
    from django.contrib.auth.models import Permission

    from moderation.models import CaseDecision
    from tests.moderation.test_views import make_case

    case = make_case(browser_cast.tenant, category="jailbreak", score=0.95)
    operator = browser_cast.owner.user
    operator.is_staff = True
    operator.save(update_fields=["is_staff"])
    operator.user_permissions.add(Permission.objects.get(codename="review_case"))
    log_in(page, "owner", "/ops/")
    page.get_by_role("link", name="Open the review queue").click()
    page.get_by_role("link", name=str(case.pk), exact=True).click()
    page.get_by_label("Decision").select_option("overturn")
    page.get_by_label("Note").fill("a false positive")
    page.get_by_role("button", name="Record decision").click()
    page.wait_for_load_state()
    decision = CaseDecision.objects.get(case=case)
    assert (decision.moderator, decision.decision) == (operator, "overturn")
    shot(page, "moderation-decided")


# Last in the module: the vLLM engines (shared with the text API tests) busy-poll a core while
# they generate.
def test_playground_text_stream_shows_tokens_as_they_arrive(page, browser_cast, text_stack):
    # Count changes to the output while the page is open: tokens must land one batch at a
    # time over the job's websocket, not in one piece with a reload at the end.
    page.add_init_script("""
      window.textMutations = 0;
      document.addEventListener("DOMContentLoaded", function () {
        var out = document.querySelector("#job-panel [data-field=text]");
        if (out) new MutationObserver(function () { window.textMutations++; })
          .observe(out, { childList: true, characterData: true, subtree: true });
      });""")
    log_in(page, "member", "/t/acme/playground/")
    page.get_by_label("Model").select_option("sluice-code-tiny")
    page.get_by_label("Code to complete").fill("def add(a, b):")
    page.get_by_label("Max tokens").fill("400")
    page.get_by_role("button", name="Complete code").click()
    page.wait_for_url(re.compile(r"\?job=job_"))
    page.evaluate("window.loadedOnce = true")  # gone if the page reloads
    page.wait_for_function("window.textMutations > 0", timeout=120_000)
    page.locator("#job-panel").scroll_into_view_if_needed()
    shot(page, "playground-text-mid-stream")
    page.locator("#job-panel [data-field=status]").filter(has_text="succeeded").wait_for(timeout=120_000)
    job = Job.objects.get(tenant=browser_cast.tenant, kind="text")
    shown = page.locator("#job-panel [data-field=text]").text_content()
    assert shown == job.result["text"] and shown
    assert page.evaluate("window.textMutations") > 1 and page.evaluate("window.loadedOnce") is True
    assert job.actual_mcu == job.usage["prompt_tokens"] + job.usage["completion_tokens"]
    assert job.api_key.name == "Dashboard playground"
    shot(page, "playground-text")
