# The two set-up commands of the README: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SOURCES := reviewkd export deploy benchmarks

.PHONY: demo test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

# tensorrt-stubs declares the real TensorRT as a dependency, whose wheel downloads from NVIDIA's
# host at install time; the stubs alone are all mypy needs, so they install without dependencies.
$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps tensorrt-stubs
	touch $(VENV)/.installed $@

demo: $(VENV)/.installed
	$(BIN)/reviewkd run --out runs/demo

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check $(SOURCES) tests
	$(BIN)/mypy $(SOURCES)

test: lint
	$(BIN)/pytest

clean:
	rm -rf $(VENV) runs
