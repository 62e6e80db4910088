"""The dashboard in a real browser (Debian's chromium, headless, driven by Playwright).

Screenshots go to out/test-artifacts/server/ for a person to look at.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from server_support import FleetServer, server_settings, wait_until

from edgecam.device.upload import upload_clip
from edgecam.protocol import Alert, ClipReady, Command, CommandResult, Status, WorkerState
from edgecam.server import auth
from edgecam.server.simulate import SimDevice, make_stats

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "out" / "test-artifacts" / "server"
CLIP = ROOT / "media" / "motion_720p30_4s.mp4"
CHROMIUM = shutil.which("chromium")

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")


@pytest.fixture
def sqlite_fleet(broker: int, prefix: str, tmp_path: Path) -> Iterator[FleetServer]:
    url = f"sqlite:///{tmp_path / 'server.db'}"
    server = FleetServer(server_settings(url, broker, prefix, tmp_path))
    yield server
    server.close()


def _fill_history(device: SimDevice, minutes: int = 30) -> None:
    now = time.time()
    infos = [
        device.publish(make_stats(device.name, i, now - minutes * 60 + i * 5))
        for i in range(minutes * 12)
    ]
    for info in infos:
        info.wait_for_publish(5)
    device.seq = minutes * 12


def _upload_clip(fleet: FleetServer, device: SimDevice) -> str:
    _, token = auth.create_token(fleet.ctx.engine, "admin", "uploads", device=device.name)
    data = CLIP.read_bytes()
    now = time.time()
    clip = ClipReady(
        device=device.name,
        camera="main",
        name="main-demo.mp4",
        path="/clips/main-demo.mp4",
        size=len(data),
        duration=4.0,
        sha256=hashlib.sha256(data).hexdigest(),
        start=now - 30,
        end=now - 26,
        trigger=now - 28,
        reason="no_mask",
    )
    device.publish(clip).wait_for_publish(5)
    upload_clip(fleet.url, device.name, token, CLIP, clip)
    device.publish(
        Alert(
            device=device.name,
            camera="main",
            alert_id="b" * 32,
            rule="no_mask",
            state="raised",
            message="2 people without a mask",
            value=2,
            threshold=1,
            started=now - 28,
            clip=clip.name,
        )
    ).wait_for_publish(5)
    return clip.name


def test_dashboard_login_live_device_chart_command_and_clip(
    sqlite_fleet: FleetServer, broker: int, prefix: str
) -> None:
    from playwright.sync_api import expect, sync_playwright

    fleet = sqlite_fleet
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    device = SimDevice("lobby-cam", "127.0.0.1", broker, prefix)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(f"{fleet.url}/")
            expect(page).to_have_url(f"{fleet.url}/login?next=/")
            page.fill("input[name=username]", "admin")
            page.fill("input[name=password]", "wrong password")
            page.click("button[type=submit]")
            expect(page.locator(".error")).to_contain_text("Wrong user name or password")
            page.screenshot(path=str(ARTIFACTS / "0-login-failed.png"))
            page.fill("input[name=password]", "correct horse battery")
            page.click("button[type=submit]")
            expect(page.locator("h1")).to_have_text("Devices")
            page.screenshot(path=str(ARTIFACTS / "1-fleet-empty.png"))

            device.start()  # the device comes online while the page is open
            row = page.locator("tr[data-device=lobby-cam]")
            expect(row).to_have_attribute("data-online", "true", timeout=15_000)
            expect(page.locator("#online-count")).to_have_text("1")
            _fill_history(device)
            clip_name = _upload_clip(fleet, device)
            wait_until(lambda: fleet.http.get("/api/alerts").json(), timeout=10)
            page.reload()
            expect(page.locator("ul.alerts")).to_contain_text("2 people without a mask")
            page.screenshot(path=str(ARTIFACTS / "2-fleet-online.png"), full_page=True)

            page.click("a[href='/devices/lobby-cam']")
            chart = page.locator("#chart")
            expect(chart.locator("canvas")).to_be_visible(timeout=15_000)
            expect(chart).not_to_have_attribute("data-points", "0", timeout=15_000)
            assert int(chart.get_attribute("data-points") or 0) > 100
            expect(page.locator("#device-state")).to_have_text("online")
            expect(page.locator("table.workers")).to_contain_text("recorder")

            page.click("button[value=save_clip]")
            result = page.locator("li.command").first.locator(".result")
            expect(result).to_have_text("ok", timeout=15_000)
            assert device.commands and device.commands[-1].name == "save_clip"
            page.select_option("select[name=worker]", "recorder")
            page.click("button[value=worker_restart]")
            latest = page.locator("li.command").first
            expect(latest).to_contain_text("worker_restart")
            expect(latest.locator(".result")).to_have_text("ok", timeout=15_000)

            expect(page.locator("li.clip")).to_contain_text(clip_name)
            page.click("li.clip button.play")
            page.wait_for_function(
                "() => { const v = document.getElementById('player');"
                " return v.readyState >= 2 && v.currentTime > 0.2; }",
                timeout=20_000,
            )
            page.screenshot(path=str(ARTIFACTS / "3-device.png"), full_page=True)

            page.click("header a[href='/alerts']")
            expect(page.locator("h1")).to_have_text("Alerts across the fleet")
            expect(page.locator("ul.alerts")).to_contain_text("no_mask")
            page.screenshot(path=str(ARTIFACTS / "5-alerts.png"))
            page.click("header a[href='/docs']")  # Swagger UI, vendored, behind the login
            expect(page.locator(".swagger-ui .title")).to_contain_text("edgecam fleet server")
            expect(page.locator(".opblock-summary-path").first).to_be_visible()
            page.screenshot(path=str(ARTIFACTS / "6-api-docs.png"))

            phone = browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True)
            phone.context.add_cookies(page.context.cookies())
            phone.goto(f"{fleet.url}/devices/lobby-cam")
            expect(phone.locator("#chart canvas")).to_be_visible(timeout=15_000)
            phone.screenshot(path=str(ARTIFACTS / "4-device-phone.png"), full_page=True)
        finally:
            browser.close()
            device.stop()


# What a device (compromised, or its config wrong) may put in any string it sends.
HOSTILE = [
    '<img src=x onerror="window.__pwned=1">',
    "</script><script>window.__pwned=2</script>",
    "\"><svg onload=window.__pwned=3> it's",
    "javascript:window.__pwned=4",
    '<div hx-get="/health" hx-trigger="load" hx-on::load="window.__pwned=5">Küche</div>',
]


class _HostileDevice(SimDevice):
    """A device whose names, states and answers are all markup and script."""

    def status(self) -> Status:
        now = time.time()
        workers = [
            WorkerState(name=h, camera=h, state="crash_loop", since=now, error=h) for h in HOSTILE
        ]
        return Status(
            device=self.name,
            state="online",
            version=HOSTILE[0],
            profile=HOSTILE[1],
            cameras=HOSTILE,
            workers=workers,
            started=self.started,
        )

    def _on_message(self, _client: Any, _userdata: Any, msg: Any) -> None:
        cmd = Command.model_validate_json(msg.payload)
        self.commands.append(cmd)
        ok = cmd.name == "save_clip"
        data = {h: h for h in HOSTILE} if ok else {}
        error = None if ok else " ".join(HOSTILE)
        self.publish(CommandResult(command_id=cmd.id, ok=ok, error=error, data=data))


def test_what_a_device_sends_shows_as_text_and_runs_nothing(
    sqlite_fleet: FleetServer, broker: int, prefix: str
) -> None:
    from playwright.sync_api import expect, sync_playwright

    fleet = sqlite_fleet
    device = _HostileDevice("evil", "127.0.0.1", broker, prefix).start()
    now = time.time()
    for i, h in enumerate(HOSTILE):
        alert = Alert(
            device="evil",
            camera=h,
            alert_id=f"{i:032x}",
            rule=h,
            state="raised",
            message=h,
            started=now - 5,
        )
        device.publish(alert).wait_for_publish(5)
    clip = ClipReady(
        device="evil",
        camera=HOSTILE[0],
        name="main-1.mp4",
        path=HOSTILE[1],
        size=1,
        duration=1.0,
        sha256="0" * 64,
        start=now - 9,
        end=now - 8,
        trigger=now - 9,
        reason=HOSTILE[2],
    )
    device.publish(clip).wait_for_publish(5)
    wait_until(lambda: len(fleet.http.get("/api/alerts").json()) == len(HOSTILE))
    wait_until(lambda: fleet.http.get("/api/clips").json())
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            # Without the CSP, so that only the escaping stands between the text and a script.
            page = browser.new_context(bypass_csp=True).new_page()
            page.goto(f"{fleet.url}/login")
            page.fill("input[name=username]", "admin")
            page.fill("input[name=password]", "correct horse battery")
            page.click("button[type=submit]")
            expect(page.locator("h1")).to_have_text("Devices")
            for path in ("/", "/alerts", "/devices/evil"):
                page.goto(f"{fleet.url}{path}")
                # Every fragment swapped in by htmx now, as its poll would (every 2-10 s).
                swapped = page.evaluate(
                    "Promise.all([...document.querySelectorAll('[hx-get]')].map(el =>"
                    " htmx.ajax('GET', el.getAttribute('hx-get'), {target: el, swap: 'innerHTML'})"
                    ")).then(done => done.length)"
                )
                assert swapped >= 1, path
                text = page.inner_text("main")
                assert [h for h in HOSTILE if h not in text] == [], path
                assert page.evaluate("window.__pwned") is None, path
            page.click("button[value=save_clip]")
            expect(page.locator("li.command").first.locator(".result")).to_have_text("ok")
            page.select_option("select[name=worker]", HOSTILE[1])
            page.click("button[value=worker_restart]")
            latest = page.locator("li.command").first
            expect(latest.locator(".result")).to_have_text("failed", timeout=15_000)
            expect(latest).to_contain_text(" ".join(HOSTILE))
            # The arguments and the answer's data are shown as JSON, their text as it is.
            expect(latest.locator("code")).to_contain_text(HOSTILE[1])
            answer = page.locator("li.command").nth(1).locator("code").nth(1)
            for h in ("</script><script>", "it's", "Küche"):
                expect(answer).to_contain_text(h)
            assert page.evaluate("window.__pwned") is None

            # With the CSP, markup that did reach the page would run no script either.
            guarded = browser.new_page()
            guarded.context.add_cookies(page.context.cookies())
            guarded.goto(f"{fleet.url}/devices/evil")
            guarded.evaluate(f"document.body.insertAdjacentHTML('beforeend', {HOSTILE[0]!r})")
            guarded.wait_for_timeout(500)
            assert guarded.evaluate("window.__pwned") is None
        finally:
            browser.close()
            device.stop()
