"""The app end to end in headless Chromium: open the page, erase 9, generate, see the gallery change; then
"erase all" and "restore all" bring every slider to 1 and back, and the base grid returns.

Needs Debian's ``chromium`` at ``/usr/bin/chromium`` and Playwright's Python package (never ``playwright install``).
The screenshot goes to ``$D3PM_ARTIFACTS/app_screenshot.png`` (a temporary folder when the variable is unset).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from .test_app import make_app_folder, make_service, served

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
def page(tmp_path) -> Iterator:
    """A Chromium page; fails (never skips) when the browser or Playwright is missing."""
    if not CHROMIUM.is_file():
        pytest.fail(f"Chromium is missing at {CHROMIUM}: install it with `apt-get install -y chromium`.", pytrace=False)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("Playwright is missing: `pip install -e .[dev]` (never `playwright install`).", pytrace=False)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser.new_page(viewport={"width": 1400, "height": 1000})
        finally:
            browser.close()


def test_erase_nine_then_all_then_restore(page, tmp_path):
    from playwright.sync_api import expect

    service = make_service(make_app_folder(tmp_path / "app"))
    with served(service) as url:
        page.goto(url, wait_until="load")
        thumbnails = page.locator("#grid .thumbnail-item img")
        expect(thumbnails).to_have_count(10)  # the page draws the base grid as it opens
        before = [thumbnails.nth(digit).get_attribute("src") for digit in range(10)]
        expect(page.locator("#status")).to_contain_text("nothing erased")

        page.locator("#strength-9 input[type=range]").fill("1")
        page.locator("#generate").click()

        expect(page.locator("#grid .caption-label").nth(9)).to_contain_text("9 (100%) → ")
        expect(page.locator("#status")).to_contain_text("erasing 9 (100%)")
        after = [thumbnails.nth(digit).get_attribute("src") for digit in range(10)]
        assert after[9] != before[9], "the 9 tile must change"
        assert after[:9] == before[:9], "the hand-made delta for 9 leaves digits 0-8 exactly as they were"

        artifacts = Path(os.environ.get("D3PM_ARTIFACTS") or tmp_path)
        artifacts.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(artifacts / "app_screenshot.png"), full_page=True)

        page.locator("#erase-all").click()
        expect(page.locator("#status")).to_contain_text("erasing 0 (100%), 1 (100%)")
        expect(page.locator("#strength-0 input[type=range]")).to_have_value("1")
        page.locator("#restore-all").click()
        expect(page.locator("#status")).to_contain_text("nothing erased")
        expect(page.locator("#strength-9 input[type=range]")).to_have_value("0")
        assert [thumbnails.nth(digit).get_attribute("src") for digit in range(10)] == before
