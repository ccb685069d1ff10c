# medfm: `make demo` runs the main job, `make test` the whole suite. Both create .venv if absent.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.medfm-installed
export MEDFM_DATA_ROOT ?= ../shared/data/medmnist
DEMO_WORKDIR ?= medfm-work/demo

.PHONY: install test demo lint bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,dist]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check medfm tests benchmarks

demo: $(STAMP)
	$(VENV)/bin/medfm extract --workdir $(DEMO_WORKDIR) --dataset breastmnist --size 28 \
		--backbone tf_efficientnet_lite0.in1k
	$(VENV)/bin/medfm stores --workdir $(DEMO_WORKDIR)

bench: $(STAMP)
	$(PY) benchmarks/extract_bench.py

clean:
	rm -rf medfm-work .pytest_cache
