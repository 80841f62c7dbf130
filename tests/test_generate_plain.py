"""`tunelab generate` on a model that never learnt a chat template (pre-trained from scratch on text with a
tokenizer trained without one, or a model folder whose tokenizer has none) continues the prompt as plain text
and says so on stderr; a fine-tuned run keeps its template."""

import json
import shutil

import pytest
from test_pretrain_scratch import LINES, scratch_cfg

import tunelab
import tunelab.models.generation as generation
from tunelab.cli import main
from tunelab.inference import generate, plain_prompt_reason
from tunelab.stages.runs import load_run

pytestmark = pytest.mark.usefixtures("empty_home")  # the tokenizer and data caches


@pytest.fixture()
def scratch_run(tmp_path):
    corpus = tmp_path / "plays.txt"
    corpus.write_text("\n".join(LINES * 12) + "\n")
    cfg = scratch_cfg(str(corpus), tmp_path / "pre", max_steps=2, eval_every=None)
    cfg.model.tokenizer.train.chat_template = "none"
    return tunelab.train(cfg).run_dir


def recording(monkeypatch):
    prompts = []
    real = generation.generate

    def record(model, tokenizer, ids, **kw):
        prompts.extend(ids)
        return real(model, tokenizer, ids, **kw)

    monkeypatch.setattr(generation, "generate", record)
    return prompts


def test_a_scratch_pretrained_model_gets_the_plain_prompt(scratch_run, tmp_path, monkeypatch, capsys):
    prompts = recording(monkeypatch)
    assert main(["generate", str(scratch_run), "First Citizen:", "--max-new-tokens", "5"]) == 0
    out, err = capsys.readouterr()
    assert "continued as plain text, not in a chat template" in err and "pre-trained from scratch" in err
    model, tok = load_run(str(scratch_run), device="cpu")
    assert prompts == [tok("First Citizen:")["input_ids"]]  # the text itself: no ChatML markup around it
    assert "im_start" not in tok.decode(prompts[0]) and "user" not in tok.decode(prompts[0])
    assert out.strip() == generate(model, tok, "First Citizen:", 5, chat_template=False)
    generate(model, tok, "First Citizen:", 5)  # what the chat template would have fed it instead: more
    assert len(prompts) == 3 and prompts[1] == prompts[0] and len(prompts[2]) > len(prompts[0]) + 2


def manifest_variant(run, tmp_path, name, **changes):
    """A copy of the run's final/tunelab.json with some keys changed (plain_prompt_reason reads only that)."""
    manifest = json.loads((run / "final" / "tunelab.json").read_text())
    for key, value in changes.items():
        where, _, field = key.rpartition(".")
        node = manifest
        for part in filter(None, where.split(".")):
            node = node[part]
        node[field] = value
    (tmp_path / name / "final").mkdir(parents=True)
    (tmp_path / name / "final" / "tunelab.json").write_text(json.dumps(manifest))
    return str(tmp_path / name)


def test_what_keeps_the_chat_template(scratch_run, tmp_path):
    assert plain_prompt_reason(str(scratch_run)) is not None
    chatml = manifest_variant(scratch_run, tmp_path, "chatml", **{"base_model.tokenizer.train.chat_template": "chatml"})
    assert plain_prompt_reason(chatml) is None  # a tokenizer trained with ChatML
    assert plain_prompt_reason(manifest_variant(scratch_run, tmp_path, "sft", stage="sft")) is None  # fine-tuned
    assert (
        plain_prompt_reason(manifest_variant(scratch_run, tmp_path, "base", **{"base_model.architecture": None}))
        is None
    )
    # a plain model folder: plain when its tokenizer has no template, the template when it has one
    folder = tmp_path / "folder"
    shutil.copytree(scratch_run / "final", folder)
    (folder / "tunelab.json").unlink()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    (folder / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "chat_template"}))
    assert "has no chat template" in plain_prompt_reason(str(folder))
    (folder / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    assert plain_prompt_reason(str(folder)) is None
