# The default layout of a WORK folder, defined once: the Makefile includes this file and `alexnet-pipe status`
# reads it (pipeline/status.py), so both name the same folders. Paths are relative to WORK.
DEMO_DATA_DIR    = demo-data
TRAIN_SHARDS_DIR = shards/train
VAL_SHARDS_DIR   = shards/val
PCA_DIR          = pca
RUNS_DIR         = runs
EVALS_DIR        = eval
ABLATIONS_DIR    = ablations
