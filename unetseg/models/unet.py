"""The U-Net: a plain ``torch.nn.Module`` (no distributed code; paste it into a notebook)
and its options, registered as model ``unet``.

>>> model = UNet(UNetConfig(num_classes=10, width=32))
>>> model.describe()
'UNet depth=4 width=32 norm=batch upsample=transpose num_classes=10: 7.76M parameters'
>>> model(torch.zeros(2, 3, 100, 75)).shape   # any size: padded inside, cropped back
torch.Size([2, 10, 100, 75])

``UNetConfig`` is the one definition of the architecture's options: the ``model``
section of a training config, the ``--model-*`` flags and a saved model's
``config.yaml`` all come from it. ``UNetConfig.to_dict()`` gives plain JSON/YAML types;
``UNet.from_config_dict(d)`` rebuilds the same architecture (load the weights with
``load_state_dict``).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from unetseg.models import ModelConfigError, ModelOptions, register_model

NORMS = ("batch", "group", "none")
UPSAMPLES = ("transpose", "bilinear")


class UNetConfig(ModelOptions):
    """The architecture of a :class:`UNet`; every field is a plain int/float/str."""

    name: str = Field("unet", description="Model architecture, by its registered name (unetseg.models).")
    depth: int = Field(4, ge=1, le=8, description="Number of down/up levels; the input is padded to a multiple of 2**depth.")
    width: int = Field(16, ge=1, description="Channels of the first U-Net level (doubling at each level).")
    max_width: int | None = Field(None, ge=1, description="Cap on the channels of any level (none: no cap).")
    norm: Literal["batch", "group", "none"] = Field(
        "batch", description="Normalisation after each 3x3 conv: BatchNorm2d, GroupNorm (gcd(32, C) groups) or none.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout2d probability in the bottleneck and decoder.")
    upsample: Literal["transpose", "bilinear"] = Field(
        "transpose", description="Decoder upsampling: ConvTranspose2d(k=2, s=2), or bilinear x2 then a 1x1 conv.")
    block: Literal["plain", "residual"] = Field(
        "plain", description="Each level's block: plain (3x3 conv, norm, ReLU, twice) or residual (the same two convs "
        "with an identity shortcut, a 1x1 conv + norm where the channels change, added before the last ReLU).")
    encoder: str | None = Field(
        None, description="A timm backbone as the encoder (e.g. efficientnet_lite0, resnet34, convnext_tiny; needs "
        "pip install 'unetseg[timm]'), the decoder sized from its feature maps: width is then the decoder's channels at "
        "full resolution, depth is not used. none: the U-Net from scratch.")
    encoder_weights: str = Field(
        "none", description="The encoder's weights: none (random), imagenet (timm's pretrained weights, from the "
        "Hugging Face cache when there, else downloaded), or the path of a safetensors/state-dict file under timm's "
        "names (the encoder's, or the whole classifier's). A saved model needs none of these: it holds its weights.")
    encoder_depth: int | None = Field(
        None, ge=2, le=8, description="Encoder feature maps used, from the first (none: all, e.g. 5 for strides 2 to 32).")

    @model_validator(mode="after")
    def _cap_above_width(self) -> UNetConfig:
        if self.max_width is not None and self.max_width < self.width:
            raise ValueError(f"max_width={self.max_width} is less than width={self.width}; "
                             "use a max_width >= width, or none")
        return self

    @model_validator(mode="after")
    def _encoder_options(self) -> UNetConfig:
        if self.encoder is None and (self.encoder_weights != "none" or self.encoder_depth is not None):
            which = "encoder_weights" if self.encoder_weights != "none" else "encoder_depth"
            raise ValueError(f"{which} is set but no encoder is: set encoder (e.g. efficientnet_lite0), "
                             f"or leave {which} out")
        return self

    def for_saved_weights(self) -> UNetConfig:
        """The options to build the model with when its own weights are loaded next (a saved
        model, a resume): no pretrained weights fetched."""
        return self.model_copy(update={"encoder_weights": "none"}) if self.encoder else self

    def default_normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The encoder's pretrained normalisation, else ImageNet's."""
        if self.encoder:
            from unetseg.models.encoders import encoder_normalization

            found = encoder_normalization(self.encoder)
            if found:
                return found
        return super().default_normalization()

    def channels(self, level: int) -> int:
        """Channels at ``level`` (0 = full resolution, ``depth`` = bottleneck)."""
        c = self.width * 2**level
        return c if self.max_width is None else min(c, self.max_width)


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(math.gcd(32, channels), channels)
    return nn.Identity()


class ConvBlock(nn.Sequential):
    """(3x3 conv, norm, ReLU) twice, then Dropout2d when ``dropout > 0``."""

    def __init__(self, cin: int, cout: int, norm: str, dropout: float = 0.0):
        bias = norm == "none"
        layers: list[nn.Module] = []
        for c in (cin, cout):
            layers += [nn.Conv2d(c, cout, 3, padding=1, bias=bias), _norm(norm, cout), nn.ReLU(inplace=True)]
        if dropout > 0:
            layers.append(nn.Dropout2d(dropout))
        super().__init__(*layers)


class ResidualBlock(nn.Module):
    """(3x3 conv, norm, ReLU, 3x3 conv, norm) + shortcut, then ReLU, then Dropout2d when
    ``dropout > 0``. The shortcut is the input itself, or a 1x1 conv and norm where the
    channels change."""

    def __init__(self, cin: int, cout: int, norm: str, dropout: float = 0.0):
        super().__init__()
        bias = norm == "none"
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1, bias=bias), _norm(norm, cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=bias), _norm(norm, cout),
        )
        self.shortcut = nn.Identity() if cin == cout else nn.Sequential(nn.Conv2d(cin, cout, 1, bias=bias),
                                                                        _norm(norm, cout))
        self.out = nn.Sequential(nn.ReLU(inplace=True), *([nn.Dropout2d(dropout)] if dropout > 0 else []))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(x) + self.shortcut(x))


BLOCKS = {"plain": ConvBlock, "residual": ResidualBlock}


def _upsampler(kind: str, cin: int, cout: int) -> nn.Module:
    if kind == "transpose":
        return nn.ConvTranspose2d(cin, cout, kernel_size=2, stride=2)
    return nn.Sequential(
        nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False), nn.Conv2d(cin, cout, 1)
    )


@register_model(UNetConfig)
def build_unet(config: UNetConfig) -> nn.Module:
    """The U-Net from scratch, or on a timm encoder when ``config.encoder`` is set."""
    if config.encoder:
        from unetseg.models.encoders import EncoderUNet

        return EncoderUNet(config)
    return UNet(config)


class PaddedForward:
    """The forward of a U-Net-shaped ``nn.Module`` with ``config.in_channels``,
    ``pad_multiple`` and ``forward_padded(x, stages)``: any input size, zero-padded at the
    bottom and right to a multiple of ``pad_multiple``, the logits cropped back."""

    def forward_stages(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The logits, and the inner decoder stages' outputs (deepest first) at the padded
        input's resolution divided by 2**(depth-1), ..., 2: what
        :mod:`unetseg.deep_supervision` reads."""
        stages: list[torch.Tensor] = []
        return self._padded(x, stages), stages

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._padded(x)

    def _padded(self, x: torch.Tensor, stages: list[torch.Tensor] | None = None) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(
                f"{type(self).__name__} expected input (N, {self.config.in_channels}, H, W), got shape {tuple(x.shape)}: "
                f"pass images with {self.config.in_channels} channels or set in_channels in the model config"
            )
        h, w = x.shape[-2:]
        m = self.pad_multiple  # ceil division, not -h % m: inductor fails on a symbolic Python mod
        pad_h, pad_w = (h + m - 1) // m * m - h, (w + m - 1) // m * m - w
        # Unconditional pad and crop (a zero pad copies only the input): no branch on the
        # size, so torch.compile with dynamic shapes keeps one graph for every size.
        logits = self.forward_padded(F.pad(x, (0, pad_w, 0, pad_h)), stages)
        return logits[:, :, :h, :w]


class UNet(PaddedForward, nn.Module):
    """U-Net for semantic segmentation: (N, in_channels, H, W) -> logits (N, num_classes, H, W).

    **Any input size.** The input is zero-padded on the bottom and right to the next
    multiple of ``2**depth`` (``self.pad_multiple``), and the logits are cropped back to
    the top-left H x W, so pixel (y, x) of the output belongs to pixel (y, x) of the
    input. Zero padding works for every size (reflect padding fails when the pad is
    larger than the image). Inputs whose H and W already are multiples of ``2**depth``
    get no padding: train on such crops so padded zeros never enter BatchNorm or
    GroupNorm statistics.

    Encoder level i (i < depth): a block (``ConvBlock``, or ``ResidualBlock`` with
    ``block="residual"``), then 2x2 max-pool. Bottleneck (level depth): block +
    Dropout2d. Decoder level i: upsample, concatenate the skip, block + Dropout2d. Head: 1x1 conv to ``num_classes``. Dropout is active in ``train()`` only.
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        if config.num_classes is None:
            raise ModelConfigError(["model.num_classes is not set"], "Python code",
                                   "use UNetConfig(num_classes=...) or build_model(options, num_classes)")
        self.config = cfg = config
        self.pad_multiple = 2**cfg.depth
        ch = [cfg.channels(i) for i in range(cfg.depth + 1)]
        block = BLOCKS[cfg.block]
        self.encoder = nn.ModuleList(
            [block(cfg.in_channels if i == 0 else ch[i - 1], ch[i], cfg.norm) for i in range(cfg.depth)]
        )
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = block(ch[-2], ch[-1], cfg.norm, cfg.dropout)
        # Decoder, deepest first: ups[j] and decoder[j] bring level depth-j back to depth-j-1.
        levels = range(cfg.depth - 1, -1, -1)
        self.ups = nn.ModuleList([_upsampler(cfg.upsample, ch[i + 1], ch[i]) for i in levels])
        self.decoder = nn.ModuleList([block(2 * ch[i], ch[i], cfg.norm, cfg.dropout) for i in levels])
        self.head = nn.Conv2d(ch[0], cfg.num_classes, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming normal (fan_out, relu) for every conv, zero biases; norms weight 1, bias 0."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @classmethod
    def from_config_dict(cls, d: dict[str, Any]) -> UNet:
        return cls(UNetConfig.from_dict(d))

    def forward_padded(self, x: torch.Tensor, stages: list[torch.Tensor] | None = None) -> torch.Tensor:
        """The network on an input whose H and W are multiples of ``pad_multiple``; the
        inner decoder stages' outputs are appended to ``stages`` when it is given."""
        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        for j, (up, block, skip) in enumerate(zip(self.ups, self.decoder, reversed(skips))):
            if j and stages is not None:
                stages.append(x)  # the previous decoder stage's output
            x = block(torch.cat([up(x), skip], dim=1))
        return self.head(x)

    def stage_channels(self) -> list[int]:
        """Channels of the inner decoder stages (deepest first), for deep supervision."""
        return [self.config.channels(i) for i in range(self.config.depth - 1, 0, -1)]

    def describe(self) -> str:
        """One line for the start of a run, e.g. 'UNet depth=4 width=32 ...: 7.76M parameters'."""
        c = self.config
        extra = (f" max_width={c.max_width}" if c.max_width else "") + (f" dropout={c.dropout}" if c.dropout else "") \
            + (f" block={c.block}" if c.block != "plain" else "")
        return (
            f"UNet depth={c.depth} width={c.width} norm={c.norm} upsample={c.upsample}{extra} "
            f"num_classes={c.num_classes}: {format_count(num_parameters(self))} parameters"
        )

    summary = describe


def num_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (each shared tensor counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def format_count(n: int) -> str:
    """7763338 -> '7.76M', 12345 -> '12.3K', 999 -> '999'."""
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(n)
