"""bench/scale_curves.py's pure parts: the published configs' sizes counted as transformers builds them, the
memory guard's estimate ordering the points as their memory does, and the table it writes."""

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def scale():
    sys.path.insert(0, str(BENCH))  # it imports its sibling data_prepare lazily
    spec = importlib.util.spec_from_file_location("scale_curves", BENCH / "scale_curves.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    sys.path.remove(str(BENCH))


@pytest.mark.parametrize("size", ["135m", "360m", "1.7b", "gemma3-270m"])
def test_parameter_counts_match_the_model_transformers_builds(scale, size):
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = dict(scale.SIZES[size])
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(shape.pop("model_type", "llama"), **shape))
    model.tie_weights()  # as from_pretrained does: the head is the token table
    total, table = scale.parameters(size)
    assert total == sum(p.numel() for p in model.parameters())  # tied head counted once
    assert table == model.model.embed_tokens.weight.numel()


def test_the_estimate_grows_with_size_and_length_and_qlora_is_smaller(scale):
    est = lambda size, n, method="lora", side="tunelab": scale.estimate_peak_gb(size, n, method, side, 256)  # noqa: E731
    assert est("135m", 256) < est("360m", 256) < est("1.7b", 256)
    assert est("360m", 256) < est("360m", 1024) < est("360m", 4096)
    assert est("1.7b", 1024, "qlora") < 0.6 * est("1.7b", 1024)
    assert 7 < est("1.7b", 256) < 14  # the fp32 1.7B model is 6.9 GB: fits 24 GB, not a busy 10 GB


def test_points_and_the_table(scale):
    points = scale.all_points()
    assert len(points) == 4 * 3 * 2 * 2 + 3 * 2 and "train:1.7b:4096:qlora:ref" in points and "data:1m:trl" in points
    row = lambda side, tps, mb: {"point": f"train:135m:256:lora:{side}", "kind": "train", "size": "135m",  # noqa: E731
                                 "length": 256, "method": "lora", "side": side, "rows_per_step": 4, "result": "ok",
                                 "tokens_per_s": tps, "peak_rss_mb": mb, "load_before": "3.0 2.0 1.0"}  # fmt: skip
    big = {"point": "train:1.7b:4096:lora:ref", "kind": "train", "size": "1.7b", "length": 4096, "method": "lora",
           "side": "ref", "rows_per_step": 1, "result": "does not fit: estimated 30 GB > 20 GB available",
           "load_before": "1.0 1.0 1.0"}  # fmt: skip
    table = scale.markdown([row("tunelab", 250.0, 1000.0), row("ref", 100.0, 2000.0), big])
    assert "| 135m | 256 | lora | 4 x 256 | 250.0 | 100.0 | 2.50 | 1,000 | 2,000 | 0.50 | 3.0, 3.0 |" in table
    assert "| 1.7b | 4096 | lora | 1 x 4096 | not run | does not fit: estimated 30 GB > 20 GB available | — |" in table


def test_each_side_runs_on_the_malloc_it_is_given_and_the_table_says_which(scale, monkeypatch):
    """The reference runs on glibc's malloc by default, even under a bench started with tbbmalloc preloaded, and on
    tbbmalloc with --ref-allocator tbbmalloc; each row's allocator is shown beside its precision."""
    preloaded = "/x/libtbbmalloc.so.2 /x/libtbbmalloc_proxy.so.2"
    monkeypatch.setenv("LD_PRELOAD", preloaded)
    assert "LD_PRELOAD" not in scale.reference_environment("system")
    assert scale.reference_environment("tbbmalloc") is None  # preloaded here already: the child inherits it
    monkeypatch.delenv("LD_PRELOAD")
    assert "LD_PRELOAD" not in scale.reference_environment("system")
    row = lambda side, alloc: {"point": f"train:135m:256:lora:{side}", "kind": "train", "size": "135m",  # noqa: E731
                               "length": 256, "method": "lora", "side": side, "rows_per_step": 4, "result": "ok",
                               "tokens_per_s": 100.0, "peak_rss_mb": 1000.0, "load_before": "1.0 1.0 1.0",
                               "precision": "bf16", "allocator": alloc}  # fmt: skip
    table = scale.markdown([row("tunelab", "tbbmalloc"), row("ref", "system")])
    assert "| precision, allocator (tunelab; ref) |" in table and "| bf16, tbbmalloc; bf16, system |" in table
