"""report.html in a real, headless Chromium: what the browser test, the report benchmark and
the README's screenshot use.

    from medfm.report.browser import open_page
    with open_page("medfm-work/report/report.html") as (page, log):
        page.screenshot(path="docs/img/report.png", full_page=True)
        assert not log.errors and log.requests == [page.url]

Drives a system Chromium (Debian's `chromium` package; `MEDFM_CHROMIUM` names another binary)
through Playwright's Python package (`pip install 'medfm[browser]'`), which never downloads a
browser here. Either one missing is one MedfmError line saying what to install.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from medfm.errors import MedfmError

CHROMIUM_ENV = "MEDFM_CHROMIUM"  # a Chromium/Chrome binary to use instead of the one on PATH
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
WINDOW = (1280, 900)  # the window the page must fit (width, height in CSS px)
# resolves after two animation frames: whatever the page queued for the next frame (report.js
# redraws on one) has run
NEXT_FRAMES = ("() => new Promise((done) => requestAnimationFrame("
               "() => requestAnimationFrame(done)))")
# as root (CI containers), Chromium refuses to start without --no-sandbox
LAUNCH_ARGS = ("--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage")


@dataclass
class PageLog:
    """What the page did while open."""

    console: list[tuple[str, str]] = field(default_factory=list)  # (type, text) of each message
    errors: list[str] = field(default_factory=list)  # console errors and uncaught exceptions
    requests: list[str] = field(default_factory=list)  # every URL the page asked for


def chromium_executable() -> str:
    """The Chromium binary to drive: $MEDFM_CHROMIUM, else the first of CHROMIUM_NAMES on PATH."""
    named = os.environ.get(CHROMIUM_ENV)
    if named:
        if not Path(named).is_file():
            raise MedfmError(f"${CHROMIUM_ENV} is {named}, which is not a file; point it at a "
                             "Chromium binary or unset it")
        return named
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    raise MedfmError("no Chromium found (looked for " + ", ".join(CHROMIUM_NAMES) + "); install "
                     f"one (Debian/Ubuntu: apt-get install chromium) or set ${CHROMIUM_ENV}")


@contextmanager
def open_page(path: str | os.PathLike, *, window: tuple[int, int] = WINDOW
              ) -> Iterator[tuple[object, PageLog]]:
    """Open the HTML file `path` in headless Chromium at `window`; yields (Playwright page, its
    PageLog) once the page has loaded and drawn."""
    try:
        from playwright.sync_api import Error as PlaywrightError
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise MedfmError("opening a report in a browser needs Playwright: pip install "
                         "'medfm[browser]'") from None
    executable = chromium_executable()
    log = PageLog()
    with sync_playwright() as playwright:
        try:
            browser = playwright.chromium.launch(executable_path=executable,
                                                 args=list(LAUNCH_ARGS))
        except PlaywrightError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise MedfmError(f"Chromium at {executable} did not start ({first}); reinstall it "
                             f"or set ${CHROMIUM_ENV} to a working binary") from None
        try:
            page = browser.new_page(viewport={"width": window[0], "height": window[1]})
            page.on("console", lambda m: _console(log, m.type, m.text))
            page.on("pageerror", lambda exc: log.errors.append(f"uncaught: {exc}"))
            page.on("request", lambda request: log.requests.append(request.url))
            page.goto(Path(path).resolve().as_uri(), wait_until="load")
            settle(page)
            yield page, log
        finally:
            browser.close()


def settle(page) -> None:
    """Wait until the page has drawn what its last input queued (two animation frames)."""
    page.evaluate(NEXT_FRAMES)


def _console(log: PageLog, kind: str, text: str) -> None:
    log.console.append((kind, text))
    if kind == "error":
        log.errors.append(text)
