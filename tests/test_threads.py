"""accel/threads.py: a pass's parts run at once in threads and give the training of the whole pass."""

import threading
import time
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from test_training import losses, make_cfg
from torch import nn

import tunelab
from tunelab.accel import fast_lora, threads
from tunelab.methods import get
from tunelab.testing import tiny_llama


def test_auto_parts_follow_the_cores_and_stay_off_with_dropout_or_elsewhere(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    auto, cpu = SimpleNamespace(pass_threads=None, gradient_checkpointing=False), torch.device("cpu")
    plain = nn.Sequential(nn.Linear(4, 4)).requires_grad_(False)
    assert threads.parts_for(auto, cpu, False, plain) == (2, None)
    parts, why = threads.parts_for(auto, cpu, False, nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1)))
    assert parts == 1 and "dropout" in why
    assert threads.parts_for(auto, cpu, False, nn.Sequential(nn.Dropout(0.0))) == (2, None)
    full = nn.Sequential(nn.Linear(2, 2))
    parts, why = threads.parts_for(auto, cpu, False, full.requires_grad_(True))
    assert parts == 1 and "gradient of its own" in why
    plain.requires_grad_(False)
    plain[0].bias.requires_grad_(True)  # 4 of 20 parameters: few enough
    assert threads.parts_for(auto, cpu, False, plain) == (2, None)
    assert threads.parts_for(auto, cpu, True, plain)[0] == 1  # DDP: one pass per process
    assert threads.parts_for(SimpleNamespace(pass_threads=1), cpu, False, plain) == (1, None)
    with pytest.raises(ValueError, match="pass_threads: 2 .* set it to null or 1"):
        threads.parts_for(SimpleNamespace(pass_threads=2), cpu, True, plain)


def test_run_keeps_order_restores_threads_and_waits_for_every_part_when_one_fails():
    before = torch.get_num_threads()
    seen = []

    def part(k):
        seen.append((k, threading.current_thread().name, torch.get_num_threads()))
        return k * 10

    assert threads.run([lambda k=k: part(k) for k in range(3)]) == [0, 10, 20]
    assert all(name.startswith("tunelab-part") and n == max(1, before // 3) for _, name, n in seen)
    assert torch.get_num_threads() == before

    finished = []

    def slow():
        time.sleep(0.3)
        finished.append(True)

    def bad():
        raise ValueError("row 3: no labels")

    with pytest.raises(ValueError, match="row 3"):
        threads.run([bad, slow])
    assert finished == [True]  # the failing part did not leave the other one writing gradients
    threads.shutdown()


def test_a_stages_ahead_passes_run_a_thread_per_share_each_shares_in_turn():
    """Stage.ahead gets a call per pass in share order: each share's calls run in turn on one thread, the shares at
    once (no more threads than shares); the results come back in the calls' order."""
    seen = []

    def call(k):
        seen.append((k, threading.current_thread().name))
        time.sleep(0.05)  # both shares running at once
        return k

    assert threads.by_share([2, 1])([lambda k=k: call(k) for k in range(3)]) == [0, 1, 2]
    where = dict(seen)
    assert where[0] == where[1] != where[2] and all(name.startswith("tunelab-part") for name in where.values())
    assert [k for k, _ in seen if k < 2] == [0, 1]  # the first share's passes in order
    assert threads.by_share([2, 1])([lambda: 7, lambda: 8]) == [7, 8]  # calls not one per pass: a thread each
    threads.shutdown()


def test_a_share_that_finishes_first_gives_its_threads_to_the_rest_between_blocks():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    model = tiny_llama()
    assert threads.watch(model) == 2  # its two decoder blocks
    seen = {}

    def record(module, args, out):  # inside the first block: its forward, then (a hook) its backward
        seen.setdefault("forward", torch.get_num_threads())
        out.register_hook(lambda g: seen.setdefault("backward", torch.get_num_threads()) and None)

    model.model.layers[0].mlp.register_forward_hook(record)
    forward_done = threading.Event()

    def quick():
        forward_done.wait(30)
        return torch.get_num_threads()

    def slow():
        loss = model(torch.arange(8)[None]).logits.float().pow(2).mean()
        forward_done.set()  # `quick` returns now: its thread is free
        for _ in range(300):
            if threads._TEAM["running"] == 1:
                break
            time.sleep(0.01)
        loss.backward()  # the last block's output gradient: widen before its backward pass
        return torch.get_num_threads()

    try:
        assert threads.run([quick, slow]) == [1, 2]
        assert seen == {"forward": 1, "backward": 2}  # one thread each while both ran, both once `quick` ended
        assert torch.get_num_threads() == 2
        seen.clear()
        loss = model(torch.arange(8)[None]).logits.float().pow(2).mean()
        loss.backward()
        assert seen == {"forward": 2, "backward": 2}  # outside a share the hooks leave the threads alone
        threads.shutdown()  # removes the hooks
        assert all(not block._forward_pre_hooks for block in model.model.layers)
    finally:
        threads.shutdown()
        torch.set_num_threads(before)


def test_parts_in_threads_train_like_the_whole_pass(tiny_dir, data_file, tmp_path, monkeypatch):
    calls = []
    real_run = threads.run
    monkeypatch.setattr(threads, "run", lambda fns: calls.append(len(fns)) or real_run(fns))

    def run(name, parts, **training):
        cfg = make_cfg(tiny_dir, data_file, tmp_path / name, max_steps=4, batch_size=4, pass_threads=parts, **training)
        cfg.data.packing, cfg.data.max_length, cfg.method.dropout = True, 160, 0.0
        final = tunelab.train(cfg).final_dir
        return losses(tmp_path / name), load_file(final / "adapter_model.safetensors")

    whole, whole_w = run("whole", 1)
    assert calls == []
    two, two_w = run("two", 2)
    assert set(calls) == {2}  # every micro-batch of 4 packed rows ran as two shares at once
    again, again_w = run("again", 2)
    # two rows in flight: each share runs its two rows one pass at a time
    halves, halves_w = run("halves", 2, rows_per_pass=2)
    assert whole.keys() == two.keys() == halves.keys()
    for step in whole:
        assert abs(whole[step] - two[step]) < 1e-5 and abs(whole[step] - halves[step]) < 1e-5
    for k in whole_w:
        torch.testing.assert_close(two_w[k], whole_w[k], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(halves_w[k], whole_w[k], rtol=1e-4, atol=1e-6)
        assert torch.equal(two_w[k], again_w[k])  # the shares' gradients are added in one order: same run


def test_lora_dropout_on_the_fast_path_keeps_shares_on_other_dropout_does_not(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    auto, cpu = SimpleNamespace(pass_threads=None, gradient_checkpointing=False), torch.device("cpu")
    method = get("lora")
    model = method.apply(tiny_llama(), method.Config(r=4, dropout=0.1, target_modules="all-linear"))
    parts, why = threads.parts_for(auto, cpu, False, model)
    assert parts == 1 and "dropout outside the fast LoRA layers" in why  # PEFT's forward: torch's generator
    fast_lora.enable(model)
    assert len(fast_lora.covered_dropouts(model)) == 14 and threads.shares_draw(model)  # 7 per layer, 2 layers
    assert threads.parts_for(auto, cpu, False, model) == (2, None)
    parts, why = threads.parts_for(SimpleNamespace(pass_threads=None, gradient_checkpointing=True), cpu, False, model)
    assert parts == 1 and "gradient checkpointing" in why
    with pytest.raises(ValueError, match="pass_threads: 2 with LoRA dropout and gradient checkpointing"):
        threads.parts_for(SimpleNamespace(pass_threads=2, gradient_checkpointing=True), cpu, False, model)
    model.get_base_model().model.layers[0].self_attn.config.attention_dropout = 0.1
    assert threads.parts_for(auto, cpu, False, model)[0] == 1


def test_shares_with_lora_dropout_repeat_run_to_run(tiny_dir, data_file, tmp_path, monkeypatch):
    """Each share draws its masks from its own generator: the same seed gives the same losses and weights,
    whichever thread runs first; another seed, or no dropout, other ones."""
    calls = []
    real_run = threads.run
    monkeypatch.setattr(threads, "run", lambda fns: calls.append(len(fns)) or real_run(fns))

    def run(name, dropout, seed=3):
        cfg = make_cfg(tiny_dir, data_file, tmp_path / name, max_steps=3, batch_size=4, pass_threads=2, seed=seed)
        cfg.data.packing, cfg.data.max_length, cfg.method.dropout = True, 160, dropout
        final = tunelab.train(cfg).final_dir
        return losses(tmp_path / name), load_file(final / "adapter_model.safetensors")

    first, first_w = run("first", 0.3)
    assert set(calls) == {2}
    again, again_w = run("again", 0.3)
    none, _ = run("none", 0.0)
    other, _ = run("other", 0.3, seed=4)
    assert first == again and len(first) == 3
    for k in first_w:
        assert torch.equal(first_w[k], again_w[k]), k
    assert first[3] != none[3] and first[3] != other[3]  # (step 1: B = 0, no mask changes the loss)


def test_auto_counts_weights_that_are_no_longer_parameters(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    model = nn.Sequential(nn.Linear(4, 4))  # 20 parameters, all trainable: here, as after compacting the base
    auto, cpu = SimpleNamespace(pass_threads=None), torch.device("cpu")
    assert threads.parts_for(auto, cpu, False, model)[0] == 1
    assert threads.parts_for(auto, cpu, False, model, total=1000) == (2, None)  # 2% of the whole model


def test_rows_are_balanced_over_the_shares_by_their_estimated_compute():
    # costliest first, each to the least loaded share, every share in the rows' order
    assert threads.balance(["a", "b", "c", "d"], 2, [4, 3, 2, 1]) == [["a", "d"], ["b", "c"]]
    assert threads.balance(["a", "b", "c", "d"], 2, [9, 1, 1, 1]) == [["a", "d"], ["b", "c"]]  # 2 rows each
    assert threads.balance(list("abcde"), 2, [1, 5, 4, 3, 2]) == [["a", "b", "e"], ["c", "d"]]
    assert threads.balance(list(range(4)), 2, [1, 1, 1, 1]) == [[0, 2], [1, 3]]
    assert threads.balance([7], 4, [1.0]) == [[7]]  # never an empty share
    assert threads.balance([1, 2], 1, []) == [[1, 2]]
    # a packed row: tokens, the head's work at label positions, attention quadratic in each example's length
    one = {"input_ids": [5] * 256, "labels": [5] * 256, "position_ids": list(range(256))}
    four = {"input_ids": [5] * 256, "labels": [-100, 5] * 128, "position_ids": list(range(64)) * 4}
    assert threads.row_cost(one) == 256 + threads.HEAD_COST * 256 + 256**2 * threads.ATTENTION_COST
    assert threads.row_cost(four) == 256 + threads.HEAD_COST * 128 + 4 * 64**2 * threads.ATTENTION_COST
    assert threads.row_cost({"chosen_input_ids": [1, 2]}) == 1.0
