"""Open report pages in headless Chromium the way a reader would: load, screenshot, count.

    python -m lib.cli.html_check reports/html/index.html reports/html/04_merge_route.html [--out reports/screenshots]

For each page: a PNG screenshot, and what the loaded page holds, read from the DOM after
the page's load event: the number of tables, links and images, and how many images failed
to decode (``naturalWidth == 0``). Needs Debian's ``chromium`` (``apt-get install chromium``;
``.ci/run`` installs it). Chromium runs with no network access of its own (background
networking off) and a throw-away profile.
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--virtual-time-budget=10000"]

# Appended to a copy of the page: after load, write what the reader would see onto <body>.
PROBE = """<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var broken = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); }).length;
  document.body.setAttribute('data-probe-images', imgs.length);
  document.body.setAttribute('data-probe-broken', broken);
  document.body.setAttribute('data-probe-tables', document.querySelectorAll('table').length);
  document.body.setAttribute('data-probe-links', document.querySelectorAll('a[href]').length);
});
</script>"""


class BrowserMissing(RuntimeError):
    pass


def find_chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    raise BrowserMissing("no headless browser found: install Debian's chromium (apt-get install chromium)")


@dataclass
class PageCheck:
    page: Path
    screenshot: Path
    tables: int
    links: int
    images: int
    broken_images: int
    text: str


def _run(args: list[str], timeout: int = 120) -> str:
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.run([find_chromium(), *FLAGS, f"--user-data-dir={profile}", *args],
                              capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"chromium failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return proc.stdout


def check_page(page: str | Path, screenshot_dir: str | Path, width: int = 1280, height: int = 2400) -> PageCheck:
    """Load ``page`` (a local HTML file), save a screenshot, and read the probe's counts."""
    page = Path(page).resolve()
    if not page.is_file():
        raise FileNotFoundError(f"{page}: no such page")
    screenshot_dir = Path(screenshot_dir)
    screenshot_dir.mkdir(parents=True, exist_ok=True)
    shot = screenshot_dir / (page.stem + ".png")
    _run([f"--window-size={width},{height}", f"--screenshot={shot}", page.as_uri()])
    # The probed copy sits next to the original so relative links and images resolve the same.
    probed = page.with_name(f".probe-{page.name}")
    try:
        probed.write_text(page.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
        dom = _run(["--dump-dom", probed.as_uri()])
    finally:
        probed.unlink(missing_ok=True)
    body = re.search(r"<body[^>]*>", dom)
    attrs = dict(re.findall(r'data-probe-(\w+)="(\d+)"', body.group(0) if body else ""))
    if not attrs:
        raise RuntimeError(f"{page}: the page did not finish loading in headless Chromium (no probe result)")
    text = re.sub(r"<[^>]+>", " ", dom)
    return PageCheck(page, shot, int(attrs["tables"]), int(attrs["links"]), int(attrs["images"]),
                     int(attrs["broken"]), re.sub(r"\s+", " ", text))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pages", nargs="+")
    ap.add_argument("--out", default="reports/screenshots")
    args = ap.parse_args(argv)
    bad = 0
    for p in args.pages:
        c = check_page(p, args.out)
        print(f"{c.page}: {c.tables} tables, {c.links} links, {c.images} images ({c.broken_images} broken) "
              f"-> {c.screenshot}")
        bad += c.broken_images
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
