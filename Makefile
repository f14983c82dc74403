# icl-gd: `make run` (default experiment) and `make test` create the environment when missing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
ICL := $(BIN)/icl-gd
ARGS ?=

EXPERIMENTS := single_layer recurrent multi_layer depth_extrapolation softmax layernorm_mlp \
	ood distractors label_noise sine sine_paper classic_tokens_small
## Beyond linearity as the paper ran it, five seeds each (README, "Beyond linearity").
NONLINEAR := softmax softmax_2heads layernorm layernorm_2layers classic_tokens preconditioned
STAMP_TIME := $(shell date +%Y-%m-%d_%H-%M-%S)

## The follow-up paper's sequence models (docs/science.md section 8; README, "Mesa-optimization").
LDS := lds_softmax lds_mesa lds_probes lds_fewshot lds_softmax_partial lds_mesa_partial

.PHONY: venv cuda run test lint bench baselines explain clean-venv $(EXPERIMENTS) $(NONLINEAR) $(LDS) lds_linear lds_compare \
	softmax_sweep paper

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

## The GPU build of JAX (CUDA 12 wheels from the package index) in the same .venv, created if missing;
## every target then runs on the GPU (`summary.json` names the devices a run used).
cuda: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[dev,cuda]'

## The default experiment: Figure 2, one LSA layer against one GD step (about 25 s on 2 CPU cores).
run: $(STAMP)
	$(ICL) train experiment=single_layer $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest

## Static checks, offline (config in pyproject.toml): lint, format, types (icl_gd/ only), import contracts.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/basedpyright icl_gd
	$(BIN)/lint-imports --no-cache --no-logo

## Benchmarks (README, Performance): `make bench ARGS="--only seeds,layers"` picks sections.
bench: $(STAMP)
	$(BIN)/python scripts/bench_train.py $(ARGS)

## The whole study: every named experiment at the papers' sizes, explain, one compare, one report.
## Resumable: run it again after an interruption; finished runs are not run again (runs/paper/).
paper: $(STAMP)
	$(BIN)/python scripts/paper.py $(ARGS)

baselines: $(STAMP)
	$(ICL) baselines $(ARGS)

## Paper figures: one target per named experiment (conf/experiment/<name>.yaml).
## `make <experiment> ARGS="train.seeds=3"` passes overrides through.
single_layer: $(STAMP)
	$(ICL) train experiment=single_layer train.seeds=5 $(ARGS)

recurrent: $(STAMP)
	$(ICL) train -m experiment=recurrent model.layers=2,3,4,5 --out runs/recurrent/$(STAMP_TIME) $(ARGS)
	$(ICL) compare runs/recurrent/$(STAMP_TIME) --out runs/recurrent/$(STAMP_TIME)/compare

multi_layer depth_extrapolation layernorm_mlp: $(STAMP)
	$(ICL) train experiment=$@ $(ARGS)

## Task variants, five seeds each (docs/experiments_tasks.md).
ood distractors label_noise sine sine_paper classic_tokens_small: $(STAMP)
	$(ICL) train experiment=$@ train.seeds=5 $(ARGS)

softmax softmax_2heads layernorm layernorm_2layers: $(STAMP)
	$(ICL) train experiment=$@ train.seeds=5 $(ARGS)

## The paper's classic-token run: 40,000 steps, five seeds (convergence depends on the seed).
classic_tokens: $(STAMP)
	$(ICL) train experiment=classic_tokens train.seeds=5 train.steps=40000 $(ARGS)

## Non-isotropic inputs, five seeds, then which algorithm the layer runs (docs/explain.md).
preconditioned: $(STAMP)
	$(ICL) train experiment=preconditioned train.seeds=5 --out runs/preconditioned/$(STAMP_TIME) $(ARGS)
	$(ICL) explain runs/preconditioned/$(STAMP_TIME) --seed-all

## Why one softmax head stalls: initial scale x learning rate, two seeds each, then compare.
softmax_sweep: $(STAMP)
	$(ICL) train -m experiment=softmax model.init_scale=0.002,0.02,0.2 train.lr=1e-3,3e-3 train.seeds=2 --out runs/softmax_sweep/$(STAMP_TIME) $(ARGS)
	$(ICL) compare runs/softmax_sweep/$(STAMP_TIME) --out runs/softmax_sweep/$(STAMP_TIME)/compare

## Constructed tokens, one sweep over depth, then every run against the references by position.
lds_linear: $(STAMP)
	$(ICL) train -m experiment=lds_linear model.layers=1,2,4,6 --out runs/lds_linear/$(STAMP_TIME) $(ARGS)
	$(ICL) compare runs/lds_linear/$(STAMP_TIME) --out runs/lds_linear/$(STAMP_TIME)/compare

$(LDS): $(STAMP)
	$(ICL) train experiment=$@ $(ARGS)

## The mesa-layer against linear and softmax layers of the same depth (after the same softmax first layer).
lds_compare: $(STAMP)
	$(ICL) train -m experiment=lds_mesa model.attention=linear,softmax,mesa --out runs/lds_compare/$(STAMP_TIME) $(ARGS)
	$(ICL) compare runs/lds_compare/$(STAMP_TIME) --out runs/lds_compare/$(STAMP_TIME)/compare

## Issue 5, docs/explain.md: which algorithm does each trained model run? Trains each experiment once
## into runs/explain/<name> (when that folder is missing), explains every seed once (when
## runs/explain/<name>/explain is missing), then compares them side by side.
## `make explain ARGS="train.seeds=3"` passes overrides to the training runs.
EXPLAINED := single_layer recurrent multi_layer softmax

explain: $(STAMP)
	@for name in $(EXPLAINED); do \
	  dir=runs/explain/$$name; \
	  [ -d $$dir ] || $(ICL) train experiment=$$name train.progress=false --out $$dir $(ARGS) || exit 1; \
	  [ -d $$dir/explain ] || $(ICL) explain $$dir --seed-all || exit 1; \
	done
	$(ICL) compare $(addprefix runs/explain/,$(EXPLAINED)) --out runs/explain/compare-$(STAMP_TIME)

clean-venv:
	rm -rf $(VENV)
