# Two set-up commands: `make demo` (the main job on the embedded model) and `make test` (the suite).
# Both create .venv if missing. torch is pinned first so pip takes the local CPU wheel here
# (a normal wheel elsewhere) instead of resolving a multi-GB CUDA build.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0
DEMO_DIR ?= demo-run

.PHONY: demo test install clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[test,plot]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) scripts/demo.py --workdir $(DEMO_DIR)

test: $(VENV)/.installed
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) $(DEMO_DIR) *.egg-info build
