# Two set-up commands: `make demo` (the main job on the embedded model) and `make test` (the suite).
# Both create .venv if missing and install the exact versions in constraints.txt, the ones CI tests.
# torch is installed first, pinned, so pip takes the local CPU wheel here (a normal wheel elsewhere)
# instead of resolving a multi-GB CUDA build.
#
# `make test-newest` builds .venv-newest with the newest releases pip resolves (upper bounds lifted,
# torch kept at TORCH_PIN), runs the suite there and prints the versions it used. Once it passes,
# `make constraints` copies those versions into constraints.txt.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0
DEMO_DIR ?= demo-run
NEWEST ?= .venv-newest
VERSIONS := torch transformers tokenizers safetensors huggingface.hub kernels typer triton numpy

.PHONY: demo test install test-newest constraints clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt "$(TORCH_PIN)"
	$(PY) -m pip install -q -c constraints.txt -e ".[test,plot]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) scripts/demo.py --workdir $(DEMO_DIR)

test: $(VENV)/.installed
	$(PY) -m pytest -q

test-newest:
	rm -rf $(NEWEST)
	$(PYTHON) -m venv $(NEWEST)
	$(NEWEST)/bin/python -m pip install -q --upgrade pip
	$(NEWEST)/bin/python -m pip install -q "$(TORCH_PIN)"
	$(NEWEST)/bin/python scripts/unbounded_requirements.py test plot --pin "$(TORCH_PIN)" > $(NEWEST)/requirements.txt
	$(NEWEST)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -r $(NEWEST)/requirements.txt
	$(NEWEST)/bin/python -m pip install -q --no-deps -e .
	$(NEWEST)/bin/python -m pip freeze --all --exclude-editable | grep -v "^pip==" > $(NEWEST)/versions.txt
	@echo "make test-newest: versions used"
	@grep -iE "^($(shell echo $(VERSIONS) | tr ' ' '|'))==" $(NEWEST)/versions.txt
	$(NEWEST)/bin/python -m pytest -q

constraints:
	test -f $(NEWEST)/versions.txt || { echo "run make test-newest first"; exit 1; }
	{ sed -n '1,2p' constraints.txt; grep -v "^vlsparse" $(NEWEST)/versions.txt | sed 's/+cpu$$//'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) $(NEWEST) $(DEMO_DIR) *.egg-info build
