#!/usr/bin/env bash
# Submit the alexnet-pipe DAG to Slurm with its dependencies; print one "NAME JOBID" line per job on stdout.
#
#   cluster/submit.sh STAGE...      STAGE: shard-train shard-val pca-stats train eval ablations, or
#                                   prepare (= shard-train shard-val pca-stats), all (= prepare train eval)
#
#   stage        jobs (cluster/slurm/)                                          waits for (afterok)
#   shard-SPLIT  array shard.sbatch --num-tasks T, then finalize shard.sbatch    -
#   pca-stats    array pca-stats.sbatch --num-tasks T, then reduce              shard-train
#   train        train.sbatch: srun → torchrun on every node                    pca-stats, shard-val
#   eval         eval.sbatch                                                     train
#   ablations    array ablate.sbatch --num-tasks T (the last task writes the table)  pca-stats, shard-val
#
# Stages named in one call are chained to each other. A stage whose upstream was submitted by an earlier call
# waits for that job while it is still queued or running (ids are kept in $WORK/logs/jobs/), so
# `cluster/submit.sh prepare; cluster/submit.sh train` chains like `cluster/submit.sh all`. A dependent job is
# cancelled when its dependency fails (--kill-on-invalid-dep). Then fix the cause and submit again: every stage
# keeps its finished units, so a resubmitted stage redoes only what is missing and an up-to-date one returns at
# once. To resubmit one failed array index alone: ARRAY=IDX with the same task count, e.g.
#   ARRAY=3 SHARD_TRAIN_TASKS=8 cluster/submit.sh shard-train
#
# Environment (defaults in brackets):
#   DATA or IMAGENET     the ImageNet source for the shard stages (official tars or an extracted tree)
#   WORK [./work]        artifacts: shards/{train,val}, pca/, runs/$RUN, eval/$RUN; logs/%x-%A_%a.out
#   ALEXNET_PIPE         the CLI the jobs run [alexnet-pipe on PATH]; must be reachable from the compute nodes
#   NUM_TASKS [8]        array size; per stage: SHARD_TRAIN_TASKS, SHARD_VAL_TASKS, PCA_TASKS, ABLATION_TASKS
#                        [NUM_TASKS]
#   ARRAY                sbatch --array spec for the array stages of this call [0-(tasks-1)]
#   CPUS_PER_TASK [4]    CPUs of each shard / pca-stats job (its --workers)
#   SHARD_SIZE [1000] SEED [0] RUN [demo] DEVICES [auto]
#   NODES [1] GPUS_PER_NODE [2] TRAIN_CPUS [8]   the train job (eval: 1 node, up to 2 GPUs)
#   NPROC_PER_NODE RDZV_PORT TORCHRUN            passed on to train.sbatch (see there)
#   SHARD_ARGS PCA_ARGS TRAIN_ARGS EVAL_ARGS ABLATION_ARGS   extra CLI options, e.g. TRAIN_ARGS="--epochs 30",
#                        ABLATION_ARGS="--recipe paper --seeds 3"
#   PREPARE_SBATCH_ARGS TRAIN_SBATCH_ARGS        extra sbatch options of the CPU / GPU jobs, e.g. "--partition=cpu";
#                                                sbatch's own SBATCH_ACCOUNT, SBATCH_TIMELIMIT, … apply to every job
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SCRIPTS=$HERE/slurm
# The WORK layout, from its one definition (NAME = path lines, as the Makefile includes it)
eval "$(sed -n 's/^\([A-Z_]*\) *= *\(.*\)$/\1="\2"/p' "$HERE/../pipeline/layout.mk")"

die() {
    echo "cluster/submit.sh: $*" >&2
    exit 2
}

[ $# -gt 0 ] || die "usage: cluster/submit.sh STAGE... (shard-train shard-val pca-stats train eval ablations prepare all)"

declare -A WANT=()
for arg in "$@"; do
    case $arg in
        prepare) WANT[shard-train]=1 WANT[shard-val]=1 WANT[pca-stats]=1 ;;
        all) WANT[shard-train]=1 WANT[shard-val]=1 WANT[pca-stats]=1 WANT[train]=1 WANT[eval]=1 ;;
        shard-train | shard-val | pca-stats | train | eval | ablations) WANT[$arg]=1 ;;
        -h | --help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown stage '$arg' (shard-train shard-val pca-stats train eval ablations prepare all)" ;;
    esac
done

command -v sbatch >/dev/null || die "sbatch not found: run this on a Slurm login node"
CLI=${ALEXNET_PIPE:-alexnet-pipe}
if [[ $CLI == */* ]]; then
    CLI=$(realpath -m "$CLI")
fi
command -v "$CLI" >/dev/null || die "the CLI '$CLI' is not there: set ALEXNET_PIPE=/path/to/.venv/bin/alexnet-pipe"
export ALEXNET_PIPE=$CLI # the jobs inherit the environment (sbatch --export=ALL)

WORK=$(realpath -m "${WORK:-./work}")
DATA=${DATA:-${IMAGENET:-}}
if [ -n "$DATA" ]; then
    DATA=$(realpath -m "$DATA")
fi
NUM_TASKS=${NUM_TASKS:-8}
CPUS_PER_TASK=${CPUS_PER_TASK:-4}
SHARD_SIZE=${SHARD_SIZE:-1000}
SEED=${SEED:-0}
RUN=${RUN:-demo}
DEVICES=${DEVICES:-auto}
NODES=${NODES:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-2}
TRAIN_CPUS=${TRAIN_CPUS:-8}
read -r -a SHARD_EXTRA <<<"${SHARD_ARGS:-}"
read -r -a PCA_EXTRA <<<"${PCA_ARGS:-}"
read -r -a TRAIN_EXTRA <<<"${TRAIN_ARGS:-}"
read -r -a EVAL_EXTRA <<<"${EVAL_ARGS:-}"
read -r -a ABLATION_EXTRA <<<"${ABLATION_ARGS:-}"
read -r -a PREPARE_SBATCH <<<"${PREPARE_SBATCH_ARGS:-}"
read -r -a TRAIN_SBATCH <<<"${TRAIN_SBATCH_ARGS:-}"

LOGS=$WORK/logs
mkdir -p "$LOGS/jobs"

declare -A SINK=() # stage → the job whose success means the stage is done (finalize / reduce / train / eval)
LAST=

# submit NAME SBATCH_OPTION... SCRIPT ARG...: sbatch it, print "NAME JOBID", keep the id in LAST.
submit() {
    local name=$1
    shift
    printf '+ sbatch' >&2
    printf ' %q' "$@" >&2
    printf '\n' >&2
    LAST=$(sbatch --parsable --job-name="$name" "$@")
    LAST=${LAST%%;*} # "id;cluster" on a multi-cluster setup
    echo "$name $LAST"
}

# after STAGE...: sets DEP to the afterok options for those upstream stages' jobs still pending or running.
after() {
    local ids=() stage id
    for stage in "$@"; do
        if [ -n "${SINK[$stage]:-}" ]; then
            ids+=("${SINK[$stage]}")
        elif [ -s "$LOGS/jobs/$stage" ]; then
            id=$(<"$LOGS/jobs/$stage")
            if [ -n "$(squeue -h -j "$id" -o %i 2>/dev/null)" ]; then
                ids+=("$id")
            fi
        fi
    done
    DEP=()
    if [ ${#ids[@]} -gt 0 ]; then
        DEP=(--dependency="afterok:$(IFS=:; echo "${ids[*]}")" --kill-on-invalid-dep=yes)
    fi
}

done_by() {
    SINK[$1]=$2
    echo "$2" >"$LOGS/jobs/$1"
}

# array_stage STAGE TASKS SCRIPT UPSTREAM ARG...: the array of task runs, then the plain run (finalize / reduce).
array_stage() {
    local stage=$1 tasks=$2 script=$3 upstream=$4
    shift 4
    [[ $tasks =~ ^[1-9][0-9]*$ ]] || die "$stage: the number of tasks must be a positive integer, got '$tasks'"
    DEP=()
    [ -z "$upstream" ] || after "$upstream"
    local common=(--cpus-per-task="$CPUS_PER_TASK" "${PREPARE_SBATCH[@]}")
    submit "$stage" --array="${ARRAY:-0-$((tasks - 1))}" --output="$LOGS/%x-%A_%a.out" "${DEP[@]}" "${common[@]}" \
        "$SCRIPTS/$script" "$@" --num-tasks "$tasks"
    local array=$LAST
    local final=finalize
    [ "$stage" != pca-stats ] || final=reduce
    submit "$stage-$final" --dependency="afterok:$array" --kill-on-invalid-dep=yes --output="$LOGS/%x-%j.out" \
        "${common[@]}" "$SCRIPTS/$script" "$@"
    done_by "$stage" "$LAST"
}

for split in train val; do
    [ -n "${WANT[shard-$split]:-}" ] || continue
    [ -n "$DATA" ] || die "shard-$split: set DATA (or IMAGENET) to the ImageNet source"
    tasks_var=SHARD_${split^^}_TASKS dir_var=${split^^}_SHARDS_DIR
    array_stage "shard-$split" "${!tasks_var:-$NUM_TASKS}" shard.sbatch "" \
        "$DATA" "$WORK/${!dir_var}" --split "$split" --shard-size "$SHARD_SIZE" --seed "$SEED" "${SHARD_EXTRA[@]}"
done

if [ -n "${WANT[pca-stats]:-}" ]; then
    array_stage pca-stats "${PCA_TASKS:-$NUM_TASKS}" pca-stats.sbatch shard-train \
        "$WORK/$TRAIN_SHARDS_DIR" "$WORK/$PCA_DIR" "${PCA_EXTRA[@]}"
fi

gpu_options() { # gpu_options COUNT: sets GPU to the sbatch options for COUNT GPUs a node (none for 0)
    GPU=()
    [ "$1" -eq 0 ] || GPU=(--gpus-per-node="$1")
}

if [ -n "${WANT[train]:-}" ]; then
    after pca-stats shard-train shard-val
    gpu_options "$GPUS_PER_NODE"
    submit train --nodes="$NODES" --ntasks-per-node=1 --cpus-per-task="$TRAIN_CPUS" "${GPU[@]}" \
        --output="$LOGS/%x-%j.out" "${DEP[@]}" "${TRAIN_SBATCH[@]}" "$SCRIPTS/train.sbatch" \
        --train "$WORK/$TRAIN_SHARDS_DIR" --val "$WORK/$VAL_SHARDS_DIR" --pca "$WORK/$PCA_DIR/pca.json" \
        --out "$WORK/$RUNS_DIR/$RUN" --devices "$DEVICES" "${TRAIN_EXTRA[@]}"
    done_by train "$LAST"
fi

if [ -n "${WANT[eval]:-}" ]; then
    after train shard-val
    gpu_options "$((GPUS_PER_NODE < 2 ? GPUS_PER_NODE : 2))"
    submit eval --nodes=1 --ntasks=1 --cpus-per-task="$TRAIN_CPUS" "${GPU[@]}" --output="$LOGS/%x-%j.out" \
        "${DEP[@]}" "${TRAIN_SBATCH[@]}" "$SCRIPTS/eval.sbatch" \
        "$WORK/$RUNS_DIR/$RUN" --val "$WORK/$VAL_SHARDS_DIR" --out "$WORK/$EVALS_DIR/$RUN" --devices "$DEVICES" \
        "${EVAL_EXTRA[@]}"
    done_by eval "$LAST"
fi

if [ -n "${WANT[ablations]:-}" ]; then
    after pca-stats shard-train shard-val
    tasks=${ABLATION_TASKS:-$NUM_TASKS}
    [[ $tasks =~ ^[1-9][0-9]*$ ]] || die "ablations: the number of tasks must be a positive integer, got '$tasks'"
    gpu_options "$((GPUS_PER_NODE < 2 ? GPUS_PER_NODE : 2))"
    submit ablations --array="${ARRAY:-0-$((tasks - 1))}" --cpus-per-task="$TRAIN_CPUS" "${GPU[@]}" \
        --output="$LOGS/%x-%A_%a.out" "${DEP[@]}" "${TRAIN_SBATCH[@]}" "$SCRIPTS/ablate.sbatch" \
        --train "$WORK/$TRAIN_SHARDS_DIR" --val "$WORK/$VAL_SHARDS_DIR" --pca "$WORK/$PCA_DIR/pca.json" \
        --out "$WORK/$ABLATIONS_DIR" --devices "$DEVICES" --num-tasks "$tasks" "${ABLATION_EXTRA[@]}"
    done_by ablations "$LAST"
fi
