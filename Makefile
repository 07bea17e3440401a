# The verbs a user types. Every target installs what it needs into .venv/ first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ADAPTER ?= outputs/gemma3-270m-belle-demo
OUTPUT ?= $(ADAPTER)-merged
RECIPE ?=

.PHONY: install train demo test test-fast eval chat merge webui bench bench-quality lint format clean

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

install: $(VENV)/.installed  ## create .venv/ from the pinned requirements.txt

train: install  ## fine-tune: the mission recipe on a CUDA GPU (low-memory form under 14 GiB), the 270M demo on CPU (RECIPE=... to choose)
	$(PY) -m gemma_sft.hardware $(RECIPE)

demo: install  ## the CPU demo end to end: train the 270M, then evaluate it
	$(PY) sft.py recipes/gemma3_270m_belle_demo.yaml
	$(PY) evaluate.py --adapter outputs/gemma3-270m-belle-demo

test: install  ## every test, offline (the slow end-to-end ones included)
	$(PY) -m pytest -n 2 --dist loadgroup

test-fast: install  ## the fast tests only
	$(PY) -m pytest -n 2 -m "not slow"

eval: install  ## base vs adapter: answer loss, perplexity, generations, loss curve -> ADAPTER/report.md
	$(PY) evaluate.py --adapter $(ADAPTER)

chat: install  ## talk to the adapter in the terminal
	$(PY) chat.py --adapter $(ADAPTER)

merge: install  ## merge the adapter into a 16-bit base -> OUTPUT
	$(PY) merge.py --adapter $(ADAPTER) --output $(OUTPUT)

webui: install  ## base and adapter side by side in the browser, streamed, with the report -> http://127.0.0.1:7860
	$(PY) webui.py --adapter $(ADAPTER)

bench: install  ## throughput benchmark (needs a CUDA GPU): original settings vs ours -> bench/results.json
	$(PY) bench/bench.py

bench-quality: install  ## time to quality (needs a CUDA GPU): held-out loss against wall time per set-up -> bench/quality/
	$(PY) bench/quality.py

lint: install  ## ruff check and format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install  ## apply ruff fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:  ## remove outputs and caches (keeps .venv/)
	rm -rf outputs .pytest_cache .ruff_cache
