"""The web page in a real headless Chromium (Debian's, driven by Playwright): upload a real COCO image, see the
caption the API gives, switch datastore, compare two datastores side by side; a screenshot is saved."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="needs the serve extra: pip install 'smallcap[serve]'")
playwright_api = pytest.importorskip("playwright.sync_api", reason="needs the test extra (playwright)")
import httpx  # noqa: E402

from serving_helpers import live_server, smallest_coco_images, wait_ready  # noqa: E402
from smallcap.serving.app import create_app  # noqa: E402
from smallcap.serving.engine import Engine  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def served():
    if not Path(CHROMIUM).exists():
        pytest.fail("Chromium is not installed: run scripts/setup.sh (apt-get install chromium) first")
    engine = Engine.load()
    with live_server(create_app(lambda: engine)) as url, httpx.Client(base_url=url, timeout=120) as client:
        wait_ready(client)
        yield url, client


def api_caption(client, image: Path, datastore: str) -> str:
    files = {"files": (image.name, image.read_bytes(), "image/jpeg")}
    return client.post("/v1/captions", files=files, data={"datastores": datastore}).json()["results"][0]["caption"]


def test_page_uploads_an_image_and_shows_the_api_caption(served, tmp_path):
    url, client = served
    image = smallest_coco_images(1)[0]
    expected = {store: api_caption(client, image, store) for store in ("mini-source", "mini-target")}
    assert expected["mini-source"] != expected["mini-target"]  # so the switch is visible
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                             args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page()
            page.set_default_timeout(60_000)
            page.goto(url + "/")
            page.locator("#stores input[value=mini-source]").wait_for()
            assert page.locator("#stores input[value=mini-source]").is_checked()
            page.set_input_files("#files", str(image))
            page.click("#run")
            caption = page.locator(".card .caption").first
            caption.wait_for()
            assert caption.inner_text() == expected["mini-source"]
            assert page.locator(".card .retrieved li").count() == 4

            page.uncheck("#stores input[value=mini-source]")  # switch datastore
            page.check("#stores input[value=mini-target]")
            page.click("#run")
            page.wait_for_function("expected => document.querySelector('.card .caption')?.textContent === expected",
                                   arg=expected["mini-target"])

            page.check("#compare")  # the same image with two datastores side by side
            page.select_option("#left-store", "mini-source")
            page.select_option("#right-store", "mini-target")
            page.click("#run")
            page.wait_for_function("() => document.querySelectorAll('.card .column').length === 2")
            columns = page.locator(".card .column .caption").all_inner_texts()
            assert columns == [expected["mini-source"], expected["mini-target"]]
            page.screenshot(path=str(tmp_path / "serve_page.png"), full_page=True)
            assert (tmp_path / "serve_page.png").stat().st_size > 10_000

            page.uncheck("#compare")
            page.locator("#samples img").first.click()  # a bundled sample, one click
            page.wait_for_function("() => document.querySelector('.card')?.dataset.input.startsWith('source_')")
            assert page.locator(".card .caption").first.inner_text().strip()

            page.set_input_files("#files", str(Path(__file__)))  # not an image: a clear message, no crash
            page.click("#run")
            page.locator("#error").wait_for()
            assert "415" in page.locator("#error").inner_text() and "not an image" in page.locator("#error").inner_text()
        finally:
            browser.close()
