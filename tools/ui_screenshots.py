"""Take the screenshots of docs/ui.md (docs/img/ui/*.png) with the browser-test harness (tests/ui_browser.py).

    python tools/ui_screenshots.py [--model smollm2-135m-instruct] [--steps 12] [--out docs/img/ui]

Drives the UI as docs/ui.md walks through it: LoRA on the alpaca demo set (two runs, to overlay in Runs), in
headless Chromium; the PNGs are downscaled and reduced to 64 colours to stay small in the repository.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from ui_browser import chromium_path, ui_server  # noqa: E402

from tunelab.ui.context import UIContext  # noqa: E402


def small_png(page, path: Path, width: int = 1000, colors: int = 64, full_page: bool = True, clip=None) -> None:
    from PIL import Image

    raw = path.with_suffix(".raw.png")
    page.screenshot(path=str(raw), full_page=full_page, clip=clip)
    img = Image.open(raw).convert("RGB")
    if img.width > width:
        img = img.resize((width, round(img.height * width / img.width)), Image.LANCZOS)
    img.quantize(colors=colors, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    raw.unlink()
    print(f"{path}: {path.stat().st_size // 1024} KiB", flush=True)


def fill(page, elem_id: str, text: str) -> None:
    box = page.locator(f"#{elem_id} input, #{elem_id} textarea").first
    box.fill(text)
    box.blur()


def start_run(page, name: str, model: str, steps: int, lr: str, shots: Path | None, start: bool = True) -> None:
    page.get_by_role("tab", name="Train").click()
    fill(page, "train-run-name", name)
    if model != "smollm2-135m-instruct":
        fill(page, "train-model", model)
        page.keyboard.press("Enter")
    fill(page, "train-data-limit", "128")
    fill(page, "train-data-max_length", "256")
    fill(page, "train-training-max_steps", str(steps))
    fill(page, "train-training-eval_every", str(max(1, steps // 3)))
    fill(page, "train-training-lr", lr)
    page.locator("#train-yaml").get_by_text(f"lr: {lr}").wait_for()
    if shots:
        page.locator("#train-preview").click()
        page.locator("#train-preview-info").get_by_text("detected format").wait_for(timeout=300_000)
        page.locator("#train-check").click()
        page.locator("#train-estimate").get_by_text("trainable parameters").wait_for(timeout=300_000)
        small_png(page, shots / "train.png")
    if not start:
        return
    page.locator("#train-start").click()
    page.locator("#train-status").get_by_text("started").wait_for()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--steps", type=int, default=12, help="steps of the first run")
    p.add_argument("--second-steps", type=int, default=6, help="steps of the second run (overlaid in Runs)")
    p.add_argument(
        "--runs",
        help="a runs folder whose first run (smollm2-lora-alpaca) is already trained: "
        "the Train page is shot without starting it again",
    )
    p.add_argument("--out", default=str(REPO / "docs" / "img" / "ui"))
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from playwright.sync_api import sync_playwright

    runs = Path(args.runs) if args.runs else Path(tempfile.mkdtemp(prefix="tunelab-ui-shots-")) / "runs"
    ctx = UIContext(runs)
    first = "smollm2-lora-alpaca"
    with ui_server(ctx) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path(), headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.route("**/*", lambda r: r.continue_() if r.request.url.startswith("http://127.0.0.1") else r.abort())
        page.set_default_timeout(120_000)
        page.goto(url)
        page.locator("#train-yaml").get_by_text("output_dir").wait_for()
        if not (runs / first / "results.json").is_file():
            start_run(page, first, args.model, args.steps, "0.0005", out)
            page.get_by_role("tab", name="Watch").click()
            page.locator("#watch-progress").get_by_text("final train loss").wait_for(timeout=1_800_000)
        else:  # the Train page as it was filled for the first run
            start_run(page, first + "-again", args.model, args.steps, "0.0005", out, start=False)
            page.get_by_role("tab", name="Watch").click()
            page.locator("#watch-job input").click()
            page.get_by_role("option", name=re.compile(f"^{first} ")).click()
            page.locator("#watch-progress").get_by_text("final train loss").wait_for()
        page.wait_for_timeout(3000)  # the plots' last redraw
        small_png(page, out / "watch.png")
        second = "smollm2-lora-alpaca-lr1e-4"
        if not (runs / second / "results.json").is_file():
            start_run(page, second, args.model, args.second_steps, "0.0001", None)
            page.get_by_role("tab", name="Watch").click()
            page.locator("#watch-progress").get_by_text("running").wait_for()  # it follows the job just started
            page.locator("#watch-progress").get_by_text("final train loss").wait_for(timeout=1_800_000)
        page.get_by_role("tab", name="Runs").click()
        page.locator("#runs-refresh").click()
        for name in (first, second):
            page.locator("#runs-picked input").click()
            page.get_by_role("option", name=name, exact=True).click()
        page.keyboard.press("Escape")
        page.locator("#runs-scores").get_by_text("train_loss").wait_for()
        page.locator("#runs-loss").get_by_text(second).wait_for()  # both curves drawn
        page.wait_for_timeout(2000)
        small_png(page, out / "runs.png")
        browser.close()


if __name__ == "__main__":
    main()
