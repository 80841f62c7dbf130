# `make demo` and `make test` each create or refresh .venv, install what they need, then run.
# The install step is skipped while pyproject.toml is unchanged (a stamp file), so reruns are fast.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# EXTRAS: the optional dependency groups installed
EXTRAS ?= dev
comma  := ,
STAMP  := $(VENV)/.tunelab-installed-$(subst $(comma),-,$(EXTRAS))
# pytest-xdist is not used: the machines have 2 cores and torch already uses both.
PYTEST_ARGS ?=

.PHONY: demo sft-demo test test-slow install clean compare llama-cpp

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[$(EXTRAS)]'
	@touch $(STAMP)

# The main job: adapters, LoRA and full fine-tuning of the default model side by side on SST-2, with
# majority, zero-shot and TF-IDF references, intervals and paired tests; prints the tables and the report's
# path (10 min from a fresh clone, installs included).
demo: $(STAMP)
	$(BIN)/tunelab compare examples/compare-sst2.yaml

# A single LoRA SFT run with before/after generations (~4 min).
sft-demo: $(STAMP)
	$(BIN)/python examples/demo.py

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# llama-cpp-python with a build of only the library it loads (tools/install-llama-cpp.sh: ~4 min on 2 cores);
# tests/test_llama_cpp.py then runs exported GGUF files in llama.cpp itself (.ci/run does this first)
llama-cpp: $(STAMP)
	tools/install-llama-cpp.sh $(VENV)

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS)

# tunelab compare on any grid (default: the demo's); e.g. make compare GRID=examples/compare-sst2-all.yaml
GRID ?= examples/compare-sst2.yaml
compare: $(STAMP)
	$(BIN)/tunelab compare $(GRID)

clean:
	rm -rf $(VENV) runs .pytest_cache
