"""Model registry: every registered model runs forward and backward; errors name the valid choices."""

import pytest
import torch

import lesionkit
from lesionkit.models import SegmentationOutput, create_model, list_models, register_model, segmentation_logits, smoke_test_config


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_forward_backward(name):
    torch.manual_seed(0)
    smoke = smoke_test_config(name)
    model = create_model(name, **smoke["kwargs"])
    c, h, w = smoke["input_size"]
    x = torch.rand(2, c, h, w, requires_grad=True)
    if smoke.get("task") == "reconstruction":  # the MAEs of GRCSF's residual maps
        out = model(x)
        assert out.reconstruction.shape == x.shape and out.mask.any()
        out.reconstruction.square().mean().backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert x.grad is not None and x.grad.abs().sum() > 0
        return
    inputs = {key: torch.rand(2, *shape) for key, shape in smoke["inputs"].items()}
    output = model(x, **inputs)
    out = segmentation_logits(output)
    assert out.shape == (2, 1, h, w)
    assert out.dtype == torch.float32
    loss = out.square().mean()
    # Multi-head models train their other heads through the extras (SegMAE's reconstruction).
    extras = output.extras if isinstance(output, SegmentationOutput) else {}
    loss = loss + sum(v.float().square().mean() for v in extras.values() if v.is_floating_point())
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_top_level_helpers_are_the_registry():
    assert lesionkit.list_models() == list_models()
    assert {"unet", "unet_tiny"} <= set(lesionkit.list_models())
    assert lesionkit.list_models("unet_t*") == ["unet_tiny"]


def test_unet_paper_size_parameter_count():
    # GRCSF's comparison table lists U-Net at 31.04M parameters.
    n = sum(p.numel() for p in create_model("unet").parameters())
    assert n == 31_037_633


def test_options_reach_the_model_and_are_recorded():
    model = create_model("unet_tiny", widths=[8, 16, 32], num_classes=3, upsample="bilinear", norm="groupnorm")
    assert model.model_name == "unet_tiny"
    assert model.model_kwargs["num_classes"] == 3
    assert model(torch.rand(1, 3, 16, 16)).shape == (1, 3, 16, 16)


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError, match="unet_tiny"):
        create_model("unet_huge")


def test_unknown_option_names_the_model_and_options():
    with pytest.raises(ValueError, match=r"'unet_tiny' has no option\(s\) \['depth'\].*widths"):
        create_model("unet_tiny", depth=3)


@pytest.mark.parametrize("kwargs, match", [({"norm": "layernorm"}, "norm"), ({"widths": (8,)}, "widths"),
                                          ({"upsample": "pixelshuffle"}, "upsample")])
def test_bad_config_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        create_model("unet_tiny", **kwargs)


def test_input_size_not_divisible_is_an_error():
    model = create_model("unet_tiny")
    with pytest.raises(ValueError, match="multiples of 16.*30x32"):
        model(torch.rand(1, 3, 30, 32))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.rand(1, 1, 32, 32))


def test_register_twice_is_an_error():
    def unet(**kwargs):
        raise AssertionError("never built")

    with pytest.raises(ValueError, match="registered twice"):
        register_model(unet)


def test_segmentation_output_carries_extras():
    out = SegmentationOutput(logits=torch.zeros(1, 1, 4, 4), extras={"reconstruction": torch.zeros(1, 3, 4, 4)})
    assert segmentation_logits(out) is out.logits
    with pytest.raises(TypeError, match="dict"):
        segmentation_logits({"logits": out.logits})


# The counts the README's and docs/models.md's model tables print for the CPU-size models (and
# AMLP's pre-training U-Net, whose two heads add 1,220 parameters to `unet`).
@pytest.mark.parametrize("name, count", [
    ("unet_tiny", 1_942_577), ("amlp_unet_tiny", 1_942_757), ("amlp_unet", 31_038_853),
    ("unetpp_tiny", 2_293_793), ("grcsf_tiny", 2_492_693), ("mae_vit_tiny", 2_448_192),
    ("transunet_tiny", 2_508_169), ("segmae_tiny", 3_028_873), ("vmunet_tiny", 2_169_403), ("cmssm_tiny", 3_832_714),
])
def test_documented_parameter_counts(name, count):
    assert sum(p.numel() for p in create_model(name).parameters()) == count
