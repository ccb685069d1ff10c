#!/usr/bin/env bash
# The issue-14 sweep's missing cells on a CUDA machine with no network, after gpu_check.sh, in
# whatever time is left (parallel shards, each its own work directory, all on the one GPU):
#   bash benchmarks/gpu_sweep.sh OUTDIR SECONDS
# Shards (the sixth session's): the class-balanced loss (`medfm:class_weight=balanced`) in every
# cell of the issue-14 sweep, today's `medfm` (no early stop) where it differs from the rows the
# fifth session left (PneumoniaMNIST-28 at 30% and 100%: its 300-step cells cannot stop early,
# so their `medfm:patience=12` rows are today's training), and `medfm-v1` at BreastMNIST 100%.
# (Earlier sessions' shards are in git history.)
# Needs .gpu-bundle/ (benchmarks/gpu_bundle.sh). Each run is written to its shard's registry as
# it ends, so a shard stopped at the deadline keeps every finished run; the registries and logs
# come back as OUTDIR/sweep.tgz. Read them here with
#   python benchmarks/finetune_sweep.py --import-from DIR/w-*/ --workdir W --summary-only ...
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${1:?OUTDIR}
BUDGET=${2:?SECONDS}
BUNDLE=${MEDFM_GPU_BUNDLE:-.gpu-bundle}
PY=${PY:-python3}
if [ "$BUDGET" -lt 60 ]; then echo "gpu_sweep: only ${BUDGET}s left; nothing run"; exit 0; fi
WORK=$(mktemp -d /tmp/medfm-gpu-sweep.XXXX)
$PY -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" \
    "$BUNDLE"/wheels/*.whl || exit 2
export PYTHONPATH=$PWD:$WORK/site MEDFM_DATA_ROOT=$PWD/$BUNDLE/data MEDFM_OFFLINE=1 \
       MEDFM_CACHE=$WORK/cache MEDFM_NPY_CACHE=$WORK/npy PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
LIMIT=$((BUDGET - 20))
shard() {  # shard NAME ARGS...: a sweep in its own work directory, stopped at the deadline
    local name=$1
    shift
    timeout --kill-after=5 "$LIMIT" $PY benchmarks/finetune_sweep.py --device cuda \
        --workdir "$WORK/$name" "$@" > "$WORK/$name.log" 2>&1 &
}
B="medfm:class_weight=balanced"
for seed in 0 1 2; do  # PneumoniaMNIST at 100%: 2,220 steps per run, one shard per run
    shard "w-p28-1.0-s$seed-bal" --sets pneumoniamnist:28 --fractions 1.0 --seeds $seed \
        --variants "$B"
    shard "w-p28-1.0-s$seed" --sets pneumoniamnist:28 --fractions 1.0 --seeds $seed \
        --variants "medfm"
    shard "w-p28-0.3-s$seed" --sets pneumoniamnist:28 --fractions 0.3 --seeds $seed \
        --variants "$B;medfm"
done
for set in breastmnist:28 breastmnist:64; do  # 300-step runs; the 1% cells first
    shard "w-${set/:/}-small-bal" --sets $set --fractions 0.01,0.1 --variants "$B"
    shard "w-${set/:/}-large-bal" --sets $set --fractions 0.3,1.0 --variants "$B"
    shard "w-${set/:/}-1.0" --sets $set --fractions 1.0 --variants "medfm-v1;medfm"
done
shard w-p28-small-bal --sets pneumoniamnist:28 --fractions 0.01,0.1 --variants "$B"
echo "gpu_sweep: shards running, ${LIMIT}s"
wait
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader > "$WORK/gpu.txt" 2>&1
(cd "$WORK" && tar czf "$OUTDIR/sweep.tgz" gpu.txt w-*.log w-*/registry.sqlite*)
tail -n 3 "$WORK"/w-*.log
rm -rf "$WORK"
