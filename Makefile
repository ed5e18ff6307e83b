# The two commands a newcomer runs: `make demo` and `make test`.
# Every install comes from the lock (requirements-dev.txt and friends, written by
# `make lock`; see docs/dependencies.md).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
STAMP := $(VENV)/.installed-stamp
# Where PyTorch's CPU build (locked as torch==...+cpu, not on PyPI) comes from: the
# machine's wheel folder when it has one, else PyTorch's CPU index (scripts/lock.py).
TORCH_SOURCE ?= $(if $(wildcard /opt/wheels/torch-*.whl),--find-links /opt/wheels,\
	--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match)
SCENARIO ?= anomaly
DEVICES ?= 10
WORKSPACE := -e . -e ./update_format -e ./edge -e ./training_image -e ./devstack
PYPROJECTS := pyproject.toml update_format/pyproject.toml edge/pyproject.toml \
	training_image/pyproject.toml devstack/pyproject.toml
# Typed packages `make lint` checks with mypy (each part's own folder).
TYPED := -p chalicelib -p mledge_ops -p mledge_update -p mledge_edge -p trainer -p trainer_batch \
	-p mledge_devstack -p app

.PHONY: test test-fast demo lint env lock system-deps clean bench stack

# uv comes from a hashed pin (requirements/bootstrap.txt); `uv pip sync` then makes the
# venv hold exactly the locked distributions (it removes anything else), and the five
# workspace packages are installed editable without their dependencies.
$(STAMP): requirements-dev.txt requirements/bootstrap.txt $(PYPROJECTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --require-hashes \
		-r requirements/bootstrap.txt
	$(UV) pip sync -q --python $(PY) --require-hashes $(TORCH_SOURCE) requirements-dev.txt
	$(UV) pip install -q --python $(PY) --no-deps --no-build-isolation $(WORKSPACE)
	touch $(STAMP)

env: $(STAMP)

# Re-resolve after changing a pyproject's dependencies: `make lock`;
# move everything to the newest allowed versions: `make lock ARGS=--upgrade`.
lock: env
	$(PY) scripts/lock.py $(ARGS)

system-deps:
	bash scripts/ensure-system-deps.sh

lint: env
	$(PY) -m ruff check .
	$(PY) -m mypy $(TYPED)
	$(VENV)/bin/lint-imports  # layering and no import cycles: [tool.importlinter] in pyproject.toml

# The whole suite in two runs: everything that does not start the local stack on two
# workers, then the stack and end-to-end tests one at a time (they time real devices and
# would only compete with each other for the CPU).
test: env system-deps lint
	$(PY) -m pytest -q -m "not stack" -n 2
	$(PY) -m pytest -q -m stack

# Everything but the tests that start the local stack (moto server over HTTP, the whole
# stack, the end-to-end demo), on two workers.
test-fast: env system-deps
	$(PY) -m pytest -q -m "not stack" -n 2

demo: env system-deps
	$(PY) -m mledge_devstack.demo --scenario $(SCENARIO) --devices $(DEVICES)

bench: env
	$(PY) bench/ingest.py
	$(PY) bench/delta.py
	$(PY) bench/train.py
	$(PY) bench/data.py --sizes 1000000

clean:
	rm -rf $(VENV) demo-output .devstack .pytest_cache .ruff_cache .mypy_cache

stack: env system-deps  # the local stack in the foreground (Ctrl-C stops it); see docs/local-stack.md
	$(PY) -m mledge_devstack up
