"""Preference data, the reward-model stage and DPO, on tiny models (the real-data checks are marked slow)."""

import json
import math
import random
import re
from pathlib import Path

import pytest
import torch

import tunelab
from tunelab.config import ConfigError, load_config
from tunelab.data import DataError, shared_data_dir
from tunelab.data.preference import collate_pairs, encode_preference, load_preference_pairs, read_preference_pairs
from tunelab.stages import dpo as P
from tunelab.testing import save_tiny_model_dir, tiny_llama, tiny_tokenizer

WORDS = "the quick brown fox jumps over lazy dog give three tips eat well sleep enough and exercise".split()


def synthetic_pairs(n: int, seed: int) -> list[dict]:
    """Chosen replies hold the word 'Paris' somewhere among random words; rejected ones never do."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        good = rng.choices(WORDS, k=rng.randint(3, 6))
        good.insert(rng.randint(0, 3), "Paris")
        bad = rng.choices(WORDS, k=rng.randint(3, 6))
        rows.append({"prompt": f"Question {i}: say something.", "chosen": " ".join(good), "rejected": " ".join(bad)})
    return rows


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("pairs")
    return write_jsonl(d / "train.jsonl", synthetic_pairs(120, 0)), write_jsonl(d / "dev.jsonl", synthetic_pairs(40, 1))


def make_cfg(stage, tiny_dir, files, out, method=None, **training):
    t = dict(max_steps=30, batch_size=8, lr=1e-2, warmup_steps=0, progress=False, tensorboard=False, seed=3)
    t.update(training)
    return load_config(
        {
            "stage": stage,
            "output_dir": str(out),
            "model": {"name": tiny_dir},
            "data": {"train": files[0], "validation": files[1], "format": "preference", "max_length": 64},
            "method": method or {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
            "dpo": {"beta": 0.5},
            "training": t,
        }
    )


def metrics_lines(run_dir):
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


def data_prepare_report(raw: dict, folder, capsys):
    """`tunelab data prepare` on the config `raw` (written to folder/c.yaml): (its path, what it printed, the
    printed `name   number` fields)."""
    import yaml

    from tunelab.cli import main

    path = folder / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["data", "prepare", str(path)]) == 0
    out = capsys.readouterr().out
    return path, out, dict(re.findall(r"^(\S.*?)  +(\d+)", out, re.M))


# ----------------------------------------------------------------------------------------------- data
def test_explicit_format_with_text_messages_and_implicit_prompt(tmp_path):
    conv = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "2+2?"},
    ]
    rows = [
        {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Rome.", "system": "Be brief."},
        {"prompt": conv, "chosen": [{"role": "assistant", "content": "4"}], "rejected": {"role": "assistant", "content": "5"}},
        {"chosen": conv + [{"role": "assistant", "content": "4"}], "rejected": conv + [{"role": "assistant", "content": "22"}]},
        {"prompt": conv, "chosen": conv + [{"role": "assistant", "content": "4"}], "rejected": "5"},
    ]  # fmt: skip
    pairs = load_preference_pairs(write_jsonl(tmp_path / "p.jsonl", rows))
    assert pairs[0] == {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}],
        "chosen": "Paris.",
        "rejected": "Rome.",
    }
    assert pairs[1] == {"prompt": conv, "chosen": "4", "rejected": "5"}
    assert pairs[2] == {"prompt": conv, "chosen": "4", "rejected": "22"}
    assert pairs[3]["prompt"] == conv  # a chosen conversation that repeats the prompt is not doubled
    # own column names
    (tmp_path / "o.json").write_text(json.dumps([{"q": "Why?", "good": "Because.", "bad": "No."}]))
    own = load_preference_pairs(str(tmp_path / "o.json"), columns={"prompt": "q", "chosen": "good", "rejected": "bad"})
    assert own == [{"prompt": [{"role": "user", "content": "Why?"}], "chosen": "Because.", "rejected": "No."}]


def test_pairs_with_the_same_reply_twice_are_dropped_and_counted(tmp_path):
    same = {"prompt": "Hi", "chosen": "Hello", "rejected": "Hello"}
    rows = [same, {"prompt": "Hi", "chosen": "Hello", "rejected": "Go away"}, same]
    pairs, stats = read_preference_pairs(write_jsonl(tmp_path / "p.jsonl", rows))
    assert stats == {"rows_read": 3, "skipped": 0, "identical": 2} and [p["rejected"] for p in pairs] == ["Go away"]
    with pytest.raises(
        DataError, match=r"2 rows dropped: chosen and rejected are the same reply, first .*p2.jsonl line 1"
    ):
        read_preference_pairs(write_jsonl(tmp_path / "p2.jsonl", [same, same]))


def test_hh_rlhf_transcripts(tmp_path):
    head = "\n\nHuman: How do I bake bread?\n\nAssistant: Flour, water, yeast.\n\nHuman: And then?"
    rows = [
        {"chosen": head + "\n\nAssistant: Knead and bake it.", "rejected": head + "\n\nAssistant: Buy some.  "},
        # the same speaker twice in a row is one turn; an empty last reply is still a reply
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello\n\nAssistant: there", "rejected": "\n\nHuman: Hi\n\nAssistant:"},
        # the two conversations differ before the final reply: no pair, skipped
        {"chosen": "\n\nHuman: A\n\nAssistant: B\n\nHuman: C\n\nAssistant: D", "rejected": "\n\nHuman: A\n\nAssistant: X"},
    ]  # fmt: skip
    pairs, stats = read_preference_pairs(write_jsonl(tmp_path / "hh.jsonl", rows))
    assert stats == {"rows_read": 3, "skipped": 1, "identical": 0}
    assert pairs[0] == {
        "prompt": [
            {"role": "user", "content": "How do I bake bread?"},
            {"role": "assistant", "content": "Flour, water, yeast."},
            {"role": "user", "content": "And then?"},
        ],
        "chosen": "Knead and bake it.",
        "rejected": "Buy some.",
    }
    assert pairs[1] == {"prompt": [{"role": "user", "content": "Hi"}], "chosen": "Hello\n\nthere", "rejected": ""}


def test_sharegpt_format(tmp_path):
    rows = [
        {
            "conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q1"},
                              {"from": "gpt", "value": "A1"}, {"from": "human", "value": "Q2"}],
            "chosen": {"from": "gpt", "value": "good"},
            "rejected": {"from": "gpt", "value": "bad"},
        }
    ]  # fmt: skip
    (tmp_path / "s.json").write_text(json.dumps(rows))
    assert load_preference_pairs(str(tmp_path / "s.json")) == [
        {
            "prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"},
                       {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}],
            "chosen": "good",
            "rejected": "bad",
        }
    ]  # fmt: skip


@pytest.mark.parametrize(
    "row, expected",
    [
        ({"prompt": "Q", "chosen": "A"}, ["bad.jsonl line 2", "field 'rejected' is missing", "data.columns.rejected"]),
        ({"prompt": 3, "chosen": "A", "rejected": "B"}, ["line 2", "field 'prompt' should be text or a list"]),
        ({"chosen": "just text", "rejected": "more"}, ["line 2", "'chosen'", "hh-rlhf transcript", "prompt column"]),
        ({"prompt": "Q", "chosen": [{"role": "user", "content": "A"}], "rejected": "B"},
         ["line 2", "'chosen' must end with an assistant reply"]),
        ({"prompt": "Q", "chosen": [{"from": "alien", "value": "A"}], "rejected": "B"}, ["line 2", "alien"]),
        ({"chosen": [{"role": "assistant", "content": "A"}], "rejected": [{"role": "assistant", "content": "B"}]},
         ["line 2", "no prompt", "data.columns.prompt"]),
    ],
)  # fmt: skip
def test_bad_rows_name_file_line_field_and_fix(tmp_path, row, expected):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok", "chosen": "a", "rejected": "b"}, row])
    with pytest.raises(DataError) as err:
        load_preference_pairs(path)
    for piece in expected:
        assert piece in str(err.value), (piece, str(err.value))


def test_encode_preference_masks_the_reply_and_truncates_the_prompt_from_the_left():
    tok = tiny_tokenizer()
    pair = {"prompt": [{"role": "user", "content": "the quick brown fox " * 6}], "chosen": "Paris.", "rejected": "no"}
    full = encode_preference(pair, tok, 10_000)
    assert not full["truncated"]
    for side, text in (("chosen", "Paris."), ("rejected", "no")):
        ids, mask = full[f"{side}_input_ids"], full[f"{side}_response_mask"]
        assert tok.decode([t for t, m in zip(ids, mask) if m]) == text + "<|im_end|>\n"
        assert mask == sorted(mask)  # prompt, then reply
    short = encode_preference(pair, tok, 24)
    assert short["truncated"]
    for side in ("chosen", "rejected"):
        ids, mask = short[f"{side}_input_ids"], short[f"{side}_response_mask"]
        assert len(ids) <= 24
        n_reply = sum(full[f"{side}_response_mask"])
        assert ids[-n_reply:] == full[f"{side}_input_ids"][-n_reply:] and sum(mask) == n_reply  # reply intact
    # both sides keep the same prompt tail
    k = short["chosen_response_mask"].index(1)
    assert k == short["rejected_response_mask"].index(1) >= 24 // 4
    for side in ("chosen", "rejected"):
        prompt = full[f"{side}_input_ids"][: full[f"{side}_response_mask"].index(1)]
        assert short[f"{side}_input_ids"][:k] == prompt[-k:]


def test_preference_config_is_validated_up_front():
    with pytest.raises(ConfigError, match="stage: dpo needs data.format: preference"):  # auto detects pairs
        load_config({"stage": "dpo", "data": {"train": "x.jsonl", "format": "instruction"}})
    with pytest.raises(ConfigError, match="data.format: preference is for stage: reward or stage: dpo"):
        load_config({"data": {"train": "x.jsonl", "format": "preference"}})
    with pytest.raises(ConfigError, match="dpo.beta"):
        load_config({"stage": "dpo", "data": {"format": "preference"}, "dpo": {"beta": 0}})
    with pytest.raises(ConfigError, match="stage: reward does not support method prefix"):
        load_config({"stage": "reward", "data": {"format": "preference"}, "method": {"name": "prefix"}})
    with pytest.raises(ConfigError, match="Did you mean 'beta'"):
        load_config({"stage": "dpo", "data": {"format": "preference"}, "dpo": {"bta": 0.2}})


@pytest.mark.slow
def test_real_preference_files_parse():
    if not (shared_data_dir() / "hh-rlhf").is_dir():
        pytest.skip("shared data not available")
    pairs, stats = read_preference_pairs(str(shared_data_dir() / "hh-rlhf/harmless-base/test.jsonl.gz"))
    assert stats == {"rows_read": 2312, "skipped": 0, "identical": 0} and len(pairs) == 2312
    assert all(p["prompt"][-1]["role"] == "user" and p["chosen"] != p["rejected"] for p in pairs)
    demo = load_preference_pairs(str(shared_data_dir() / "llamafactory-demo/dpo_en_demo.json"))
    assert len(demo) == 300 and all(p["prompt"][-1]["role"] == "user" for p in demo)


# ---------------------------------------------------------------------------------------------- losses
def test_sequence_logps_matches_full_logits_and_dpo_loss_formulas():
    tok, model = tiny_tokenizer(), tiny_llama()
    enc = [encode_preference(p | {"prompt": [{"role": "user", "content": p["prompt"]}]}, tok, 64)
           for p in synthetic_pairs(3, 5)]  # fmt: skip
    batch = collate_pairs(enc, tok.pad_token_id)
    fast = P.sequence_logps(model, batch)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, -1)
    ref = [
        sum(float(logp[i, t - 1, batch["input_ids"][i, t]]) for t in range(1, batch["input_ids"].shape[1])
            if batch["response_mask"][i, t])
        for i in range(6)
    ]  # fmt: skip
    assert torch.allclose(fast, torch.tensor(ref), atol=1e-4)

    lw, ll = torch.tensor([1.0, -0.5]), torch.tensor([0.0, 0.5])  # h = [1, -1]
    b = 0.5
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert torch.allclose(P.dpo_loss(lw, ll, b), torch.tensor([-math.log(sig(0.5)), -math.log(sig(-0.5))]))
    smooth = P.dpo_loss(lw, ll, b, label_smoothing=0.1)
    assert math.isclose(float(smooth[0]), -0.9 * math.log(sig(0.5)) - 0.1 * math.log(sig(-0.5)), rel_tol=1e-6)
    assert torch.allclose(P.dpo_loss(lw, ll, b, loss_type="ipo"), torch.tensor([0.0, 4.0]))  # (h - 1/(2b))^2


def test_simpo_and_orpo_losses_are_the_papers():
    """SimPO (Meng et al. 2024, eq. 6) and ORPO (Hong et al. 2024, eqs. 4-7) by hand, from the mean log-probs."""
    tok, model = tiny_tokenizer(), tiny_llama()
    enc = [encode_preference(p | {"prompt": [{"role": "user", "content": p["prompt"]}]}, tok, 64)
           for p in synthetic_pairs(3, 5)]  # fmt: skip
    batch = collate_pairs(enc, tok.pad_token_id)
    n = [sum(batch["response_mask"][i, 1:].tolist()) for i in range(6)]
    assert torch.allclose(
        P.mean_logps(model, batch), P.sequence_logps(model, batch) / torch.tensor(n, dtype=torch.float)
    )
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    mw, ml = torch.tensor([-0.4, -2.0]), torch.tensor([-1.0, -0.5])
    simpo = [-math.log(sig(2.0 * (w - lo) - 0.6)) for w, lo in zip(mw.tolist(), ml.tolist())]
    assert torch.allclose(P.simpo_loss(mw, ml, 2.0, 0.6), torch.tensor(simpo), atol=1e-6)

    def log_odds(m):
        return m - math.log(1 - math.exp(m))

    orpo = [-w - 0.2 * math.log(sig(log_odds(w) - log_odds(lo))) for w, lo in zip(mw.tolist(), ml.tolist())]
    assert torch.allclose(P.orpo_loss(mw, ml, 0.2), torch.tensor(orpo), atol=1e-6)


@pytest.mark.parametrize("loss_type", ["simpo", "orpo"])
def test_reference_free_losses_learn_the_preference_without_a_reference(tiny_dir, files, tmp_path, monkeypatch,
                                                                        loss_type, capsys):  # fmt: skip
    from tunelab.methods import reference

    def no_reference(*args, **kwargs):
        raise AssertionError("a reference-free loss asked for the reference")

    monkeypatch.setattr(P, "reference_logps", no_reference)
    monkeypatch.setattr(reference, "prepare", no_reference)  # nor prepared (full fine-tuning: no frozen copy)
    cfg = make_cfg("dpo", tiny_dir, files, tmp_path / loss_type, max_steps=30, lr=1e-2, pass_threads=2)
    cfg.dpo.loss_type, cfg.dpo.beta = loss_type, 2.0 if loss_type == "simpo" else 1.0
    m = tunelab.train(cfg).metrics
    assert "runs as up to 2 shares of its rows at once" in capsys.readouterr().err  # no reference pass to wait for
    assert m["eval_loss"] < m["eval_loss_before"]
    # 40 held-out pairs, chance 0.5 (measured: SimPO 1.0, ORPO 0.925, its SFT term dominating early)
    assert m["pairwise_accuracy"] > 0.8 and m["chosen_mean_logp"] > m["rejected_mean_logp"]
    assert "reference_accuracy" not in m


def test_a_frozen_reference_copy_runs_the_policys_fused_modules(tiny_dir, files, tmp_path, monkeypatch):
    """dpo with full fine-tuning: pi_ref is a frozen copy taken before the speed code is applied; it gets the same
    fused RMSNorm and attention as the policy (accel's Speed.match), so in bf16 the two round alike (a bf16 KTO run
    of the default model read a loss of 0.5007 before training without it, 0.5000 with it)."""
    from tunelab.accel import attention
    from tunelab.methods import reference
    from tunelab.models.loading import unwrap

    prepared = []
    real = reference.prepare
    monkeypatch.setattr(reference, "prepare", lambda model, method: (prepared.append(model), real(model, method)))
    m = tunelab.train(make_cfg("dpo", tiny_dir, files, tmp_path / "full", {"name": "full"}, max_steps=1)).metrics
    assert m["eval_loss_before"] == pytest.approx(math.log(2), abs=1e-6)
    policy, ref = prepared[0], reference.frozen(prepared[0])
    assert ref is not None and ref is not policy
    for model in (policy, ref):
        assert unwrap(model).config._attn_implementation == attention.NAME
        norms = [mod for mod in model.modules() if type(mod).__name__.endswith("RMSNorm")]
        assert norms and all(hasattr(mod, "_plain_forward") for mod in norms)
    # still the starting weights, not the trained policy's
    assert any(not torch.equal(p, q) for p, q in zip(policy.parameters(), ref.parameters()))


def test_a_frozen_reference_copy_keeps_its_weights_compact_and_scores_as_the_dense_one(files, tmp_path, monkeypatch,
                                                                                       capsys):  # fmt: skip
    """dpo with full fine-tuning over a model whose fp32 weights hold bf16 values (a bf16 checkpoint read in fp32): the
    frozen reference copy keeps every linear weight and the tied token table compact (2 bytes a weight, not 4), and
    its log-probs are bit for bit those of the same copy with its dense weights back."""
    import copy

    from transformers import AutoTokenizer

    from tunelab.accel import compact
    from tunelab.methods import reference
    from tunelab.testing import save_bf16_valued_tiny_model_dir

    model_dir = save_bf16_valued_tiny_model_dir(tmp_path / "bf16-valued")
    prepared = []
    real = reference.prepare
    monkeypatch.setattr(reference, "prepare", lambda model, method: (prepared.append(model), real(model, method)))
    m = tunelab.train(make_cfg("dpo", model_dir, files, tmp_path / "full", {"name": "full"}, max_steps=2)).metrics
    assert m["eval_loss_before"] == pytest.approx(math.log(2), abs=1e-6)  # the compact copy scores as the policy
    assert "the frozen reference copy's 15 weights kept compact" in capsys.readouterr().err  # 2 x 7 linears, the table
    ref = reference.frozen(prepared[0])
    kinds = {type(mod).__name__ for mod in ref.modules()}
    assert {"CompactLinear", "CompactEmbedding"} <= kinds and "Linear" not in kinds
    dense = copy.deepcopy(ref)
    assert compact.expand_compact(dense) == 15 and "CompactLinear" not in {type(x).__name__ for x in dense.modules()}
    tok = AutoTokenizer.from_pretrained(model_dir)
    batch = collate_pairs(
        [encode_preference(p, tok, 64) for p in load_preference_pairs(files[1])[:8]], tok.pad_token_id
    )
    with torch.no_grad():
        assert torch.equal(P.sequence_logps(ref, batch), P.sequence_logps(dense, batch))


def test_simpo_left_at_dpos_beta_is_noted_in_the_run_log(tiny_dir, files, tmp_path, capsys):
    cfg = make_cfg("dpo", tiny_dir, files, tmp_path / "simpo", max_steps=1)
    assert P.dpo_notes(cfg) == []  # sigmoid: DPO's own default
    cfg = load_config({**cfg.model_dump(mode="json", exclude={"dpo"}), "dpo": {"loss_type": "simpo"}})
    (note,) = P.dpo_notes(cfg)
    assert "beta 2 to 2.5" in note
    tunelab.train(cfg)
    assert f"note: {note}" in capsys.readouterr().err
    cfg.dpo.beta = 2.0  # set by the user, even to a value: no note
    assert P.dpo_notes(cfg) == []


def train_losses(cfg, capsys) -> tuple[list[dict], str]:
    """(the metrics lines with a training loss, the run log) of tunelab.train(cfg)."""
    tunelab.train(cfg)
    return [r for r in metrics_lines(Path(cfg.output_dir)) if "loss" in r], capsys.readouterr().err


def test_dpo_with_an_adapter_runs_thread_shares_its_reference_computed_first(tiny_dir, files, tmp_path, capsys):
    """pi_ref is the trained model with its LoRA adapter off: the loop's thread computes it for each micro-batch
    before its shares run (Stage.ahead), and the training is one pass's to rounding. From step 2 on, a reference
    taken with the adapter on would give other losses (at step 1 the adapter is still a no-op)."""
    one, _ = train_losses(make_cfg("dpo", tiny_dir, files, tmp_path / "one", max_steps=4, pass_threads=1), capsys)
    two, log = train_losses(make_cfg("dpo", tiny_dir, files, tmp_path / "two", max_steps=4, pass_threads=2), capsys)
    assert "up to 2 shares of its rows at once" in log and "reference pass switches" not in log
    # two passes a share: their reference passes in turn on the share's thread
    cfg = make_cfg("dpo", tiny_dir, files, tmp_path / "four", max_steps=4, pass_threads=2, rows_per_pass=4)
    four, _ = train_losses(cfg, capsys)
    assert len(two) == len(four) == 4 and one[-1]["loss"] < one[0]["loss"]
    for a, b, c in zip(one, two, four):
        for run in (b, c):
            assert run["loss"] == pytest.approx(a["loss"], rel=1e-4)
            assert run["reward_margin"] == pytest.approx(a["reward_margin"], rel=1e-3, abs=1e-6)


def test_a_reference_pass_that_switches_the_adapter_is_refused_beside_other_passes(tiny_dir):
    """A thread share's pass must not switch the adapter of the model other shares run on."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tunelab.methods import get as get_method
    from tunelab.methods import reference

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir), LoraConfig(r=4, target_modules="all-linear"))
    reference.prepare(model, get_method("lora"))
    with reference.policy(model):  # the loop's own thread: allowed
        pass
    with reference.beside_other_passes(), pytest.raises(RuntimeError, match="Stage.ahead"):
        with reference.policy(model):
            pass


# ---------------------------------------------------------------------------------------------- reward
def test_reward_model_learns_a_preference_and_reloads_for_scoring(tiny_dir, files, tmp_path):
    from tunelab.stages.reward import load_reward_model, score

    result = tunelab.train(make_cfg("reward", tiny_dir, files, tmp_path / "rm"))
    m = result.metrics
    assert m["pairwise_accuracy"] > 0.9, m
    assert m["eval_loss"] < 0.5 * m["eval_loss_before"]
    assert metrics_lines(tmp_path / "rm")[-2]["eval_reward_accuracy"] == pytest.approx(m["pairwise_accuracy"])

    model, tok = load_reward_model(tmp_path / "rm")
    dev = load_preference_pairs(files[1])
    prompts = [p["prompt"] for p in dev]
    chosen = score(model, tok, prompts, [p["chosen"] for p in dev], max_length=64)
    rejected = score(model, tok, prompts, [p["rejected"] for p in dev], max_length=64)
    assert float((chosen > rejected).float().mean()) == pytest.approx(m["pairwise_accuracy"], abs=1 / len(dev))
    assert float((chosen - rejected).mean()) == pytest.approx(m["reward_margin"], rel=1e-3, abs=1e-3)
    # padding does not change a score: the head reads the last non-pad token
    alone = torch.cat(
        [score(model, tok, [p], [r], max_length=64) for p, r in zip(prompts[:3], [d["chosen"] for d in dev])]
    )
    assert torch.allclose(alone, chosen[:3], atol=1e-5)
    with pytest.raises(ValueError, match="not a reward-model run"):
        load_reward_model(tiny_dir)


def test_reward_run_resumes_exactly(tiny_dir, files, tmp_path):
    full = tunelab.train(make_cfg("reward", tiny_dir, files, tmp_path / "a", max_steps=6))

    def stop_after_3(step, record):
        if step == 3:
            raise KeyboardInterrupt

    cfg = make_cfg("reward", tiny_dir, files, tmp_path / "b", max_steps=6, save_every=2)
    assert tunelab.train(cfg, callbacks=[stop_after_3]).metrics["interrupted"]
    resumed = tunelab.train(cfg, resume=True)
    a = {r["step"]: r["loss"] for r in metrics_lines(tmp_path / "a") if "loss" in r}
    b = {r["step"]: r["loss"] for r in metrics_lines(tmp_path / "b") if "loss" in r}
    assert sorted(b) == list(range(1, 7))
    assert all(abs(a[s] - b[s]) < 1e-6 for s in a), (a, b)
    assert resumed.metrics["pairwise_accuracy"] == full.metrics["pairwise_accuracy"]


@pytest.mark.parametrize("stage", ["dpo", "kto"])
def test_data_prepare_counts_a_preference_stages_rows_as_training_reads_them(stage, tiny_dir, files, tmp_path,
                                                                             capsys, monkeypatch):  # fmt: skip
    from tunelab.cli import main
    from tunelab.models import load_tokenizer
    from tunelab.stages import get as get_stage

    cfg = make_cfg(stage, tiny_dir, files, tmp_path / "run").model_dump(mode="json")
    cfg["data"]["max_length"] = 24  # some rows longer: truncated
    path, out, fields = data_prepare_report(cfg, tmp_path, capsys)
    run = load_config(str(path))
    bundle = get_stage(stage, run).build_data(run, load_tokenizer(run.model))  # what `tunelab train` tokenises
    train, val = ("train pairs", "val pairs") if stage == "dpo" else ("train replies", "val replies")
    assert (int(fields[train]), int(fields[val])) == (len(bundle.train), len(bundle.val))
    assert len(bundle.train) == (120 if stage == "dpo" else 240)
    assert int(fields["truncated"]) == bundle.stats["truncated"] > 0
    bars = [int(ln.split()[-1]) for ln in out.splitlines() if ln.startswith("  ") and "-" in ln]
    assert len(bars) == 8 and sum(bars) == 240  # every reply of the train rows, each its own row
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi", "chosen": "a"\n')
    monkeypatch.setattr(tunelab.models, "load_tokenizer", lambda *a: pytest.fail("the tokenizer loaded first"))
    assert main(["data", "prepare", str(path), "--set", f"data.train={bad}"]) == 2  # the data error comes first
    assert "bad.jsonl line 1" in capsys.readouterr().err
    monkeypatch.undo()
    ppo = ["--set", "stage=ppo", "--set", f"ppo.prompts={files[0]}", "--set", f"ppo.reward.path={tiny_dir}"]
    assert main(["data", "prepare", str(path), *ppo]) == 0  # stages/describe.py: any stage
    out = capsys.readouterr().out
    fields = dict(re.findall(r"^(\S.*?)  +(\d+)", out, re.M))
    assert "(stage ppo," in out and int(fields["prompts read"]) == int(fields["train prompts"]) + int(
        fields["held-out prompts"]
    ), out


# ------------------------------------------------------------------------------------------------- DPO
def record_reference_calls(monkeypatch, stage=P):
    """Every reference pass `stage`'s loss makes from now on: [(its batch, the log-probs it gave)] (copies)."""
    calls, original = [], P.reference_logps

    def recording(model, batch, *ref):
        out = original(model, batch, *ref)
        calls.append(({k: v.cpu().clone() for k, v in batch.items()}, out.detach().cpu().clone()))
        return out

    monkeypatch.setattr(stage, "reference_logps", recording)
    return calls


@pytest.mark.parametrize("method", ["lora", "full"])
def test_dpo_widens_the_margin_against_an_unchanged_reference(tiny_dir, files, tmp_path, monkeypatch, method):
    from transformers import AutoModelForCausalLM

    from tunelab.stages.runs import load_run

    calls = record_reference_calls(monkeypatch)
    spec = None if method == "lora" else {"name": "full"}
    steps, lr = (30, 1e-2) if method == "lora" else (12, 2e-3)
    result = tunelab.train(make_cfg("dpo", tiny_dir, files, tmp_path / "dpo", method=spec, max_steps=steps, lr=lr))
    m = result.metrics
    # step 0: the policy is the reference, so every pair's loss is log 2
    assert m["eval_loss_before"] == pytest.approx(math.log(2), abs=1e-6)
    # held out: log pi(chosen) - log pi(rejected) grew by (chosen_logratio - rejected_logratio) nats
    assert m["chosen_logratio"] - m["rejected_logratio"] > 2.0, m
    assert m["chosen_logratio"] > 0 > m["rejected_logratio"]
    assert m["pairwise_accuracy"] > 0.9 and m["reward_margin"] > 1.0
    assert m["eval_loss"] < 0.3
    # the reference never moved: every call on the (fixed) validation batches, from step 0 to the end,
    # gave the untrained model's log-probs, while the trained policy's differ
    base = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    policy, tok = load_run(str(tmp_path / "dpo"), device="cpu")
    first = collate_pairs(
        [encode_preference(p, tok, 64) for p in load_preference_pairs(files[1])[:8]], tok.pad_token_id
    )
    matching = [v for batch, v in calls if torch.equal(batch["input_ids"], first["input_ids"])]
    assert len(matching) >= 2  # the eval before training and the one after
    with torch.no_grad():
        expected, trained = P.sequence_logps(base, first), P.sequence_logps(policy, first)
    for v in matching:
        assert torch.allclose(v, expected, atol=1e-4)
    assert (trained - expected).abs().max() > 0.5


@pytest.mark.parametrize("stage,method", [("dpo", "lora"), ("dpo", "full"), ("kto", "lora")])
def test_reference_log_probs_are_computed_once_per_row_and_train_as_recomputed(stage, method, tiny_dir, files,
                                                                               tmp_path, monkeypatch):  # fmt: skip
    """pi_ref does not train, so each row's reference log-prob is kept: the second epoch and every evaluation after the
    first run no reference pass, and the run trains to the same losses as one that recomputes every time."""
    from tunelab.methods import reference

    passes, original = [], reference.policy

    def counting(model):
        passes.append(1)
        return original(model)

    monkeypatch.setattr(reference, "policy", counting)
    spec = None if method == "lora" else {"name": "full"}
    # 120 pairs (kto: 240 replies, 30 micro-batches of 8 + their KL rows), two epochs, an evaluation every 10 steps
    per_epoch = 15 if stage == "dpo" else 30
    cfg = make_cfg(stage, tiny_dir, files, tmp_path / "kept", method=spec, max_steps=None, epochs=2, lr=2e-3,
                   eval_every=10, eval_batches=2)  # fmt: skip
    kept = tunelab.train(cfg).metrics
    n_kept, passes[:] = len(passes), []
    monkeypatch.setattr(reference, "memo", lambda model: None)  # every pass recomputed, as before the cache
    cfg = make_cfg(stage, tiny_dir, files, tmp_path / "again", method=spec, max_steps=None, epochs=2, lr=2e-3,
                   eval_every=10, eval_batches=2)  # fmt: skip
    again = tunelab.train(cfg).metrics
    evals = 1 + 2 * per_epoch // 10 + (2 * per_epoch % 10 > 0)  # step 0, every 10 steps, the end
    # the held-out metrics' batches (dpo: 40 pairs, 16 a batch; kto: 80 replies, 8 a batch), the first 16 rows
    # of which the evaluations saw (two batches of 8)
    val, size = (40, 16) if stage == "dpo" else (80, 8)
    assert len(passes) == 2 * per_epoch + 2 * evals + math.ceil(val / size)
    # the first epoch's micro-batches, the first evaluation's two batches, the held-out rows no evaluation saw:
    # nothing else runs pi_ref
    assert n_kept == per_epoch + 2 + math.ceil((val - 16) / size), (n_kept, len(passes))
    for k in ("loss", "eval_loss"):
        a, b = ({r["step"]: r[k] for r in metrics_lines(tmp_path / run) if k in r} for run in ("kept", "again"))
        assert sorted(a) == sorted(b) and len(a) == (2 * per_epoch if k == "loss" else evals), (k, a, b)
        assert all(a[s] == pytest.approx(b[s], rel=1e-5, abs=1e-6) for s in a), (k, a, b)
    assert kept["eval_loss"] < kept["eval_loss_before"]
    for k in ("eval_loss", "reward_accuracy" if stage == "kto" else "pairwise_accuracy"):
        assert kept[k] == pytest.approx(again[k], rel=1e-5, abs=1e-6)


def test_dpo_sft_weight_adds_the_chosen_replys_nll_and_keeps_its_likelihood_up(tiny_dir, files, tmp_path):
    """dpo.sft_weight alpha (RPO, Pang et al. 2024; LLaMA-Factory's pref_ftx): each pair's loss gains alpha x the
    chosen reply's mean token NLL. Before training the policy is the reference: every pair's loss is
    log 2 + alpha x that NLL, computed here from the base model itself."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    plain = tunelab.train(make_cfg("dpo", tiny_dir, files, tmp_path / "plain", max_steps=12)).metrics
    cfg = make_cfg("dpo", tiny_dir, files, tmp_path / "rpo", max_steps=12)
    cfg.dpo.sft_weight = 2.0
    m = tunelab.train(cfg).metrics
    base = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    batch = collate_pairs([encode_preference(p, tok, 64) for p in load_preference_pairs(files[1])], tok.pad_token_id)
    with torch.no_grad():
        nll = -P.mean_logps(base, batch)[: len(batch["input_ids"]) // 2]
    assert m["eval_loss_before"] == pytest.approx(math.log(2) + 2.0 * float(nll.mean()), abs=1e-4)
    evals = [ln for ln in metrics_lines(tmp_path / "rpo") if "eval_chosen_nll" in ln]
    assert evals[0]["eval_chosen_nll"] == pytest.approx(float(nll.mean()), abs=1e-4)
    assert evals[-1]["eval_chosen_nll"] < evals[0]["eval_chosen_nll"]
    # the SFT term holds the chosen replies' likelihood above where plain DPO leaves it, at a similar ordering
    assert m["chosen_logratio"] > plain["chosen_logratio"] + 2.0, (m, plain)  # measured 14.4 against 4.4
    assert m["pairwise_accuracy"] > 0.8


def test_dpo_over_an_adapter_it_starts_from_takes_that_adapter_as_its_reference(tiny_dir, files, tmp_path, monkeypatch):
    """method.start_from with stage dpo (an adapter trained before, then DPO on it): pi_ref is the adapter as it
    starts, not the base: step 0's loss is log 2, and every reference pass, in training (dropout on, the policy's
    graph pending) as in evaluation, gives the starting adapter's log-probs."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    before = tunelab.train(make_cfg("dpo", tiny_dir, files, tmp_path / "first", max_steps=10))  # a trained adapter
    calls = record_reference_calls(monkeypatch)
    method = {"name": "lora", "dropout": 0.3, "start_from": str(tmp_path / "first")}
    result = tunelab.train(make_cfg("dpo", tiny_dir, files, tmp_path / "dpo", method=method, max_steps=6))
    m = result.metrics
    assert m["eval_loss_before"] == pytest.approx(math.log(2), abs=1e-6)
    assert m["eval_loss"] < m["eval_loss_before"]
    start = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), before.final_dir).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    assert len(calls) > 6  # the six training steps' and the evaluations'
    with torch.no_grad():
        for batch, got in calls:
            expected = P.sequence_logps(start, batch)
            assert torch.allclose(got, expected, atol=1e-4)
            assert (P.sequence_logps(base, batch) - expected).abs().max() > 0.05  # the start is not the base


def test_reward_in_bf16_runs_bf16_passes_to_the_autocast_runs_losses(tiny_dir, files, tmp_path, capsys):
    """The score head trains whole in fp32 (master weights) on a bf16 backbone: its input is cast up, so the passes
    drop autocast (fast LoRA, the fused norm, thread shares), follow the autocast run's first steps to bf16's
    rounding (at lr 1e-2 the two then drift apart as fp32 and autocast do), and learn the preference."""
    losses = {}
    for name, accelerate in (("fast", "auto"), ("plain", "off")):  # the same schedule: 30 steps each
        cfg = make_cfg("reward", tiny_dir, files, tmp_path / name, accelerate=accelerate)
        cfg.model.dtype = "bfloat16"
        m = tunelab.train(cfg).metrics
        losses[name] = [r["loss"] for r in metrics_lines(tmp_path / name) if "loss" in r]
        if name == "fast":
            assert m["precision"] == "bfloat16, fp32 master weights" and "fast LoRA" in capsys.readouterr().err
            assert m["pairwise_accuracy"] > 0.9 and m["eval_loss"] < 0.5 * m["eval_loss_before"], m
        else:
            assert m["precision"] == "bfloat16 autocast, fp32 master weights"
    # step 1 to bf16's rounding (~0.1%); by step 3 the updates' rounding has moved them ~1% apart (the padded rows
    # laid end to end round their backward pass otherwise than the padded one, its forward bit for bit the same)
    assert losses["fast"][0] == pytest.approx(losses["plain"][0], rel=0.002), losses
    assert losses["fast"][:3] == pytest.approx(losses["plain"][:3], rel=0.02), losses


@pytest.mark.parametrize("labels", [1, 3])
def test_padded_rows_are_scored_end_to_end_where_the_packed_attention_runs(tiny_dir, labels):
    """Where accel's packed attention is installed, a padded batch of a decoder with a `score` head (reward: one
    label; classification: three) has its rows laid end to end (one attention call each, none over padding), each
    scored at the token transformers' head takes, the rightmost that is not the pad id (one row here ends in the pad
    id itself): the padded forward's scores and gradients."""
    import copy

    from transformers import AutoModelForSequenceClassification

    from tunelab.accel import attention
    from tunelab.methods import get as get_method
    from tunelab.stages.classification import classification_logits
    from tunelab.stages.reward import reward_logits

    scores = reward_logits if labels == 1 else classification_logits
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_dir, num_labels=labels)
    base.config.pad_token_id = pad = 0
    plain = get_method("lora").apply(base, get_method("lora").Config(r=4, dropout=0.0)).train()
    fast = copy.deepcopy(plain)
    assert attention.install(fast)
    ids = torch.randint(3, 300, (4, 20), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    for row, end in {0: 9, 1: 20, 2: 14, 3: 17}.items():
        ids[row, end:], mask[row, end:] = pad, 0
    ids[3, 16] = pad  # a real token equal to the pad id: transformers scores the row at position 15
    batch = {"input_ids": ids, "attention_mask": mask}
    calls, real = [], attention._causal
    attention._causal = lambda q, *a: calls.append(q.shape[2]) or real(q, *a)
    try:
        r_fast = scores(fast, batch)
    finally:
        attention._causal = real
    assert calls[:4] == [9, 20, 14, 17]  # each row at its own length, the first layer
    r_plain = scores(plain, batch)
    assert r_fast.shape == r_plain.shape == ((4,) if labels == 1 else (4, labels))
    torch.testing.assert_close(r_fast, r_plain, rtol=1e-5, atol=1e-5)
    weights = torch.arange(1.0, 1.0 + r_fast.numel()).view(r_fast.shape)
    (r_fast * weights).sum().backward()
    (r_plain * weights).sum().backward()
    grads = {n: p.grad for n, p in plain.named_parameters() if p.grad is not None}
    assert len(grads) > 4
    for n, p in fast.named_parameters():
        if n in grads:  # to fp32's rounding of the tensor's largest gradient (sums in another order)
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-5 * float(grads[n].abs().max()))


def test_packed_pairs_score_as_padded_ones_and_train_to_the_same_losses(tiny_dir, files, tmp_path):
    """data.packing for stage reward: the pairs' sequences packed into rows (collate_packed_pairs) give each
    sequence the score the padded batch gives it, and a run follows the padded run's losses, with the plain
    block-diagonal mask (accelerate: off) and with one attention call per sequence (auto)."""
    from transformers import AutoModelForSequenceClassification

    from tunelab.data.preference import collate_packed_pairs, collate_pairs
    from tunelab.models import load_tokenizer
    from tunelab.stages.preference import pairs_data
    from tunelab.stages.reward import reward_logits

    cfg = make_cfg("reward", tiny_dir, files, tmp_path / "x")
    cfg.data.max_length = 128  # the synthetic sequences are 30-60 tokens: two or more a row
    tok = load_tokenizer(cfg.model)
    examples = pairs_data(cfg, tok).train[:8]
    packed = collate_packed_pairs(examples, tok.pad_token_id, width=cfg.data.max_length)
    lengths = [len(e[f"{s}_input_ids"]) for s in ("chosen", "rejected") for e in examples]
    rows, width = packed["input_ids"].shape
    assert rows < 16 and max(lengths) <= width <= cfg.data.max_length and rows * width < 16 * max(lengths)
    flat = packed["input_ids"].flatten()
    assert [int(flat[i]) for i in packed["last"]] == [e[f"{s}_input_ids"][-1] for s in ("chosen", "rejected")
                                                      for e in examples]  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_dir, num_labels=1).eval()
    model.config.pad_token_id = tok.pad_token_id
    with torch.no_grad():
        torch.testing.assert_close(reward_logits(model, packed),
                                   reward_logits(model, collate_pairs(examples, tok.pad_token_id)),
                                   rtol=1e-4, atol=1e-5)  # fmt: skip

    losses = {}
    for name, packing, accelerate in (("padded", False, "auto"), ("plain", True, "off"), ("fast", True, "auto")):
        cfg = make_cfg("reward", tiny_dir, files, tmp_path / name, max_steps=4, accelerate=accelerate)
        cfg.data.packing, cfg.data.max_length = packing, 128
        tunelab.train(cfg)
        losses[name] = [r["loss"] for r in metrics_lines(tmp_path / name) if "loss" in r]
    assert len(losses["padded"]) == 4
    assert losses["plain"] == pytest.approx(losses["padded"], rel=1e-4), losses
    assert losses["fast"] == pytest.approx(losses["padded"], rel=1e-4), losses
