"""The playground in a real browser: Debian's Chromium driven by Playwright, against a bridge process."""

from __future__ import annotations

import base64
import shutil
from pathlib import Path

import pytest

from comfybridge.emulator.png import png_first_pixel

from .conftest import FIXTURES
from .helpers import bridge_process, png, system_binary

playwright_api = pytest.importorskip("playwright.async_api", reason="playwright is not installed")


async def test_try_a_workflow_in_the_browser(tmp_path: Path) -> None:
    chromium = system_binary("chromium", "chromium")
    shutil.copytree(FIXTURES / "workflows", tmp_path / "workflows")
    picture = tmp_path / "green.png"
    picture.write_bytes(png(16, 16, 0x2ED37E))
    process = bridge_process(tmp_path, "--emulate", "1", "--emulator-pace", "0.05")
    async with process as (_, url), playwright_api.async_playwright() as driver:
        browser = await driver.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = await browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.on(
                "console", lambda message: errors.append(message.text) if "Security Policy" in message.text else None
            )
            answer = await page.goto(f"{url}/playground")
            assert answer is not None
            assert "script-src 'self'" in answer.headers["content-security-policy"]  # its own files only
            # the catalogue, with its thumbnail
            card = page.locator('#catalogue button[data-workflow="text-to-image"]')
            await card.wait_for()
            assert "SD 1.5 text to image" in await card.inner_text()
            assert await card.locator("img").evaluate("img => img.complete && img.naturalWidth > 0")

            # a form built from its inputs: type a prompt, generate, watch the bar, see the picture
            await card.click()
            text = page.locator('#form [name="6/text"]')
            await text.fill("a red fox")
            await page.locator('#form [name="3/steps"]').fill("4")
            await page.click("#generate")
            await page.locator("#results img").wait_for(timeout=30_000)
            assert await page.locator(".progress").get_attribute("aria-valuenow") == "100"
            assert await page.locator("#status").inner_text() == "Execution is done"

            # a file input: upload a picture to invert, and get its inverse back
            await page.click('#catalogue button[data-workflow="invert"]')
            await page.locator('#form [name="1/image"]').set_input_files(str(picture))
            await page.click("#generate")
            result = page.locator("#results img")
            await result.wait_for(timeout=30_000)
            source = await result.get_attribute("src")
            assert source is not None
            assert source.startswith("data:image/png;base64,")
            assert png_first_pixel(base64.b64decode(source.split(",", 1)[1])) == 0xFFFFFF ^ 0x2ED37E

            # a bridge refusal is shown, not swallowed
            await page.click('#catalogue button[data-workflow="solid"]')
            await page.locator('#form [name="1/width"]').fill("0")
            await page.click("#generate")
            status = page.locator("#status.error")
            await status.wait_for()
            assert "1/width" in await status.inner_text()
            assert errors == []
        finally:
            await browser.close()


async def test_the_docs_page_runs_under_its_content_security_policy(tmp_path: Path) -> None:
    """/docs builds its list with its one inline script, let through by hash: nothing else could run."""
    chromium = system_binary("chromium", "chromium")
    shutil.copytree(FIXTURES / "workflows", tmp_path / "workflows")
    async with (
        bridge_process(tmp_path, "--emulate", "1") as (_, url),
        playwright_api.async_playwright() as driver,
    ):
        browser = await driver.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = await browser.new_page()
            errors: list[str] = []
            page.on(
                "console", lambda message: errors.append(message.text) if "Security Policy" in message.text else None
            )
            answer = await page.goto(f"{url}/docs")
            assert answer is not None
            assert "'sha256-" in answer.headers["content-security-policy"]
            await page.locator("#routes h2").first.wait_for()
            assert "/generate-based-workflow" in await page.locator("#routes").inner_text()
            assert errors == []
        finally:
            await browser.close()
