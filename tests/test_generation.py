"""tunelab.models.generation: generate, the one generation call (chat, evaluation, PPO rollouts), and
DecodeBatch, its step-by-step form for the server's continuous batching."""

from __future__ import annotations

import pytest
import torch
from transformers import TextIteratorStreamer
from transformers.generation.streamers import BaseStreamer

from tunelab.data import build_prompt_ids
from tunelab.models.generation import DecodeBatch, Sampler, generate
from tunelab.testing import tiny_llama, tiny_t5, tiny_tokenizer

TEXTS = ["Hi", "What is the capital of France?", "fox", "Give three tips for staying healthy, please."]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def llama(tok):
    torch.set_num_threads(1)
    return tiny_llama(len(tok), initializer_range=0.3)


def prompts(tok) -> list[list[int]]:
    ids = [build_prompt_ids([{"role": "user", "content": t}], tok) for t in TEXTS]
    assert len({len(p) for p in ids}) == len(ids)  # all different: the batch is padded
    return ids


def test_a_padded_batch_gives_each_prompts_greedy_tokens_alone(tok, llama):
    batch = generate(llama, tok, prompts(tok), max_new_tokens=10)
    width = max(map(len, prompts(tok)))
    assert batch.prompt_ids.shape == (len(TEXTS), width) and batch.tokens.shape[0] == len(TEXTS)
    assert batch.prompt_mask[:, -1].all() and not batch.prompt_mask[:, 0].all()  # left-padded
    for i, p in enumerate(prompts(tok)):
        alone = generate(llama, tok, [p], max_new_tokens=10)
        assert batch.ids()[i] == alone.ids()[0] == alone.tokens[0].tolist()
        # and the plain transformers call on the unpadded prompt
        ref = llama.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)  # fmt: skip
        assert alone.tokens[0].tolist() == ref[0, len(p) :].tolist()
    assert batch.texts() == [tok.decode(r, skip_special_tokens=True) for r in batch.ids()]


def test_stop_tokens_end_a_row_and_the_rest_is_padding(tok, llama):
    p = prompts(tok)
    free = generate(llama, tok, p, max_new_tokens=8)
    rows = free.tokens.tolist()
    # a row j that first produces some token at step k >= 2: that token is the extra stop token
    j, k = next((j, k) for j, r in enumerate(rows) for k in range(2, 7) if r[k] not in r[:k])
    stop = rows[j][k]
    out = generate(llama, tok, p, max_new_tokens=8, eos_token_id=[tok.eos_token_id, stop])
    assert out.ids()[j] == rows[j][: k + 1]
    assert (out.tokens[j, k + 1 :] == tok.pad_token_id).all()
    for i in range(len(p)):  # every row is its free run up to its first stop token
        r = free.tokens[i].tolist()
        assert out.ids()[i] == r[: r.index(stop) + 1 if stop in r else len(r)]


class Recorder(BaseStreamer):
    def __init__(self):
        self.puts, self.ended = [], False

    def put(self, value):
        self.puts.append(value.tolist())

    def end(self):
        self.ended = True


def test_a_streamer_receives_the_prompt_then_each_new_token(tok, llama):
    p = prompts(tok)[1]
    rec = Recorder()
    out = generate(llama, tok, [p], max_new_tokens=6, streamer=rec)
    assert rec.ended and rec.puts[0] == [p]
    assert [t for put in rec.puts[1:] for t in put] == out.tokens[0].tolist()

    text = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    out = generate(llama, tok, [p], max_new_tokens=6, streamer=text)
    assert "".join(text) == out.texts()[0]


def test_sampling_draws_what_the_former_ppo_call_drew(tok, llama):
    """Same seed, same tokens as PPO's sample_responses before it used generate (a GenerationConfig)."""
    from transformers import GenerationConfig

    p = prompts(tok)
    for temperature, top_k in ((1.0, 0), (0.7, 5)):
        torch.manual_seed(11)
        new = generate(llama, tok, p, max_new_tokens=7, temperature=temperature, top_k=top_k, top_p=1.0,
                       use_cache=True)  # fmt: skip
        torch.manual_seed(11)
        cfg = GenerationConfig(do_sample=True, temperature=temperature, top_k=top_k, top_p=1.0, max_new_tokens=7,
                               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, use_cache=True)  # fmt: skip
        old = llama.generate(input_ids=new.prompt_ids, attention_mask=new.prompt_mask, generation_config=cfg)
        assert torch.equal(new.tokens, old[:, new.prompt_ids.shape[1] :])
    torch.manual_seed(11)
    again = generate(llama, tok, p, max_new_tokens=7, temperature=0.7, top_k=5, top_p=1.0, use_cache=True)
    assert torch.equal(again.tokens, new.tokens)


def test_encoder_decoder_is_right_padded_and_drops_the_start_token(tok):
    t5 = tiny_t5(len(tok), initializer_factor=5.0)
    srcs = [tok("copy: " + t)["input_ids"] for t in TEXTS]
    batch = generate(t5, tok, srcs, max_new_tokens=6)
    assert batch.prompt_mask[:, 0].all() and not batch.prompt_mask[:, -1].all()  # right-padded
    for i, s in enumerate(srcs):
        ref = t5.generate(torch.tensor([s]), max_new_tokens=6, do_sample=False)
        assert batch.ids()[i] == ref[0, 1:].tolist()  # without the decoder start token


def test_no_prompts(tok, llama):
    out = generate(llama, tok, [], max_new_tokens=4)
    assert out.ids() == [] and out.texts() == []


def test_rows_joining_and_leaving_a_decode_batch_get_their_greedy_tokens_alone(tok, llama):
    """DecodeBatch (the server's continuous batching): rows join at different steps, leave when done."""
    ps, wanted = prompts(tok), [12, 5, 9, 7]
    alone = [
        generate(llama, tok, [p], max_new_tokens=n, eos_token_id=[]).tokens[0].tolist() for p, n in zip(ps, wanted)
    ]
    batch, rows, got = DecodeBatch(llama), [], {}
    for step in range(40):
        if step % 2 == 0 and len(got) < len(ps):  # a newcomer every other step
            i = len(got)
            got[i] = [batch.add(ps[i], Sampler())]
            rows.append(i)
        else:
            for i, t in zip(rows, batch.step(), strict=True):
                got[i].append(t)
        keep = [k for k, i in enumerate(rows) if len(got[i]) < wanted[i]]
        batch.keep(keep)
        rows = [rows[k] for k in keep]
        if not rows and len(got) == len(ps):
            break
    assert [got[i] for i in range(len(ps))] == alone
    assert len(batch) == 0 and batch.cache is None


def test_a_seeded_row_samples_the_same_whatever_else_is_in_its_batch(tok, llama):
    ps = prompts(tok)

    def draw(companions: int) -> list[int]:
        batch = DecodeBatch(llama)
        for p in ps[1 : 1 + companions]:
            batch.add(p, Sampler(temperature=1.0, seed=99))
        first = batch.add(ps[0], Sampler(temperature=0.9, top_p=0.8, seed=7))
        return [first] + [batch.step()[companions] for _ in range(8)]

    assert draw(0) == draw(2) == draw(3)
    batch = DecodeBatch(llama)
    batch.add(ps[0], Sampler(temperature=0.9, top_p=0.8, seed=8))
    assert [batch.step()[0] for _ in range(8)] != draw(0)[1:]  # another seed, another draw
