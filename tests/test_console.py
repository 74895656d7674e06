"""The web console (hub/console/) in a real browser: Debian's chromium, driven by Playwright, against a real
`hub serve` with simulated devices (firmware-sim) over real sockets.

The hub, the console's site, the devices and the browser are shared by the module's tests (each test opens its own
browser context, so its own sessionStorage); tests that need a device in a known state have one of their own.
Screenshots go to each test's tmp_path.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from hub.fleet import Registry, registry_path
from tests.hubproc import HubProcess, run_hub
from tests.servers import ConsoleSite
from tests.waiting import wait_until

CHROMIUM = "/usr/bin/chromium"  # Debian's; Playwright cannot download its own browsers here
DESKTOP = {"width": 1280, "height": 860}
PHONE = {"width": 390, "height": 844}
SIM_DEVICES = ["sim-0001", "sim-0002", "sim-0003"]
TIMEOUT_MS = 20_000  # for a condition to show in the page (the hub and chromium share 2 cores with the suite)

expect.set_options(timeout=TIMEOUT_MS)


class ConsoleHub:
    """A `hub serve` child process with registered devices and operators; started by `console_url`."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.tokens: dict[str, str] = {}
        with Registry(registry_path(data_dir)) as registry:
            for name in [*SIM_DEVICES, "newcomer", "spare"]:
                self.tokens[name] = registry.add(name)
            registry.set_labels("spare", {"site": "cellar", "rack": "r1"}, [])
            self.tokens["alice"] = registry.add_operator("alice", "operator")
            self.tokens["victor"] = registry.add_operator("victor", "viewer")
            self.tokens["rita"] = registry.add_operator("rita", "operator")  # revoked by a test
        self.process: HubProcess | None = None

    def start(self, allowed_origins: list[str]) -> None:
        config = self.data_dir / "hub.toml"
        config.write_text(f"[control]\nallowed_origins = {json.dumps(allowed_origins)}\n")
        assert tomllib.loads(config.read_text())["control"]["allowed_origins"] == allowed_origins
        self.process = HubProcess(self.data_dir, "--config", str(config))
        self.process.start()

    @property
    def control_url(self) -> str:
        assert self.process is not None
        return f"ws://127.0.0.1:{self.process.port}/v1/control"

    @property
    def http_port(self) -> int:
        """The hub's HTTP port (metrics; once merged with the web side, the REST API and the console), by its log."""
        assert self.process is not None
        found: list[str] = []

        def logged() -> bool:
            assert self.process is not None
            found[:] = re.findall(r'msg="metrics listening".*?\bport=(\d+)', self.process.log())
            return bool(found)

        wait_until(logged, what="the hub's HTTP port in its log")
        return int(found[-1])

    def stop_for_restart(self) -> None:
        """SIGTERM, and wait for the hub to end; `start_again` starts it on the same ports."""
        assert self.process is not None
        http_port = self.http_port
        self.process.signal(signal.SIGTERM)
        self.process.wait(30)
        # HubProcess keeps the WebSocket port; the HTTP port (a page's origin) must stay too. The last one given wins.
        self.process.args = (*self.process.args, "--metrics-port", str(http_port))

    def start_again(self) -> None:
        assert self.process is not None
        self.process.start()

    def devices(self, *names: str, interval: float = 0.5) -> subprocess.Popen[bytes]:
        """firmware-sim running the devices `names` (reporting every `interval` s); the caller stops it."""
        assert self.process is not None
        tokens = self.data_dir / f"tokens-{'-'.join(names)}"
        tokens.write_text("".join(self.tokens[n] + "\n" for n in names))
        cmd = [sys.executable, "-m", "firmware_sim.cli", "--hub", f"ws://127.0.0.1:{self.process.port}"]
        cmd += ["--tokens", str(tokens), "--interval", str(interval), "--clock-skew", "0", "--progress-every", "60"]
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        if self.process is not None and self.process.proc is not None and self.process.proc.poll() is None:
            self.process.signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop firmware-sim gracefully (SIGINT: the devices close their sessions)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture(scope="module")
def console_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsoleHub]:
    """The hub (not started yet: `console_url` starts it), with its devices and operators registered."""
    console = ConsoleHub(tmp_path_factory.mktemp("console-hub"))
    try:
        yield console
    finally:
        console.stop()


@pytest.fixture(scope="module")
def console_url(console_hub: ConsoleHub) -> Iterator[str]:
    """The console's address: the hub's own HTTP port, whose origin the control channel allows without any
    `allowed_origins` entry."""
    console_hub.start(allowed_origins=[])
    yield f"http://127.0.0.1:{console_hub.http_port}/"


@pytest.fixture(scope="module")
def fleet(console_hub: ConsoleHub, console_url: str) -> Iterator[None]:
    """The simulated devices sim-0001..0003 online, reporting twice a second."""
    proc = console_hub.devices(*SIM_DEVICES)
    try:
        yield
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Debian's chromium, headless. A missing browser fails the tests: they are never skipped."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (scripts/test does)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM)
        try:
            yield launched
        finally:
            launched.close()


@contextmanager
def new_page(browser: Browser, **options: Any) -> Iterator[Page]:
    """A fresh tab (its own sessionStorage). The test fails if a script in it throws, or something it loads or does
    breaks the Content-Security-Policy."""
    context = browser.new_context(**options)
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(f"uncaught: {error}"))
    page.on("console", lambda m: problems.append(m.text) if "Content Security Policy" in m.text else None)
    try:
        yield page
    finally:
        context.close()
    assert not problems, problems


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A fresh tab at desktop width."""
    with new_page(browser, viewport=DESKTOP) as tab:
        yield tab


def refused_origins(console_hub: ConsoleHub) -> int:
    """How many control handshakes the hub has refused for their Origin, by its log."""
    assert console_hub.process is not None
    return len(re.findall(r"status=403 reason=origin_not_allowed .*endpoint=control", console_hub.process.log()))


def log_in(page: Page, url: str, token: str) -> None:
    page.goto(url)
    page.get_by_label("Operator token").fill(token)
    page.get_by_role("button", name="Log in").click()


def fleet_row(page: Page, name: str) -> Any:
    return page.locator(f'#fleet tbody tr[data-device="{name}"]')


def open_device(page: Page, name: str) -> None:
    page.locator("#fleet").get_by_role("link", name=name, exact=True).click()
    expect(page.locator("#device-name")).to_have_text(name)


def chart_points(page: Page, series: str) -> int:
    return int(page.locator(f'figure[data-series="{series}"]').get_attribute("data-points") or 0)


def test_an_operator_logs_in_and_sees_the_fleet_and_the_hub_status(
    page: Page, console_url: str, console_hub: ConsoleHub, fleet: None, tmp_path: Path
) -> None:
    log_in(page, console_url, console_hub.tokens["alice"])
    expect(page.locator("#who")).to_have_text("alice · operator")
    for name in SIM_DEVICES:
        expect(fleet_row(page, name)).to_have_attribute("data-state", "online")
    expect(fleet_row(page, "spare")).to_have_attribute("data-state", "never")
    expect(fleet_row(page, "spare").locator("td.labels")).to_have_text("rack=r1, site=cellar")
    expect(fleet_row(page, "sim-0001").locator("td.labels")).to_have_text("\u2013")  # an en dash: no labels
    expect(page.locator("#st-sink")).to_have_text("up")
    expect(page.locator("#st-connections")).to_have_text(re.compile(r"^\d+$"))
    # The token is in this tab's sessionStorage, never in the URL; a reload logs in again with it.
    assert console_hub.tokens["alice"] not in page.url
    assert page.evaluate("sessionStorage.getItem('hub.operatorToken')") == console_hub.tokens["alice"]
    page.reload()
    expect(page.locator("#who")).to_have_text("alice · operator")
    # Filters: by state, and by name.
    page.locator("#filter-state").select_option("never")
    expect(fleet_row(page, "spare")).to_be_visible()
    expect(fleet_row(page, "sim-0001")).to_have_count(0)
    page.locator("#filter-state").select_option("")
    page.locator("#filter-name").fill("0002")
    expect(page.locator("#fleet tbody tr")).to_have_count(1)
    expect(fleet_row(page, "sim-0002")).to_be_visible()
    page.locator("#filter-name").fill("")
    page.screenshot(path=tmp_path / "fleet-desktop.png", full_page=True)
    # Logging out forgets the token.
    page.get_by_role("button", name="Log out").click()
    expect(page.get_by_label("Operator token")).to_be_visible()
    assert page.evaluate("sessionStorage.getItem('hub.operatorToken')") is None


def test_a_device_goes_online_live_and_offline_when_it_leaves(
    page: Page, console_url: str, console_hub: ConsoleHub
) -> None:
    log_in(page, console_url, console_hub.tokens["alice"])
    expect(fleet_row(page, "newcomer")).to_have_attribute("data-state", "never")
    sim = console_hub.devices("newcomer")
    try:
        expect(fleet_row(page, "newcomer")).to_have_attribute("data-state", "online")
        expect(fleet_row(page, "newcomer").locator(".state")).to_have_text("online")
    finally:
        stop(sim)
    expect(fleet_row(page, "newcomer")).to_have_attribute("data-state", "offline")


def test_a_chart_gains_points(
    page: Page, console_url: str, console_hub: ConsoleHub, fleet: None, tmp_path: Path
) -> None:
    log_in(page, console_url, console_hub.tokens["alice"])
    open_device(page, "sim-0001")
    assert page.url.endswith("#/device/sim-0001")
    chart = page.locator("figure.chart:has(svg)").first
    expect(chart).to_be_visible()
    series = chart.get_attribute("data-series")
    assert series
    before = chart_points(page, series)
    page.wait_for_function(
        "([s, n]) => Number(document.querySelector(`figure[data-series='${s}']`).dataset.points) >= n + 3",
        arg=[series, before],
        timeout=TIMEOUT_MS,
    )
    expect(chart.locator("polyline")).to_have_attribute("points", re.compile(r"(\S+ ){3,}"))
    page.screenshot(path=tmp_path / "device-desktop.png", full_page=True)


def test_an_operator_sends_a_command_and_sees_it_succeed(
    page: Page, console_url: str, console_hub: ConsoleHub, fleet: None, tmp_path: Path
) -> None:
    log_in(page, console_url, console_hub.tokens["alice"])
    open_device(page, "sim-0002")
    rows = page.locator("#commands tbody tr")
    # Arguments are checked before anything is sent.
    page.get_by_label("Command").fill("echo")
    page.get_by_label("Arguments").fill('{"note": ')
    page.get_by_role("button", name="Send").click()
    expect(page.locator("#send-error")).to_contain_text("not valid JSON")
    page.get_by_label("Arguments").fill("[1, 2]")
    page.get_by_role("button", name="Send").click()
    expect(page.locator("#send-error")).to_contain_text("must be a JSON object")
    page.get_by_label("Command").fill("no spaces allowed")
    page.get_by_role("button", name="Send").click()
    expect(page.locator("#send-error")).to_contain_text("command name")
    expect(rows).to_have_count(0)
    # Device data is shown as text: markup in a result stays markup.
    page.get_by_label("Command").fill("echo")
    page.get_by_label("Arguments").fill('{"note": "<img src=x onerror=alert(1)><b>bold</b>"}')
    page.get_by_role("button", name="Send").click()
    expect(page.locator("#send-error")).to_have_text("")
    expect(rows).to_have_count(1)
    expect(rows.first).to_have_attribute("data-state", "succeeded")
    expect(rows.first.locator(".trail")).to_have_text("queued → sent → delivered → succeeded")
    expect(rows.first.locator("td.outcome")).to_contain_text("<b>bold</b>")
    expect(page.locator("#commands img, #commands b")).to_have_count(0)
    # A command the device does not know fails, with its error.
    page.get_by_label("Command").fill("self_destruct")
    page.get_by_label("Arguments").fill("")
    page.get_by_role("button", name="Send").click()
    failed = page.locator("#commands tbody tr", has_text="self_destruct")
    expect(failed).to_have_attribute("data-state", "failed")
    expect(failed.locator("td.outcome")).to_contain_text("unknown command")
    page.screenshot(path=tmp_path / "commands-desktop.png", full_page=True)


def test_an_operator_cancels_a_queued_command(page: Page, console_url: str, console_hub: ConsoleHub) -> None:
    log_in(page, console_url, console_hub.tokens["alice"])
    open_device(page, "spare")  # registered, never connected: its commands wait
    expect(page.locator("#device-summary")).to_contain_text("rack=r1, site=cellar")
    page.get_by_label("Command").fill("ping")
    page.get_by_role("button", name="Send").click()
    row = page.locator("#commands tbody tr").first
    expect(row).to_have_attribute("data-state", "queued")
    row.get_by_role("button", name="Cancel").click()
    expect(row).to_have_attribute("data-state", "cancelled")
    expect(row.get_by_role("button", name="Cancel")).to_have_count(0)


def test_a_viewer_has_no_send_button(
    page: Page, console_url: str, console_hub: ConsoleHub, fleet: None, tmp_path: Path
) -> None:
    # A command a viewer could otherwise cancel: queued for a device that never connects.
    log_in(page, console_url, console_hub.tokens["alice"])
    open_device(page, "spare")
    page.get_by_label("Command").fill("ping")
    page.get_by_role("button", name="Send").click()
    expect(page.locator('#commands tbody tr[data-state="queued"]').first).to_be_visible()
    page.get_by_role("button", name="Log out").click()

    log_in(page, console_url, console_hub.tokens["victor"])
    expect(page.locator("#who")).to_have_text("victor · viewer")
    open_device(page, "spare")
    expect(page.locator('#commands tbody tr[data-state="queued"]').first).to_be_visible()
    expect(page.get_by_role("button", name="Send")).to_have_count(0)
    expect(page.get_by_role("button", name="Cancel")).to_have_count(0)
    expect(page.locator("#send-form")).to_have_count(0)
    page.goto(f"{console_url}#/device/sim-0003")
    expect(page.locator("#device-name")).to_have_text("sim-0003")
    expect(page.locator("figure.chart").first).to_be_visible()
    expect(page.get_by_role("button", name="Send")).to_have_count(0)
    page.screenshot(path=tmp_path / "device-viewer.png", full_page=True)


def test_a_bad_token_is_refused_with_a_message(
    page: Page, console_url: str, console_hub: ConsoleHub, tmp_path: Path
) -> None:
    log_in(page, console_url, "op.alice.not-the-secret")
    expect(page.locator("#login-error")).to_contain_text("The hub refused this token")
    expect(page.locator("#fleet-view")).to_be_hidden()
    assert page.evaluate("sessionStorage.getItem('hub.operatorToken')") is None
    page.screenshot(path=tmp_path / "bad-token.png", full_page=True)
    # A device token is no operator token.
    page.get_by_label("Operator token").fill(console_hub.tokens["sim-0001"])
    page.get_by_role("button", name="Log in").click()
    expect(page.locator("#login-error")).to_contain_text("The hub refused this token")


def test_a_revoked_operator_is_sent_back_to_the_login_form(
    page: Page, console_url: str, console_hub: ConsoleHub
) -> None:
    log_in(page, console_url, console_hub.tokens["rita"])
    expect(page.locator("#who")).to_have_text("rita · operator")
    revoked = run_hub("operator", "revoke", "rita", "--data-dir", str(console_hub.data_dir))
    assert revoked.returncode == 0, revoked.stderr
    expect(page.locator("#login-error")).to_have_text("This operator's token was revoked.")
    expect(page.locator("#fleet-view")).to_be_hidden()
    assert page.evaluate("sessionStorage.getItem('hub.operatorToken')") is None


def test_a_page_from_a_foreign_origin_cannot_open_the_control_channel(
    browser: Browser, console_url: str, console_hub: ConsoleHub, tmp_path: Path
) -> None:
    """The same console served from an origin not in control.allowed_origins: the hub refuses the handshake."""
    before = refused_origins(console_hub)
    with ConsoleSite(lambda: console_hub.control_url) as foreign, new_page(browser, viewport=DESKTOP) as page:
        log_in(page, foreign.origin + "/", console_hub.tokens["alice"])
        expect(page.locator("#login-error")).to_contain_text("Cannot open the control channel")
        expect(page.locator("#login-error")).to_contain_text(foreign.origin)
        expect(page.locator("#fleet-view")).to_be_hidden()
        page.screenshot(path=tmp_path / "foreign-origin.png", full_page=True)
        # A plain WebSocket from this page never opens.
        outcome = page.evaluate(
            """(url) => new Promise((resolve) => {
                const ws = new WebSocket(url);
                ws.onopen = () => resolve("open");
                ws.onclose = (e) => resolve(`closed ${e.code}`);
            })""",
            console_hub.control_url,
        )
        assert outcome == "closed 1006"
        # A token this tab saved before is kept and tried again (the hub may be restarting): no new login needed.
        page.evaluate("(token) => sessionStorage.setItem('hub.operatorToken', token)", console_hub.tokens["alice"])
        page.reload()
        expect(page.locator("#login-error")).to_contain_text("Trying again")
        assert page.evaluate("sessionStorage.getItem('hub.operatorToken')") == console_hub.tokens["alice"]
        # The first try after the reload, and one more a few seconds later.
        wait_until(lambda: refused_origins(console_hub) >= before + 4, what="the saved token tried again")
        # The hub refused the handshakes for their Origin (403), before any token was looked at.
        wait_until(lambda: refused_origins(console_hub) >= before + 2, what="the hub's log of the refusals")


def test_hub_client_module_in_a_page_of_its_own(page: Page, console_url: str, console_hub: ConsoleHub) -> None:
    """hub-client.js as a user's page would use it: requests, typed errors, a subscription."""
    page.goto(console_url + "hub-client.js")  # any page of the allowed origin
    result = page.evaluate(
        """async ([url, token, viewer]) => {
            const { connect, HubError, AuthError } = await import("/hub-client.js");
            const out = {};
            try {
                await connect(url, "op.nobody.wrong");
            } catch (err) {
                out.bad = [err instanceof AuthError, err instanceof HubError, err.code, err.closeCode];
            }
            const hub = await connect(url, token);
            out.who = [hub.operator, hub.role];
            out.pong = (await hub.request("ping")) === undefined;
            out.names = (await hub.request("devices")).map((d) => d.name);
            out.cellar = (await hub.request("devices", { selector: "site=cellar" })).map((d) => d.name);
            try {
                await hub.request("device", { name: "no-such-device" });
            } catch (err) {
                out.notFound = [err instanceof HubError, err.code, err.message];
            }
            try {
                await hub.request("frobnicate");
            } catch (err) {
                out.unknown = err.code;
            }
            const seen = [];
            const sub = await hub.subscribe("commands", (r) => seen.push(r.state), { selector: "site=cellar" });
            const sent = await hub.request("send_command", { device: "spare", name: "ping" });
            await hub.request("cancel_command", { command_id: sent.command_id });
            while (!seen.includes("cancelled")) await new Promise((r) => setTimeout(r, 20));
            await sub.unsubscribe();
            const ended = new Promise((r) => hub.addEventListener("closed", (e) => r(e.detail.error)));
            hub.close();
            out.closedError = await ended;
            try {
                await hub.request("ping");
            } catch (err) {
                out.afterClose = err.code;
            }
            const looker = await connect(url, viewer);
            try {
                await looker.request("send_command", { device: "spare", name: "ping" });
            } catch (err) {
                out.viewerSends = err.code;
            }
            looker.close();
            return out;
        }""",
        [console_hub.control_url, console_hub.tokens["alice"], console_hub.tokens["victor"]],
    )
    assert result["bad"] == [True, True, "auth_invalid", 1008]
    assert result["who"] == ["alice", "operator"]
    assert result["pong"] is True
    assert set(SIM_DEVICES) <= set(result["names"])
    assert result["cellar"] == ["spare"]
    assert result["notFound"][:2] == [True, "not_found"]
    assert result["unknown"] == "unknown_type"
    assert result["closedError"] is None
    assert result["afterClose"] == "not_connected"
    assert result["viewerSends"] == "forbidden"


def test_hub_client_notices_a_hub_that_stopped_answering_and_reconnects(
    page: Page, console_url: str, console_hub: ConsoleHub, fleet: None
) -> None:
    """The hub process is frozen (SIGSTOP: its sockets stay open, nothing answers): the heartbeat's unanswered ping
    ends the connection; once the hub runs again the client reconnects and its subscription goes on."""
    process = console_hub.process
    assert process is not None and process.proc is not None
    page.goto(console_url + "hub-client.js")
    page.evaluate(
        """async ([url, token]) => {
            const { connect } = await import("/hub-client.js");
            const options = { heartbeat: 500, openTimeout: 1000, minDelay: 100, maxDelay: 500 };
            const hub = await connect(url, token, options);
            window.seen = { events: [], points: 0 };
            for (const name of ["disconnected", "reconnecting", "ready"]) {
                hub.addEventListener(name, () => window.seen.events.push(name));
            }
            await hub.subscribe("telemetry", () => window.seen.points++, { devices: ["sim-0001"] });
            window.hub = hub;
        }""",
        [console_hub.control_url, console_hub.tokens["alice"]],
    )
    page.wait_for_function("() => window.seen.points > 0", timeout=TIMEOUT_MS)
    process.signal(signal.SIGSTOP)
    try:
        page.wait_for_function("() => window.seen.events.includes('disconnected')", timeout=TIMEOUT_MS)
        assert page.evaluate("window.hub.connected") is False
    finally:
        process.signal(signal.SIGCONT)
    page.wait_for_function("() => window.seen.events.includes('ready')", timeout=TIMEOUT_MS)
    before = page.evaluate("window.seen.points")
    page.wait_for_function("(n) => window.seen.points > n", arg=before, timeout=TIMEOUT_MS)
    assert page.evaluate("window.hub.request('ping').then(() => 'pong')") == "pong"
    page.evaluate("window.hub.close()")


def test_phone_width(browser: Browser, console_url: str, console_hub: ConsoleHub, fleet: None, tmp_path: Path) -> None:
    """At a phone's width nothing needs sideways scrolling, and the send form is there for an operator."""
    with new_page(browser, viewport=PHONE, is_mobile=True, has_touch=True, device_scale_factor=2) as page:
        log_in(page, console_url, console_hub.tokens["alice"])
        expect(fleet_row(page, "sim-0001")).to_have_attribute("data-state", "online")
        page.screenshot(path=tmp_path / "fleet-phone.png", full_page=True)
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        open_device(page, "sim-0001")
        expect(page.locator("figure.chart").first).to_be_visible()
        expect(page.get_by_role("button", name="Send")).to_be_visible()
        page.get_by_label("Command").fill("ping")
        page.get_by_role("button", name="Send").click()
        succeeded = page.locator('#commands tbody tr[data-state="succeeded"]').first
        expect(succeeded).to_be_visible()
        expect(succeeded.locator("td.outcome")).to_be_hidden()  # no room for the Result column ...
        expect(succeeded.locator(".narrow-only")).to_contain_text('"pong":true')  # ... the result is under the state
        page.screenshot(path=tmp_path / "device-phone.png", full_page=True)
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")


def test_the_console_reconnects_and_subscribes_again_after_a_hub_restart(
    page: Page, console_url: str, console_hub: ConsoleHub, fleet: None
) -> None:
    """The hub stops and starts again on its port: the page reconnects by itself, and its subscriptions go on."""
    log_in(page, console_url, console_hub.tokens["alice"])
    open_device(page, "sim-0003")
    chart = page.locator("figure.chart:has(svg)").first
    expect(chart).to_be_visible()
    series = chart.get_attribute("data-series")
    assert series
    console_hub.stop_for_restart()
    expect(page.locator("#conn")).to_contain_text("reconnecting")
    before = chart_points(page, series)
    console_hub.start_again()
    expect(page.locator("#conn")).to_have_text("live")
    page.wait_for_function(
        "([s, n]) => Number(document.querySelector(`figure[data-series='${s}']`).dataset.points) >= n + 2",
        arg=[series, before],
        timeout=TIMEOUT_MS,
    )
    expect(page.locator("#who")).to_have_text("alice · operator")


def test_an_operator_changes_the_desired_twin_and_sees_the_device_apply_it(
    page: Page, console_url: str, console_hub: ConsoleHub, fleet: None, tmp_path: Path
) -> None:
    log_in(page, console_url, console_hub.tokens["alice"])
    open_device(page, "sim-0001")
    expect(page.locator("#twin-desired-version")).to_have_text(re.compile(r"v\d+"))
    page.get_by_label("Desired change").fill("[1]")
    page.get_by_role("button", name="Set desired").click()
    expect(page.locator("#twin-error")).to_contain_text("must be a JSON object")
    # The simulator applies its interval from the twin and reports it back; markup in a document stays text.
    page.get_by_label("Desired change").fill('{"interval": 0.4, "note": "<b>x</b>"}')
    page.get_by_role("button", name="Set desired").click()
    expect(page.locator("#twin-error")).to_have_text("")
    expect(page.locator("#twin-desired")).to_contain_text('"interval": 0.4')
    expect(page.locator("#twin-reported")).to_contain_text('"interval": 0.4', timeout=20_000)
    expect(page.locator("#twin-sync")).to_contain_text("Not applied yet")  # `note` is not the simulator's
    expect(page.locator(".twin b")).to_have_count(0)
    version = page.locator("#twin-desired-version").inner_text()
    page.get_by_label("Desired change").fill('{"note": null}')
    page.get_by_role("button", name="Set desired").click()
    expect(page.locator("#twin-sync")).to_have_attribute("data-sync", "in-sync", timeout=20_000)
    expect(page.locator("#twin-desired-version")).not_to_have_text(version)
    page.screenshot(path=tmp_path / "twin.png", full_page=True)
