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

# The main job on the embedded default: train a U-Net on the synthetic 10-class dataset
# (generated under shards/synthetic on first use) and print the final val mIoU.
demo: $(STAMP)
	$(BIN)/python -m unetseg.train

test: $(STAMP)
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) shards/synthetic .pytest_cache
