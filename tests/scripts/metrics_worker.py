"""Worker for tests/test_metrics.py: update a ConfusionMatrix with this rank's share of a
saved batch, reduce it over all ranks and write what it saw to JSON.

Run under a launcher (see tests/multiproc.py), for example::

    python -m torch.distributed.run --nproc_per_node 2 tests/scripts/metrics_worker.py \\
        --data data.pt --out results/ --case even=4,3 --case empty=7,0

``--data`` is a ``torch.save``'d dict with ``pred`` (N, H, W) class indices,
``target`` (N, H, W), ``num_classes`` and ``ignore_index``. Each ``--case
NAME=SPLIT`` is evaluated independently; SPLIT is either comma-separated
sample counts per rank (contiguous chunks in rank order, summing to N) or
``sampler`` for the indices a padding ``DistributedSampler`` hands out. Every
rank writes ``OUT/NAME.rank{R}.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data.distributed import DistributedSampler

from unetseg.distributed import get_rank, get_world_size
from unetseg.metrics import ConfusionMatrix


def rank_indices(split: str, num_samples: int, rank: int, world_size: int) -> list[int]:
    if split == "sampler":
        sampler = DistributedSampler(range(num_samples), num_replicas=world_size, rank=rank, shuffle=False)
        return list(sampler)
    sizes = [int(size) for size in split.split(",")]
    if len(sizes) != world_size or sum(sizes) != num_samples:
        raise SystemExit(f"split {split!r} must give one size per rank ({world_size}) summing to {num_samples}")
    start = sum(sizes[:rank])
    return list(range(start, start + sizes[rank]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--case", action="append", required=True, metavar="NAME=SPLIT")
    parser.add_argument("--init", choices=["torch", "accelerate"], default="torch",
                        help="create the process group with torch.distributed or with Accelerate")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=2)
    args = parser.parse_args()

    if args.init == "accelerate":
        from accelerate import PartialState

        PartialState()
    else:
        dist.init_process_group("gloo")
    try:
        data = torch.load(args.data)
        rank, world_size = get_rank(), get_world_size()
        for case in args.case:
            name, split = case.split("=", 1)
            indices = rank_indices(split, data["target"].shape[0], rank, world_size)
            local = ConfusionMatrix(data["num_classes"], ignore_index=data["ignore_index"])
            for start in range(0, len(indices), args.batch_size):
                batch = indices[start : start + args.batch_size]
                local.update(data["pred"][batch], data["target"][batch])
            local_before = local.matrix.tolist()
            reduced = local.reduce()
            reduced_again = local.reduce()  # the local counts must be reduced afresh, not doubled
            reduced_of_reduced = reduced.reduce()  # must not communicate nor double
            record = {
                "rank": rank,
                "world_size": world_size,
                "backend": str(dist.get_backend()),
                "indices": indices,
                "local_matrix": local_before,
                "local_matrix_after_reduce": local.matrix.tolist(),
                "local_num_samples": local.num_samples,
                "matrix": reduced.matrix.tolist(),
                "num_samples": reduced.num_samples,
                "matrix_reduced_again": reduced_again.matrix.tolist(),
                "matrix_reduced_of_reduced": reduced_of_reduced.matrix.tolist(),
                "num_samples_reduced_of_reduced": reduced_of_reduced.num_samples,
                "metrics": reduced.compute().to_dict(),
            }
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"{name}.rank{rank}.json").write_text(json.dumps(record))
    finally:
        # Without this, gloo often aborts while the interpreter shuts down.
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
