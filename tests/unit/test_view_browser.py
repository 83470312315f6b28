"""The status page in a real headless Chromium (Debian's, driven by Selenium) against a real
daemon on libvirt's test driver: the slot map is `vacfactory machines --json`, the charts
draw the expected series, the numbers change when VMs start and end, hostile names and
shutdown messages stay text, nothing is fetched from anywhere but the factory, and the
console stays clean."""

from __future__ import annotations

import json
import re
import socket
import time

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By

from tests.unit.view_harness import ViewDaemon, free_port, write_config
from tests.waiting import scaled
from vacfactory.cli.main import main
from vacfactory.space.responder import Responder
from vacfactory.space.snapshot import FactorySnapshot, MachinetypeStatus

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
HOSTILE = "<script>document.title='pwned'</script><img src=x onerror=\"document.title='pwned'\">"
PIPE_SUFFIX = "<script>document.title='pwned'</script>"


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1600", "--no-first-run", "--disable-extensions",
                # JavaScript's network: only the factory's loopback listener resolves at all
                "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def machines_json(capsys, config_path: str) -> list:
    capsys.readouterr()
    assert main(["-c", config_path, "machines", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def slot_map(driver) -> list:
    return driver.execute_script("""
        return Array.from(document.querySelectorAll('#slots .slot')).map(d => ({
            slot: +d.dataset.slot, state: d.dataset.state, name: d.dataset.name || null,
            machinetype: d.dataset.machinetype || null}));""")


def series(driver) -> dict:
    """chart title -> the data-series names of its non-empty polylines."""
    return driver.execute_script("""
        const out = {};
        for (const s of document.querySelectorAll('svg[data-chart]')) {
            out[s.dataset.chart] = Array.from(s.querySelectorAll('polyline'))
                .filter(p => p.getAttribute('points').trim().split(' ').length >= 2)
                .map(p => p.dataset.series);
        }
        return out;""")


def wait_in_browser(driver, check, what: str, timeout: float = 15.0):
    """Poll ``check(driver)`` until it is true. The page replaces what it re-renders, so an
    element found a moment ago can be gone when it is read (stale): that is "not yet"."""
    deadline = time.monotonic() + scaled(timeout)
    while time.monotonic() < deadline:
        try:
            value = check(driver)
        except StaleElementReferenceException:
            value = None
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting in the browser for {what}")


def text_of(driver, by: str, value: str) -> str:
    """The (non-empty) text of an element the page may be re-rendering meanwhile."""
    return wait_in_browser(driver, lambda d: d.find_element(by, value).text, f"the text of {value}")


@pytest.fixture
def factory(tmp_path):
    """A daemon with a hostile pipe entry and a peer whose answer names a hostile machinetype."""
    udp_port = free_port(socket.SOCK_DGRAM)
    pipe = tmp_path / "pipe.json"
    pipe.write_text(json.dumps({"machinetypes": [{"suffix": PIPE_SUFFIX, "target_share": 1,
                                                  "root_image": "/nonexistent"}]}))
    path = write_config(str(tmp_path), processors=4, extra=(
        "factories = . 127.0.0.2 127.0.0.3\nudp_timeout_seconds = 0.3\n"
        f"\n[vacuum_pipe vo]\nvacuum_pipe_url = file://{pipe}\ntarget_share = 0\n"))
    with open(path) as f:
        text = re.sub(r"udp_port = [0-9]+", f"udp_port = {udp_port}", f.read())
    with open(path, "w") as f:
        f.write(text)
    snapshot = FactorySnapshot(space="space.example.org", factory="127.0.0.2", machinetypes=(
        MachinetypeStatus("alpha", running_processors=5, running_hs06=50.0),
        MachinetypeStatus(HOSTILE, running_processors=1, running_hs06=10.0)))
    responder = Responder(("127.0.0.2", udp_port), lambda: snapshot, "space.example.org", lambda: {"127.0.0.1"})
    responder.start()
    v = ViewDaemon(path)
    v.daemon.space.clock = v.clock
    v.daemon.refresh_pipes()
    yield v, path
    v.close()
    responder.stop()


def test_the_page_in_chromium_shows_the_factory_and_follows_it(browser, factory, capsys):
    v, config = factory
    v.daemon.space.query_once()
    v.round()
    v.clock.advance(60)
    v.daemon.space.query_once()
    v.round()  # two minutes of points: the charts have lines
    browser.get(v.url + "/")
    assert browser.title.startswith("vacfactory")

    # the slot map is machines --json
    rows = machines_json(capsys, config)
    expected = [{"slot": r["slot"], "state": r["state"], "name": r.get("name"), "machinetype": r.get("machinetype")}
                for r in rows]
    wait_in_browser(browser, lambda d: slot_map(d) == expected, "the slot map")
    assert text_of(browser, By.ID, "summary") == "4 of 4 processors busy, 0 free"

    # the charts: each machinetype's shares (target, here, space), VMs started, CPU efficiency
    charts = wait_in_browser(browser, lambda d: series(d).get("alpha: shares") and series(d), "the charts")
    assert charts["alpha: shares"] == ["target", "here", "space"]
    assert "started" in next(v for k, v in charts.items() if k.startswith("alpha: VMs per minute"))

    # the space: the answering peer with its processors; the silent one marked. The peer's
    # hostile machinetype name is refused by the VacQuery parser before it reaches anything.
    space = text_of(browser, By.ID, "space")
    assert "127.0.0.2 answered alpha: 5" in space and "127.0.0.3 NO ANSWER" in space
    assert "pwned" not in space

    # a VM ends with a hostile shutdown message: the page follows without a reload
    ended = v.live()[0]
    v.power_off(ended, "300 " + HOSTILE)
    v.clock.advance(60)
    v.round()
    row = f'#recent tr[data-uuid="{ended.uuid}"]'
    recent = wait_in_browser(browser, lambda d: "abort" in "".join(
        e.text for e in d.find_elements(By.CSS_SELECTOR, row)) and d.find_element(By.ID, "recent").text,
        "the ended VM in recent VMs", timeout=20)
    busy = v.status()["processors"]["busy"]
    wait_in_browser(browser, lambda d: d.find_element(By.ID, "summary").text
                    == f"{busy} of 4 processors busy, {4 - busy} free", "the new processor count")
    assert "abort: 300 " + HOSTILE in recent
    table = text_of(browser, By.ID, "machinetypes")
    assert "300: 1" in table
    href = wait_in_browser(browser, lambda d: d.find_element(
        By.CSS_SELECTOR, f'#recent tr[data-uuid="{ended.uuid}"] a').get_attribute("href"), "the VM's link")
    assert href == f"{v.url}/machine/{ended.uuid}"

    # hostile text stayed text: no script ran, nothing was injected, the pipe's entry is not there
    assert browser.title.startswith("vacfactory") and "pwned" not in browser.title
    assert len(browser.find_elements(By.TAG_NAME, "script")) == 1
    assert browser.find_elements(By.CSS_SELECTOR, "img") == []
    assert PIPE_SUFFIX not in text_of(browser, By.ID, "machinetypes")
    assert not [m for m in v.daemon.factory.config.machinetypes if "<" in m]

    # everything came from the factory's listener; the console is clean
    origins = browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => new URL(e.name).origin);")
    assert origins and set(origins) == {v.url}
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []

    # and the page's policy refuses any other destination to a script
    blocked = browser.execute_async_script("""
        const done = arguments[arguments.length - 1];
        fetch('http://127.0.0.1:9/x').then(() => done('fetched'), e => done('blocked: ' + e));""")
    assert blocked.startswith("blocked")
    assert any("Content Security Policy" in e["message"] for e in browser.get_log("browser"))


def test_the_machine_link_opens_the_vms_facts(browser, factory):
    v, _ = factory
    v.round()
    machine = v.live()[0]
    browser.get(v.url + f"/machine/{machine.uuid}")
    text = browser.find_element(By.TAG_NAME, "body").text
    assert text.startswith(f"VM {machine.record.name}") and machine.uuid in text
