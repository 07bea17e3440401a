# The verbs a user types. Every target installs what it needs into .venv/ first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The adapter `make train` writes on this machine (with the same RECIPE): the verbs after it use that one.
ADAPTER ?= $(shell $(PY) -m gemma_sft.hardware --adapter $(RECIPE) 2>/dev/null || echo outputs/gemma3-270m-belle-demo)
OUTPUT ?= $(ADAPTER)-merged
GGUF ?= $(ADAPTER)-gguf
TYPE ?= f16
RECIPE ?=

.PHONY: install train demo test test-fast eval chat merge export webui serve bench bench-quality bench-data lint format clean

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

install: $(VENV)/.installed  ## create .venv/ from the pinned requirements.txt

# llama.cpp itself, where export.py checks its GGUF file and serve.py serves it: llama-cpp-python built from its PyPI
# source release, the CPU library only (no C++ tools, examples, server or multimodal part), about 9 minutes on 2 cores,
# once; its Python OpenAI-compatible server and the openai client (for the server's tests) come with it.
LLAMA_CPP_CMAKE := -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
	-DLLAMA_BUILD_SERVER=OFF -DGGML_NATIVE=OFF
$(VENV)/.llama-cpp: requirements-llama-cpp.txt $(VENV)/.installed
	CMAKE_ARGS="$(LLAMA_CPP_CMAKE)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PY) -m pip install --quiet -r requirements-llama-cpp.txt
	touch $@

train: install  ## fine-tune: the mission recipe on a CUDA GPU (low-memory form under 11 GiB free; --kept_layers from the free memory), the 270M demo on CPU (RECIPE=... to choose)
	$(PY) -m gemma_sft.hardware $(RECIPE)

demo: install  ## the CPU demo end to end: train the 270M, then evaluate it
	$(PY) sft.py recipes/gemma3_270m_belle_demo.yaml
	$(PY) evaluate.py --adapter outputs/gemma3-270m-belle-demo

test: install $(VENV)/.llama-cpp  ## every test, offline (the slow end-to-end ones included; builds llama.cpp once)
	$(PY) -m pytest -n 2 --dist loadgroup

test-fast: install  ## the tests that train nothing (under 3 minutes on 2 cores)
	$(PY) -m pytest -n 2 -m "not slow and not train"

eval: install  ## base vs adapter: answer loss, perplexity, generations, loss curve -> ADAPTER/report.md
	$(PY) evaluate.py --adapter $(ADAPTER)

chat: install  ## talk to the adapter in the terminal
	$(PY) chat.py --adapter $(ADAPTER)

merge: install  ## merge the adapter into a 16-bit base -> OUTPUT
	$(PY) merge.py --adapter $(ADAPTER) --output $(OUTPUT)

export: install $(VENV)/.llama-cpp  ## merge ADAPTER, write one GGUF file (TYPE=f16 or q8_0) checked in llama.cpp, with an Ollama Modelfile -> GGUF
	$(PY) export.py --adapter $(ADAPTER) --output $(GGUF) --type $(TYPE)

webui: install  ## base and adapter side by side in the browser, streamed, with the report -> http://127.0.0.1:7860
	$(PY) webui.py --adapter $(ADAPTER)

PORT ?= 8000
serve: install $(VENV)/.llama-cpp  ## OpenAI-compatible endpoint for ADAPTER's GGUF (exported first when GGUF is missing) on llama.cpp -> http://127.0.0.1:PORT/v1
	@test -e $(GGUF) || $(PY) export.py --adapter $(ADAPTER) --output $(GGUF) --type $(TYPE)
	$(PY) serve.py --adapter $(ADAPTER) --gguf $(GGUF) --port $(PORT)

bench: install  ## throughput benchmark (needs a CUDA GPU): original settings vs ours -> bench/results.json
	$(PY) bench/bench.py

bench-quality: install  ## time to quality (needs a CUDA GPU): held-out loss against wall time per set-up -> bench/quality/
	$(PY) bench/quality.py

bench-data: install  ## data preparation of 519,255 Belle-shaped rows (CPU): time and memory, empty cache then cached -> bench/results/data-prep.json
	$(PY) bench/data_prep.py

lint: install  ## ruff check and format check (CI runs it)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install  ## apply ruff fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:  ## remove outputs and caches (keeps .venv/)
	rm -rf outputs .pytest_cache .ruff_cache
