"""Check, before a GPU script spends device time, that this Python can import what
unetseg needs; name what is missing and how to bring it.

    python3 benchmarks/check_imports.py            # exit 0, or 1 naming the missing modules

A lent GPU machine runs its image's Python, not this project's venv, and it cannot reach a
package registry: what its image lacks travels as wheels (``benchmarks/gpu_wheels.sh``).
"""

from __future__ import annotations

import importlib.util
import sys

# Import name -> distribution, for every third-party module unetseg's training, evaluation
# and the benchmarks import (wandb is imported only with --tracker wandb).
NEEDED = {
    "torch": "torch", "torchvision": "torchvision", "accelerate": "accelerate", "webdataset": "webdataset",
    "braceexpand": "braceexpand", "numpy": "numpy", "PIL": "pillow", "typer": "typer", "rich": "rich",
    "yaml": "pyyaml", "safetensors": "safetensors", "matplotlib": "matplotlib", "pydantic": "pydantic",
    "pydantic_core": "pydantic-core", "annotated_types": "annotated-types",
}


def missing(modules: dict[str, str] = NEEDED) -> list[str]:
    """The distributions of ``modules`` that this Python cannot find, in order."""
    return [dist for name, dist in modules.items() if importlib.util.find_spec(name) is None]


def main(argv: list[str] | None = None) -> int:
    names = missing({name: name for name in argv} if argv else NEEDED)
    if not names:
        print(f"imports: all {len(argv or NEEDED)} found ({sys.executable}, Python {sys.version.split()[0]})")
        return 0
    print(f"error: {sys.executable} cannot import {', '.join(names)}. Fix: on a machine with pip and a package "
          "registry, `bash benchmarks/gpu_wheels.sh` (wheels into .whl/), carry .whl, and start the command with "
          "`python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && "
          "export PYTHONPATH=/tmp/site`", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
