"""CM-SSM U-Net: each switch adds what it names and only that; the feature distillation losses
against a direct formula; the cmssm trainer adds them to the segmentation loss."""

import pytest
import torch

from lesionkit.losses.feature_distillation import cross_feature_distillation, internal_feature_distillation
from lesionkit.models import SegmentationOutput, create_model

OFF = {"se": False, "cmn": False, "cra": False, "cfd": False, "ifd": False}
SMALL = {"dims": (8, 16, 32, 64), "depths": (1, 1, 1, 1), "depths_decoder": (1, 1, 1, 1)}


def _shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_all_switches_off_is_vmunet():
    torch.manual_seed(0)
    a = create_model("cmssm_tiny", **OFF, **SMALL)
    b = create_model("vmunet_tiny", **SMALL)
    assert _shapes(a) == _shapes(b)
    b.load_state_dict(a.state_dict())
    x = torch.rand(2, 3, 64, 64)
    a.train(), b.train()
    out = a(x)
    assert isinstance(out, torch.Tensor)  # no FD: plain logits even in training
    a.eval(), b.eval()
    torch.testing.assert_close(a(x), b(x))


@pytest.mark.parametrize("switch, new_keys", [
    ("se", {"se.fc1.weight", "se.fc1.bias", "se.fc2.weight", "se.fc2.bias"}),
    ("cmn", {"ln_2.weight", "ln_2.bias", "cmn.fc1.weight", "cmn.fc1.bias", "cmn.dwconv.weight", "cmn.dwconv.bias",
             "cmn.fc2.weight", "cmn.fc2.bias"}),
])
def test_block_switches_add_their_module_to_every_block(switch, new_keys):
    base = _shapes(create_model("cmssm_tiny", **OFF, **SMALL))
    on = _shapes(create_model("cmssm_tiny", **{**OFF, switch: True}, **SMALL))
    added = set(on) - set(base)
    assert set(base) <= set(on) and all(on[k] == base[k] for k in base)
    n_blocks = sum(SMALL["depths"]) + sum(SMALL["depths_decoder"])
    assert len(added) == n_blocks * len(new_keys)
    assert {k.split(".blocks.")[1].split(".", 1)[1] for k in added} == new_keys


def test_cra_switch_adds_attention_on_the_three_used_skips():
    base = _shapes(create_model("cmssm_tiny", **OFF, **SMALL))
    on = _shapes(create_model("cmssm_tiny", **{**OFF, "cra": True}, **SMALL))
    added = set(on) - set(base)
    assert all(k.startswith("skip_attention.") for k in added)
    # Skips into decoder stages 1, 2, 3 carry 64, 32, 16 channels; mip = max(8, C // 32) = 8.
    assert [on[f"skip_attention.{i}.conv_h.weight"] for i in range(3)] == [(64, 8, 1, 1), (32, 8, 1, 1), (16, 8, 1, 1)]


@pytest.mark.parametrize("switches, keys", [({"cfd": True}, {"cfd_loss"}), ({"ifd": True}, {"ifd_loss"}),
                                            ({"cfd": True, "ifd": True}, {"cfd_loss", "ifd_loss"})])
def test_fd_switches_add_their_loss_in_training_only(switches, keys):
    torch.manual_seed(0)
    model = create_model("cmssm_tiny", **{**OFF, **switches}, **SMALL)
    assert _shapes(model) == _shapes(create_model("cmssm_tiny", **OFF, **SMALL))
    out = model.train()(torch.rand(2, 3, 64, 64))
    assert isinstance(out, SegmentationOutput) and set(out.extras) == keys
    assert all(v.dim() == 0 and v > 0 for v in out.extras.values())
    assert isinstance(model.eval()(torch.rand(1, 3, 64, 64)), torch.Tensor)


def test_fd_weights_scale_the_terms():
    x = torch.rand(2, 3, 64, 64)
    outs = []
    for w in (0.015, 0.03):
        torch.manual_seed(0)
        model = create_model("cmssm_tiny", **{**OFF, "ifd": True, "ifd_weight": w}, **SMALL, drop_path_rate=0.0)
        outs.append(model.train()(x).extras["ifd_loss"])
    torch.testing.assert_close(outs[1], 2 * outs[0])


def test_cmssm_parameter_counts_and_paper_size_builds():
    vm = sum(p.numel() for p in create_model("vmunet").parameters())
    full = sum(p.numel() for p in create_model("cmssm_unet").parameters())
    assert full > vm
    no_cmn = sum(p.numel() for p in create_model("cmssm_unet", cmn=False).parameters())
    # CMN per block of width C: LN (2C) + fc1 (4C*C + 4C) + dwconv (4C*9 + 4C) + fc2 (4C*C + C).
    dims_per_block = [96] * 2 + [192] * 2 + [384] * 2 + [768] * 2 + [768] * 2 + [384] * 2 + [192] * 2 + [96]
    assert full - no_cmn == sum(2 * c + 4 * c * c + 4 * c + 36 * c + 4 * c + 4 * c * c + c for c in dims_per_block)


# ------------------------------------------------------------------------------ FD losses

def _mean_pool(t, factor):
    b, c, h, w = t.shape
    return t.reshape(b, c, h // factor, factor, w // factor, factor).mean(dim=(3, 5))


def test_cfd_against_the_direct_formula():
    torch.manual_seed(0)
    final = torch.randn(2, 4, 8, 8, requires_grad=True)
    same = torch.randn(2, 4, 8, 8, requires_grad=True)  # E_1: same size and width
    small = torch.randn(2, 4, 2, 2, requires_grad=True)  # deeper block: the final map is pooled 4x
    got = cross_feature_distillation([same, small], final)
    t = final.detach()
    want = (((same - t) ** 2).sum() / same.numel() + ((small - _mean_pool(t, 4)) ** 2).sum() / small.numel()) / 2
    torch.testing.assert_close(got, want)
    got.backward()
    assert final.grad is None  # the final decoder features are the teacher: detached
    assert same.grad is not None and small.grad is not None


def test_cfd_random_channel_selection():
    torch.manual_seed(0)
    final = torch.randn(1, 3, 4, 4)
    wide = torch.randn(1, 6, 4, 4)
    got = cross_feature_distillation([wide], final, generator=torch.Generator().manual_seed(7))
    idx = torch.randperm(6, generator=torch.Generator().manual_seed(7))[:3]
    want = ((wide[:, idx] - final) ** 2).mean()
    torch.testing.assert_close(got, want)
    # Whatever the draw, it is the MSE against some 3 of the 6 channels (paired in order).
    for seed in range(5):
        v = cross_feature_distillation([wide], final, generator=torch.Generator().manual_seed(seed))
        options = [((wide[:, list(p)] - final) ** 2).mean() for p in __import__("itertools").permutations(range(6), 3)]
        assert min(abs(v - o) for o in options) < 1e-6


def test_ifd_against_the_direct_formula():
    torch.manual_seed(0)
    f = torch.randn(2, 6, 3, 3) + torch.arange(6.0).view(1, 6, 1, 1) * 0.5
    odd = torch.randn(1, 5, 2, 2)

    def direct(t):
        c = t.shape[1]
        means = [(t[:, i].sum() / t[:, i].numel()).item() for i in range(c)]
        order = sorted(range(c), key=lambda i: -means[i])
        half = c // 2
        top, bottom = order[:half], order[half:2 * half]
        return sum(((t[:, a] - t[:, b]) ** 2).sum() for a, b in zip(top, bottom)) / (t.shape[0] * half * t.shape[2] * t.shape[3])

    torch.testing.assert_close(internal_feature_distillation([f, odd]), (direct(f) + direct(odd)) / 2)


def test_fd_bad_inputs():
    with pytest.raises(ValueError, match=r"features\[0\].*\(2, 3\)"):
        cross_feature_distillation([torch.zeros(2, 3)], torch.zeros(1, 2, 2, 2))
    with pytest.raises(ValueError, match=">= 2 channels"):
        internal_feature_distillation([torch.zeros(1, 1, 2, 2)])
    with pytest.raises(ValueError, match="at least one"):
        internal_feature_distillation([])


# ------------------------------------------------------------------------------ trainer

def test_cmssm_trainer_adds_the_fd_terms(tmp_path):
    from lesionkit.engine.registry import build_trainer, load_train_config

    cfg = load_train_config({
        "trainer": "cmssm", "model": {"name": "cmssm_tiny", "kwargs": SMALL},
        "data": {"train": "synthetic:4", "image_size": 64, "batch_size": 2, "num_workers": 0, "val_fraction": 0},
        "loss": {"name": "bce_dice", "kwargs": {"bce_weight": 0.3, "dice_weight": 0.7}},
        "optim": {"name": "adamw", "lr": 1e-3, "weight_decay": 1e-2},
        "epochs": 1, "precision": "fp32", "out_dir": str(tmp_path)})
    trainer = build_trainer(cfg)
    batch = next(iter(trainer.build_train_loader()))
    torch.manual_seed(0)
    losses = trainer.training_step(batch)
    assert {"loss", "seg_loss", "cfd_loss", "ifd_loss"} <= set(losses)
    torch.testing.assert_close(losses["loss"], losses["seg_loss"] + losses["cfd_loss"] + losses["ifd_loss"])
    wd = sorted(g["weight_decay"] for g in trainer.optimizer.param_groups)
    assert wd == [0.0, 0.01]
