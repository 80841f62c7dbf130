"""Prefix tuning and prompt tuning: the harness on every architecture, the folded prefix, text
initialisation, generation with the prefix / soft prompt, the verbalizer, and the training loop."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

import tunelab
from tunelab.config import load_config
from tunelab.methods import get
from tunelab.testing import (
    save_tiny_model_dir,
    tiny_bert,
    tiny_llama,
    tiny_t5,
    tiny_tokenizer,
)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


def prompt_learning_param(n):
    return n.startswith("prompt_encoder.") or "classifier" in n


# (method, arch) -> harness kwargs (all 20 steps). A soft prompt is the smallest method (a few hundred
# parameters here), so it gets a larger learning rate and a 15% bar. On BERT the pooled position is the
# first virtual token, so a short prompt leaves the inputs' influence stronger.
HARNESS = {
    ("prefix", "llama"): {},
    ("prefix", "bert"): {},
    ("prefix", "t5"): {},
    ("prompt", "llama"): {"lr": 3e-2, "min_drop": 0.15},
    ("prompt", "bert"): {"lr": 5e-2, "num_virtual_tokens": 4},
    ("prompt", "t5"): {"lr": 0.1, "min_drop": 0.15},
}


@pytest.mark.parametrize("arch", ["llama", "bert", "t5"])
@pytest.mark.parametrize("name", ["prefix", "prompt"])
def test_method_on_every_architecture(name, arch, tmp_path):
    from method_harness import check_method

    # identity_at_init=False: a random prefix / soft prompt changes the output from step 0
    check_method(
        name,
        arch,
        tmp_path,
        expect_trainable=prompt_learning_param,
        **HARNESS[(name, arch)],
    )


def test_bert_classifier_head_trains():
    model = get("prefix").apply(tiny_bert(), get("prefix").Config())
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("classifier" in n for n in names) and any(n.startswith("prompt_encoder.") for n in names)


def _train(model, batch, steps=10, lr=1e-2):
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


IDS = torch.tensor([[1, 17, 42, 99, 7, 250, 3, 64], [1, 5, 6, 7, 8, 9, 10, 11]])


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def test_prefix_reparameterisation_is_folded_on_save(tmp_path):
    from peft import PeftModel

    mod = get("prefix")
    base = tiny_llama()
    model = mod.apply(copy.deepcopy(base), mod.Config(num_virtual_tokens=6, projection_hidden=24))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".transform." in n for n in trainable), "the MLP must train"
    model = _train(model, {"input_ids": IDS, "labels": IDS})
    mod.save(model, tmp_path)

    saved = load_file(tmp_path / "adapter_model.safetensors")
    # 2 layers x (K, V) x 2 KV heads x head_dim 8: the prefix has the KV-head count (GQA), no MLP
    assert {k: tuple(v.shape) for k, v in saved.items()} == {"prompt_embeddings": (6, 2 * 2 * 2 * 8)}
    torch.testing.assert_close(saved["prompt_embeddings"], mod.fold(model), rtol=0, atol=0)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["prefix_projection"] is False

    plain = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)  # plain PEFT, no tunelab code
    assert (_logits(plain) - _logits(model)).abs().max() < 1e-5


def _greedy_causal(model, ids, n):
    for _ in range(n):
        ids = torch.cat([ids, _logits(model, ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize("name", ["prefix", "prompt"])
def test_generation_uses_the_prefix_or_prompt_llama(name, tmp_path):
    mod = get(name)
    model = _train(
        mod.apply(tiny_llama(), mod.Config(num_virtual_tokens=5)),
        {"input_ids": IDS, "labels": IDS},
        lr=5e-2,
    )
    mod.save(model, tmp_path)
    reloaded = mod.load(tiny_llama(), tmp_path).eval()
    ids = IDS[:1, :4]
    with torch.no_grad():
        out = reloaded.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=8,
            do_sample=False,
        )
    assert out.tolist() == _greedy_causal(reloaded, ids, 8).tolist()
    with torch.no_grad():
        base_out = tiny_llama().generate(input_ids=ids, max_new_tokens=8, do_sample=False)
    assert out.tolist() != base_out.tolist()


def test_prefix_generation_t5():
    mod = get("prefix")
    ids = IDS[:, 1:]
    labels = torch.tensor([[5, 6, 7, 8, 9, 2], [9, 8, 7, 6, 5, 2]])
    model = _train(
        mod.apply(tiny_t5(), mod.Config(num_virtual_tokens=5)),
        {"input_ids": ids, "labels": labels},
        30,
    )
    x = ids[:1]
    with torch.no_grad():
        out = model.generate(
            input_ids=x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=6,
            do_sample=False,
        )
        dec = torch.zeros(1, 1, dtype=torch.long)
        for _ in range(out.shape[1] - 1):
            step = model(input_ids=x, attention_mask=torch.ones_like(x), decoder_input_ids=dec).logits
            dec = torch.cat([dec, step[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert out.tolist() == dec.tolist()


def test_prompt_init_text(tmp_path):
    from transformers import AutoModelForCausalLM

    mod = get("prompt")
    folder = save_tiny_model_dir(tmp_path / "m")
    base = AutoModelForCausalLM.from_pretrained(folder)
    tok = tiny_tokenizer()
    text = "Classify the sentiment."
    model = mod.apply(base, mod.Config(num_virtual_tokens=8, init_text=text))
    ids = tok(text, add_special_tokens=False)["input_ids"]
    ids = (ids * 8)[:8]
    expected = base.get_input_embeddings().weight[ids]
    torch.testing.assert_close(model.prompt_encoder["default"].embedding.weight, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="init_text needs the model's tokenizer"):
        mod.apply(tiny_llama(), mod.Config(init_text=text))


def test_prompt_default_init_is_vocabulary_embeddings():
    mod = get("prompt")
    base = tiny_llama()
    emb = base.get_input_embeddings().weight.detach().clone()
    model = mod.apply(base, mod.Config(num_virtual_tokens=6))
    prompt = model.prompt_encoder["default"].embedding.weight.detach()
    assert all(((emb - row).abs().sum(-1) == 0).any() for row in prompt)


# ---- verbalizer

# words whose first tokens differ in the tiny tokenizer (" good" and " bad" both start with " ")
LABEL_WORDS = {"positive": ["capital", "fox"], "negative": ["answer", "output"]}


def test_verbalizer_scores_are_log_sum_exp_of_first_tokens():
    from tunelab.methods.verbalizer import Verbalizer

    tok = tiny_tokenizer()
    v = Verbalizer(LABEL_WORDS, tok)
    assert v.classes == ["positive", "negative"]
    logits = torch.randn(3, len(tok))
    logp = logits.log_softmax(-1)
    for c, words in enumerate(LABEL_WORDS.values()):
        ids = sorted({tok(" " + w, add_special_tokens=False)["input_ids"][0] for w in words})
        torch.testing.assert_close(v.scores(logits)[:, c], logp[:, ids].logsumexp(-1))
    assert v.predict(logits).shape == (3,)
    y = torch.tensor([0, 1, 0])
    torch.testing.assert_close(v.loss(logits, y), torch.nn.functional.cross_entropy(v.scores(logits), y))
    with pytest.raises(ValueError, match="same token"):
        Verbalizer({"a": ["good"], "b": ["bad"]}, tok)


def test_prompt_tuning_with_verbalizer_fits_a_toy_classification_set():
    from tunelab.methods.verbalizer import Verbalizer, next_token_logits

    tok = tiny_tokenizer()
    texts = [
        ("The quick brown fox", 0),
        ("Eat well, sleep enough", 0),
        ("Guten Morgen", 0),
        ("the capital is Paris", 0),
        ("The lazy dog", 1),
        ("Translate to German", 1),
        ("Give three tips", 1),
        ("What is the capital", 1),
    ]
    enc = tok([t + " Answer:" for t, _ in texts], padding=True, return_tensors="pt")
    y = torch.tensor([c for _, c in texts])
    v = Verbalizer(LABEL_WORDS, tok)
    mod = get("prompt")
    torch.manual_seed(0)
    model = mod.apply(tiny_llama(len(tok)), mod.Config(num_virtual_tokens=8))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    for _ in range(100):
        loss = v.loss(next_token_logits(model, enc["input_ids"], enc["attention_mask"]), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        pred = v.predict(next_token_logits(model, enc["input_ids"], enc["attention_mask"]))
    assert pred.tolist() == y.tolist()


# ---- the training loop end to end

ROWS = [
    {
        "instruction": f"Say the number {i}.",
        "input": "",
        "output": f"The number is {i}.",
    }
    for i in range(24)
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("model"))


@pytest.mark.parametrize(
    "method, lr",
    [
        ({"name": "prompt", "num_virtual_tokens": 8}, 5e-2),
        ({"name": "prefix", "num_virtual_tokens": 8}, 1e-2),
    ],
)
def test_training_loop_and_generation(method, lr, tiny_dir, tmp_path):
    from tunelab.inference import generate
    from tunelab.stages.runs import load_run

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    cfg = load_config(
        {
            "output_dir": str(tmp_path / "run"),
            "model": {"name": tiny_dir},
            "data": {"train": str(data), "val_fraction": 0.25, "max_length": 64},
            "method": method,
            "training": {
                "max_steps": 12,
                "batch_size": 4,
                "lr": lr,
                "warmup_steps": 1,
                "progress": False,
                "tensorboard": False,
                "seed": 3,
            },
        }
    )
    result = tunelab.train(cfg)
    assert result.metrics["eval_loss"] < result.metrics["eval_loss_before"] - 0.1
    for f in ("adapter_config.json", "adapter_model.safetensors", "tunelab.json"):
        assert (result.final_dir / f).exists(), f
    model, tokenizer = load_run(str(tmp_path / "run"), device="cpu")
    assert isinstance(generate(model, tokenizer, "Say the number 3.", max_new_tokens=6), str)


def test_prompt_tuning_with_the_adapter_disabled_is_the_base_model():
    """The reference policy of DPO / PPO is the prompt-tuned model with its adapter disabled: the base model's
    logits for the real positions (the hook that drops the virtual positions' logits must not cut these)."""
    mod = get("prompt")
    base = tiny_llama()
    want = _logits(copy.deepcopy(base))
    model = mod.apply(base, mod.Config(num_virtual_tokens=6))
    with torch.no_grad():
        with model.disable_adapter():
            got = model(input_ids=IDS).logits
        tuned = model(input_ids=IDS).logits
    assert got.shape == want.shape == tuned.shape
    assert torch.allclose(got, want, atol=1e-6) and not torch.allclose(tuned, want, atol=1e-3)


def test_prompt_tuning_on_gpt2_is_a_causal_lm_and_its_loss_is_peft_own():
    """GPT2LMHeadModel's name does not end in ForCausalLM: PEFT must still wrap it as a causal LM (it was wrapped as
    a feature extractor, whose logits kept the virtual positions, and the loss failed on the shapes). The loss
    over the label tokens is PEFT's own (which pads the labels with -100 for the virtual tokens)."""
    from tunelab.methods.base import peft_task_type
    from tunelab.models.loss import token_loss_sum
    from tunelab.testing import tiny_causal
    from tunelab.training.card import model_kind

    base = tiny_causal("gpt2", 64)
    assert peft_task_type(base).value == "CAUSAL_LM"
    assert model_kind(base) == ("AutoModelForCausalLM", "text-generation")  # the model card's loading line
    model = get("prompt").apply(base, get("prompt").Config(name="prompt", num_virtual_tokens=5))
    ids = torch.randint(0, 64, (2, 12))
    labels = ids.clone()
    labels[:, :4] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    loss_sum, n = token_loss_sum(model, batch)
    reference = model(**batch).loss
    assert n == 2 * 8 and float(loss_sum) / n == pytest.approx(float(reference), rel=1e-5)
