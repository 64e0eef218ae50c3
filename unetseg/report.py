"""``unetseg report RUN``: one self-contained HTML page per run (images embedded, no
network, opens from disk), to see what a model does wrong without a notebook or W&B.

The page holds the run's sessions (command, start and end, hardware), its config and
dataset, the training curves (also written as ``<out stem>_curves.png`` beside it), the
per-class table weakest first with the row-normalised confusion matrix, the worst and
the best images of the split by per-image mIoU (image | ground truth | prediction |
errors, with their keys), and what ``unetseg evaluate`` recorded for the run (other
splits, test-time augmentation).

It works on whatever a run has so far: a run still going, a resumed one, or one made
before some file existed. A missing piece is named on the page (with how to get it),
never a traceback. The table, the matrix and the gallery come from scoring the run's
best model (else its final one) on the split; without a model or the data they come
from the run's last evaluation in ``metrics.jsonl`` and the gallery is left out.
"""

from __future__ import annotations

import base64
import html
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from unetseg.errors import UnetsegError
from unetseg.runstate import jsonl_records
from unetseg.tracking import pct

STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{margin-bottom:.2em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0} td,th{border:1px solid #ddd;padding:.25em .6em;text-align:left}
th{background:#f4f4f4} td.num{text-align:right;font-variant-numeric:tabular-nums}
pre{background:#f7f7f7;padding:.8em;overflow-x:auto;font-size:.85em}
.missing{background:#fff6e0;border-left:4px solid #e0a000;padding:.5em 1em;margin:.5em 0}
.swatch{display:inline-block;width:.9em;height:.9em;border:1px solid #888;vertical-align:middle;margin-right:.3em}
figure{margin:.8em 0} figcaption{font-size:.9em;color:#444} img{max-width:100%} figure.plot img{max-width:720px}
"""


@dataclass
class Page:
    """The sections of the page as HTML, and the missing pieces to name."""

    title: str
    sections: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def add(self, heading: str, body: str) -> None:
        self.sections.append(f"<h2>{esc(heading)}</h2>\n{body}")

    def html(self) -> str:
        missing = "".join(f'<div class="missing">{esc(m)}</div>' for m in self.missing)
        return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(self.title)}</title>'
                f"<style>{STYLE}</style></head><body>\n<h1>{esc(self.title)}</h1>\n"
                + (f"<h2>Missing from this report</h2>{missing}" if missing else "")
                + "\n".join(self.sections) + "\n</body></html>\n")


def esc(value: Any) -> str:
    return html.escape(str(value))


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def table(header: list[str], rows: list[list[str]], numeric: set[int] = frozenset()) -> str:
    """An HTML table; cells are HTML already (escape text with :func:`esc`)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>"
                                    for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def figure(png: bytes, caption: str, alt: str) -> str:
    return f'<figure class="plot"><img src="{data_uri(png)}" alt="{esc(alt)}"><figcaption>{caption}</figcaption></figure>'


# --- what the run left on disk -------------------------------------------------------------


def records(page: Page, path: Path) -> list[dict]:
    """The records of one of the run's ``.jsonl`` files. A line that is no JSON object (the
    last one cut short when the run was killed mid-write) is left out and named."""
    kept, bad = jsonl_records(path)
    if bad:
        page.missing.append(f"{path}: {bad} line(s) are not JSON records (cut short when the run was killed?) and "
                            "are left out of this report.")
    return kept


def sessions_section(page: Page, run_dir: Path, sessions: list[dict], evals: list[dict]) -> None:
    if not sessions:
        page.missing.append(f"{run_dir}/sessions.jsonl is missing (runs made before unetseg recorded them): "
                            "no command, hardware or times.")
        body = ""
    else:
        rows, pending = [], None
        for s in sessions + [None]:
            if s is None or s.get("event") == "start":
                if pending is not None:
                    rows.append(pending)
                pending = None if s is None else [esc(s.get("time", "?")), "<i>no end recorded (still running, or "
                                                  "killed)</i>", esc(s.get("step", "?")), "",
                                                  f"<code>{esc(s.get('command', '?'))}</code>",
                                                  esc(f"{s.get('hardware', '?')}; mixed precision "
                                                      f"{s.get('mixed_precision', '?')}; "
                                                      f"unetseg {s.get('unetseg', '?')}, torch {s.get('torch', '?')}, "
                                                      f"host {s.get('host', '?')}")]
            elif s.get("event") == "end" and pending is not None:
                pending[1] = esc(s.get("time", "?")) + (" (stopped by a signal)" if s.get("stopped") else "")
                pending[3] = esc(s.get("step", "?"))
        body = table(["started", "ended", "from step", "to step", "command", "hardware"], rows)
    best = max(evals, key=lambda r: r["mIoU"] if r.get("mIoU") is not None else -1) if evals else None
    models = [f"<code>{esc(run_dir / name)}</code>" for name in ("best", "final") if (run_dir / name).is_dir()]
    body += "<p>" + (f"Best val mIoU <b>{pct(best['mIoU'])}</b> at step {esc(best['step'])}; "
                     f"last evaluation {pct(evals[-1]['mIoU'])} at step {esc(evals[-1]['step'])}. " if best else
                     "No evaluation yet. ") + ("Models: " + ", ".join(models) if models else "No model saved yet.") + "</p>"
    page.add("Run", body)


def dataset_section(page: Page, info, run_dir: Path) -> None:
    if info is None:
        page.missing.append(f"{run_dir}/dataset.json is missing: no dataset summary.")
        return
    classes = info.classes
    rows = [[f'<span class="swatch" style="background:rgb({",".join(str(v) for v in colour)})"></span>{esc(name)}',
             str(i)] for i, (name, colour) in enumerate(zip(classes.names, classes.palette))]
    splits = [[esc(name), str(split.num_samples), esc(", ".join(f"{size} x {n}" for size, n in split.image_sizes.items()))]
              for name, split in info.splits.items()]
    page.add("Dataset", f"<p>{classes.num_classes} classes, ignore index {esc(classes.ignore_index)}.</p>"
             + table(["class", "id"], rows) + table(["split", "samples", "image sizes (HxW x count)"], splits))


def curves_png(rows: list[dict]) -> bytes | None:
    """Loss, learning rate, images/s and val mIoU over steps, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if r.get("mIoU") is not None]
    if not train and not evals:
        return None
    fig, axes = plt.subplots(2, 2, figsize=(10, 6))
    panels = [("loss", train, "training loss", 1), ("lr", train, "learning rate", 1),
              ("images_per_s", train, "images/s", 1), ("mIoU", evals, "val mIoU %", 100)]
    for ax, (key, source, title, scale) in zip(axes.flat, panels):
        points = [(r["step"], scale * r[key]) for r in source if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points), marker="o" if key == "mIoU" or len(points) < 20 else None, markersize=3)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()


def per_class_section(page: Page, result, where: str, out: Path) -> None:
    """The per-class table, weakest first, and the confusion matrix and IoU bars."""
    from unetseg.evaluate import write_plots

    per_class = result.to_dict()["per_class"]
    order = sorted(per_class, key=lambda c: (per_class[c]["iou"] is None, per_class[c]["iou"] or 0.0))
    rows = [[esc(c), pct(per_class[c]["iou"]), pct(per_class[c]["accuracy"]), pct(per_class[c]["dice"]),
             f"{per_class[c]['pixels']:,}"] for c in order]
    summary = (f"<p>{where}: mIoU <b>{pct(result.miou)}</b>, pixel accuracy {pct(result.pixel_accuracy)}, "
               f"mean Dice {pct(result.mean_dice)}, {result.num_samples} images.</p>")
    plots = write_plots(result, out.with_suffix(".json"))  # <stem>_confusion.png and <stem>_iou.png beside the page
    page.add("Per class (weakest first)", summary + table(["class", "IoU %", "accuracy %", "Dice %", "pixels"], rows,
                                                          {1, 2, 3, 4})
             + figure(plots[0].read_bytes(), "Row-normalised confusion matrix: rows are the true classes.",
                      "confusion matrix") + figure(plots[1].read_bytes(), "IoU per class.", "per-class IoU"))


def evaluations_section(page: Page, evaluations: list[dict]) -> None:
    if not evaluations:
        page.add("unetseg evaluate", "<p>None recorded for this run. <code>unetseg evaluate RUN --data SHARDS "
                 "--split val --tta flip</code> records its result here.</p>")
        return
    rows = [[esc(e.get("time", "")), esc(e.get("model", "")), esc(e.get("split", "")), esc(e.get("tta", "")),
             esc(e.get("eval_resize") or "as trained"), pct(e.get("mIoU")), pct(e.get("pixel_accuracy")),
             esc(e.get("report", ""))] for e in evaluations]
    page.add("unetseg evaluate", table(["when", "model", "split", "TTA", "input size", "mIoU %", "pixel acc. %",
                                        "report"], rows, {5, 6}))


# --- scoring the model, image by image ------------------------------------------------------


@dataclass
class Scored:
    key: str
    miou: float
    pred: np.ndarray
    target: np.ndarray


def image_miou(pred, target, num_classes: int, ignore_index: int | None = None) -> float | None:
    """Mean IoU of one image over the classes in its ground truth or prediction, as the
    split's :class:`~unetseg.metrics.ConfusionMatrix` counts them (None: no counted pixel)."""
    from unetseg.metrics import ConfusionMatrix

    cm = ConfusionMatrix(num_classes, ignore_index)
    cm.update(pred[None], target[None])
    result = cm.compute()
    return None if result.num_pixels == 0 else result.miou


def score_images(model_dir: Path, source, classes, eval_resize, batch_size: int, num_workers: int, keep: int):
    """The model's metrics on the split, the number of images scored, the ``keep`` worst
    and best images by per-image mIoU, and the stream's record of the samples it could not
    read (left out of the score, for the page to name)."""
    import torch

    from unetseg.badsamples import StreamStats
    from unetseg.checkpoint import load_model, normalization
    from unetseg.loaders import iterate, make_loader
    from unetseg.scoring import confusion_matrix
    from unetseg.stream import EvalStream
    from unetseg.transforms import EvalTransform, EvalTransformConfig

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, config, _ = load_model(model_dir)
    mean, std = normalization(config)
    ignore = classes.ignore_label
    worst: list[Scored] = []
    best: list[Scored] = []
    scored = [0]

    def each(key: str, pred, target) -> None:
        miou = image_miou(pred, target, classes.num_classes, ignore)
        if miou is None:
            return
        scored[0] += 1
        item = Scored(str(key), miou, pred.to(torch.uint8).cpu().numpy(), target.to(torch.uint8).cpu().numpy())
        for kept, reverse in ((worst, False), (best, True)):
            kept.append(item)
            kept.sort(key=lambda s: s.miou, reverse=reverse)
            del kept[keep:]

    stats = StreamStats(None)
    stream = EvalStream(source, EvalTransform(EvalTransformConfig(resize=eval_resize, mean=mean, std=std)), batch_size, max_bad_samples=None)
    cm, _ = confusion_matrix(model.to(device).eval(), iterate(make_loader(stream, num_workers), stats),
                             classes.num_classes, ignore, classes.names, device, each=each)
    return cm.compute(), scored[0], worst, best, stats


def gallery_rows(items: list[Scored], source, classes) -> list[str]:
    """One JPEG row per image: image | ground truth | prediction | errors (wrong pixels red)."""
    from unetseg.imageio import encode_jpeg
    from unetseg.shards import ShardReadError, iter_shard
    from unetseg.stream import decode_pair

    wanted = {s.key for s in items}
    images: dict[str, np.ndarray] = {}
    for url in source.urls:
        try:
            for sample in iter_shard(url):
                if sample["__key__"] in wanted:
                    images[sample["__key__"]] = decode_pair(sample)[0].permute(1, 2, 0).numpy()
        except ShardReadError:  # its unreadable part was scored by no one: named by report() already
            pass
        if len(images) == len(wanted):
            break
    lut = classes.palette_lut()
    rows = []
    for s in items:
        image = images.get(s.key)
        if image is None or image.shape[:2] != s.target.shape:
            image = np.full((*s.target.shape, 3), 128, dtype=np.uint8)  # not found again: a grey stand-in
        counted = (s.target != classes.ignore_label) & (s.target < classes.num_classes)
        wrong = counted & (s.pred != s.target)
        errors = (image * 0.35).astype(np.uint8)
        errors[wrong] = (230, 30, 30)
        errors[~counted] = (0, 0, 0)
        gap = np.full((image.shape[0], 4, 3), 255, dtype=np.uint8)
        strip = np.concatenate([image, gap, lut[s.target], gap, lut[s.pred], gap, errors], axis=1)
        height, width = image.shape[:2]
        if width >= 320 or height >= 480:  # keep the page small, also for images far taller than wide
            step = max(1, round(width / 320), -(-height // 480))
            strip = strip[::step, ::step]
        else:  # small images, enlarged by whole pixels to be seen (no taller than 480 pixels)
            zoom = max(1, min(-(-160 // width), 480 // height))
            strip = strip.repeat(zoom, axis=0).repeat(zoom, axis=1)
        rows.append(f'<figure><img src="{data_uri(encode_jpeg(strip, 88), "image/jpeg")}" '
                    f'alt="{esc(s.key)}"><figcaption><code>{esc(s.key)}</code>: image mIoU <b>{pct(s.miou)}</b>, '
                    f"{100 * wrong.sum() / max(1, counted.sum()):.1f}% of the counted pixels wrong</figcaption></figure>")
    return rows


def note_unread(page: Page, stats, split: str, data: str) -> None:
    """Name the samples of the split the report could not read (a truncated shard, an
    image that does not decode): the scores and the gallery are over the rest."""
    problems = stats.problems()
    if not problems:
        return
    shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
    page.missing.append(f"{stats.bad_samples} samples of split {split!r} of {data} could not be read and are left out "
                        f"of the table, the matrix and the gallery: {shown}. Fix: run `unetseg shards verify` on the "
                        "shard folder and re-pack the shards it names.")


# --- the page --------------------------------------------------------------------------------


def open_data(config, data: str | None, split: str):
    """The split to score: ``data``, else the run's validation or training shards."""
    from unetseg.sources import open_source
    from unetseg.train_data import DEFAULT_DATA

    if data is None and config is not None:
        dc = config.data
        data = dc.val_data if dc.val_data and split == dc.val_split else (dc.data or DEFAULT_DATA)
    if data is None:
        raise UnetsegError("the run has no config.yaml to say where its data is. Fix: pass --data SHARDS")
    return data, open_source(data, split)


def report(run_dir: str | os.PathLike, data: str | None = None, split: str = "val", out: str | os.PathLike | None = None,
           gallery: int = 6, batch_size: int = 4, num_workers: int = 0) -> Path:
    """Write the run's report page (written whole or not at all); returns its path."""
    import torch

    from unetseg.checkpoint import model_folder, write_text_atomic
    from unetseg.config import TrainConfig
    from unetseg.dataset import DatasetInfo
    from unetseg.evaluate import check_classes
    from unetseg.metrics import ConfusionMatrix

    run_dir = Path(run_dir)
    if not ((run_dir / "config.yaml").is_file() or (run_dir / "metrics.jsonl").is_file()):
        raise UnetsegError(f"{run_dir}: not a run dir (no config.yaml or metrics.jsonl). "
                           "Fix: pass the folder training wrote to (its --output-dir)")
    if gallery < 0 or batch_size < 1 or num_workers < 0:
        raise UnetsegError(f"--gallery {gallery}, --batch-size {batch_size}, --num-workers {num_workers}: "
                           "use a gallery of 0 or more, a batch size of 1 or more and 0 or more workers")
    out = Path(out) if out else run_dir / "report.html"
    page = Page(f"unetseg report: {run_dir.name}")
    rows = records(page, run_dir / "metrics.jsonl")
    evals = [r for r in rows if r.get("mIoU") is not None]
    config = TrainConfig.load(run_dir / "config.yaml") if (run_dir / "config.yaml").is_file() else None
    info = DatasetInfo.load(run_dir) if (run_dir / "dataset.json").is_file() else None

    sessions_section(page, run_dir, records(page, run_dir / "sessions.jsonl"), evals)
    curves = curves_png(rows)
    if curves is None:
        page.missing.append(f"{run_dir}/metrics.jsonl has no logged step yet: no training curves.")
    else:
        curves_path = out.with_name(out.stem + "_curves.png")
        curves_path.parent.mkdir(parents=True, exist_ok=True)
        curves_path.write_bytes(curves)
        page.add("Training curves", figure(curves, f"Also written to <code>{esc(curves_path)}</code>.", "training curves"))

    result, worst, best, where = None, [], [], ""
    try:
        model_dir = model_folder(run_dir)
    except UnetsegError:
        model_dir = None
    if model_dir is None:
        page.missing.append("No saved model yet (best/ and final/ are empty): the gallery needs one; the table below "
                            "is the last evaluation's.")
    else:
        try:
            data_used, source = open_data(config, data, split)
            if info is not None:
                check_classes(info.classes, source.info.classes, str(model_dir), data_used)
            eval_resize = config.data.eval_resize if config is not None else None
            result, count, worst, best, stats = score_images(model_dir, source, source.info.classes, eval_resize,
                                                             batch_size, num_workers, gallery)
            note_unread(page, stats, split, data_used)
            where = (f"<code>{esc(model_dir)}</code> on split <code>{esc(split)}</code> of <code>{esc(data_used)}</code>"
                     f" ({count} images scored by this report)")
        except UnetsegError as e:
            page.missing.append(f"Could not score {model_dir} on split {split!r}: {e}. The gallery is left out; the "
                                "table below is the last evaluation's.")
    if result is None and evals and info is not None and evals[-1].get("confusion_matrix"):
        last = evals[-1]
        cm = ConfusionMatrix(info.classes.num_classes, info.classes.ignore_label, info.classes.names)
        cm.matrix[:] = torch.tensor(last["confusion_matrix"])
        cm.num_samples = last.get("num_samples", 0)
        result, where = cm.compute(), f"The evaluation during training at step {esc(last['step'])}"
    if result is not None:
        per_class_section(page, result, where, out)
    elif not evals:
        page.missing.append("No evaluation yet: no per-class table or confusion matrix.")
    if worst:
        page.add(f"Worst {len(worst)} images of {split} by image mIoU",
                 "<p>image | ground truth | prediction | errors (wrong pixels red, ignored black)</p>"
                 + "".join(gallery_rows(worst, source, source.info.classes)))
        page.add(f"Best {len(best)} images of {split}", "".join(gallery_rows(best, source, source.info.classes)))
    evaluations_section(page, records(page, run_dir / "evaluations.jsonl"))
    page.add("Config", f"<pre>{esc((run_dir / 'config.yaml').read_text(encoding='utf-8'))}</pre>" if config else
             "<p>No config.yaml.</p>")
    if config is None:
        page.missing.append(f"{run_dir}/config.yaml is missing.")
    dataset_section(page, info, run_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, page.html())
    return out
