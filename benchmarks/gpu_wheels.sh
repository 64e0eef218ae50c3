#!/usr/bin/env bash
# The wheels a lent GPU machine lacks to run unetseg, for its Python, into a git-ignored folder.
#   bash benchmarks/gpu_wheels.sh            # -> .whl/*.whl
# The machine's image (Python 3.12, torch 2.11, torchvision 0.26, accelerate, numpy, pillow,
# pyyaml, safetensors, matplotlib, rich, typer) has no pydantic (nor its pydantic-core,
# annotated-types and typing-inspection), webdataset or braceexpand, and it reaches no
# package registry. The versions are this venv's, so the GPU runs the code tested here
# (pydantic-core must be the one pydantic pins). There, before the GPU scripts:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
# benchmarks/check_imports.py (gpu.sh runs it first) names anything still missing.
# DEST: the folder (default .whl); PYVER: the machine's Python (default 3.12); PYTHON: the
# interpreter whose versions are used (default .venv/bin/python, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${DEST:-.whl}
PYVER=${PYVER:-3.12}
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
PACKAGES=(pydantic pydantic-core annotated-types typing-inspection webdataset braceexpand)

pins=()
for name in "${PACKAGES[@]}"; do
  version=$("$PYTHON" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name") || {
    echo "error: $PYTHON has no $name installed. Fix: make install (or PYTHON=an interpreter with unetseg's dependencies)" >&2
    exit 1
  }
  pins+=("$name==$version")
done
mkdir -p "$DEST"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  "${platforms[@]}" --dest "$DEST" "${pins[@]}"
grep -qx "/$DEST/" .gitignore 2>/dev/null || git check-ignore -q "$DEST" || \
  echo "warning: $DEST is not git-ignored; add /$DEST/ to .gitignore or .git/info/exclude" >&2
echo "wheels in $DEST for Python $PYVER: ${pins[*]} ($(du -sh "$DEST" | cut -f1))"
