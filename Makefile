# MedVAR bundle: `make demo` runs the main job on the demo data, `make test` runs the test suite.
# Everything is installed into .venv from the project's own pyproject.toml.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO ?= runs/demo
WORKERS ?= 2

.PHONY: install demo test bench clean-demo

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/medvar demo-data --out $(DEMO)/data
	$(BIN)/medvar prepare --datalist $(DEMO)/data/datalist.json --out $(DEMO)/store --workers $(WORKERS)
	$(BIN)/medvar preview --store $(DEMO)/store --out $(DEMO)/store_preview.png
	@echo "demo: slice store in $(DEMO)/store (datasets.json, report.json, manifest.csv), preview $(DEMO)/store_preview.png"

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python scripts/bench_prepare.py

clean-demo:
	rm -rf $(DEMO)
