#!/usr/bin/env bash
# The GPU checks, as one script: what a session with a GPU machine runs (from the source tree, no install):
#
#   PYTHONPATH=. bench/gpu.sh [OUT]        OUT: where logs and figures go [${OUT:-/tmp/gpu-check}]
#
#   0. which Python modules are missing (torch, torchvision, typer, rich, numpy, PIL, nvidia.dali): install the
#      missing wheels first (pip install --no-deps)
#   1. the CLI prepares a generated data set (synth → shard → pca-stats)
#   2. loader: the DALI train pipeline decoding with device="mixed" on cuda:0 vs the torch reference, on those shards
#   3. train step of the paper model at batch 128 on cuda:0: fp32, bf16, bf16 + channels-last + torch.compile
#   4. the CLI trains and evaluates on the GPU: CUDA training through the same code path as on the CPU, with the
#      share of time waiting on data in metrics.jsonl; two-tower placement on cuda:0,cuda:1 when there are two GPUs
#
# Every step writes OUT/<step>.log; a failed step is reported and the next one still runs. Set PY (python3) and
# ALEXNET_PIPE (the CLI: default `python -m cli.main`) for other set-ups; QUICK=1 shrinks everything (a dry run).
set -uo pipefail
OUT=${1:-${OUT:-/tmp/gpu-check}}
PY=${PY:-$(command -v python3 || command -v python)}
CLI=${ALEXNET_PIPE:-$PY -m cli.main}
DEV=${DEVICE:-cuda:0}
QUICK=${QUICK:-0}
mkdir -p "$OUT"
failed=0

step() {  # step NAME COMMAND...: run, log, keep going
    local name=$1
    shift
    echo "== $name: $*" | tee "$OUT/$name.log"
    local started=$SECONDS
    if "$@" >>"$OUT/$name.log" 2>&1; then
        echo "== $name: ok in $((SECONDS - started)) s"
    else
        echo "== $name: FAILED (rc $?) after $((SECONDS - started)) s; tail of $OUT/$name.log:"
        tail -n 15 "$OUT/$name.log"
        failed=$((failed + 1))
    fi
    grep -v '^{' "$OUT/$name.log" | tail -n 8
}

$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])" | tee "$OUT/device.txt"
ngpu=$($PY -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
$PY - <<'PY' | tee -a "$OUT/device.txt"
import importlib
missing = []
for name in ("torch", "torchvision", "typer", "rich", "numpy", "PIL", "nvidia.dali"):
    try:
        importlib.import_module(name)
    except Exception as e:  # noqa: BLE001 - report whatever stops the import
        missing.append(f"{name} ({type(e).__name__}: {e})")
print("missing modules: " + ("; ".join(missing) if missing else "none"))
PY
$PY -m pipeline.record | tee "$OUT/run_record.json"  # the run record every train run and eval writes

if [ "$QUICK" = 1 ]; then
    SECS=2 STEPS=2 BATCH=8 CLASSES=3 PER_CLASS=8 EPOCHS=1 WIDTH=0.25
else
    SECS=20 STEPS=20 BATCH=128 CLASSES=100 PER_CLASS=100 EPOCHS=2 WIDTH=1.0
fi

W=$OUT/work
step synth $CLI synth "$W/data" --classes "$CLASSES" --train-per-class "$PER_CLASS" --val-per-class 10
step shard-train $CLI shard "$W/data" "$W/shards/train" --split train --shard-size 500
step shard-val $CLI shard "$W/data" "$W/shards/val" --split val --shard-size 500
step pca $CLI pca-stats "$W/shards/train" "$W/pca"

step loader "$PY" bench/loader.py --shards "$W/shards/train" --device "$DEV" --threads 8 --batch-size "$BATCH" \
    --seconds "$SECS"
step train-fp32 "$PY" bench/train.py --device "$DEV" --batch "$BATCH" --steps "$STEPS" --warmup 3
step train-bf16 "$PY" bench/train.py --device "$DEV" --batch "$BATCH" --steps "$STEPS" --warmup 3 --amp
step train-bf16-cl-compile "$PY" bench/train.py --device "$DEV" --batch "$BATCH" --steps "$STEPS" --warmup 5 \
    --amp --channels-last --compile

common=(--train "$W/shards/train" --val "$W/shards/val" --pca "$W/pca/pca.json" --epochs "$EPOCHS"
        --batch-size "$BATCH" --width "$WIDTH" --loader-threads 8 --log-every 5)
step train-cuda $CLI train "${common[@]}" --out "$W/runs/one" --devices "$DEV" --amp --channels-last
step eval-cuda $CLI eval "$W/runs/one" --val "$W/shards/val" --out "$W/eval/one" --devices "$DEV"
if [ "$ngpu" -ge 2 ]; then
    step train-two-gpus $CLI train "${common[@]}" --out "$W/runs/two" --devices cuda:0,cuda:1 --amp
fi
for run in "$W"/runs/*/; do
    [ -f "$run/metrics.jsonl" ] || continue
    $PY - "$run" <<'PY' | tee -a "$OUT/summary.txt"
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1] + "metrics.jsonl") if '"images_per_s"' in line]
steady = rows[len(rows) // 2:] or rows
print(f"{sys.argv[1]}: median {statistics.median(r['images_per_s'] for r in steady):.0f} images/s, "
      f"waiting on data {statistics.median(r['data_wait'] for r in steady):.1%} (second half of the logged steps)")
PY
done
echo "gpu checks: $failed step(s) failed; logs in $OUT"
exit $((failed > 0))
