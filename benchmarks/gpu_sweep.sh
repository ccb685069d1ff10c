#!/usr/bin/env bash
# The issue-14 sweep's missing cells on a CUDA machine with no network, after gpu_check.sh, in
# whatever time is left (parallel shards, each its own work directory, all on the one GPU):
#   bash benchmarks/gpu_sweep.sh OUTDIR SECONDS
# Shards: the cells the fifth session's GPU runs left open (docs/reproduction.md), `medfm-v1`
# against today's `medfm` on the same device: PneumoniaMNIST-28 at 100% and 30% (one shard per
# seed and fraction) and BreastMNIST-28/64 at 100%. (That session's shards, medfm vs backbone lr
# 3e-3 in every cell, are in its git history.)
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
       MEDFM_CACHE=$WORK/cache MEDFM_NPY_CACHE=$WORK/npy PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
LIMIT=$((BUDGET - 20))
shard() {  # shard NAME ARGS...: a sweep in its own work directory, stopped at the deadline
    local name=$1
    shift
    timeout --kill-after=5 "$LIMIT" $PY benchmarks/finetune_sweep.py --device cuda \
        --workdir "$WORK/$name" "$@" > "$WORK/$name.log" 2>&1 &
}
for seed in 0 1 2; do
    for fraction in 1.0 0.3; do
        shard "w-p28-$fraction-s$seed" --sets pneumoniamnist:28 --fractions $fraction \
            --seeds $seed --variants "medfm-v1;medfm"
    done
done
shard w-b28 --sets breastmnist:28 --fractions 1.0 --variants "medfm-v1;medfm"
shard w-b64 --sets breastmnist:64 --fractions 1.0 --variants "medfm-v1;medfm"
echo "gpu_sweep: shards running, ${LIMIT}s"
wait
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader > "$WORK/gpu.txt" 2>&1
(cd "$WORK" && tar czf "$OUTDIR/sweep.tgz" gpu.txt w-*.log w-*/registry.sqlite*)
tail -n 3 "$WORK"/w-*.log
rm -rf "$WORK"
