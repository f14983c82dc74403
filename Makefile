# icl-gd: `make run` (default experiment) and `make test` create the environment when missing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
ICL := $(BIN)/icl-gd
ARGS ?=

.PHONY: venv run test bench baselines single_layer ood distractors label_noise sine classic_tokens clean-venv

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

## The default experiment: Figure 2, one LSA layer against one GD step (about a minute on CPU).
run: $(STAMP)
	$(ICL) train experiment=single_layer $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python scripts/bench_train.py $(ARGS)

baselines: $(STAMP)
	$(ICL) baselines $(ARGS)

## Paper figures: one target per named experiment (conf/experiment/<name>.yaml).
single_layer: $(STAMP)
	$(ICL) train experiment=single_layer train.seeds=5 $(ARGS)

## Task variants (docs/experiments_tasks.md).
ood: $(STAMP)
	$(ICL) train experiment=ood train.seeds=5 $(ARGS)

distractors: $(STAMP)
	$(ICL) train experiment=distractors train.seeds=5 $(ARGS)

label_noise: $(STAMP)
	$(ICL) train experiment=label_noise train.seeds=5 $(ARGS)

sine: $(STAMP)
	$(ICL) train experiment=sine train.seeds=5 $(ARGS)

classic_tokens: $(STAMP)
	$(ICL) train experiment=classic_tokens train.seeds=5 $(ARGS)

clean-venv:
	rm -rf $(VENV)
