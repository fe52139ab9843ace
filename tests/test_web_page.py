"""The web page in a real headless Chromium (Debian's chromium and chromium-driver, through Selenium).

A person's path: open the page, type a prompt, click Generate, watch the live
preview change during denoising and the progress bar with its ETA, then get the
image with its seed and a download link. Without Chromium the test skips, unless
DIFFUSIOND_REQUIRE_BROWSER=1 (as .ci/run sets it), when it fails.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
from collections.abc import Iterator

import pytest
from conftest import running_server
from PIL import Image

from diffusiond.models.sources import ModelSource
from diffusiond.server.app import ServerSettings, ServerThread

WAIT_S = 120.0
REQUIRE_ENV = "DIFFUSIOND_REQUIRE_BROWSER"
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1200,1000")

# Installed before the click: every src the preview and result take, and every status text shown.
RECORDER = """
window.__seen = {preview: [], status: []};
new MutationObserver(() => window.__seen.preview.push(document.getElementById('preview').src))
  .observe(document.getElementById('preview'), {attributes: true, attributeFilter: ['src']});
new MutationObserver(() => window.__seen.status.push(document.getElementById('status').textContent))
  .observe(document.getElementById('status'), {childList: true, characterData: true, subtree: true});
"""


def _tools() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    missing = [name for name, path in (("chromium", chromium), ("chromium-driver", driver)) if path is None]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip install -e '.[dev]')")
    if missing:
        reason = f"the browser test needs {', '.join(missing)} (apt-get install -y chromium chromium-driver)"
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{reason}; {REQUIRE_ENV}=1 says it must run")
        pytest.skip(reason)
    return chromium, driver  # type: ignore[return-value]


@pytest.fixture(scope="module")
def page_server(builtin_dir) -> Iterator[ServerThread]:
    settings = ServerSettings(host="127.0.0.1", port=0, http_port=0, models=[ModelSource("builtin", str(builtin_dir))])
    with running_server(settings) as thread:
        yield thread


@pytest.fixture
def browser(tmp_path):
    chromium, driver_path = _tools()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_script_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


def data_url_bytes(url: str, mime: str) -> bytes:
    prefix = f"data:{mime};base64,"
    assert url.startswith(prefix), url[:60]
    return base64.b64decode(url[len(prefix):])


def test_type_a_prompt_click_generate_watch_previews_get_the_image(page_server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import Select, WebDriverWait

    wait = WebDriverWait(browser, WAIT_S)
    browser.get(f"{page_server.http_url}/")
    wait.until(lambda d: len(Select(d.find_element(By.ID, "scheduler")).options) > 1)  # the models arrived
    assert Select(browser.find_element(By.ID, "size")).first_selected_option.get_attribute("value") == "64x64"
    preview = Select(browser.find_element(By.ID, "preview-kind"))  # the model's kinds, less raw latents
    assert [o.get_attribute("value") for o in preview.options] == [
        "PREVIEW_KIND_APPROX_RGB", "PREVIEW_KIND_FULL", "PREVIEW_KIND_UNSPECIFIED"]
    assert preview.first_selected_option.get_attribute("value") == "PREVIEW_KIND_APPROX_RGB"
    browser.execute_script(RECORDER)

    browser.find_element(By.ID, "prompt").send_keys("a large red circle on a blue background, top left")
    browser.find_element(By.ID, "seed").send_keys("42")
    browser.find_element(By.ID, "generate").click()

    download = wait.until(ready.visibility_of_element_located((By.ID, "download")))
    seen = browser.execute_script("return window.__seen")

    frames = [url for url in dict.fromkeys(seen["preview"]) if url]
    assert len(frames) >= 3, f"{len(frames)} preview frames"
    for url in frames:
        assert Image.open(io.BytesIO(data_url_bytes(url, "image/jpeg"))).format == "JPEG"
    assert any("ETA" in text for text in seen["status"]), seen["status"]

    png = data_url_bytes(download.get_attribute("href"), "image/png")
    image = Image.open(io.BytesIO(png))
    image.load()
    assert image.size == (64, 64)
    assert download.get_attribute("download") == "diffusiond-42.png"
    assert "seed 42" in browser.find_element(By.ID, "result-info").text
    decoded = browser.execute_async_script(
        "const done = arguments[0]; const img = document.getElementById('result');"
        "img.decode().then(() => done([img.naturalWidth, img.naturalHeight]), (e) => done(String(e)));"
    )
    assert decoded == [64, 64]  # the browser decoded the result itself
    assert browser.find_element(By.ID, "progress").get_attribute("value") == "1"
    assert not browser.find_element(By.ID, "error").is_displayed()


def test_the_page_shows_the_servers_error(page_server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import Select, WebDriverWait

    wait = WebDriverWait(browser, WAIT_S)
    browser.get(f"{page_server.http_url}/")
    wait.until(lambda d: len(Select(d.find_element(By.ID, "scheduler")).options) > 1)
    browser.find_element(By.ID, "prompt").send_keys("a fox")
    browser.find_element(By.ID, "steps").send_keys("100000")
    browser.find_element(By.ID, "generate").click()
    error = wait.until(ready.visibility_of_element_located((By.ID, "error")))
    assert error.text.startswith("INVALID_ARGUMENT: steps")
