"""Tokens added to a pre-trained vocabulary (`model.new_special_tokens`): the tokenizer learns them as special tokens
(never split, skipped when decoding with skip_special_tokens), and the model's token table (and an untied head) grow
a row for each, starting at the mean of the rows it had.

Why the mean (Hewitt, "Initializing New Word Embeddings for Pretrained Language Models", 2021): a row drawn at
random can give the new token a logit far above the others' at every position, so the model's first outputs (and
its first losses) are wrecked; at the mean of the old rows its logit is the mean logit, and its probability stays
near what the old tokens give it. transformers' `mean_resizing` draws from a normal around that mean (a random
draw, so a run would rebuild another base on load); the mean itself is what a resumed run and `load_run` rebuild
bit for bit. (Rounded to bf16 where the table is a bf16 checkpoint's read in fp32: it then keeps an exact compact
form, accel/compact.py.)

The rows then train: with full fine-tuning as every weight does; with lora / qlora through PEFT's
`trainable_token_indices` (methods/lora.py), which keeps the added rows as a small tensor of their own beside the
adapter and saves them with it.
"""

from __future__ import annotations

# the attribute load_model sets on a model whose vocabulary grew (and the tokenizer on its tokenizer): the added
# tokens' ids, in id order
ATTR = "tunelab_new_token_ids"


def add_to_tokenizer(tokenizer, tokens: list[str]) -> list[int]:
    """`tokens` added as special tokens where the tokenizer lacks them (one it has stays as it is); the ids of those
    it added, also kept on the tokenizer (`ATTR`) for `grow`."""
    before = len(tokenizer)
    if tokens:
        tokenizer.add_tokens(list(tokens), special_tokens=True)
    added = sorted(i for i in tokenizer.convert_tokens_to_ids(list(tokens)) if i >= before)
    setattr(tokenizer, ATTR, added)
    return added


def grow(model, tokenizer) -> list[int]:
    """The model's token table (and an untied output head) grown to the tokenizer's length where the tokens
    `add_to_tokenizer` added fall past its end, every added row set to the mean of the rows before them; their ids,
    also kept on the model (`ATTR`). [] where the tokenizer added none, and nothing changes."""
    new = getattr(tokenizer, ATTR, None) or []
    if not new:
        return []
    if max(new) >= model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    import torch

    first = min(new)
    with torch.no_grad():
        for table in _tables(model):
            # summed in fp32 without an fp32 copy of the table (1.7B's: 0.4 GB)
            mean = table.weight[:first].sum(0, dtype=torch.float32) / first
            if table.weight.dtype == torch.float32 and _bf16_valued(table.weight[:first]):
                # a bf16 checkpoint read in fp32: its table keeps bf16 values, and so an exact compact form
                # (accel/compact.py: half the bytes while it trains)
                mean = mean.bfloat16().float()
            table.weight[new] = mean.to(table.weight.dtype)
    setattr(model, ATTR, new)
    return new


def _bf16_valued(weight) -> bool:
    """Whether every value of an fp32 `weight` is a bf16 value (checked 4,096 rows at a time)."""
    import torch

    return all(torch.equal(w, w.bfloat16().float()) for w in weight.split(4096))


def _tables(model) -> list:
    """The input token table, and an output head of the same rows that does not share its weight (untied)."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tables = [emb]
    if head is not None and head.weight is not emb.weight and head.weight.shape[0] == emb.weight.shape[0]:
        tables.append(head)
    return tables


def peft_indices(model) -> list[int] | dict[str, list[int]] | None:
    """PEFT's `trainable_token_indices` for the tokens `grow` added to `model`: their ids (PEFT trains them in the
    input table, and in a head tied to it), or with an untied head {table's name: ids, head's name: ids} so that the
    head's rows train too (else they stay at their start, and the model could hardly learn to emit the tokens)."""
    new = ids(model)
    if not new:
        return None
    tables = _tables(model)
    if len(tables) == 1:
        return new
    names = {id(m): name.rsplit(".", 1)[-1] for name, m in model.named_modules()}
    return {names[id(t)]: new for t in tables}


def ids(model) -> list[int] | None:
    """The ids of the tokens `grow` added to `model` (the transformers model, not a PEFT wrapper), or None."""
    return getattr(model, ATTR, None)
