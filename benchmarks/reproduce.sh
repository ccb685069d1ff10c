#!/usr/bin/env bash
# Issue 4, item 7: the reproduction runs written up in docs/reproduction.md.
#   MEDFM_DATA_ROOT=../shared/data/medmnist bash benchmarks/reproduce.sh [breast|pneumonia|lite0]...
# Results land in the registry of $WORKDIR (default medfm-work/repro); every step skips what is
# already there, so the script can be stopped and rerun at any point. V2_EPOCHS=20 shortens the
# medmnist-v2 schedule (lr drops stay at 50% and 75% of it), as the PneumoniaMNIST run on the
# 2-core CPU did; `python benchmarks/repro_table.py pneumoniamnist` prints its table.
set -euo pipefail
cd "$(dirname "$0")/.."
MEDFM=${MEDFM:-.venv/bin/medfm}
W="--workdir ${WORKDIR:-medfm-work/repro}"
for part in "${@:-lite0 breast}"; do
  for p in $part; do
    case $p in
      lite0)  # pretrained Lite0: cached probe vs end-to-end fine-tune, both at 64 px input
        $MEDFM extract $W --dataset breastmnist --size 28 --backbone tf_efficientnet_lite0.in1k --input-size 64 --quiet
        $MEDFM probe $W --dataset breastmnist --fractions 0.1,1.0 --seeds 0,1,2 --quiet
        $MEDFM finetune $W --dataset breastmnist --size 28 --backbone tf_efficientnet_lite0.in1k \
          --recipe medfm --input-size 64 --fractions 0.1,1.0 --seeds 0 --quiet
        # the same 55 images with batch 16: more optimizer steps than 30 epochs of one batch
        $MEDFM finetune $W --dataset breastmnist --size 28 --backbone tf_efficientnet_lite0.in1k \
          --recipe medfm --input-size 64 --fractions 0.1 --seeds 0 --batch-size 16 --epochs 100 \
          --quiet ;;
      breast|pneumonia)  # MedMNIST v2 protocol: ResNet-18 from scratch, 28 px, 3 seeds
        $MEDFM finetune $W --dataset ${p}mnist --size 28 --backbone resnet18 \
          --recipe medmnist-v2 ${V2_EPOCHS:+--epochs $V2_EPOCHS} --seeds 0,1,2 --quiet ;;
      *) echo "unknown part $p (lite0, breast, pneumonia)" >&2; exit 2 ;;
    esac
  done
done
$MEDFM results $W --format md
