# alexnet-pipe: the DAG  setup → prepare (shard train, shard val, pca-stats) → train → eval.
# Every DAG target is .PHONY and one CLI call: the CLI itself knows when a stage is up to date (Make cannot see a
# changed parameter in file times), so a second `make prepare` returns in seconds and does no work.

PYTHON   ?= python3.11
VENV     := .venv
PY       := $(VENV)/bin/python
CLI      := $(VENV)/bin/alexnet-pipe
STAMP    := $(VENV)/.setup-stamp
WHEELS   := $(VENV)/wheels

WORK     ?= ./work
RUN      ?= demo
include pipeline/layout.mk
DEVICES  ?= auto
IMAGENET ?=
SEED     ?= 0

# The embedded default data set (no IMAGENET): generated, small enough for a laptop CPU.
DEMO_CLASSES   ?= 10
DEMO_TRAIN     ?= 60
DEMO_VAL       ?= 10
DEMO_DATA      := $(WORK)/$(DEMO_DATA_DIR)
# The image size: the shards' short side is the recipe's (`alexnet-pipe recipe RECIPE`: [shards] short_side, else the
# paper's 256; read once, when first needed), the crop its model.crop. Another side than 256 has folders of its own
# (shards-72/, pca-72/), so that two sizes never overwrite each other in one WORK.
SHORT_SIDE     ?= $(eval SHORT_SIDE := $$(or $$(shell $(CLI) recipe $(RECIPE) --get shards.short_side),$$(error \
                  RECIPE=$(RECIPE): no short side (the line above says why))))$(SHORT_SIDE)
SIZED           = $(if $(filter 256,$(SHORT_SIDE)),,-$(SHORT_SIDE))
TRAIN_SHARDS    = $(WORK)/$(subst shards/,shards$(SIZED)/,$(TRAIN_SHARDS_DIR))
VAL_SHARDS      = $(WORK)/$(subst shards/,shards$(SIZED)/,$(VAL_SHARDS_DIR))
PCA_OUT         = $(WORK)/$(PCA_DIR)$(SIZED)
PCA_JSON        = $(PCA_OUT)/pca.json
DATA           := $(if $(IMAGENET),$(IMAGENET),$(DEMO_DATA))

SHARD_SIZE     ?= $(if $(IMAGENET),1000,100)
# A smaller set for short experiments: the first MAX_CLASSES classes (both splits), PER_CLASS training images of each.
MAX_CLASSES    ?=
PER_CLASS      ?=
CAP_ARGS        = $(if $(MAX_CLASSES),--max-classes $(MAX_CLASSES))

# Training follows a recipe (pipeline/recipes/*.toml): the paper's on ImageNet, the demo's (a quarter-width net that
# learns on a laptop CPU) without it. EPOCHS / BATCH_SIZE override the recipe only when set.
RECIPE         ?= $(if $(IMAGENET),paper,demo)
EPOCHS         ?=
BATCH_SIZE     ?=
TRAIN_ARGS     ?=
EVAL_ARGS      ?=
RECIPE_ARGS     = --recipe $(RECIPE) $(if $(filter command line environment,$(origin SEED)),--seed $(SEED)) $(if $(EPOCHS),--epochs $(EPOCHS)) $(if $(BATCH_SIZE),--batch-size $(BATCH_SIZE))
RUN_DIR        := $(WORK)/$(RUNS_DIR)/$(RUN)
EVAL_DIR       := $(WORK)/$(EVALS_DIR)/$(RUN)
REPORT          = $(CLI) report $(RUN_DIR) --eval $(EVAL_DIR) --out $(EVAL_DIR)/report

# The paper's claims (docs/paper.md, "The claims sweep"): the baseline and one variant per claim, ABLATION_SEEDS seeds each,
# on the same shards. Without IMAGENET the demo recipe, ABLATION_EPOCHS epochs a run (the whole sweep: 12.7 min measured
# on an idle 2-core CPU, docs/results.md); with IMAGENET the paper's recipe. The threshold: the training top-1 error
# counted in epochs (Figure 1; the paper's 25% is for CIFAR-10, which the short demo runs do not reach).
ABLATION_DIR       := $(WORK)/$(ABLATIONS_DIR)
ABLATION_SEEDS     ?= 3
ABLATION_VARIANTS  ?= all
ABLATION_EPOCHS    ?= $(if $(IMAGENET),,8)
ABLATION_THRESHOLD ?= $(if $(IMAGENET),0.25,0.8)
ABLATION_ARGS      ?=

# Figure 1 (§3.1) on CIFAR-10: ReLU against tanh, each at its own best learning rate (docs/figure1.md). CIFAR: the
# official cifar-10-python.tar.gz, its extracted cifar-10-batches-py/, or image folders train/<class>/.
CIFAR          ?= ../shared/data/cifar10-jpeg
FIGURE1_DIR    := $(WORK)/figure1
FIGURE1_ARGS   ?=

# TensorBoard over every events folder under WORK (runs, evals, the claims sweep, Figure 1): http://TENSORBOARD_HOST:PORT
# (localhost: only this machine; 0.0.0.0 to reach it from another, e.g. a cluster's login node through ssh -L).
TENSORBOARD_PORT ?= 6006
TENSORBOARD_HOST ?= localhost

# Slurm (cluster/submit.sh --help): the same stages as array jobs and a multi-node torchrun job.
NUM_TASKS      ?= 8
CLUSTER_ENV     = WORK=$(abspath $(WORK)) RUN=$(RUN) DEVICES=$(DEVICES) SEED=$(SEED) SHARD_SIZE=$(SHARD_SIZE) \
                  NUM_TASKS=$(NUM_TASKS) ALEXNET_PIPE=$(abspath $(CLI))

.PHONY: setup test test-fast lint synth prepare shard-train shard-val pca train eval report preview status tensorboard clean bench \
        cluster-prepare cluster-train ablations cluster-ablations figure1

setup: $(STAMP)

$(STAMP): pyproject.toml tools/build-pillow-simd.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	tools/build-pillow-simd.sh $(PY) $(WHEELS)
	$(PY) -m pip install --quiet --find-links $(WHEELS) -e '.[test]'
	$(PY) -m pip check
	$(PY) -c "import PIL, sys; v = PIL.__version__; print('PIL', v); sys.exit(0 if v.endswith('+simd') else 'stock Pillow replaced pillow-simd')"
	touch $@

test: $(STAMP)
	$(VENV)/bin/pytest -q

# The fast tier: every test not marked slow (no training run, no Slurm, no long sweep), about a minute on 2 cores.
test-fast: $(STAMP)
	$(VENV)/bin/pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check pipeline stages cli tests bench
	$(VENV)/bin/mypy pipeline stages cli

synth: $(STAMP)
	$(CLI) synth $(DEMO_DATA) --classes $(DEMO_CLASSES) --train-per-class $(DEMO_TRAIN) --val-per-class $(DEMO_VAL) --seed $(SEED)

prepare: shard-train shard-val pca

shard-train: $(STAMP) $(if $(IMAGENET),,synth)
	$(CLI) shard $(DATA) $(TRAIN_SHARDS) --split train --short-side $(SHORT_SIDE) --shard-size $(SHARD_SIZE) \
		--seed $(SEED) $(CAP_ARGS) \
		$(if $(PER_CLASS),--per-class $(PER_CLASS))

shard-val: $(STAMP) $(if $(IMAGENET),,synth)
	$(CLI) shard $(DATA) $(VAL_SHARDS) --split val --short-side $(SHORT_SIDE) --shard-size $(SHARD_SIZE) \
		--seed $(SEED) $(CAP_ARGS)

pca: shard-train
	$(CLI) pca-stats $(TRAIN_SHARDS) $(PCA_OUT)

train: prepare
	$(CLI) train --train $(TRAIN_SHARDS) --val $(VAL_SHARDS) --pca $(PCA_JSON) --out $(RUN_DIR) \
		--devices $(DEVICES) $(RECIPE_ARGS) $(TRAIN_ARGS)

eval: train
	$(CLI) eval $(RUN_DIR) --val $(VAL_SHARDS) --out $(EVAL_DIR) --devices $(DEVICES) $(EVAL_ARGS)
	$(REPORT)

report: $(STAMP)
	$(REPORT)

ablations: prepare
	$(CLI) ablate --train $(TRAIN_SHARDS) --val $(VAL_SHARDS) --pca $(PCA_JSON) \
		--out $(ABLATION_DIR) --devices $(DEVICES) --recipe $(RECIPE) --seeds $(ABLATION_SEEDS) \
		--variants $(ABLATION_VARIANTS) --threshold $(ABLATION_THRESHOLD) \
		$(if $(ABLATION_EPOCHS),--epochs $(ABLATION_EPOCHS)) $(ABLATION_ARGS)

figure1: $(STAMP)
	$(CLI) figure1 $(CIFAR) --out $(FIGURE1_DIR) --devices $(DEVICES) $(FIGURE1_ARGS)

preview: pca
	$(CLI) preview $(TRAIN_SHARDS) --pca $(PCA_JSON) --out $(WORK)/preview.png --seed $(SEED) \
		--crop $$($(CLI) recipe $(RECIPE) --get model.crop)

cluster-prepare: $(STAMP)
	$(CLUSTER_ENV) DATA=$(abspath $(DATA)) cluster/submit.sh prepare

cluster-train: $(STAMP)
	$(CLUSTER_ENV) TRAIN_ARGS="$(RECIPE_ARGS) $(TRAIN_ARGS)" \
		EVAL_ARGS="$(EVAL_ARGS)" cluster/submit.sh train eval

cluster-ablations: $(STAMP)
	$(CLUSTER_ENV) ABLATION_ARGS="--recipe $(RECIPE) --seeds $(ABLATION_SEEDS) --variants $(ABLATION_VARIANTS) \
		--threshold $(ABLATION_THRESHOLD) $(if $(ABLATION_EPOCHS),--epochs $(ABLATION_EPOCHS)) $(ABLATION_ARGS)" \
		cluster/submit.sh ablations

status: $(STAMP)
	$(CLI) status $(WORK)

tensorboard: $(STAMP)
	$(VENV)/bin/tensorboard --logdir $(WORK) --port $(TENSORBOARD_PORT) --host $(TENSORBOARD_HOST)

bench: $(STAMP)
	$(PY) bench/shard.py
	$(PY) bench/pca.py
	$(PY) bench/loader.py
	$(PY) bench/train.py
	$(PY) bench/events.py

clean:
	rm -rf $(WORK)
