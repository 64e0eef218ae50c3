"""Tests for unetseg.models.unet: shapes at any size, padding/cropping, gradients, config
validation and round trip, a small overfit, channels_last, autocast and torch.compile."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from unetseg.errors import UnetsegError
from unetseg.models.unet import NORMS, UPSAMPLES, ModelConfigError, UNet, UNetConfig, format_count, num_parameters


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is as fast, and far faster when other processes
    load the 2 cores (two spinning OpenMP threads on a busy core slowed a test 15x)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(**kw) -> UNet:
    cfg = dict(num_classes=3, width=4, depth=2, norm="none")
    cfg.update(kw)
    torch.manual_seed(0)
    return UNet(UNetConfig(**cfg))


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("upsample", UPSAMPLES)
@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_output_size_equals_input_size(depth, upsample, norm):
    model = tiny(depth=depth, upsample=upsample, norm=norm, width=6)  # 6: GroupNorm needs gcd groups
    model.eval()
    with torch.no_grad():
        for h, w in [(1, 1), (1, 9), (17, 23), (32, 32), (5, 40)]:
            out = model(torch.randn(1, 3, h, w))
            assert out.shape == (1, 3, h, w)
            assert torch.isfinite(out).all()
    model.train()  # BatchNorm in train mode needs > 1 value per channel at the bottleneck: N=2
    assert model(torch.randn(2, 3, 1, 1)).shape == (2, 3, 1, 1)


def pad_to(x: torch.Tensor, multiple: int, top_left: bool = False) -> torch.Tensor:
    h, w = x.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    return F.pad(x, (pw, 0, ph, 0) if top_left else (0, pw, 0, ph))


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("upsample", UPSAMPLES)
def test_padding_is_bottom_right_zeros_and_crop_is_top_left(norm, upsample):
    model = tiny(depth=3, norm=norm, upsample=upsample).eval()
    x = torch.randn(2, 3, 17, 23)
    with torch.no_grad():
        out = model(x)
        # The caller pads the same way: the model must not pad again, and the crop is top-left.
        padded = model(pad_to(x, 8))
        assert padded.shape == (2, 3, 24, 24)
        torch.testing.assert_close(out, padded[:, :, :17, :23], rtol=0, atol=0)
        # A multiple of 2**depth goes through the network unpadded.
        torch.testing.assert_close(model(pad_to(x, 8)), model.forward_padded(pad_to(x, 8)), rtol=0, atol=0)
        # Control: padding top-left and cropping bottom-right is a different model output,
        # so the assertion above would catch a crop from the wrong corner.
        wrong = model(pad_to(x, 8, top_left=True))[:, :, -17:, -23:]
        assert not torch.allclose(out, wrong, atol=1e-4)
        wrong_crop = padded[:, :, -17:, -23:]
        assert not torch.allclose(out, wrong_crop, atol=1e-4)


def test_output_pixels_stay_with_their_input_pixels():
    """A change in the bottom-right input pixel only changes outputs within its receptive
    field, and the top-left output is untouched (depth 1: receptive field is small)."""
    model = tiny(depth=1).eval()
    x = torch.randn(1, 3, 15, 21)
    y = x.clone()
    y[:, :, -1, -1] += 10.0
    with torch.no_grad():
        diff = (model(x) - model(y)).abs().amax(dim=1)[0]
    assert diff[-1, -1] > 0
    assert diff[:5, :5].max() == 0


@pytest.mark.parametrize("block", ["plain", "residual"])
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("upsample", UPSAMPLES)
def test_gradients_reach_every_parameter(norm, upsample, block):
    model = tiny(depth=3, norm=norm, upsample=upsample, dropout=0.1, block=block).train()
    x, target = torch.randn(2, 3, 20, 19), torch.randint(0, 3, (2, 20, 19))
    F.cross_entropy(model(x), target).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    assert sum(p.grad.abs().sum() for p in model.parameters()) > 0


@pytest.mark.parametrize(
    "kwargs, value",
    [
        ({"depth": 0}, "depth = 0"),
        ({"depth": 9}, "depth = 9"),
        ({"width": 0}, "width = 0"),
        ({"num_classes": 0}, "num_classes = 0"),
        ({"in_channels": 0}, "in_channels = 0"),
        ({"width": 2.5}, "width = 2.5"),
        ({"depth": True}, "depth = True"),
        ({"max_width": 16, "width": 32}, "max_width=16"),
        ({"norm": "layer"}, "norm = 'layer'"),
        ({"upsample": "nearest"}, "upsample = 'nearest'"),
        ({"dropout": 1.0}, "dropout = 1.0"),
        ({"dropout": -0.1}, "dropout = -0.1"),
        ({"dropout": "0.1"}, "dropout = '0.1'"),
        ({"block": "dense"}, "block = 'dense'"),
    ],
)
def test_config_errors_name_the_value(kwargs, value):
    with pytest.raises(ModelConfigError) as err:
        UNetConfig(num_classes=kwargs.pop("num_classes", 2), **kwargs)
    assert value in str(err.value)
    assert "use" in str(err.value)  # says the fix
    assert isinstance(err.value, (ValueError, UnetsegError))


def test_config_from_dict_rejects_unknown_and_missing_keys():
    with pytest.raises(ModelConfigError, match="widht"):
        UNetConfig.from_dict({"num_classes": 2, "widht": 8})
    with pytest.raises(ModelConfigError, match="num_classes"):
        UNetConfig.from_dict({"width": 8})


def test_wrong_input_channels_names_expected_and_got():
    model = tiny(in_channels=3)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\).*\(2, 1, 8, 8\)"):
        model(torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match=r"\(3, 8, 8\)"):
        model(torch.zeros(3, 8, 8))


@pytest.mark.parametrize(
    "cfg",
    [
        {"num_classes": 5, "width": 4, "depth": 3, "norm": "group", "upsample": "bilinear", "dropout": 0.2},
        {"num_classes": 2, "in_channels": 1, "width": 8, "depth": 4, "max_width": 32, "norm": "batch"},
        {"num_classes": 3, "width": 4, "depth": 2, "block": "residual", "dropout": 0.1},
    ],
)
def test_config_round_trip_rebuilds_the_same_model(cfg):
    model = UNet(UNetConfig(**cfg)).eval()
    d = json.loads(json.dumps(model.config.to_dict()))  # plain JSON types
    assert UNetConfig.from_dict(d) == model.config
    rebuilt = UNet.from_config_dict(d).eval()
    a, b = model.state_dict(), rebuilt.state_dict()
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape for k in a)
    rebuilt.load_state_dict(a)
    x = torch.randn(1, cfg.get("in_channels", 3), 13, 11)
    with torch.no_grad():
        torch.testing.assert_close(model(x), rebuilt(x))
    assert num_parameters(model) == sum(p.numel() for p in model.parameters())


def test_parameter_count_by_hand_and_describe():
    # depth 1, width 4, no norm (convs have biases), 3 -> 2 classes:
    # encoder 3->4->4: (108+4)+(144+4); bottleneck 4->8->8: (288+8)+(576+8);
    # transpose 8->4 k2: 128+4; decoder 8->4->4: (288+4)+(144+4); head 4->2: 8+2.
    model = UNet(UNetConfig(num_classes=2, width=4, depth=1, norm="none"))
    assert num_parameters(model) == 260 + 880 + 132 + 440 + 10
    default = UNet(UNetConfig(num_classes=10, width=32))
    assert num_parameters(default) == 7_763_338
    assert default.describe() == "UNet depth=4 width=32 norm=batch upsample=transpose num_classes=10: 7.76M parameters"
    assert model.summary().endswith(": 1.72K parameters")
    # Residual blocks add a 1x1 shortcut where the channels change: 3->4 (12+4), 4->8
    # (32+8) and 8->4 (32+4).
    residual = UNet(UNetConfig(num_classes=2, width=4, depth=1, norm="none", block="residual"))
    assert num_parameters(residual) == 1722 + 16 + 40 + 36
    assert "block=residual" in residual.describe()
    assert format_count(999) == "999"
    for p in model.parameters():
        p.requires_grad_(False)
    assert num_parameters(model, trainable_only=True) == 0


def test_init_kaiming_convs_and_unit_norms():
    model = UNet(UNetConfig(num_classes=2, width=16, depth=2, norm="batch"))
    conv = model.encoder[1][0]  # a 16 -> 32 3x3 conv: fan_out = 32 * 9
    assert conv.bias is None
    assert abs(conv.weight.std().item() - (2 / (32 * 9)) ** 0.5) < 0.01
    bn = model.encoder[1][1]
    assert torch.equal(bn.weight, torch.ones_like(bn.weight)) and torch.equal(bn.bias, torch.zeros_like(bn.bias))
    assert torch.equal(model.head.bias, torch.zeros_like(model.head.bias))
    groups = [(m.num_groups, m.num_channels) for m in tiny(width=6, depth=3, norm="group").modules()
              if isinstance(m, torch.nn.GroupNorm)]
    assert {g for g, _ in groups} == {2, 4, 8, 16}  # gcd(32, C) for C = 6, 12, 24, 48
    assert all(c % g == 0 for g, c in groups)


def test_dropout_only_in_train_mode():
    model = tiny(dropout=0.5, depth=2)
    plain = tiny(dropout=0.0, depth=2)
    plain.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), plain.eval()(x))
        model.train()
        assert not torch.allclose(model(x), model(x))
    assert sum(isinstance(m, torch.nn.Dropout2d) for m in model.modules()) == 1 + 2  # bottleneck + decoders


def square_batch(n: int = 4, size: int = 32):
    """Noisy images with a bright square of varying position/size; mask 1 inside it."""
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(n, size, size, dtype=torch.long)
    for i in range(n):
        s = int(torch.randint(12, 19, (1,), generator=g))
        y, x = (int(v) for v in torch.randint(0, size - s, (2,), generator=g))
        masks[i, y : y + s, x : x + s] = 1
    images = masks[:, None].float().expand(n, 3, size, size) + 0.5 * torch.randn(n, 3, size, size, generator=g)
    return images, masks


def test_a_residual_block_adds_its_input():
    """With the body's last conv zeroed, a residual block is ReLU of its shortcut."""
    from unetseg.models.unet import ResidualBlock

    same, wider = ResidualBlock(4, 4, "none"), ResidualBlock(3, 4, "none")
    x = torch.randn(2, 4, 5, 6)
    for block in (same, wider):
        torch.nn.init.zeros_(block.body[-2].weight)
        torch.nn.init.zeros_(block.body[-2].bias)
    with torch.no_grad():
        torch.testing.assert_close(same(x), x.relu())
        torch.testing.assert_close(wider(x[:, :3]), wider.shortcut(x[:, :3]).relu())


@pytest.mark.parametrize("block", ["plain", "residual"])
def test_tiny_unet_overfits_one_batch(block):
    torch.manual_seed(0)
    images, masks = square_batch()
    background = (masks == 0).float().mean().item()
    assert background < 0.9  # predicting background everywhere would not pass
    model = UNet(UNetConfig(num_classes=2, width=8, depth=2, block=block)).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(model(images), masks).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(images).argmax(1) == masks).float().mean().item()
    assert accuracy > 0.9, f"pixel accuracy {accuracy:.3f} (background alone {background:.3f})"


@pytest.mark.parametrize("norm", NORMS)
def test_channels_last_matches_contiguous(norm):
    model = tiny(depth=3, norm=norm).eval()
    x = torch.randn(2, 3, 17, 23)
    with torch.no_grad():
        expected = model(x)
        model_cl = model.to(memory_format=torch.channels_last)
        got = model_cl(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_autocast_bfloat16_on_cpu():
    model = tiny(depth=2, norm="batch").eval()
    x = torch.randn(2, 3, 17, 23)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 3, 17, 23)
    with torch.no_grad():
        torch.testing.assert_close(out.float(), model(x), rtol=0.1, atol=0.1)


def test_torch_compile_traces_without_graph_breaks():
    model = tiny(depth=2, norm="batch", upsample="bilinear").eval()
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()  # dynamo only, no inductor: fast
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend=counter)
    with torch.no_grad():
        for hw in [(17, 23), (32, 40), (9, 5)]:  # padded and unpadded sizes
            x = torch.randn(2, 3, *hw)
            torch.testing.assert_close(compiled(x), model(x))
    assert counter.frame_count == 1  # no size-dependent branch: one graph for every size
