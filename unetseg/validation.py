"""Evaluation during training: the validation split scored every ``eval_every`` steps,
every sample once over all ranks, the result logged, and the best model kept in
``best/``. It scores through :func:`unetseg.scoring.confusion_matrix` with the run's own
batch hook, as ``unetseg evaluate`` scores a saved model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from unetseg.runtime import StopFlag
    from unetseg.tracking import Reporter
    from unetseg.train import Run


class Validation:
    """Scores the model on the validation split, every sample once over all ranks, records
    the result and keeps the best model. A stop request cuts the evaluation short (it can
    take minutes, longer than a launcher waits after SIGTERM): then it returns ``None`` on
    every rank and the checkpoint records that it is still due."""

    def __init__(self, run: Run, stop: StopFlag, reporter: Reporter | None = None):
        from unetseg.train_data import eval_loader

        self.run, self.stop = run, stop
        self.reporter = reporter  # where results are logged; the loop sets it once the eval loader exists
        accelerator = run.accelerator
        self.loader = eval_loader(run.config, run.data, accelerator.process_index, accelerator.num_processes)

    def __call__(self) -> dict[str, Any] | None:
        from unetseg.checkpoint import save_model

        run, ts = self.run, self.run.state
        ts.pending_eval = True
        result, examples, bad = self.score()
        if result is None:
            return None
        ts.pending_eval = False
        metrics = result.to_dict()
        improved = metrics["mIoU"] is not None and (ts.best_miou is None or metrics["mIoU"] > ts.best_miou)
        if improved:
            ts.best_miou, ts.best_step = metrics["mIoU"], ts.step
        self.reporter.log_eval(result, examples, bad)
        if improved and run.main:
            save_model(run.run_dir / "best", run.net, run.saved_config, run.data.info)
        return metrics

    def score(self):
        """The reduced metrics (``None`` when cut short), this rank's example pictures, and the
        number of unreadable samples over all ranks."""
        from unetseg.badsamples import StreamStats
        from unetseg.distributed import all_reduce_sum
        from unetseg.runtime import sync_buffers
        from unetseg.scoring import confusion_matrix
        from unetseg.loaders import iterate

        run, accelerator, classes = self.run, self.run.accelerator, self.run.data.classes
        max_bad = run.config.data.max_bad_samples
        sync_buffers(run.net, accelerator.num_processes)
        stats = StreamStats(max_bad)
        cut = [False]

        def batches():
            for batch in iterate(self.loader, stats):
                if self.stop.requested:
                    cut[0] = True
                    return
                yield batch

        keep = run.config.run.log_images if run.main else 0
        cm, examples = confusion_matrix(run.eval_model, batches(), classes.num_classes, classes.ignore_label, classes.names,
                                        accelerator.device, accelerator.autocast, keep=keep, hook=run.hook)
        # Whether any rank cut its share short; the same on every rank, so all take the same path.
        if all_reduce_sum(torch.tensor([float(cut[0])])).item() > 0:
            return None, examples, 0
        result = cm.reduce().compute()
        bad = stats.reduce()
        expected = run.data.val.num_samples
        if run.main and expected is not None and result.num_samples != expected:
            problems = "; ".join(stats.problems()[:3])
            print(f"warning: val mIoU over {result.num_samples} of the split's {expected} samples "
                  f"({bad} could not be read{': ' + problems if problems else ''})", flush=True)
        return result, examples, bad


def eval_model(config, device: torch.device, net: torch.nn.Module, data) -> torch.nn.Module:
    """What validation runs: the model itself, or compiled over batches padded to one shape
    (the split's largest image, or ``eval_resize``, rounded up to the model's own padding
    multiple, so a split of one image size is scored exactly as without compiling)."""
    from unetseg.runtime import compiled
    from unetseg.scoring import compiled_model

    if not compiled(config, device):
        return net
    dc = config.data
    if dc.eval_resize:
        height, width = dc.eval_resize
    else:
        sizes = list(data.val.info.split(dc.val_split).shapes())
        height, width = max(h for h, _ in sizes), max(w for _, w in sizes)
    return compiled_model(net, dc.eval_batch_size or dc.batch_size, height, width)  # one shape inside the graph
