"""Headless Chromium for end-to-end tests of the console, driven through Selenium.

The browser and its driver are Debian's ``chromium`` and ``chromium-driver`` packages (``.ci/run``
installs them). Both paths are given to Selenium explicitly, so that Selenium Manager never
looks for, let alone downloads, a browser or a driver. Without them a test skips with the
reason, and fails under ``CI=true`` like every other missing integration service.

``ORGSYNC_SCREENSHOTS=DIR`` saves the screenshots a test asks for (``shot(name)``) as
``DIR/name.png``: the README's pictures come from the same run that tests the pages.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from conftest import unavailable
from selenium import webdriver
from selenium.common.exceptions import NoAlertPresentException, StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement

T = TypeVar("T")

BROWSER_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
DRIVER_CANDIDATES = ("/usr/bin/chromedriver",)
# Bounds that only turn a hang into a failure with the page shown; no assertion depends on speed.
PAGE_BOUND_S = 60.0
SCREENSHOTS_ENV = "ORGSYNC_SCREENSHOTS"


def _first_existing(candidates: tuple[str, ...], name: str) -> str | None:
    for path in candidates:
        if os.access(path, os.X_OK):
            return path
    return shutil.which(name)


def chromium_paths() -> tuple[str, str]:
    """(browser, driver) executables, or a skip (a failure under CI=true) naming what is missing."""
    browser = _first_existing(BROWSER_CANDIDATES, "chromium")
    driver = _first_existing(DRIVER_CANDIDATES, "chromedriver")
    if browser is None or driver is None:
        missing = " and ".join(
            name for name, path in (("chromium", browser), ("chromium-driver", driver)) if path is None
        )
        unavailable(f"the browser tests need Debian's {missing}: apt-get install chromium chromium-driver")
    assert browser is not None and driver is not None
    return browser, driver


@contextmanager
def chromium(download_dir: Path) -> Iterator[webdriver.Chrome]:
    """One headless Chromium with a fresh profile; quits however the block ends."""
    browser, driver_path = chromium_paths()
    # Selenium Manager stays offline even if something asks it: the paths are given.
    os.environ.setdefault("SE_OFFLINE", "true")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root in a container
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,900",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--metrics-recording-only",
        f"--user-data-dir={download_dir / 'profile'}",
    ):
        options.add_argument(argument)
    service = Service(executable_path=driver_path, log_output=str(download_dir / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(PAGE_BOUND_S)
    try:
        yield driver
    finally:
        driver.quit()


@dataclass
class Browser:
    """A Chromium on the console at ``base``: navigation, waits on the page's state, screenshots."""

    driver: webdriver.Chrome
    base: str
    screenshots: Path | None = None

    def open(self, path: str) -> None:
        self.driver.get(self.base + path)

    @property
    def path(self) -> str:
        url: str = self.driver.current_url
        return url.removeprefix(self.base)

    def source(self) -> str:
        return str(self.driver.page_source)

    def find(self, css: str) -> WebElement:
        return self.driver.find_element(By.CSS_SELECTOR, css)

    def find_all(self, css: str) -> list[WebElement]:
        return list(self.driver.find_elements(By.CSS_SELECTOR, css))

    def wait_for(self, what: str, probe: Callable[[], T | None], bound: float = PAGE_BOUND_S) -> T:
        """Poll ``probe`` (elements going stale count as not yet) until it returns a value."""
        deadline = time.monotonic() + bound
        while True:
            try:
                value = probe()
            except StaleElementReferenceException:
                value = None
            if value is not None:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"gave up waiting for {what} on {self.path}:\n{self.text()[:3000]}")
            time.sleep(0.1)

    def wait_css(self, css: str, what: str | None = None, bound: float = PAGE_BOUND_S) -> WebElement:
        def present() -> WebElement | None:
            found = self.find_all(css)
            return found[0] if found else None

        return self.wait_for(what or css, present, bound)

    def text(self) -> str:
        return str(self.driver.find_element(By.TAG_NAME, "body").text)

    def accept_confirm(self) -> None:
        """Accept the confirm() dialog a destructive button opens."""

        def alert() -> Any:
            try:
                return self.driver.switch_to.alert
            except NoAlertPresentException:
                return None

        self.wait_for("a confirmation dialog", alert).accept()

    def post(self, path: str, fields: dict[str, str]) -> tuple[int, str]:
        """A form post from this page's origin with its cookies, as a forged form would send it."""
        result = self.driver.execute_async_script(
            """
            const [path, fields, done] = arguments;
            fetch(path, {method: "POST", body: new URLSearchParams(fields), credentials: "same-origin",
                         redirect: "manual"})
              .then(async (r) => done([r.status, await r.text()]))
              .catch((e) => done([0, String(e)]));
            """,
            path,
            fields,
        )
        return int(result[0]), str(result[1])

    def shot(self, name: str) -> None:
        """Save a screenshot of the whole page when ``ORGSYNC_SCREENSHOTS`` names a directory."""
        if self.screenshots is None:
            return
        self.screenshots.mkdir(parents=True, exist_ok=True)
        height = int(self.driver.execute_script("return document.documentElement.scrollHeight"))
        self.driver.set_window_size(1280, max(900, min(height, 2400)))
        try:
            self.driver.save_screenshot(str(self.screenshots / f"{name}.png"))
        finally:
            self.driver.set_window_size(1280, 900)


def screenshot_dir() -> Path | None:
    raw = os.environ.get(SCREENSHOTS_ENV, "").strip()
    return Path(raw).resolve() if raw else None
