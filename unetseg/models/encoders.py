"""A U-Net on a pretrained timm backbone: ``model.encoder: NAME`` (``--model-encoder``).

timm (an optional extra, ``pip install 'unetseg[timm]'``) builds the encoder with
``features_only=True``: its feature maps at strides ``2, 4, ..., 32`` (a CNN's usual
pyramid) and their channels. The decoder is sized from them: the stage at stride ``s``
has the from-scratch U-Net's channels for that level, ``width * s`` (capped by
``max_width``), so the default ``width`` 16 gives 16, 32, 64, 128 and 256 channels from full
resolution up; each stage upsamples, concatenates the encoder's feature map of its stride
and runs a block (plain or residual, as ``block`` says); stages below the encoder's first
stride (an encoder whose first map is at stride 2 or 4) have no skip. The input is padded
to a multiple of the deepest stride and the logits cropped back, as the U-Net does.

Weights (``model.encoder_weights``):

- ``none``: timm's random initialisation;
- ``imagenet``: timm's default pretrained weights for the name (ImageNet for most; a tag
  such as ``resnet50.a1_in1k`` picks others). Taken from the Hugging Face cache when they
  are there, so an offline machine needs no network once they are cached; downloaded into
  it otherwise;
- a path: a safetensors or PyTorch state-dict file (read with ``weights_only``) of either
  the encoder's tensors under the names of timm's ``features_only`` model, or timm's whole
  classifier (its head is left out, and the run says so). Loaded strictly: every missing
  or unexpected tensor and every shape that does not fit is named.

An input of other than 3 channels adapts the pretrained RGB stem (timm's
``adapt_input_conv``: the RGB filters repeated over the channels and rescaled by 3/C, so
the response to a grey image is unchanged). The normalisation the weights expect (timm's
``pretrained_cfg`` mean and std) becomes the model's ``mean``/``std`` when training, so the
saved model records it for evaluate, predict, report and export. A saved model builds with
``encoder_weights`` ignored (:meth:`UNetConfig.for_saved_weights`): its own weights are
loaded next, with no network.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from unetseg.errors import UnetsegError
from unetseg.models.unet import PaddedForward

TIMM_FIX = "Fix: pip install 'unetseg[timm]' (or pip install timm), or leave --model-encoder out (the U-Net from scratch)"
ENCODER_FIX = "a CNN such as resnet34, efficientnet_lite0 or convnext_tiny"


def require_timm():
    """timm, or a clear error that names the fix."""
    try:
        import timm
    except ImportError:
        raise UnetsegError(f"model.encoder needs the timm package, which is not installed. {TIMM_FIX}") from None
    return timm


def encoder_normalization(name: str) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The mean and std of the encoder's pretrained weights (timm's ``pretrained_cfg``), or
    None when timm records none for the name."""
    cfg = require_timm().models.get_pretrained_cfg(name)
    if cfg is None or not getattr(cfg, "mean", None):
        return None
    return tuple(float(v) for v in cfg.mean), tuple(float(v) for v in cfg.std)


def create_encoder(name: str, in_channels: int, weights: str = "none", depth: int | None = None) -> nn.Module:
    """timm's ``features_only`` model ``name`` with the first ``depth`` feature maps (all when
    None), its weights as ``weights`` says (see the module doc)."""
    timm = require_timm()
    if not timm.is_model(name):  # a name, or a name.tag
        close = timm.list_models(f"*{name.split('.')[0][:6]}*")[:8]
        raise UnetsegError(f"model.encoder {name!r}: timm has no such model. Fix: use a name from timm.list_models()"
                           + (f", e.g. {', '.join(close)}" if close else f", e.g. {ENCODER_FIX}"))
    kwargs: dict[str, Any] = {"features_only": True, "in_chans": in_channels}
    if depth is not None:
        kwargs["out_indices"] = tuple(range(depth))
    if weights == "none":
        return timm.create_model(name, pretrained=False, **kwargs)
    if weights == "imagenet":
        return _pretrained_from_hub(timm, name, kwargs)
    return _from_file(timm, name, Path(weights), kwargs)


def _cached_file(timm, name: str) -> str | None:
    """The weights of ``name`` in the local Hugging Face cache, if they are there."""
    cfg = timm.models.get_pretrained_cfg(name)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not hub_id:
        return None
    from huggingface_hub import try_to_load_from_cache

    hub_id, _, revision = hub_id.partition("@")  # timm may pin a revision: 'org/name@rev'
    for filename in (getattr(cfg, "hf_hub_filename", None), "model.safetensors", "pytorch_model.bin"):
        if filename:
            found = try_to_load_from_cache(hub_id, filename, revision=revision or None)
            if isinstance(found, str):
                return found
    return None


def _pretrained_from_hub(timm, name: str, kwargs: dict[str, Any]) -> nn.Module:
    cached = _cached_file(timm, name)
    if cached:  # no network at all: timm loads the cached file as if it were a local one
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": cached}, **kwargs)
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as e:  # huggingface_hub's offline/connection errors, timm's "no pretrained weights"
        cache = os.environ.get("HF_HUB_CACHE") or os.path.join(
            os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "hub")
        raise UnetsegError(
            f"model.encoder_weights imagenet: could not get the pretrained weights of {name!r}: they are not in the "
            f"Hugging Face cache ({cache}) and the download failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
            "Fix: run once on a machine with network (timm caches them there; copy that cache, or set HF_HUB_CACHE to "
            "it), or pass --model-encoder-weights PATH to a safetensors or state-dict file of the weights"
        ) from None


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors or PyTorch state-dict file (``weights_only``: no code
    runs); a checkpoint holding its state dict under ``state_dict`` or ``model`` works too."""
    if not path.is_file():
        raise UnetsegError(f"model.encoder_weights {str(path)!r}: no such file. Fix: give the path of a safetensors or "
                           "state-dict file of the encoder's weights, or use imagenet or none")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(path))
        else:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UnetsegError(f"{path}: not a safetensors or PyTorch weights file ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:200]}). Fix: save the encoder with safetensors.torch.save_file "
                           "or torch.save(model.state_dict())") from None
    for key in ("state_dict", "model"):
        if isinstance(tensors, dict) and isinstance(tensors.get(key), dict):
            tensors = tensors[key]
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise UnetsegError(f"{path}: holds no state dict (name -> tensor). Fix: save model.state_dict()")
    return tensors


def _names(keys) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:12]) + (f" and {len(keys) - 12} more" if len(keys) > 12 else "")


def _from_file(timm, name: str, path: Path, kwargs: dict[str, Any]) -> nn.Module:
    tensors = read_tensors(path)
    encoder = timm.create_model(name, pretrained=False, **kwargs)
    own = encoder.state_dict()
    with torch.device("meta"):
        full = timm.create_model(name, pretrained=False).state_dict()
    whole = set(tensors) - set(own) and not set(tensors) - set(full)
    expected = full if whole else own
    missing, unexpected = set(expected) - set(tensors), set(tensors) - set(expected)
    if missing or unexpected:
        raise UnetsegError(
            f"{path}: does not hold the weights of timm's {name!r}"
            + (f"; missing: {_names(missing)}" if missing else "") + (f"; unexpected: {_names(unexpected)}" if unexpected else "")
            + f". Fix: save the encoder's tensors under the names of timm.create_model({name!r}, features_only=True) "
            "or of the whole classifier (benchmarks/convert_efficientnet_lite0.py converts one such file)"
        )
    if whole:  # timm maps the classifier's names onto its feature model and adapts the stem
        head = sorted(set(full) - set(own))
        # The head's shapes need not fit (another number of classes): timm leaves it out.
        bad = [k for k in own if k in tensors and not _fits(tensors[k], full[k])]
        _check_shapes(path, name, bad, tensors, full)
        print(f"encoder {name}: {len(own)} tensors from {path}; left out the classifier head "
              f"({len(head)} tensors: {_names(head)})", flush=True)
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kwargs)
    stem = _stem_key(own, tensors, kwargs["in_chans"])
    bad = [k for k in own if k != stem and not _fits(tensors[k], own[k])]
    _check_shapes(path, name, bad, tensors, own)
    if stem:
        tensors = {**tensors, stem: timm.models.adapt_input_conv(kwargs["in_chans"], tensors[stem])}
    encoder.load_state_dict(tensors, strict=True)
    print(f"encoder {name}: {len(own)} tensors from {path}", flush=True)
    return encoder


def _fits(tensor: torch.Tensor, like: torch.Tensor) -> bool:
    return tuple(tensor.shape) == tuple(like.shape)


def _stem_key(own: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], in_chans: int) -> str | None:
    """The first convolution's weight when the file's has 3 input channels and the model's
    ``in_chans``: the one tensor that RGB weights are adapted in."""
    if in_chans == 3:
        return None
    for key, t in own.items():
        if t.ndim == 4:  # the first conv weight in the state dict is the stem's
            src = tensors.get(key)
            if src is not None and src.ndim == 4 and src.shape[1] == 3 and t.shape[1] == in_chans \
                    and src.shape[0] == t.shape[0] and src.shape[2:] == t.shape[2:]:
                return key
            return None
    return None


def _check_shapes(path: Path, name: str, bad: list[str], tensors, like) -> None:
    if bad:
        shown = "; ".join(f"{k}: {tuple(tensors[k].shape)} in the file, {tuple(like[k].shape)} in the model" for k in bad[:6])
        raise UnetsegError(f"{path}: {len(bad)} tensor(s) do not fit timm's {name!r}: {shown}. Fix: use weights of "
                           f"this very architecture (or another --model-encoder that matches the file)")


class EncoderUNet(PaddedForward, nn.Module):
    """A U-Net decoder on a timm encoder: (N, in_channels, H, W) -> logits (N, num_classes, H, W).
    Built from :class:`~unetseg.models.unet.UNetConfig` with ``encoder`` set (see the module doc)."""

    def __init__(self, config, encoder: nn.Module | None = None):
        super().__init__()
        from unetseg.models.unet import BLOCKS, _upsampler

        if config.num_classes is None:
            raise UnetsegError("model.num_classes is not set. Fix: use UNetConfig(num_classes=...)")
        self.config = cfg = config
        self.encoder = encoder if encoder is not None else create_encoder(
            cfg.encoder, cfg.in_channels, cfg.encoder_weights, cfg.encoder_depth)
        info = self.encoder.feature_info
        strides, channels = list(info.reduction()), list(info.channels())
        self._check_strides(strides)
        self.pad_multiple = strides[-1]
        levels = [int(math.log2(s)) for s in strides]
        block = BLOCKS[cfg.block]
        # Decoder stages, deepest first: to each shallower feature map's level with its skip,
        # then down to level 0 (full resolution) without one.
        targets = [(level, c) for level, c in zip(levels[-2::-1], channels[-2::-1])] \
            + [(level, 0) for level in range(levels[0] - 1, -1, -1)]
        ups, blocks, cin = [], [], channels[-1]
        for level, skip in targets:
            cout = cfg.channels(level)
            ups.append(_upsampler(cfg.upsample, cin, cout))
            blocks.append(block(cout + skip, cout, cfg.norm, cfg.dropout))
            cin = cout
        self.ups, self.decoder = nn.ModuleList(ups), nn.ModuleList(blocks)
        self.skips = [skip > 0 for _, skip in targets]
        self.head = nn.Conv2d(cin, cfg.num_classes, 1)
        self._stage_channels = [cfg.channels(level) for level, _ in targets[:-1]]
        for m in [*self.ups.modules(), *self.decoder.modules(), self.head]:
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def _check_strides(self, strides: list[int]) -> None:
        ok = strides and strides[0] & (strides[0] - 1) == 0 and all(b == 2 * a for a, b in zip(strides, strides[1:]))
        if not ok or len(strides) < 2:
            raise UnetsegError(
                f"model.encoder {self.config.encoder!r}: its feature maps have strides {strides}; the U-Net decoder needs "
                f"two or more, each twice the one before. Fix: use {ENCODER_FIX}, or a larger --model-encoder-depth")

    def pretrained_encoder(self) -> nn.Module:
        """What ``optim.encoder_lr_mult`` and ``optim.encoder_freeze_steps`` apply to."""
        return self.encoder

    def forward_padded(self, x: torch.Tensor, stages: list[torch.Tensor] | None = None) -> torch.Tensor:
        features = self.encoder(x)
        y, skips = features[-1], iter(features[-2::-1])
        for j, (up, block, has_skip) in enumerate(zip(self.ups, self.decoder, self.skips)):
            if j and stages is not None:
                stages.append(y)
            y = up(y)
            y = block(torch.cat([y, next(skips)], dim=1) if has_skip else y)
        return self.head(y)

    def stage_channels(self) -> list[int]:
        """Channels of the inner decoder stages (deepest first), for deep supervision."""
        return list(self._stage_channels)

    def describe(self) -> str:
        from unetseg.models.unet import format_count, num_parameters

        c = self.config
        encoder = sum(p.numel() for p in self.encoder.parameters())
        return (f"UNet encoder={c.encoder} ({format_count(encoder)}, weights {c.encoder_weights}) decoder width={c.width} "
                f"norm={c.norm} upsample={c.upsample}{' block=' + c.block if c.block != 'plain' else ''} "
                f"num_classes={c.num_classes}: {format_count(num_parameters(self))} parameters")

    summary = describe
