# medfm: `make demo` runs the main job, `make test` the whole suite. Both create .venv if absent.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.medfm-installed
# default data root: the BreastMNIST-28 file shipped with the repository (data/medmnist/README.md)
export MEDFM_DATA_ROOT ?= data/medmnist
DEMO_WORKDIR ?= medfm-work/demo

.PHONY: install test demo lint bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,dist]'
	$(PY) -m pip install -q -c constraints.txt --no-deps medmnistc==0.1.0
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check medfm tests benchmarks

MEDFM := $(VENV)/bin/medfm
DEMO := --workdir $(DEMO_WORKDIR)
LITE0 := --dataset breastmnist --size 28 --backbone tf_efficientnet_lite0.in1k

demo: $(STAMP)
	@echo "== 1. extract: BreastMNIST through the ImageNet EfficientNet-Lite0 (offline weights)"
	$(MEDFM) extract $(DEMO) $(LITE0)
	$(MEDFM) stores $(DEMO)
	@echo "== 2. probe: logistic regression on the cached features, 3 fractions x 3 seeds"
	$(MEDFM) probe $(DEMO) --dataset breastmnist --fractions 0.1,0.3,1.0 --seeds 0,1,2 --quiet
	@echo "== 3. finetune: a short end-to-end run (64 px input, 4 epochs of batch 16) on the same subsets"
	$(MEDFM) finetune $(DEMO) $(LITE0) --fractions 0.1,1.0 --epochs 4 --batch-size 16 --input-size 64 --quiet
	@echo "== 4. probe and fine-tune side by side"
	$(MEDFM) results $(DEMO) --dataset breastmnist
	@echo "== 5. a tiny grid (logreg, kNN, fine-tune at 64 px), then the report"
	$(MEDFM) grid examples/grid_demo.yaml $(DEMO) --quiet
	$(MEDFM) report $(DEMO)

bench: $(STAMP)
	$(PY) benchmarks/extract_bench.py

clean:
	rm -rf medfm-work .pytest_cache
