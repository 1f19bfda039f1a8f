"""The policy arena in a real browser: headless Chromium from Debian (`chromium`, `chromium-driver`)
driven by Selenium, against a live keyed server on the embedded model. Two presets answer side by
side with their KV bars, chart and export; a long run is cancelled (the server stops its requests
and keeps serving); a busy server's 429 shows in its column with a retry; a missing or wrong API key
is explained in the page.

Nothing is downloaded: the driver and the browser are given by path, so Selenium Manager never
runs. Without them the tests skip, except under CI (the environment variable CI set), where they fail.
KVMUX_ARENA_SCREENSHOT=<path> saves a screenshot of the finished run (docs/arena.png comes from it).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.server.arena_page import ArenaPage, save_screenshot
from tests.server.conftest import start_server

pytestmark = pytest.mark.model

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
KEY = "arena-browser-key"
CONTEXT = (
    "The lighthouse on Gull Island was built in 1871. Its lamp is green, so that ships can tell it from the "
    "white light on the mainland. The keeper, Mira Holt, rows to the harbour every Tuesday for supplies. "
    "In winter the island is closed to visitors, but the keeper stays to tend the lamp and log the weather. "
) * 2
QUESTION = "What colour is the lamp of the lighthouse on Gull Island?"


def _missing_browser() -> str | None:
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package")
    if not missing:
        return None
    return f"the arena browser tests need {', '.join(missing)} (Debian: apt-get install chromium chromium-driver)"


@pytest.fixture(scope="module", autouse=True)
def _browser_available():
    reason = _missing_browser()
    if reason and os.environ.get("CI"):
        pytest.fail(reason + "; CI must run them", pytrace=False)
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def arena_server(smollm):
    with start_server(smollm, max_new=512, api_keys=[KEY]) as live:
        yield live


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    downloads = tmp_path_factory.mktemp("arena-downloads")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run"):
        options.add_argument(flag)
    options.add_argument("--window-size=1280,1000")
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads)})
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SE_OFFLINE", "true")  # belt and braces: Selenium Manager may not fetch anything
        browser = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    browser.execute_cdp_cmd("Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    browser.downloads = downloads
    yield browser
    browser.quit()


@pytest.fixture()
def page(driver, arena_server):
    return ArenaPage(driver, arena_server.url)


def test_two_presets_side_by_side(page, tmp_path):
    page.open()
    assert "needs an API key (401)" in page.notice()  # no key yet: the page says what to do
    page.use_key(KEY)
    assert page.notice() == "" and page.lane_presets() == ["full", "streaming_llm"]

    page.set_overrides(1, "{window: 32")  # not JSON: caught in the page, nothing is sent
    page.run()
    assert "not valid JSON" in page.lane_error(1) and page.column_states() == []

    page.set_overrides(1, '{"no_such_param": 1}')  # JSON, but the server refuses it: 400 in the column
    page.set_number("max-tokens", 4)
    page.run()
    assert page.wait_states(lambda s: s == ["done", "error"])
    assert "Error 400 (kv_policy.no_such_param)" in page.problem(1)

    context_file = tmp_path / "lighthouse.txt"
    context_file.write_text(CONTEXT)
    page.load_context(context_file)
    page.set_text("question", QUESTION)
    page.set_overrides(1, '{"sink_tokens": 4, "window": 32}')
    page.set_number("max-tokens", 16)
    page.run()
    assert page.wait_states(lambda s: s == ["done", "done"])
    answers = page.answers()
    assert all(answer.strip() for answer in answers)
    kv = page.kv_texts()
    assert kv[0].endswith("(100.0%)") and "(100.0%)" not in kv[1], kv
    widths = page.kv_fill_widths()
    assert widths[0] > widths[1] > 0
    assert all("ms" in figures["TTFT"] and figures["Tokens seen / kept"] for figures in page.figures())
    assert page.chart_rows() == 2 and page.fits_width()

    record = page.export(timeout_s=20)
    assert [c["status"] for c in record["columns"]] == ["done", "done"]
    assert [c["answer"] for c in record["columns"]] == answers
    assert record["columns"][1]["kv"]["tokens_kept"] == 36 < record["columns"][0]["kv"]["tokens_kept"]
    assert record["settings"]["context"] == CONTEXT and record["model"] == "SmolLM2-135M-Instruct"
    if os.environ.get("KVMUX_ARENA_SCREENSHOT"):
        save_screenshot(page.driver, Path(os.environ["KVMUX_ARENA_SCREENSHOT"]))


def test_cancel_stops_every_column_and_the_server_keeps_serving(page, arena_server):
    page.open()
    page.use_key(KEY)
    page.open()
    assert page.key_field() == KEY  # kept in the tab's session storage: the presets load at once
    page.wait_presets()
    page.set_number("max-tokens", 400)
    page.check("ignore-eos")
    page.run_with_keyboard()  # Ctrl+Enter
    assert page.wait_states(lambda s: "streaming" in s)
    page.press_escape()  # cancels every column
    assert page.wait_states(lambda s: s == ["cancelled", "cancelled"], timeout_s=10)
    scheduler = arena_server.app.state.kvmux.scheduler
    deadline = time.monotonic() + 15
    while (scheduler.num_running or scheduler.num_waiting) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert scheduler.num_running == 0 and scheduler.num_waiting == 0  # the server stopped both requests

    page.check("ignore-eos", False)
    page.set_number("max-tokens", 4)
    page.run()
    assert page.wait_states(lambda s: s == ["done", "done"])


def test_busy_server_answer_shows_in_its_column_with_a_retry(page, arena_server):
    page.open()
    page.use_key(KEY)
    page.set_number("max-tokens", 8)
    page.check("ignore-eos")
    scheduler = arena_server.app.state.kvmux.scheduler
    limits = scheduler.max_active, scheduler.max_queued
    scheduler.max_active, scheduler.max_queued = 1, 0  # one request at a time, none waiting: the other gets 429
    try:
        page.run()
        assert page.wait_states(lambda s: sorted(s) == ["done", "error"])
    finally:
        scheduler.max_active, scheduler.max_queued = limits
    busy = page.column_states().index("error")
    assert "busy (429)" in page.problem(busy) and "Retry after 1 s" in page.problem(busy)
    assert page.retry_visible(busy)
    page.retry(busy)
    assert page.wait_states(lambda s: s == ["done", "done"])


def test_wrong_key_is_explained_in_the_page(page):
    page.open()
    page.use_key(KEY)
    page.wait_presets()
    page.use_key("not-the-key")
    assert "refused the API key (401)" in page.notice()
    assert page.driver.execute_script("return sessionStorage.getItem('kvmux.arena.apiKey')") == "not-the-key"
    page.set_number("max-tokens", 4)
    page.run()
    assert page.wait_states(lambda s: s == ["error", "error"])
    assert all("refused the API key (401)" in page.problem(i) for i in range(2))
    assert not any(page.retry_visible(i) for i in range(2))  # a retry cannot help: fix the key
    page.use_key(KEY)  # the right key again: the presets load and a run answers
    assert page.notice() == ""
    page.run()
    assert page.wait_states(lambda s: s == ["done", "done"])
