# The two set-up commands of the README: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SOURCES := reviewkd export deploy benchmarks

.PHONY: demo test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# The demo and the tests train and draw the report's plots, so they install the `train` (torch) and
# `plots` (matplotlib) extras, with the CPU ONNX Runtime; `pip install '.[cpu]'` alone is the torch-free edge
# install of the README.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[cpu,train,plots]'
	touch $@

# tensorrt-stubs declares the real TensorRT as a dependency, whose wheel downloads from NVIDIA's
# host at install time; the stubs alone are all mypy needs, so they install without dependencies.
$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[cpu,train,plots,dev]'
	$(BIN)/pip install --quiet --no-deps tensorrt-stubs
	touch $(VENV)/.installed $@

demo: $(VENV)/.installed
	$(BIN)/reviewkd run --out runs/demo --resume

# As installed, tensorrt-stubs is invisible to mypy (no py.typed) and does not even parse, so the plain
# run sees TensorRT as Any. The second run checks the TensorRT modules against a repaired copy that sits
# on MYPYPATH only (never on sys.path, where it would make `import tensorrt` succeed without TensorRT);
# its own cache keeps the two runs from invalidating each other's.
TRT_STUBS := $(VENV)/trt-stubs
TRT_MODULES := export/tensorrt_engine.py deploy/runners/tensorrt_runner.py deploy/trt_sidecar.py \
	benchmarks/trt_breakdown.py

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check $(SOURCES) tests .ci
	$(BIN)/lint-imports
	$(BIN)/mypy $(SOURCES) .ci/trt_stubs.py
	$(BIN)/python .ci/trt_stubs.py $(TRT_STUBS)
	MYPYPATH=$(TRT_STUBS) $(BIN)/mypy --cache-dir .mypy_cache/tensorrt $(TRT_MODULES)

test: lint
	$(BIN)/pytest

clean:
	rm -rf $(VENV) runs
