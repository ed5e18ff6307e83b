# The two commands a newcomer runs: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
SCENARIO ?= anomaly
DEVICES ?= 10

.PHONY: test demo lint env system-deps clean bench

$(STAMP): requirements.txt requirements-dev.txt training_image/requirements.txt edge/requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -e . -e update_format -e edge -e training_image -e devstack
	touch $(STAMP)

env: $(STAMP)

system-deps:
	bash scripts/ensure-system-deps.sh

lint: env
	$(PY) -m ruff check .

test: env system-deps lint
	$(PY) -m pytest -q

demo: env system-deps
	$(PY) -m mledge_devstack.demo --scenario $(SCENARIO) --devices $(DEVICES)

bench: env
	$(PY) bench/ingest.py
	$(PY) bench/delta.py
	$(PY) bench/train.py
	$(PY) bench/data.py --sizes 1000000

clean:
	rm -rf $(VENV) demo-output .devstack .pytest_cache .ruff_cache

.PHONY: stack
stack: env system-deps  # the local stack in the foreground (Ctrl-C stops it); see docs/local-stack.md
	$(PY) -m mledge_devstack up
