"""The UI's Chat, Compare and Evaluate & export tabs (tunelab/ui/chat.py, compare.py, evaluate.py).

Unit tests call each tab's functions and check them against what the CLI gives for the same input (the
reply of tunelab.inference, `tunelab eval --json`, `tunelab config GRID`'s error, a loadable export);
the browser tests at the end drive the tabs in headless Chromium and read the results off the page.
"""

import json
import re
import zipfile
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml
from ui_browser import ui_server

import tunelab
from tunelab.cli import main
from tunelab.compare.plan import resolve_cells
from tunelab.compare.run import planned_keys
from tunelab.config import ConfigError
from tunelab.testing import save_tiny_model_dir

ROWS = [{"instruction": f"Say the number {i}.", "input": "", "output": f"The number is {i}."} for i in range(16)]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A LoRA SFT run (3 steps) on a tiny Llama, under a runs folder as the UI sees it."""
    root = tmp_path_factory.mktemp("ui-tabs")
    base = save_tiny_model_dir(root / "model")
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    cfg = tunelab.load_config({"output_dir": str(root / "runs" / "tiny-lora"), "model": {"name": base},
                               "data": {"train": str(data), "val_fraction": 0.25, "max_length": 48},
                               "method": {"name": "lora", "r": 2},
                               "training": {"max_steps": 3, "batch_size": 4, "lr": 1e-2, "progress": False,
                                            "tensorboard": False}})  # fmt: skip
    run = tunelab.train(cfg).run_dir
    return {"run": str(run), "base": base, "runs": root / "runs", "root": root}


# ------------------------------------------------------------------------------------------ chat
def test_chat_reply_is_tunelab_inference_reply(tiny_run):
    from tunelab.inference import generate
    from tunelab.stages.runs import load_run
    from tunelab.ui import chat

    model, tok = load_run(tiny_run["run"], device="cpu")
    settings = {"max_new_tokens": 12, "temperature": 0.0, "top_p": 1.0}
    want = generate(model, tok, "Say the number 3.", **settings)
    steps = list(chat.respond(tiny_run["run"], True, "Say the number 3.", [], [], 0.0, 1.0, 12, "", device="cpu"))
    history, base_history, error, box = steps[-1]
    assert error == "" and box == ""
    assert history == [{"role": "user", "content": "Say the number 3."}, {"role": "assistant", "content": want}]
    assert len(steps) > 3  # streamed: the reply grew over several updates
    partial = [h[-1]["content"] for h, _, _, _ in steps[:-1] if h and h[-1]["role"] == "assistant"]
    assert all(want.startswith(p.strip()) for p in partial if p.strip())
    base_model, base_tok = load_run(tiny_run["base"], device="cpu")
    assert base_history[-1]["content"] == generate(base_model, base_tok, "Say the number 3.", **settings)
    assert chat.load(tiny_run["run"], "cpu")[0] is chat.load(tiny_run["run"], "cpu")[0]  # loaded once

    # a second turn carries the conversation, as `tunelab chat` does
    more = list(chat.respond(tiny_run["run"], False, "And 4?", history, [], 0.0, 1.0, 12, "", device="cpu"))[-1][0]
    assert more[-1]["content"] == generate(model, tok, [*history, {"role": "user", "content": "And 4?"}], **settings)

    # sampled with a seed: the same settings give the same reply as generate
    torch.manual_seed(7)
    sampled = generate(model, tok, "Say the number 3.", 12, 0.9, top_p=0.8)
    torch.manual_seed(7)
    got = list(chat.respond(tiny_run["run"], False, "Say the number 3.", [], [], 0.9, 0.8, 12, "", device="cpu"))
    assert got[-1][0][-1]["content"] == sampled


def test_chat_refuses_bad_settings_as_the_cli_does(tiny_run, capsys):
    from tunelab.ui import chat

    for field, cli_flag, value in (("top_p", "--top-p", 1.5), ("temperature", "--temperature", -1.0),
                                   ("max_new_tokens", "--max-new-tokens", 0)):  # fmt: skip
        settings = {"temperature": 0.0, "top_p": 1.0, "max_new_tokens": 8, field: value}
        *_, (history, _, error, box) = chat.respond(tiny_run["run"], False, "hi", [], [], settings["temperature"],
                                                    settings["top_p"], settings["max_new_tokens"], "", device="cpu")  # fmt: skip
        assert main(["generate", tiny_run["run"], "hi", cli_flag, str(value)]) == 2
        cli = capsys.readouterr().err.strip().removeprefix("tunelab: error: ")
        assert f"```text\n{cli}\n```" in error, (error, cli)
        assert history == [] and box == "hi"  # nothing asked; the message stays in the box
    *_, (_, _, error, _) = chat.respond(tiny_run["base"], True, "hi", [], [], 0.0, 1.0, 8, "", device="cpu")
    assert "not a run folder" in error  # a plain model has no base beside it
    *_, (_, _, error, _) = chat.respond(tiny_run["run"], False, "hi", [], [], None, 1.0, None, "", device="cpu")
    assert "--temperature, --max-new-tokens: give a number" in error  # cleared fields


def test_chat_shows_the_cli_command_of_its_settings():
    import shlex

    from tunelab.cli import build_parser
    from tunelab.ui import chat

    shown = chat.chat_command("runs/my run", 0.7, 0.9, 10.0, "Be brief, 'please'.", True)
    args = build_parser().parse_args(shlex.split(shown.split("`")[1])[1:])
    assert (args.run, args.temperature, args.top_p, args.max_new_tokens) == ("runs/my run", 0.7, 0.9, 10)
    assert args.system == "Be brief, 'please'." and args.trust_remote_code
    bare = build_parser().parse_args(shlex.split(chat.chat_command("", 0, 1, 256, "  ").split("`")[1])[1:])
    assert (bare.run, bare.temperature, bare.system, bare.trust_remote_code) == ("RUN", 0.0, None, False)


# -------------------------------------------------------------------------------------- evaluate
def test_eval_scores_equal_tunelab_eval(tiny_run, capsys):
    from tunelab.ui import evaluate

    result = evaluate.score(tiny_run["run"], "sst2", limit=24, seed=1, device="cpu")
    assert main(["eval", tiny_run["run"], "--task", "sst2", "--limit", "24", "--seed", "1", "--json"]) == 0
    cli = json.loads(capsys.readouterr().out)
    assert result["metrics"] == cli["metrics"] and result["n"] == cli["n"] == 24
    lo, hi = result["intervals"]["accuracy"]
    assert 0.0 <= lo <= result["metrics"]["accuracy"] <= hi <= 1.0 and hi - lo > 0.1  # 24 rows: a wide interval
    table = evaluate.scores_table(result)
    assert table[0] == ["accuracy", f"{cli['metrics']['accuracy']:.4f}", f"[{lo:.4f}, {hi:.4f}]", 24]
    assert {row[0]: row[2] for row in table}["f1"] == "—"  # only the main and the vectorised metrics get one


def test_eval_perplexity_of_an_uploaded_file(tiny_run, capsys):
    from tunelab.ui import evaluate

    text = tiny_run["root"] / "held-out.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    result = evaluate.score(tiny_run["run"], "perplexity", data=str(text), context=32, device="cpu")
    assert (
        main(["eval", tiny_run["run"], "--task", "perplexity", "--data", str(text), "--context", "32", "--json"]) == 0
    )
    assert result["metrics"] == json.loads(capsys.readouterr().out)["metrics"]
    with pytest.raises(ConfigError, match="--limit 0: must be 1 or more"):
        evaluate.score(tiny_run["run"], "sst2", limit=0)


def test_export_hf_zip_and_gguf_load(tiny_run, tmp_path):
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM

    from tunelab.export.hf import load_merged
    from tunelab.ui import evaluate

    report, download = evaluate.export_run(tiny_run["run"], "hf", "f32", str(tmp_path / "hf"), tiny_run["runs"])
    assert report["path"] == str(tmp_path / "hf") and download.endswith("hf.zip")
    with zipfile.ZipFile(download) as z:
        z.extractall(tmp_path / "unzipped")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "unzipped" / "hf").eval()
    merged, _, _ = load_merged(tiny_run["run"])
    ids = torch.tensor([[5, 17, 42, 7, 99]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, merged(ids).logits, rtol=0, atol=1e-5)

    report, download = evaluate.export_run(tiny_run["run"], "gguf", "q8_0", None, tiny_run["runs"])
    assert Path(report["path"]) == Path(tiny_run["run"] + "-q8_0.gguf")  # beside the run, as the CLI puts it
    assert Path(download).name == Path(report["path"]).name
    assert Path(download).read_bytes() == Path(report["path"]).read_bytes()
    reader = GGUFReader(download)
    assert len(reader.tensors) == report["tensors"] if "tensors" in report else len(reader.tensors) > 0


def test_export_refuses_a_bad_quant_as_the_cli_does(tiny_run, capsys):
    from tunelab.ui import evaluate
    from tunelab.ui.shared import error_markdown

    with pytest.raises(Exception) as e:
        evaluate.export_run(tiny_run["run"], "hf", "q4_0", None, tiny_run["runs"])
    assert main(["export", tiny_run["run"], "--format", "hf", "--quant", "q4_0"]) == 2
    cli = capsys.readouterr().err.strip().removeprefix("tunelab: error: ")
    assert f"```text\n{cli}\n```" in error_markdown(e.value)


# --------------------------------------------------------------------------------------- compare
BAD_GRID = """output_dir: {out}
models: [{model}]
methods: [{{name: lorra}}]
tasks: [{{name: sst2, train_limit: 8}}]
"""


def test_compare_check_gives_tunelab_configs_text(tiny_run, capsys):
    from tunelab.ui import compare

    text = BAD_GRID.format(out=tiny_run["root"] / "grid-out", model=tiny_run["base"])
    with pytest.raises(ConfigError) as e:
        compare.check(text, None, tiny_run["runs"])
    saved = compare.grid_file(text, None, tiny_run["runs"])  # the pasted text, saved by content
    assert saved.parent == tiny_run["runs"] / ".ui-grids" and saved.read_text() == text
    assert main(["config", str(saved)]) == 2
    assert capsys.readouterr().err.strip() == f"tunelab: error: {e.value}"
    assert "unknown method 'lorra'" in str(e.value) and "Did you mean 'lora'" in str(e.value)

    good = text.replace("lorra", "lora")
    path, described = compare.check(good, None, tiny_run["runs"])
    assert main(["config", str(path)]) == 0
    assert capsys.readouterr().out.strip() == described
    example = compare.example_grids()[0]  # an unchanged example runs from its own file
    assert compare.grid_file(example.read_text(), str(example), tiny_run["runs"]) == example


def test_compare_builds_a_grid_from_the_form(tiny_run):
    from tunelab.compare import load_grid
    from tunelab.ui import compare

    text = compare.build_grid(["smollm2-135m-instruct"], f" {tiny_run['base']} ", ["lora", "bitfit"], ["sst2", "stsb"],
                              32, 40, 6, str(tiny_run["root"] / "built"))  # fmt: skip
    grid = load_grid(yaml.safe_load(text))
    assert [m.name for m in grid.models] == ["smollm2-135m-instruct", tiny_run["base"]]
    assert [m.name for m in grid.methods] == ["lora", "bitfit"]
    assert [(t.name, t.train_limit, t.dev_limit) for t in grid.tasks] == [("sst2", 32, 40), ("stsb", 32, 40)]
    assert grid.base["training"]["max_steps"] == 6


# --------------------------------------------------------------------------------------- browser
# the shared harness (tests/ui_browser.py): the app on a free local port, headless Chromium that may only reach it
@contextmanager
def ui_page(page, runs, tab):
    """`page` (the browser_page fixture) opened on an app with one tab; the app closes after."""
    from tunelab.ui.context import UIContext

    with ui_server(UIContext(Path(runs)), tabs=[tab]) as url:
        page.goto(url)
        yield page


def words(text: str) -> str:
    return " ".join(text.split())


def table_rows(page, elem_id: str) -> list[list[str]]:
    """The body rows of a gr.Dataframe as the page shows them, cell by cell (its rows carry role=row)."""
    return page.evaluate(
        """id => [...document.querySelectorAll(`#${id} [role=row]`)].filter(r => r.getAttribute('aria-rowindex') > 1)
            .map(r => [...r.querySelectorAll('[role=gridcell]')].map(c => c.innerText.trim()))""",
        elem_id,
    )


def test_browser_chat_shows_the_reply(browser_page, tiny_run, tmp_path):
    from tunelab.inference import generate
    from tunelab.stages.runs import load_run

    model, tok = load_run(tiny_run["run"], device="cpu")
    want = generate(model, tok, "Say the number 3.", max_new_tokens=10)
    with ui_page(browser_page, tiny_run["runs"], "Chat") as page:
        page.get_by_text("Generation settings").click()
        page.get_by_label("--max-new-tokens").fill("10")
        page.get_by_label("--max-new-tokens").press("Tab")  # a Number keeps its text on blur
        # the server's echo of the settings: once it shows 10 the page state holds it (CI twice sent the default
        # when the test only waited a moment)
        page.locator("#chat-command").get_by_text("--max-new-tokens 10").wait_for(timeout=30_000)
        page.locator("#chat-message textarea").fill("Say the number 3.")
        page.locator("#chat-message textarea").press("Enter")
        reply = page.locator('#chat-run [data-testid="bot"]').last
        reply.wait_for(timeout=60_000)
        page.wait_for_function("() => !document.querySelector('#chat-run .pending, #chat-run .generating')",
                               timeout=60_000)  # fmt: skip
        page.wait_for_timeout(500)
        page.screenshot(path=tmp_path / "chat.png", full_page=True)
        assert words(reply.inner_text()) == words(want) != ""
        assert page.locator("#chat-error").inner_text().strip() == ""

        # a bad setting: the CLI's message beside the form, nothing asked of the model, no traceback page
        page.get_by_label("--top-p (1 = no nucleus cut)").fill("1.5")
        page.get_by_label("--top-p (1 = no nucleus cut)").press("Tab")  # blur: kept before the send
        page.locator("#chat-message textarea").fill("hi")
        page.locator("#chat-send").click()
        error = page.locator("#chat-error")
        error.get_by_text("--top-p 1.5: must be above 0 and at most 1 (1 = no nucleus cut)").wait_for(timeout=30_000)
        assert "tunelab: error:" in error.inner_text()
        assert page.locator('#chat-run [data-testid="bot"]').count() == 1


def test_browser_evaluate_and_export(browser_page, tiny_run, tmp_path):
    from playwright.sync_api import expect

    from tunelab.ui import evaluate

    want = evaluate.score(tiny_run["run"], "sst2", limit=16, device="cpu")
    with ui_page(browser_page, tiny_run["runs"], "Evaluate & export") as page:
        page.get_by_label("--limit (dev rows; empty = all)").fill("16")
        page.get_by_label("--limit (dev rows; empty = all)").press("Tab")  # blur: kept before the send
        page.locator("#eval-button").click()
        page.locator("#eval-scores").get_by_text("accuracy", exact=True).wait_for(timeout=90_000)
        lo, hi = want["intervals"]["accuracy"]
        assert table_rows(page, "eval-scores")[0] == ["accuracy", f"{want['metrics']['accuracy']:.4f}",
                                                      f"[{lo:.4f}, {hi:.4f}]", "16"]  # fmt: skip
        assert "16 rows" in page.locator("#eval-summary").inner_text()

        page.get_by_label("gguf", exact=True).check()
        expect(page.get_by_label("--quant")).to_have_value("f16")  # the format's default, as tunelab export's
        page.locator("#export-button").click()
        link = page.locator('#export-download [data-testid="download-link"]').first
        link.wait_for(timeout=90_000)
        page.screenshot(path=tmp_path / "evaluate.png", full_page=True)
        gguf = Path(tiny_run["run"] + "-f16.gguf")
        assert link.get_attribute("download") == gguf.name
        body = page.request.get(link.get_attribute("href")).body()
        assert body == gguf.read_bytes()  # the download is the file export wrote


def test_browser_compare_runs_a_tiny_grid(browser_page, tiny_run, tmp_path):
    from playwright.sync_api import expect

    from tunelab.compare.record import table_cells
    from tunelab.ui import compare

    rows = [
        {"text": f"{w} {w} the film", "label": int(w in ("good", "great"))}
        for w in ["good", "bad", "great", "awful"] * 4
    ]
    for split in ("train", "dev"):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "grid-out"
    grid = {"output_dir": str(out), "zero_shot": False,
            "base": {"training": {"max_steps": 2, "batch_size": 8, "warmup_steps": 0, "threads": 1, "tensorboard": False}},
            "models": [{"name": tiny_run["base"], "label": "llama", "data": {"max_length": 256}}],
            "methods": [{"name": "lora", "r": 4, "dropout": 0.0}],
            "tasks": [{"name": "reviews", "labels": ["negative", "positive"], "train_file": str(tmp_path / "train.jsonl"),
                       "dev_file": str(tmp_path / "dev.jsonl"), "max_length": 32}]}  # fmt: skip
    (tmp_path / "tiny-grid.yaml").write_text(yaml.safe_dump(grid))
    # an earlier grid run of this UI, which failed: listed below the new one, and shown when picked
    older = Path(tiny_run["runs"]) / ".ui-jobs" / "20000101-000000-0ld0ld"
    older.mkdir(parents=True)
    (older / "job.json").write_text(json.dumps({"argv": ["compare", str(tmp_path / "old-grid.yaml")],
                                                "run_dir": str(tmp_path / "old-out"), "started": 0, "pid": 2**22 + 7}))  # fmt: skip
    (older / "rc.json").write_text(json.dumps({"returncode": 1}))
    with ui_page(browser_page, tiny_run["runs"], "Compare") as page:
        page.locator('input[type="file"]').first.set_input_files(str(tmp_path / "tiny-grid.yaml"))
        page.locator("#compare-grid").get_by_text("reviews").first.wait_for(timeout=30_000)
        page.locator("#compare-run").click()
        page.locator("#compare-results").get_by_text("lora", exact=True).wait_for(timeout=240_000)
        page.locator("#compare-plots img").first.wait_for(timeout=30_000)
        page.screenshot(path=tmp_path / "compare.png", full_page=True)
        header, body = table_cells(json.loads((out / "results.json").read_text()))
        assert len(body) == 2  # the majority reference and the one cell
        assert table_rows(page, "compare-results") == body
        lora = next(r for r in body if r[header.index("Method")] == "lora")
        assert lora[header.index("Status")] == "done" and lora[header.index("95% CI")].startswith("[")
        assert "done" in page.locator("#compare-cells").inner_text()
        assert page.locator("#compare-status").inner_text().startswith("finished")
        run_picker = page.locator("#compare-job input")
        expect(run_picker).to_have_value(re.compile(r"^grid-out · compare · finished · "))
        run_picker.click()
        page.get_by_role("option", name=re.compile("old-out")).click()
        expect(page.locator("#compare-status")).to_contain_text("failed (exit 1)")
        expect(page.locator("#compare-status")).to_contain_text("old-out")
        run_picker.click()
        page.get_by_role("option", name=re.compile("grid-out")).click()
        expect(page.locator("#compare-status")).to_contain_text("finished")
        assert table_rows(page, "compare-results") == body
    # the rows the run planned (plan.json) are the grid's as `tunelab compare` plans them, references first
    grid = compare.load_grid(str(tmp_path / "tiny-grid.yaml"))
    cells = [c.key for c in resolve_cells(grid, out, materialise=False)]
    assert planned_keys(out)[-len(cells) :] == cells and len(planned_keys(out)) == 2
    assert [r[4] for r in compare.cell_rows(out, planned_keys(out))] == ["done", "done"]
