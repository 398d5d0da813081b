"""A real Streamlit server and Debian's chromium for the browser tests.

Without /usr/bin/chromium the browser tests skip, unless REQUIRE_BROWSER=1 (as in CI),
where they fail.
"""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = ROOT / "tests" / "screenshots"


def require_chromium() -> None:
    if shutil.which(CHROMIUM) is None:
        message = f"{CHROMIUM} is missing (apt-get install -y chromium)"
        if os.environ.get("REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def streamlit_server(workspace: Path, log: Path, script: str = "app.py", **env: str) -> Iterator[str]:
    """`streamlit run app.py` (or another `script`) on a free port; yields its URL and stops
    it afterwards."""
    port = _free_port()
    command = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        script,
        "--server.headless",
        "true",
        "--server.port",
        str(port),
        "--server.fileWatcherType",
        "none",
        "--browser.gatherUsageStats",
        "false",
    ]
    environment = {**os.environ, "DR_WORKSPACE": str(workspace), "DR_DEMO": "0", **env}
    with open(log, "wb") as out:
        server = subprocess.Popen(
            command, cwd=ROOT, env=environment, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as reply:
                    if reply.read() == b"ok":
                        break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise AssertionError(f"streamlit did not start:\n{log.read_text()[-3000:]}") from None
                time.sleep(0.3)
        yield url
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


@contextmanager
def chromium_page():
    """A Playwright page in headless Debian chromium (a fresh profile), 1400x1000; its
    context opens further tabs (`page.context.new_page()`)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 1000})
            context.set_default_timeout(60_000)
            yield context.new_page()
        finally:
            browser.close()


def wait_until_idle(page) -> None:
    """Until the script run that the last action started has finished."""
    page.wait_for_selector("[data-testid='stApp'][data-test-script-state='notRunning']")
    page.wait_for_timeout(300)  # the rerun a widget triggers starts a moment later
    page.wait_for_selector("[data-testid='stApp'][data-test-script-state='notRunning']")


def screenshot(page, name: str) -> Path:
    """The whole page into tests/screenshots/<name>.png. Streamlit scrolls its main area inside
    the window, which a full-page shot does not unroll: the window grows for the shot."""
    SCREENSHOTS.mkdir(exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    hidden = page.evaluate("""() => Math.max(0, ...Array.from(document.querySelectorAll('*'))
        .filter(e => ['auto', 'scroll'].includes(getComputedStyle(e).overflowY))
        .map(e => e.scrollHeight - e.clientHeight))""")
    size = page.viewport_size
    page.set_viewport_size({"width": size["width"], "height": min(size["height"] + hidden, 6000)})
    try:
        page.wait_for_timeout(500)  # charts redraw at the new size
        page.screenshot(path=str(path), full_page=True)
    finally:
        page.set_viewport_size(size)
    return path


def wait_for(check: Callable[[], Any], timeout: float = 60, what: str = "condition") -> Any:
    """Poll `check` (a database query, say) until it returns something truthy; that value."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)
    return value


def wait_for_count(locator, count: int, what: str, timeout: float = 60) -> None:
    """Until `locator` matches `count` elements: charts are drawn a moment after the script
    run ends, later still on a busy machine, so a count taken at an instant can fall short."""
    wait_for(lambda: locator.count() == count, timeout, f"{count} {what} (last seen: {locator.count()})")


def go_to(page, title: str) -> None:
    """Open a page by its link in the sidebar's navigation, as a user does, and wait for it."""
    page.locator("[data-testid='stSidebar']").get_by_role("link", name=title).click()
    page.get_by_role("heading", name=title, level=1).wait_for()
    wait_until_idle(page)


def press_on_body(page, key: str) -> None:
    """Press a key with the focus on the page itself, as a reviewer does after a click: keys
    typed into a text field are not shortcuts."""
    page.evaluate("document.activeElement && document.activeElement.blur()")
    page.keyboard.press(key)
