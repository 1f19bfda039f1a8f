"""The arena page as the browser tests use it (a Selenium page object): fields, buttons, the state
of each result column, the exported run, and a size-bounded screenshot of the page."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable
from pathlib import Path

SCREENSHOT_MAX_BYTES = 300_000


class ArenaPage:
    def __init__(self, driver, url: str):
        self.driver = driver
        self.url = url

    # -- reading the page --
    def js(self, script: str, *args):
        return self.driver.execute_script(script, *args)

    def by_id(self, element_id: str):
        return self.driver.find_element("id", element_id)

    def notice(self) -> str:
        return self.js("const n = document.getElementById('notice'); return n.hidden ? '' : n.textContent;")

    def key_field(self) -> str:
        return self.by_id("api-key").get_attribute("value")

    def lane_presets(self) -> list[str]:
        return self.js("return [...document.querySelectorAll('.lane-preset')].map(s => s.value);")

    def lane_error(self, lane: int) -> str:
        return self.js("return document.querySelectorAll('.lane-editor .field-error')[arguments[0]].textContent;", lane)

    def column_states(self) -> list[str]:
        return self.js("return [...document.querySelectorAll('.column')].map(c => c.dataset.state);")

    def _texts(self, selector: str) -> list[str]:
        return self.js("return [...document.querySelectorAll(arguments[0])].map(e => e.textContent);", selector)

    def answers(self) -> list[str]:
        return self._texts(".column .answer")

    def kv_texts(self) -> list[str]:
        return self._texts(".column .kv-text")

    def problem(self, column: int) -> str:
        return self._texts(".column .problem-text")[column]

    def retry_visible(self, column: int) -> bool:
        return self.driver.find_elements("css selector", ".column .retry")[column].is_displayed()

    def kv_fill_widths(self) -> list[float]:
        script = "return [...document.querySelectorAll('.column .kv-fill')].map(e => e.getBoundingClientRect().width);"
        return self.js(script)

    def figures(self) -> list[dict[str, str]]:
        return self.js(
            "return [...document.querySelectorAll('.column .figures')].map(dl => Object.fromEntries("
            "[...dl.querySelectorAll('dt')].map(dt => [dt.textContent, dt.nextElementSibling.textContent])));"
        )

    def chart_rows(self) -> int:
        if self.js("return document.getElementById('chart-box').hidden;"):
            return 0
        return self.js("return document.querySelectorAll('#chart > g:first-child rect').length;")

    def fits_width(self) -> bool:
        return self.js("return document.documentElement.scrollWidth <= window.innerWidth;")

    # -- acting on it --
    def open(self) -> None:
        self.driver.get(self.url + "/arena")
        self.wait(lambda: self.js("return document.body.dataset.server") in ("ready", "unreachable"), 30)

    def wait(self, condition: Callable[[], bool], timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError(f"the page did not get there in {timeout_s} s (columns: {self.column_states()})")
            time.sleep(0.05)

    def wait_states(self, done: Callable[[list[str]], bool], timeout_s: float = 60) -> bool:
        self.wait(lambda: done(self.column_states()), timeout_s)
        return True

    def wait_presets(self) -> None:
        self.wait(lambda: len(self.lane_presets()) >= 2, 30)

    def use_key(self, key: str) -> None:
        self.set_text("api-key", key)
        self.by_id("key-apply").click()
        self.wait(lambda: self.js("return document.body.dataset.server") != "loading", 30)

    def set_text(self, element_id: str, text: str) -> None:
        field = self.by_id(element_id)
        field.clear()
        field.send_keys(text)

    def set_number(self, element_id: str, value: int) -> None:
        self.set_text(element_id, str(value))

    def check(self, element_id: str, on: bool = True) -> None:
        box = self.by_id(element_id)
        if box.is_selected() != on:
            box.click()

    def set_overrides(self, lane: int, text: str) -> None:
        field = self.driver.find_elements("css selector", ".lane-overrides")[lane]
        field.clear()
        field.send_keys(text)

    def load_context(self, path: Path) -> None:
        self.by_id("context-file").send_keys(str(path.resolve()))
        expected = len(path.read_text())
        self.wait(lambda: len(self.by_id("context").get_attribute("value")) == expected, 10)

    def retry(self, column: int) -> None:
        self.driver.find_elements("css selector", ".column .retry")[column].click()

    def run(self) -> None:
        self.by_id("run").click()

    def run_with_keyboard(self) -> None:
        from selenium.webdriver.common.keys import Keys

        self.by_id("question").send_keys(Keys.CONTROL + Keys.ENTER)

    def press_escape(self) -> None:
        from selenium.webdriver.common.keys import Keys

        self.driver.switch_to.active_element.send_keys(Keys.ESCAPE)

    def export(self, timeout_s: float = 20) -> dict:
        """Click 'Export run as JSON' and read the file the browser saved."""
        folder: Path = self.driver.downloads
        before = set(folder.glob("*.json"))
        self.by_id("export").click()
        self.wait(lambda: set(folder.glob("*.json")) - before and not list(folder.glob("*.crdownload")), timeout_s)
        (saved,) = set(folder.glob("*.json")) - before
        return json.loads(saved.read_text())


def save_screenshot(driver, path: Path) -> None:
    """The whole page as a PNG of at most SCREENSHOT_MAX_BYTES (colours reduced if needed)."""
    from PIL import Image

    size = driver.get_window_size()
    width, height = size["width"], size["height"]
    page_height = driver.execute_script("return document.documentElement.scrollHeight;")
    driver.set_window_size(1280, page_height + (height - driver.execute_script("return window.innerHeight;")))
    try:
        png = driver.get_screenshot_as_png()
    finally:
        driver.set_window_size(width, height)
    image = Image.open(io.BytesIO(png))
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=True)
    if out.tell() > SCREENSHOT_MAX_BYTES:
        out = io.BytesIO()
        image.convert("RGB").quantize(colors=128).save(out, format="PNG", optimize=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(out.getvalue())
