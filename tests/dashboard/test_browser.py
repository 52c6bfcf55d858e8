"""The dashboard in a real browser against a real `edge fleet serve` and real agents.

One controller per module; each test starts the agents it needs (agents already running from an
earlier test are reused). Screenshots of every step land in test-artifacts/dashboard/.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from tests.dashboard.conftest import Agents, Fleet, login_with_password, login_with_token, shot
from tests.fixtures.bundles import make_generic_bundle

expect = pytest.importorskip("playwright.sync_api", reason="playwright is not installed").expect

pytestmark = pytest.mark.timeout(240)
# Real agents install, validate and activate a model in a few seconds; CI machines are slow.
ROLLOUT_S = 120_000
LIVE_S = 45_000
FLEET = ("edge-a1", "edge-a2")  # two agents: enough for two waves, cheap on two cores


def nav(page: Any, name: str) -> None:
    """Go to a page through the sidebar."""
    page.locator("nav.nav").get_by_role("link", name=name).click()


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory, signing_key: Any) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bundles")
    out = {v: make_generic_bundle(folder, signing_key, "tiny", v, "generic-cpu") for v in ("1.0.0", "2.0.0")}
    out["unsigned"] = make_generic_bundle(folder, None, "tiny", "9.9.9", "generic-cpu")
    return out


def test_login_with_the_first_run_token_then_users_with_passwords(fleet: Fleet, page: Any) -> None:
    page.goto(fleet.url + "/")
    expect(page.locator("#username")).to_be_visible()
    shot(page, "01-login")
    page.get_by_role("tab", name="API token").click()
    page.locator("#token").fill("edge_not-a-real-token")
    page.locator("#login-submit").click()
    expect(page.locator(".form-error")).to_contain_text("unknown or revoked API token")

    login_with_token(page, fleet)
    expect(page.locator(".topbar [data-role]")).to_have_text("admin")
    cookie = next(c for c in page.context.cookies() if c["name"] == "edge_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"

    nav(page, "Access")
    page.locator("#user-name").fill("olivia")
    page.locator("#user-password").fill("a long enough passphrase")
    page.locator("#user-role").select_option("read")
    page.locator("#user-add").click()
    expect(page.locator("table").first).to_contain_text("olivia")
    page.locator("#logout").click()
    expect(page.locator(".notice")).to_have_text("You are logged out.")

    page.locator("#username").fill("olivia")
    page.locator("#password").fill("not the passphrase")
    page.locator("#login-submit").click()
    expect(page.locator(".form-error")).to_have_text("wrong user name or password")
    login_with_password(page, fleet, "olivia", "a long enough passphrase")
    expect(page.locator(".topbar [data-role]")).to_have_text("read-only")
    nav(page, "Rollouts")
    expect(page.locator("#new-rollout")).to_have_count(0)  # read-only: no way to start one
    shot(page, "01-read-only-rollouts")


def test_devices_appear_as_agents_connect(fleet: Fleet, agents: Agents, page: Any) -> None:
    login_with_token(page, fleet)
    nav(page, "Devices")
    if not agents.procs:
        expect(page.get_by_text("No devices yet")).to_be_visible()
        shot(page, "02-devices-empty")
    agents.start(*FLEET, wait=False)
    for d in FLEET:  # no reload: the live stream brings them in
        expect(page.locator(f"tr[data-device='{d}']")).to_be_visible(timeout=LIVE_S)
        expect(page.locator(f"tr[data-device='{d}'] [data-state]").first).to_have_text("Online", timeout=LIVE_S)
    expect(page.locator("#device-summary")).to_contain_text("of 2 devices")
    page.locator("#device-search").fill("a2")
    expect(page.locator("tr[data-device]")).to_have_count(1)
    expect(page).to_have_url(re.compile(r"/ui/devices\?search=a2$"))
    shot(page, "02-devices-appeared")


def test_device_page_shows_identity_charts_events_and_answers_a_ping(fleet: Fleet, agents: Agents, page: Any) -> None:
    agents.start(*FLEET)
    login_with_token(page, fleet)
    nav(page, "Devices")
    page.locator("tr[data-device='edge-a1'] a").click()
    expect(page).to_have_url(re.compile(r"/ui/devices/edge-a1$"))
    expect(page.locator(".device-title")).to_have_text("edge-a1")
    expect(page.locator("section.card", has_text="Identity")).to_contain_text("generic-cpu")
    expect(page.locator("section.card", has_text="Capabilities")).to_contain_text("CPU")
    # The agents report every 2 s: the CPU and memory charts fill in live.
    expect(page.locator("[data-chart='cpu'] canvas")).to_be_visible(timeout=LIVE_S)
    expect(page.locator("[data-chart='ram'] canvas")).to_be_visible()
    expect(page.locator("[data-chart='temp']")).to_be_visible()

    page.locator("#action-ping").click()
    expect(page.locator("section.card", has_text="Commands")).to_contain_text("pong", timeout=LIVE_S)
    page.locator("#edit-labels").click()
    page.locator("#labels-tags").fill("canary, eu-west")
    page.locator("#labels-save").click()
    expect(page.locator("section.card", has_text="Tags and groups")).to_contain_text("canary")
    assert fleet.device("edge-a1")["tags"] == ["canary", "eu-west"]  # type: ignore[index]
    shot(page, "03-device")


def test_upload_a_bundle_start_a_rollout_and_watch_it_finish(fleet: Fleet, agents: Agents, page: Any,
                                                              bundles: dict[str, Path]) -> None:
    agents.start(*FLEET)
    login_with_token(page, fleet)
    nav(page, "Bundles")
    expect(page.get_by_text("No bundles yet")).to_be_visible()
    page.locator("#bundle-file").set_input_files(str(bundles["unsigned"]))
    page.locator("#bundle-upload").click()  # refused, and the page says why and what to do
    expect(page.locator(".upload-result .error-box")).to_contain_text("bundle is not signed")
    expect(page.locator(".upload-result .error-box")).to_contain_text("edge bundle sign")
    shot(page, "04-upload-refused")
    page.locator("#bundle-file").set_input_files(str(bundles["1.0.0"]))
    page.locator("#bundle-upload").click()
    expect(page.locator(".upload-result")).to_contain_text("signature verified", timeout=LIVE_S)
    page.locator(".upload-result a").click()
    expect(page.locator("section.card", has_text="Signature")).to_contain_text("verified")
    expect(page.locator("section.card", has_text="Fidelity")).to_contain_text("cosine_mean")
    shot(page, "04-bundle")

    page.get_by_role("link", name="Roll out this version").click()
    expect(page.locator("#rollout-version")).to_have_value("tiny@1.0.0")
    page.locator("#rollout-waves").fill("1, 100%")
    expect(page.locator("#wave-preview")).to_contain_text("1 → 1")
    expect(page.locator("#wave-preview")).to_contain_text("100% → 2")
    page.locator("#rollout-soak").fill("2")
    page.locator("#rollout-soak-unit").select_option("s")
    shot(page, "04-rollout-form")
    page.locator("#rollout-submit").click()
    expect(page).to_have_url(re.compile(r"/ui/rollouts/ro-[0-9a-f]+$"))
    # Watch it live: the canary wave, the soak, then everyone.
    expect(page.locator(".waves [data-wave='0'].wave-done")).to_be_visible(timeout=ROLLOUT_S)
    shot(page, "04-rollout-wave-1-done")
    expect(page.locator("#rollout-state")).to_have_text("Completed", timeout=ROLLOUT_S)
    expect(page.locator(".rollout-devices tr[data-state='committed']")).to_have_count(2)
    expect(page.locator("section.card", has_text="Audit trail")).to_contain_text("every wave passed")
    shot(page, "04-rollout-completed")

    nav(page, "Overview")
    expect(page.locator("[data-model='tiny']")).to_contain_text("1.0.0 × 2")
    shot(page, "04-overview-after-rollout")


def test_abort_a_rollout_from_its_page(fleet: Fleet, agents: Agents, page: Any, bundles: dict[str, Path]) -> None:
    agents.start(*FLEET)
    with fleet.client() as c:
        assert c.post("/api/v1/bundles", content=bundles["2.0.0"].read_bytes()).status_code in (200, 201)
        r = c.post("/api/v1/rollouts", json={"model": "tiny", "version": "2.0.0",
                                              "plan": {"waves": ["1", "100%"], "soak_s": 3600}})
        assert r.status_code == 201, r.text
        rid = r.json()["id"]
    login_with_token(page, fleet)
    page.goto(f"{fleet.url}/ui/rollouts/{rid}")
    expect(page.locator("#rollout-state")).to_have_text(re.compile("Deploying|Soaking"), timeout=LIVE_S)
    page.locator("#rollout-abort").click()
    page.locator("dialog textarea").fill("wrong version, stopping it")
    page.locator("dialog button[value='ok']").click()
    expect(page.locator("#rollout-state")).to_have_text("Aborted")
    expect(page.locator("#rollout-abort")).to_be_disabled()
    expect(page.locator("#rollout-rollback")).to_be_enabled()  # still revertible
    expect(page.locator("section.card", has_text="Audit trail")).to_contain_text("wrong version, stopping it")
    shot(page, "05-rollout-aborted")
    with fleet.client() as c:
        assert c.get(f"/api/v1/rollouts/{rid}").json()["state"] == "aborted"


def test_a_device_goes_offline_and_comes_back(fleet: Fleet, agents: Agents, page: Any) -> None:
    agents.start("edge-b1")
    login_with_token(page, fleet)
    page.goto(fleet.url + "/ui/devices?search=edge-b")
    row = page.locator("tr[data-device='edge-b1']")
    expect(row).to_have_attribute("data-status", "online")
    agents.kill("edge-b1")  # no goodbye: the broker publishes the agent's last will
    expect(row).to_have_attribute("data-status", "offline", timeout=LIVE_S)
    expect(page.locator(".toast", has_text="edge-b1 went offline")).to_be_visible()
    shot(page, "06-device-offline")

    nav(page, "Overview")
    expect(page.locator("[data-kpi='offline'] .kpi-value")).not_to_have_text("0")
    expect(page.locator("section.card", has_text="Recent failures")).to_contain_text("edge-b1")
    shot(page, "06-overview-with-offline-device")

    page.goto(fleet.url + "/ui/devices/edge-b1")
    expect(page.locator(".page-head-title")).to_contain_text("connection lost")
    agents.start("edge-b1", wait=False)
    expect(page.locator(".page-head-title [data-state]")).to_have_text("Online", timeout=LIVE_S)
