# The two set-up commands of the README. Both create .venv when it is missing and
# (re)install the project into it whenever pyproject.toml changes.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.unetseg-installed

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The main job on the embedded default: the synthetic 10-class dataset, generated as
# folders, packed into shards, verified and summarised.
demo: $(STAMP)
	$(BIN)/unetseg synth --format folders --out shards/synthetic-folders --overwrite
	$(BIN)/unetseg pack --images shards/synthetic-folders/images --masks shards/synthetic-folders/masks \
		--classes shards/synthetic-folders/classes.json --out shards/synthetic --overwrite
	$(BIN)/unetseg shards verify shards/synthetic
	$(BIN)/unetseg shards info shards/synthetic

test: $(STAMP)
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) shards/synthetic shards/synthetic-folders .pytest_cache
