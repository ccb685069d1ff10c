"""The README's picture of report.html: the top of the page as Chromium draws it at 1280 px.

    python benchmarks/report_screenshot.py medfm-work/demo/report/report.html docs/img/report.png

Opens the page with medfm.report.browser (Playwright + a system Chromium), refuses a page that
logs a console error or asks the network for anything, and saves the first `--height` CSS
pixels of it, 1280 px wide.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from medfm.report.browser import WINDOW, open_page


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("page", type=Path, help="a report.html")
    parser.add_argument("png", type=Path, help="where to save the picture")
    parser.add_argument("--height", type=int, default=1800, help="CSS pixels from the top")
    args = parser.parse_args()
    with open_page(args.page, window=(WINDOW[0], args.height)) as (page, log):
        if log.errors or log.requests != [page.url]:
            raise SystemExit(f"the page misbehaved: errors {log.errors}, requests {log.requests}")
        page.screenshot(path=str(args.png))
    print(f"{args.png}: {args.png.stat().st_size / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
