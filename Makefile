# The two commands: `make demo` and `make test`. Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test bench clean

$(BIN)/moelab: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,hf,tb]'
	touch $(BIN)/moelab

demo: $(BIN)/moelab
	$(BIN)/moelab demo --out runs/demo

test: $(BIN)/moelab
	$(BIN)/python -m pytest

bench: $(BIN)/moelab
	$(BIN)/python benchmarks/bench_moe.py

clean:
	rm -rf $(VENV) runs
