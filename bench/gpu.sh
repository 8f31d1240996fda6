#!/usr/bin/env bash
# The GPU check in one prepared run: what a session with a GPU machine runs (from the source tree, no install).
#
#   bench/gpu.sh [OUT]      OUT: where the three result files go [${OUT:-/tmp/gpu-check-out}]
#
# Works in a fresh folder under /tmp (never under OUT: only 8 files of 16 MiB come back from a GPU machine's $OUT)
# and leaves exactly three files in OUT: summary.json, summary.md and logs.tar.gz (every step's log, the runs'
# metrics.jsonl, eval.json; ≤ 16 MiB). Runs from the repository root whatever the current folder. Measures, each
# side by side in the same run:
#   1. the run record: versions, GPU name, driver, commit (written with the summary)
#   2. loaders: DALI `mixed` train augmentation and 10-crop vs DALI on all CPU cores and the torch reference
#      DataLoader; the largest pixel difference between GPU- and CPU-decoded batches of the same samples
#   3. the training step at batch 128 of the paper model: fp32 (TF32 off), TF32, bf16, bf16 + channels-last +
#      torch.compile (compiled: the two-tower model only); the two-tower model vs the grouped one and torchvision's
#   4. the CLI end to end on DEVICE for a few hundred steps on generated 256-pixel data: images/s, data_wait, mfu
#      from metrics.jsonl; eval with 10-crop, images/s
#   5. the data_wait figure itself: a loader a quarter of a step long reads ~0 on a GPU (queued steps), 3 steps ~2/3
#   6. with two GPUs: cuda:0,cuda:1 placement equal to one device; two NCCL ranks (torchrun)
#   7. whether the paper recipe starts learning at full width: bf16 steps on 1,000 generated classes, paper init and
#      default init side by side: the first step 0.5 below ln(C)
# DALI comes from DALI_SITE (default /tmp/gpu-bundle/site, what tools/gpu-bundle.sh install leaves) when present;
# without an importable DALI the loader steps are skipped and the CLI runs with --loader torch, so the CUDA training
# and eval paths still run. A failed step is reported and the next one runs; once BUDGET seconds (225) are spent the
# remaining steps are skipped, so that the summary is always written. QUICK=1 DEVICE=cpu is the dry run (tiny sizes,
# no compile, the two-tower model only); PY picks the Python.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=$(mkdir -p "${1:-${OUT:-/tmp/gpu-check-out}}" && cd "${1:-${OUT:-/tmp/gpu-check-out}}" && pwd)
PY=${PY:-$(command -v python3 || command -v python)}
DEV=${DEVICE:-cuda:0}
QUICK=${QUICK:-0}
DALI_SITE=${DALI_SITE:-/tmp/gpu-bundle/site}
[ -d "$DALI_SITE" ] && PYTHONPATH="$DALI_SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
W=$(mktemp -d /tmp/gpu-check.XXXXXX)
mkdir -p "$W/logs"
CLI=("$PY" -m cli.main)
CPUS=$(nproc)

BUDGET=${BUDGET:-225}  # seconds for all steps: the summary must be written before the device call's timeout

step() {  # step NAME COMMAND...: run within what is left of BUDGET, log, record status; keep going on failure
    local name=$1 started=$SECONDS rc=0 limit=$((BUDGET - SECONDS))
    shift
    [ $limit -gt "${STEP_LIMIT:-240}" ] && limit=${STEP_LIMIT:-240}
    if [ $limit -lt 5 ]; then
        echo "SKIPPED 0 out-of-time" >"$W/logs/$name.status"
        echo "== $name: SKIPPED (the ${BUDGET} s budget is spent)"
        return
    fi
    echo "== $name: $*" | tee "$W/logs/$name.log"
    timeout "$limit" "$@" >>"$W/logs/$name.log" 2>&1 || rc=$?
    local took=$((SECONDS - started))
    if [ $rc = 0 ]; then
        echo "ok $took" >"$W/logs/$name.status"
        echo "== $name: ok in $took s"
    else
        echo "FAILED $took rc=$rc" >"$W/logs/$name.status"
        echo "== $name: FAILED (rc $rc) after $took s; tail of its log:"
        tail -n 12 "$W/logs/$name.log"
    fi
}

if [ "$QUICK" = 1 ]; then
    CLASSES=4 PER_CLASS=16 VAL=4 SECS=1 ROUNDS=1 BATCH=8 STEPS=2 WARMUP=1 WIDTH=0.125
    TRAIN_STEPS=4 LEARN_SECS=0.5 MODELS=two-tower VARIANTS=(fp32)
else
    CLASSES=100 PER_CLASS=40 VAL=10 LEARN_CLASSES=1000 LEARN_PER=3 SECS=4 ROUNDS=2 BATCH=128 STEPS=12 WARMUP=5
    WIDTH=1.0 TRAIN_STEPS=300 LEARN_SECS=20 MODELS=two-tower,grouped,torchvision
    VARIANTS=(bf16-cl-compile bf16 tf32 fp32-no-tf32)  # the goal's figure first
fi

LOADER=dali
dali_error=$("$PY" -c "import nvidia.dali" 2>&1 | tail -n 1)
if [ -n "$dali_error" ]; then
    LOADER=torch
    echo "== DALI is not importable ($dali_error): skipping the DALI loader steps; the CLI runs with --loader torch" \
         "(install DALI with tools/gpu-bundle.sh, see docs/gpu-check.md)" | tee "$W/logs/dali.log"
fi

# data: the CLI's own stages on generated 256-pixel sets, the two synth runs side by side
D=$W/data
step synth-e2e "${CLI[@]}" synth "$D/e2e" --classes $CLASSES --train-per-class $PER_CLASS --val-per-class $VAL &
LEARN=$W/shards/train  # the dry run asks the learning question of the e2e set
if [ "$QUICK" != 1 ]; then
    LEARN=$W/shards/learn
    step synth-learn "${CLI[@]}" synth "$D/learn" --classes $LEARN_CLASSES --train-per-class $LEARN_PER \
        --val-per-class 1 &
fi
wait
step shard "${CLI[@]}" shard "$D/e2e" "$W/shards/train" --split train --shard-size 500 --workers "$CPUS"
step shard-val "${CLI[@]}" shard "$D/e2e" "$W/shards/val" --split val --shard-size 500 --workers "$CPUS"
[ "$QUICK" != 1 ] && step shard-learn "${CLI[@]}" shard "$D/learn" "$LEARN" --split train --shard-size 500 \
    --workers "$CPUS"
step pca "${CLI[@]}" pca-stats "$W/shards/train" "$W/pca" --workers "$CPUS"
PCA=$W/pca/pca.json

if [ $LOADER = dali ]; then
    loader_args=(--seconds $SECS --rounds $ROUNDS --batch-size $BATCH --repeat 4)
    for kind in train ten-crop; do
        shards=$W/shards/train flags=()
        [ $kind = ten-crop ] && shards=$W/shards/val flags=(--ten-crop)
        step "loader-$kind-gpu" "$PY" bench/loader.py --shards "$shards" --device "$DEV" --threads "$CPUS" \
            "${loader_args[@]}" "${flags[@]}"
        if [ "$DEV" != cpu ]; then  # DALI on every CPU core beside it (on a CPU the step above is that already)
            step "loader-$kind-cpu" "$PY" bench/loader.py --shards "$shards" --device cpu --threads "$CPUS" \
                "${loader_args[@]}" "${flags[@]}"
        fi
    done
    [ "$DEV" != cpu ] && step pixels "$PY" bench/gpu_check.py pixels --val "$W/shards/val" --pca "$PCA" --device "$DEV"
fi

for variant in "${VARIANTS[@]}"; do
    case $variant in
        fp32) flags=() ;;
        fp32-no-tf32) flags=(--no-tf32) ;;
        tf32) flags=(--tf32) ;;
        bf16) flags=(--amp) ;;
        bf16-cl-compile) flags=(--amp --channels-last --compile) ;;
    esac
    models=$MODELS
    [ "$variant" = bf16-cl-compile ] && models=two-tower  # compile only ours: it costs about a minute a model
    step "train-step-$variant" "$PY" bench/train.py --device "$DEV" --batch $BATCH --steps $STEPS --warmup $WARMUP \
        --width $WIDTH --models "$models" "${flags[@]}"
done

common=(--train "$W/shards/train" --val "$W/shards/val" --pca "$PCA" --epochs 1000 --max-steps $TRAIN_STEPS
        --batch-size $BATCH --width $WIDTH --loader $LOADER --loader-threads "$CPUS" --log-every 10
        --checkpoint-every 100000 --keep-checkpoints 1)
fast=(--amp --channels-last)
[ "$DEV" = cpu ] && fast=()  # bf16 on a small CPU is slower than fp32
step cli-train "${CLI[@]}" train "${common[@]}" --out "$W/runs/one-gpu" --devices "$DEV" "${fast[@]}"
step cli-eval "${CLI[@]}" eval "$W/runs/one-gpu" --val "$W/shards/val" --out "$W/eval/one-gpu" --devices "$DEV" \
    --loader $LOADER
[ "$DEV" != cpu ] && step clock "$PY" bench/gpu_check.py clock --device "$DEV"  # the CPU's: tests/test_speed.py
ngpu=0
[ "$DEV" != cpu ] && ngpu=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [ "$ngpu" -ge 2 ]; then
    step placement "$PY" bench/gpu_check.py placement --devices cuda:0,cuda:1
    step cli-train-nccl "$PY" -m torch.distributed.run --standalone --nproc_per_node=2 -m cli.main train \
        "${common[@]}" --out "$W/runs/nccl" --devices auto "${fast[@]}"
fi
step learning "$PY" bench/gpu_check.py learning --shards "$LEARN" --pca "$PCA" --device "$DEV" \
    --seconds $LEARN_SECS --width $WIDTH --loader $LOADER $([ "$QUICK" = 1 ] && echo --batch-size $BATCH)

"$PY" bench/gpu_check.py summary "$W" "$OUT" >"$W/logs/summary.log" 2>&1 || tail -n 20 "$W/logs/summary.log"
tar -czf "$OUT/logs.tar.gz" -C "$W" logs $(cd "$W" && ls runs/*/metrics.jsonl runs/*/_stage.json eval/*/eval.json \
    2>/dev/null)
if [ "$(stat -c %s "$OUT/logs.tar.gz")" -gt $((16 * 1024 * 1024)) ]; then  # never: logs are small; but keep 16 MiB
    tar -czf "$OUT/logs.tar.gz" -C "$W" logs/summary.log
fi
cat "$OUT/summary.md"
failed=$(grep -l FAILED "$W"/logs/*.status 2>/dev/null | wc -l)
skipped=$(grep -l SKIPPED "$W"/logs/*.status 2>/dev/null | wc -l)
[ "${KEEP_WORK:-0}" = 1 ] || rm -rf "$W"
echo "gpu check: $failed step(s) failed, $skipped skipped for time, in $SECONDS s; results in $OUT" \
     "(summary.json, summary.md, logs.tar.gz)"
exit $((failed > 0))
