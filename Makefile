# Two commands on a fresh machine: `make demo` and `make test` (each sets up .venv first).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch; pip finds it fast (a range that admits newer releases pulls a multi-GB CUDA build).
TORCH ?= torch==2.13.0

.PHONY: demo test test-comfyui bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(PY) -m trainer_core demo --out demo_output

test: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(PY) -m pytest tests

# The real-ComfyUI suite: make test-comfyui COMFYUI_DIR=/path/to/ComfyUI COMFYUI_PYTHON=/path/to/its/python
COMFYUI_DIR ?=
COMFYUI_PYTHON ?= $(COMFYUI_DIR)/venv/bin/python
test-comfyui: $(VENV)/.installed
	HF_HUB_OFFLINE=1 COMFYUI_DIR="$(COMFYUI_DIR)" COMFYUI_PYTHON="$(COMFYUI_PYTHON)" $(PY) -m pytest tests/integration -rA -s

bench: $(VENV)/.installed
	$(PY) -m bench

clean:
	rm -rf $(VENV) demo_output .pytest_cache
