"""UNet++: parameter counts of GRCSF's Table 1, the nested skips, deep supervision, the config."""

from pathlib import Path

import pytest
import torch

from lesionkit.models import SegmentationOutput, create_model

CONFIGS = Path(__file__).resolve().parents[1] / "lesionkit" / "configs"


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("in_chans, expected", [(1, 36_628_481), (3, 36_629_633)])
def test_paper_size_parameter_count(in_chans, expected):
    # GRCSF's Table 1 lists UNet++ at 36.63M parameters (1 input and 1 output channel).
    assert n_params(create_model("unetpp", in_chans=in_chans)) == expected


def test_narrow_widths_parameter_count():
    # The widths (32..512) of the UNet++ reference code, 3 input channels.
    assert n_params(create_model("unetpp", widths=(32, 64, 128, 256, 512))) == 9_163_329


def test_every_nested_node_reaches_the_output():
    # Dense skips: each of the depth * (depth + 1) / 2 decoder nodes gets a gradient.
    model = create_model("unetpp_tiny", widths=(4, 8, 16, 32))
    model(torch.rand(2, 3, 16, 16)).sum().backward()
    decoder = [node for level in model.nodes for node in list(level)[1:]]
    assert len(decoder) == 6
    assert all(node[0].weight.grad.abs().sum() > 0 for node in decoder)


def test_deep_supervision_averages_the_heads():
    model = create_model("unetpp_tiny", widths=(4, 8, 16), deep_supervision=True, num_classes=2).eval()
    out = model(torch.rand(1, 3, 8, 8))
    assert isinstance(out, SegmentationOutput) and out.logits.shape == (1, 2, 8, 8)
    heads = [out.extras[f"deep_supervision_{j}"] for j in (1, 2)]
    torch.testing.assert_close(out.logits, (heads[0] + heads[1]) / 2)


def test_input_size_not_divisible_is_an_error():
    with pytest.raises(ValueError, match="multiples of 16 for this UNet\\+\\+, got 24x32"):
        create_model("unetpp_tiny")(torch.rand(1, 3, 24, 32))
    with pytest.raises(ValueError, match=r"x should be \(B, 1, H, W\)"):
        create_model("unetpp_tiny", in_chans=1)(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match="widths should list"):
        create_model("unetpp_tiny", widths=(8,))


def test_cli_trains_the_tiny_config(tmp_path, capsys):
    from lesionkit.cli import main

    out = tmp_path / "run"
    rc = main(["train", "--config", str(CONFIGS / "unetpp_tiny_isic2018.yaml"), "--data", "synthetic:8",
               "--val-data", "synthetic:4:1", "--image-size", "32", "--batch-size", "4", "--epochs", "1",
               "--out", str(out), "--device", "cpu", "--no-progress", "--set", "data.num_workers=0"])
    assert rc == 0, capsys.readouterr().err
    assert "trained" in capsys.readouterr().out
    assert (out / "best.pt").is_file()


@pytest.mark.parametrize("name", ["unetpp_tiny", "grcsf_tiny"])
def test_convolutions_start_with_he_weights_and_zero_biases(name):
    # GRCSF's implementation details (and the UNet++ reference code): He initialisation, zero biases,
    # for the backbone and, in GRCSF, the GCU / RCU convolutions. conv_init="torch" keeps PyTorch's.
    from lesionkit.models import create_model

    torch.manual_seed(0)
    model = create_model(name)
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) > 30 and (name == "unetpp_tiny" or any(n.startswith(("gcus", "rcus")) for n, _ in convs))
    for n, m in convs:
        assert m.bias is None or not m.bias.any(), n
        fan_in = m.weight[0].numel()
        if m.weight.numel() >= 4096:  # enough samples to pin the standard deviation within 10 %
            std = m.weight.std().item()
            assert abs(std / (2.0 / fan_in) ** 0.5 - 1) < 0.1, (n, std, fan_in)
    torch.manual_seed(0)
    default = create_model(name, conv_init="torch")
    assert all(m.bias.any() for m in default.modules() if isinstance(m, torch.nn.Conv2d) and m.bias is not None)
    with pytest.raises(ValueError, match="conv_init"):
        create_model(name, conv_init="xavier")
