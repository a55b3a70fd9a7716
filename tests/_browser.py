"""Debian's chromium, headless through chromedriver, for the tests that read a web UI (the MLflow UI,
the ZenML dashboard); scripts/test.sh installs both with apt."""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


@contextmanager
def chromium(profile: Path, window: str, extra_args: Sequence[str] = ()) -> Iterator[webdriver.Chrome]:
    """A headless chromium with its own profile folder and a window of ``window`` ("W,H")."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: scripts/test.sh installs chromium and chromium-driver (apt)")
    options = Options()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
                f"--window-size={window}", *extra_args):
        options.add_argument(arg)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SE_OFFLINE", "true")  # Selenium Manager may never fetch a browser or a driver
        driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def shown(driver, expected: list, shot: Optional[Path] = None, timeout: float = 120,
          each_poll: Callable[[], None] = lambda: None, scroll_to: str = "") -> str:
    """Wait until every expected string is on the page (calling ``each_poll`` before each look), scroll
    to the heading ``scroll_to`` when given, save a screenshot to ``shot`` when given; return the text."""
    missing, deadline = expected, time.monotonic() + timeout
    try:
        while missing and time.monotonic() < deadline:
            time.sleep(2)
            each_poll()
            text = driver.find_element(By.TAG_NAME, "body").text
            missing = [e for e in expected if e not in text]
        if scroll_to and not missing:
            driver.execute_script("arguments[0].scrollIntoView()",
                                  driver.find_element(By.XPATH, f"//*[normalize-space(text())='{scroll_to}']"))
    finally:
        if shot is not None:
            shot.parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(shot))
    assert not missing, f"{driver.current_url} did not show {missing} within {timeout:.0f} s"
    return text
