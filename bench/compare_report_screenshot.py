"""Screenshot a `tunelab compare` report.html in headless Chromium and check the image is not blank.

    python bench/compare_report_screenshot.py runs/compare-sst2/report.html [--out shot.png]

Needs the `chromium` binary (Debian: apt-get install chromium). Exit codes: 0 ok, 1 blank or failed,
77 chromium not found (the test skips on that). Prints one JSON line: path, size, pixel std-dev.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
MIN_STD = 8.0  # a blank (single-colour) page has std-dev 0; a table and plots give tens


def find_chromium() -> str | None:
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


def screenshot(html: Path, out: Path, width: int = 1280, height: int = 2000, timeout: int = 120) -> None:
    browser = find_chromium()
    if browser is None:
        raise FileNotFoundError("chromium not found")
    with tempfile.TemporaryDirectory() as profile:
        cmd = [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            f"--screenshot={out}",
            f"--window-size={width},{height}",
            html.resolve().as_uri(),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if not out.is_file():
        raise RuntimeError(f"chromium wrote no screenshot (exit {proc.returncode}): {proc.stderr[-2000:]}")


def pixel_stats(png: Path) -> dict:
    from PIL import Image, ImageStat

    img = Image.open(png).convert("L")
    stat = ImageStat.Stat(img)
    return {"width": img.width, "height": img.height, "mean": stat.mean[0], "std": stat.stddev[0]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("report", type=Path)
    p.add_argument("--out", type=Path, help="PNG to write (default: next to the report)")
    args = p.parse_args(argv)
    if find_chromium() is None:
        print(json.dumps({"skipped": "chromium not found"}))
        return 77
    out = args.out or args.report.with_name("report-screenshot.png")
    screenshot(args.report, out)
    stats = pixel_stats(out)
    ok = stats["std"] >= MIN_STD
    print(json.dumps({"screenshot": str(out), **stats, "ok": ok}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
