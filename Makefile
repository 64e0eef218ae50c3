# The two set-up commands of the README. Both create .venv when it is missing and
# (re)install the project into it whenever pyproject.toml changes.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.unetseg-installed

.PHONY: demo test test-browser test-slurm install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The main job on the embedded default: train a U-Net on the synthetic 10-class dataset
# (generated under shards/synthetic on first use), print the final val mIoU, then write
# the run's HTML report and print its path.
demo: $(STAMP)
	@run=runs/demo-$$(date +%Y%m%d-%H%M%S); \
	$(BIN)/python -m unetseg.train --output-dir $$run && $(BIN)/python -m unetseg report $$run

# Two test files at a time (pytest-xdist; each file's module fixtures stay in one worker):
# most tests wait on single-threaded training subprocesses, so on 2 cores this takes about
# 0.6 of a serial run (docs/benchmarks.md). TEST_JOBS=1 runs them one by one.
TEST_JOBS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest $(if $(filter-out 1,$(TEST_JOBS)),-n $(TEST_JOBS) --dist loadfile)

# The report page in a real headless browser: installs Debian's chromium (apt, as root or
# with sudo) and playwright, then runs the tests marked browser (make test skips them
# when these are missing).
test-browser: $(STAMP)
	command -v chromium >/dev/null || $$( [ "$$(id -u)" = 0 ] || echo sudo ) sh -c 'apt-get update -q && apt-get install -y -q chromium'
	$(BIN)/python -m pip install --quiet -e '.[dev,browser]'
	$(BIN)/python -m pytest -m browser

# SLURM preemption for real: installs Debian's slurm-wlm and munge (apt, as root: the
# one-host cluster the test writes runs jobs as root), then runs the tests marked slurm
# (make test leaves them out: see addopts in pyproject.toml).
test-slurm: $(STAMP)
	command -v slurmctld >/dev/null || sh -c 'apt-get update -q && apt-get install -y -q slurm-wlm munge'
	$(BIN)/python -m pytest -m slurm

clean:
	rm -rf $(VENV) shards/synthetic .pytest_cache
