"""The web UI's Train, Watch and Runs tabs in a real browser (headless Chromium, tests/ui_browser.py).

One tiny training run, started from the Train form, is shared by the tests of this module: the form is
filled for a tiny random model folder, started, watched to the end; the page's final loss must equal the
run's metrics.jsonl, Runs must list it, and a bad field must show the CLI's own error beside it.
"""

import json
import re

import pytest
from conftest import SFT_ROWS
from ui_browser import screenshot, ui_server

from tunelab.ui.context import UIContext

TABS = ["Train", "Watch", "Runs"]
RUN = "ui-tiny"


def expect(locator):
    from playwright.sync_api import expect

    return expect(locator)


def fill(page, elem_id: str, text: str) -> None:
    box = page.locator(f"#{elem_id} input, #{elem_id} textarea").first
    box.fill(text)
    box.blur()


def choose(page, elem_id: str, value: str) -> None:
    """Pick a dropdown's choice as a person does: open it, click the choice. (Typing and Enter picks the list's
    active item, which may still be the old choice if Enter comes before the list has filtered.)"""
    box = page.locator(f"#{elem_id} input").first
    box.click()
    page.locator(f"#{elem_id} [role=option][aria-label='{value}']").click()
    expect(box).to_have_value(value)


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_dir, chromium_browser):
    """The app on a free port and one run trained from its Train form: (url, ctx, run_dir, folder of the PNGs)."""
    root = tmp_path_factory.mktemp("ui")
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in SFT_ROWS))
    ctx = UIContext(root / "runs")
    with ui_server(ctx, tabs=TABS) as url:
        context = chromium_browser.new_context(viewport={"width": 1280, "height": 900})
        context.route("**/*", lambda r: r.continue_() if r.request.url.startswith("http://127.0.0.1") else r.abort())
        page = context.new_page()
        page.set_default_timeout(60_000)
        page.goto(url)
        page.locator("#train-yaml").get_by_text("output_dir").wait_for()
        fill(page, "train-run-name", RUN)
        fill(page, "train-model", tiny_dir)
        page.keyboard.press("Enter")
        page.locator("#train-data-source [data-testid=path-radio-label]").click()
        fill(page, "train-data-path", str(data))
        fill(page, "train-lora-r", "4")
        fill(page, "train-training-max_steps", "6")
        fill(page, "train-training-eval_every", "3")
        page.locator("#train-yaml").get_by_text("max_steps").wait_for()
        page.locator("#train-check").click()
        page.locator("#train-estimate").get_by_text("trainable parameters").wait_for()
        screenshot(page, root / "train.png")
        page.locator("#train-start").click()
        page.locator("#train-status").get_by_text("started").wait_for()
        page.get_by_role("tab", name="Watch").click()
        page.locator("#watch-progress").get_by_text("final train loss").wait_for(timeout=180_000)
        screenshot(page, root / "watch.png")
        progress = page.locator("#watch-progress").inner_text()
        page.wait_for_timeout(2500)  # the plots' redraw after the last metrics line
        legend = set(page.locator("#watch-loss svg text").all_text_contents())
        context.close()
        yield url, ctx, ctx.runs / RUN, root, progress, legend


def test_train_form_runs_to_the_end_and_watch_shows_its_final_loss(served):
    url, ctx, run_dir, shots, progress, legend = served
    config = (run_dir / "ui.yaml").read_text()
    assert "r: 4" in config and "max_steps: 6" in config  # the form's values, in the YAML the job ran
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses) == 6 and (run_dir / "final").is_dir()
    shown = float(re.search(r"final train loss: ([-+.\deE]+)", progress).group(1))
    assert shown == losses[-1]
    assert re.search(r"step 6 / 6", progress), progress
    assert {"loss", "eval_loss"} <= legend, legend  # both curves drawn, though eval_loss came first
    for name in ("train.png", "watch.png"):
        assert (shots / name).stat().st_size > 5000


def test_runs_lists_the_run_with_its_scores(served, browser_page):
    url, ctx, run_dir, shots, *_ = served
    results = json.loads((run_dir / "results.json").read_text())
    page = browser_page
    page.goto(url)
    page.get_by_role("tab", name="Runs").click()
    table = page.locator("#runs-table")
    expect(table).to_contain_text(RUN)
    expect(table).to_contain_text("finished")
    page.locator("#runs-picked input").click()
    page.get_by_role("option", name=RUN).click()
    scores = page.locator("#runs-scores")
    expect(scores).to_contain_text(repr(results["train_loss"]))  # the exact number results.json holds
    expect(page.locator("#runs-loss")).to_contain_text(RUN)  # its curve, in the plot's legend
    expect(page.locator("#runs-config")).to_contain_text(f"output_dir: {run_dir}")  # the top of its config.yaml
    screenshot(page, shots / "runs.png")


def test_a_bad_field_shows_the_cli_error_beside_it(served, browser_page, capsys):
    from tunelab.cli import main

    url, ctx, run_dir, shots, *_ = served
    page = browser_page
    page.goto(url)
    page.locator("#train-yaml").get_by_text("output_dir").wait_for()
    fill(page, "train-run-name", "bad")
    fill(page, "train-lora-r", "abc")
    info = page.locator("#train-lora-r .info-text")
    info.get_by_text("method.r").wait_for()
    page.locator("#train-error-method").get_by_text("invalid config").wait_for()
    draft = ctx.runs / ".ui-drafts" / "bad" / "ui.yaml"  # the YAML the page shows, as the form wrote it
    assert main(["config", str(draft)]) == 2
    cli = capsys.readouterr().err.strip().removeprefix("tunelab: error: ").splitlines()
    assert info.inner_text().strip() == "⚠ " + cli[-1].strip()  # the CLI's line, beside the field
    box = " ".join(page.locator("#train-error-method").inner_text().split())
    assert box == "error " + " ".join(" ".join(cli).split())  # the whole message, below the method's section
    screenshot(page, shots / "train-error.png")


def test_a_stage_shows_its_own_settings(tmp_path, browser_page):
    """Choosing stage dpo shows the dpo section (its fields from DPOConfig) and what is typed there reaches the
    YAML; back on sft the section hides and the YAML drops it."""
    page = browser_page
    with ui_server(UIContext(tmp_path / "runs"), tabs=["Train"]) as url:
        page.goto(url)
        page.locator("#train-yaml").get_by_text("output_dir").wait_for()
        beta = page.locator("#train-dpo-beta")
        expect(beta).to_be_hidden()
        choose(page, "train-stage", "dpo")
        expect(beta).to_be_visible()
        fill(page, "train-dpo-beta", "0.25")
        expect(page.locator("#train-yaml")).to_contain_text("beta: 0.25")
        screenshot(page, tmp_path / "train-dpo.png")
        choose(page, "train-stage", "sft")
        expect(beta).to_be_hidden()
        expect(page.locator("#train-yaml")).not_to_contain_text("beta")
