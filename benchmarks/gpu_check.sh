#!/usr/bin/env bash
# Run on a CUDA machine: the test suite, then the extract, probe and fine-tune benchmarks on the GPU.
#   bash benchmarks/gpu_check.sh            (from the repository root)
# Uses .venv if present, else the python on PATH (torch, timm, h5py, scikit-learn expected). If
# medmnist is missing, a wheel in ./wheels/ (pip download --no-deps medmnist -d wheels) is used.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export MEDFM_DATA_ROOT=${MEDFM_DATA_ROOT:-../shared/data/medmnist}
$PY -c "import medmnist" 2>/dev/null || $PY -m pip install -q --no-deps wheels/medmnist-*.whl
$PY -m pip install -q --no-deps -e . 2>/dev/null || export PYTHONPATH=$PWD
$PY -c "import torch; print('cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0))"
$PY -m pytest -q -rs tests 2>&1 | tail -40   # no -x: every failure shows; -rs: why each skipped
$PY benchmarks/extract_bench.py --device cuda
$PY benchmarks/probe_bench.py  # auto, sklearn, torch (on cuda), cuML if installed: each in a fresh process
$PY benchmarks/finetune_bench.py --device cuda
exit 0
