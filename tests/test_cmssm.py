"""CM-SSM U-Net: each switch adds what it names and only that; the network starts as VM-UNet and
its added parts learn; the feature distillation losses against a direct formula over exactly
the blocks of Eq. 8-9; the cmssm trainer adds them (after an optional start) through fit,
resume and the CLI."""

import itertools
import math
import warnings

import pytest
import torch
from conftest import recipe_without

from lesionkit.layers.cross_region_attention import CrossRegionAttention
from lesionkit.layers.vss_block import ChannelMixing, SqueezeExcitation, VSSBlock
from lesionkit.losses.feature_distillation import (
    FeatureDistillation,
    cross_feature_distillation,
    internal_feature_distillation,
)
from lesionkit.models import create_model

OFF = {"se": False, "cmn": False, "cra": False}
SMALL = {"dims": (8, 16, 32, 64), "depths": (1, 1, 1, 1), "depths_decoder": (1, 1, 1, 1)}


def _shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _relative(a, b):
    return float((a - b).norm() / b.norm())


def test_all_switches_off_is_vmunet():
    torch.manual_seed(0)
    a = create_model("cmssm_tiny", **OFF, **SMALL)
    b = create_model("vmunet_tiny", **SMALL)
    assert _shapes(a) == _shapes(b)
    b.load_state_dict(a.state_dict())
    x = torch.rand(2, 3, 64, 64)
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


def test_cmssm_parameter_counts_and_paper_size_builds():
    vm = sum(p.numel() for p in create_model("vmunet").parameters())
    full = sum(p.numel() for p in create_model("cmssm_unet").parameters())
    assert full > vm
    no_cmn = sum(p.numel() for p in create_model("cmssm_unet", cmn=False).parameters())
    # CMN per block of width C: LN (2C) + fc1 (4C*C + 4C) + dwconv (4C*9 + 4C) + fc2 (4C*C + C).
    dims_per_block = [96] * 2 + [192] * 2 + [384] * 2 + [768] * 2 + [768] * 2 + [384] * 2 + [192] * 2 + [96]
    assert full - no_cmn == sum(2 * c + 4 * c * c + 4 * c + 36 * c + 4 * c + 4 * c * c + c for c in dims_per_block)
    half = sum(p.numel() for p in create_model("cmssm_unet", cmn_ratio=2.0).parameters())
    assert full - half == sum(4 * c * c + 2 * c + 18 * c + 2 * c for c in dims_per_block)  # fc1, fc2, dwconv at 2C


# ------------------------------------------------------------------------------ starts as VM-UNet

def _cmssm_with_vmunet_weights(**kwargs):
    torch.manual_seed(0)
    vm = create_model("vmunet_tiny", drop_path_rate=0.0).eval()
    torch.manual_seed(1)
    cm = create_model("cmssm_tiny", drop_path_rate=0.0, **kwargs).eval()
    result = cm.load_state_dict(vm.state_dict(), strict=False)
    assert not result.unexpected_keys  # every VM-UNet tensor has its place in CM-SSM
    assert all(".se." in k or ".cmn." in k or ".ln_2." in k or k.startswith("skip_attention.")
               for k in result.missing_keys)  # and only the added parts keep their own init
    return vm, cm


def test_cmssm_computes_vmunet_at_initialisation():
    """With VM-UNet's weights in the shared modules, the added parts change the logits by < 5 %."""
    vm, cm = _cmssm_with_vmunet_weights()
    x = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        assert _relative(cm(x), vm(x)) < 0.05
    # The layers' default initialisation (SE at 0.5, CRA near 0.25, CMN random) does not.
    vm, old = _cmssm_with_vmunet_weights(gate_init=None, cmn_zero_init=False)
    with torch.no_grad():
        assert _relative(old(x), vm(x)) > 0.2


def test_added_parts_start_as_identities():
    torch.manual_seed(0)
    model = create_model("cmssm_tiny", **SMALL, gate_init=0.9).eval()
    for m in model.modules():
        if isinstance(m, SqueezeExcitation):
            z = torch.randn(2, 4, 4, m.fc2.out_features)
            torch.testing.assert_close(m(z), 0.9 * z, atol=0.02 * z.abs().max().item(), rtol=0.02)
        elif isinstance(m, ChannelMixing):
            assert torch.count_nonzero(m(torch.randn(2, 4, 4, m.fc2.out_features))) == 0  # the branch starts at zero
        elif isinstance(m, CrossRegionAttention):
            z = torch.randn(2, m.conv_h.out_channels, 4, 4)
            torch.testing.assert_close(m(z), 0.9 * z, atol=0.03 * z.abs().max().item(), rtol=0.03)


def _added_part_outputs(model):
    """Each added part's output on a fixed probe input: SE and CRA gated inputs, CMN branches."""
    g = torch.Generator().manual_seed(0)
    outs = []
    for m in model.modules():
        if isinstance(m, (SqueezeExcitation, ChannelMixing)):
            outs.append((type(m).__name__, m(torch.randn(2, 4, 4, m.fc2.out_features, generator=g))))
        elif isinstance(m, CrossRegionAttention):
            outs.append((type(m).__name__, m(torch.rand(2, m.conv_h.out_channels, 4, 4, generator=g) + 0.5)))
    return outs


def test_each_switch_changes_what_it_should_once_trained():
    """Near-identity at the start, not forever: a few steps move every added part off its start."""
    torch.manual_seed(0)
    model = create_model("cmssm_tiny", **SMALL, drop_path_rate=0.0)
    with torch.no_grad():
        before = _added_part_outputs(model.eval())
    x = torch.rand(4, 3, 64, 64)
    y = (x.mean(1, keepdim=True) > 0.5).float()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(5):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model.train()(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = _added_part_outputs(model.eval())
    moved = {}
    for (name, a), (_, b) in zip(before, after):
        moved.setdefault(name, []).append(_relative(b, a) if a.norm() > 0 else float(b.norm()))
    n_blocks = sum(SMALL["depths"]) + sum(SMALL["depths_decoder"])
    assert {k: len(v) for k, v in moved.items()} == {"SqueezeExcitation": n_blocks, "ChannelMixing": n_blocks,
                                                     "CrossRegionAttention": 3}
    assert all(v > 1e-4 for values in moved.values() for v in values), moved


def test_gate_init_is_validated():
    with pytest.raises(ValueError, match="gate_init"):
        create_model("cmssm_tiny", gate_init=1.0)


# ------------------------------------------------------------------------------ block outputs

def test_block_names_are_the_papers_list():
    model = create_model("cmssm_tiny")
    names = model.block_names()
    assert names[:3] == ["E1(1)", "E1(2)", "E2(1)"] and names[7] == "E4(2)"
    assert names[8:] == ["D4(1)", "D4(2)", "D3(1)", "D3(2)", "D2(1)", "D2(2)", "D1(1)"]


def test_forward_intermediates_returns_every_block_output_in_order():
    torch.manual_seed(0)
    model = create_model("cmssm_tiny", depths=(2, 1, 1, 2), depths_decoder=(1, 2, 1, 2), dims=(8, 16, 32, 64)).eval()
    seen = []
    blocks = [b for layer in list(model.layers) + list(model.layers_up) for b in layer.blocks]
    hooks = [b.register_forward_hook(lambda m, i, o: seen.append(o.permute(0, 3, 1, 2))) for b in blocks]
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        logits, features = model.forward_intermediates(x)
    for h in hooks:
        h.remove()
    assert len(features) == len(model.block_names()) == len(seen) == 12
    assert all(torch.equal(a, b) for a, b in zip(features, seen))
    torch.testing.assert_close(logits, model(x))
    assert isinstance(blocks[0], VSSBlock)


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
        options = [((wide[:, list(p)] - final) ** 2).mean() for p in itertools.permutations(range(6), 3)]
        assert min(abs(v - o) for o in options) < 1e-6


def test_ifd_halves_against_the_direct_formula():
    """Eq. 9 as its text says: the upper half of the channels against the lower half."""
    torch.manual_seed(0)
    # Channel means out of order, so that ranking the channels would pair them differently.
    f = torch.randn(2, 6, 3, 3) + torch.tensor([2.0, -1.0, 0.5, 3.0, 0.0, 1.0]).view(1, 6, 1, 1)
    odd = torch.randn(1, 5, 2, 2)

    def direct(t):
        half = t.shape[1] // 2
        return sum(((t[:, i] - t[:, half + i]) ** 2).sum() for i in range(half)) / (t.shape[0] * half * t.shape[2] * t.shape[3])

    torch.testing.assert_close(internal_feature_distillation([f, odd]), (direct(f) + direct(odd)) / 2)


def test_ifd_ranked_against_the_direct_formula():
    """SelfReg-UNet's reading, kept as ifd_split='ranked': channels sorted by mean activation first."""
    torch.manual_seed(0)
    f = torch.randn(2, 6, 3, 3) + torch.tensor([2.0, -1.0, 0.5, 3.0, 0.0, 1.0]).view(1, 6, 1, 1)

    def direct(t):
        c = t.shape[1]
        means = [(t[:, i].sum() / t[:, i].numel()).item() for i in range(c)]
        order = sorted(range(c), key=lambda i: -means[i])
        half = c // 2
        top, bottom = order[:half], order[half:2 * half]
        return sum(((t[:, a] - t[:, b]) ** 2).sum() for a, b in zip(top, bottom)) / (t.shape[0] * half * t.shape[2] * t.shape[3])

    torch.testing.assert_close(internal_feature_distillation([f], split="ranked"), direct(f))
    assert not torch.allclose(internal_feature_distillation([f], split="ranked"), internal_feature_distillation([f]))


def test_distillation_reads_exactly_the_blocks_of_eq_8_and_9():
    """CFD and IFD over every block E1(1) .. D2(2), one map per block, D1 the teacher only."""
    torch.manual_seed(0)
    names = create_model("cmssm_tiny").block_names()
    dims = {"1": 8, "2": 16, "3": 32, "4": 64}
    sizes = {"1": 16, "2": 8, "3": 4, "4": 2}
    features = [torch.randn(2, dims[n[1]], sizes[n[1]], sizes[n[1]]) for n in names]
    fd = FeatureDistillation(cfd_weight=0.5, ifd_weight=2.0)
    gen_seed = 3
    torch.manual_seed(gen_seed)
    got = fd(features, names)
    students = features[:-1]  # all but D1(1): 14 maps
    assert len(students) == 14
    torch.manual_seed(gen_seed)
    want_cfd = 0.5 * torch.stack([cross_feature_distillation([s], features[-1]) for s in students]).mean()
    want_ifd = 2.0 * torch.stack([internal_feature_distillation([s]) for s in students]).mean()
    torch.testing.assert_close(got["ifd_loss"], want_ifd)
    torch.testing.assert_close(got["cfd_loss"], want_cfd)
    # maps="stages": each stage's last block, D1 still left out.
    maps, final = FeatureDistillation(maps="stages").select(features, names)
    assert [id(m) for m in maps] == [id(features[names.index(n)]) for n in
                                      ["E1(2)", "E2(2)", "E3(2)", "E4(2)", "D4(2)", "D3(2)", "D2(2)"]]
    assert final is features[-1]


def test_fd_bad_inputs():
    with pytest.raises(ValueError, match=r"features\[0\].*\(2, 3\)"):
        cross_feature_distillation([torch.zeros(2, 3)], torch.zeros(1, 2, 2, 2))
    with pytest.raises(ValueError, match=">= 2 channels"):
        internal_feature_distillation([torch.zeros(1, 1, 2, 2)])
    with pytest.raises(ValueError, match="at least one"):
        internal_feature_distillation([])
    with pytest.raises(ValueError, match="ifd_split"):
        FeatureDistillation(ifd_split="sorted")
    with pytest.raises(ValueError, match="D1"):
        FeatureDistillation().select([torch.zeros(1, 2, 2, 2)] * 2, ["E1(1)", "D2(1)"])


# ------------------------------------------------------------------------------ trainer

def _config(tmp_path, **cmssm):
    from lesionkit.engine.registry import load_train_config

    return load_train_config({
        "trainer": "cmssm", "model": {"name": "cmssm_tiny", "kwargs": {**SMALL, "drop_path_rate": 0.0}},
        "cmssm": cmssm,
        "data": {"train": "synthetic:4", "image_size": 64, "batch_size": 2, "num_workers": 0, "val_fraction": 0},
        "loss": {"name": "bce_dice", "kwargs": {"bce_weight": 0.3, "dice_weight": 0.7}},
        "optim": {"name": "adamw", "lr": 1e-3, "weight_decay": 1e-2},
        "epochs": 1, "precision": "fp32", "progress": False, "out_dir": str(tmp_path)})


def test_cmssm_trainer_adds_the_fd_terms(tmp_path):
    from lesionkit.engine.registry import build_trainer

    trainer = build_trainer(_config(tmp_path, cfd_weight=0.5, ifd_weight=2.0))
    batch = next(iter(trainer.build_train_loader()))
    torch.manual_seed(0)
    losses = trainer.training_step(batch)
    torch.manual_seed(0)
    logits, features = trainer.model.forward_intermediates(batch["image"])
    seg = trainer.loss_fn(logits, batch["mask"])
    fd = FeatureDistillation(0.5, 2.0)(features, trainer.model.block_names())
    torch.testing.assert_close(losses["seg_loss"], seg)
    torch.testing.assert_close(losses["cfd_loss"], fd["cfd_loss"])
    torch.testing.assert_close(losses["ifd_loss"], fd["ifd_loss"])
    torch.testing.assert_close(losses["loss"], seg + fd["cfd_loss"] + fd["ifd_loss"])
    wd = sorted(g["weight_decay"] for g in trainer.optimizer.param_groups)
    assert wd == [0.0, 0.01]
    # Table 5 row 1: no distillation at all, the segmentation loss alone.
    plain = build_trainer(_config(tmp_path, cfd=False, ifd=False))
    losses = plain.training_step(batch)
    assert set(losses) == {"loss", "seg_loss"}


def test_distillation_starts_after_its_warm_up(tmp_path):
    from lesionkit.engine.registry import build_trainer

    trainer = build_trainer(_config(tmp_path, fd_start_steps=1))
    batch = next(iter(trainer.build_train_loader()))
    early = trainer.training_step(batch)
    assert early["cfd_loss"] == 0 and early["ifd_loss"] == 0
    torch.testing.assert_close(early["loss"], early["seg_loss"])
    trainer.global_step = 1
    late = trainer.training_step(batch)
    assert late["cfd_loss"] > 0 and late["ifd_loss"] > 0
    # Fractional epochs count in steps: 2 batches per epoch, 1.5 epochs -> step 3.
    assert build_trainer(_config(tmp_path, fd_start_epochs=1.5)).fd_start_step == 3


def test_old_model_switches_move_to_the_recipe(tmp_path):
    from lesionkit.engine.registry import load_train_config

    cfg = load_train_config({"trainer": "cmssm", "model": {"name": "cmssm_tiny",
                                                           "kwargs": {"cfd": False, "ifd_weight": 0.1}}})
    assert (cfg.cmssm.cfd, cfg.cmssm.ifd, cfg.cmssm.ifd_weight) == (False, True, 0.1)
    assert "cfd" not in cfg.model.kwargs
    with pytest.warns(FutureWarning, match="cmssm:"):
        create_model("cmssm_tiny", cfd=True)


def test_distillation_needs_a_vmunet_family_model(tmp_path):
    from lesionkit.engine.registry import build_trainer, load_train_config

    cfg = load_train_config({"trainer": "cmssm", "model": {"name": "unet_tiny", "kwargs": {"widths": [4, 8]}},
                             "data": {"train": "synthetic:4", "image_size": 32, "batch_size": 2, "num_workers": 0,
                                      "val_fraction": 0}, "out_dir": str(tmp_path)})
    with pytest.raises(ValueError, match="cmssm.cfd"):
        build_trainer(cfg)


def test_cmssm_recipe_fields_are_validated():
    from lesionkit.engine.registry import load_train_config

    for bad, key in (({"maps": "layers"}, "cmssm.maps"), ({"cfd_weight": -1}, "cmssm.cfd_weight"),
                     ({"fd_start_epochs": math.inf}, "cmssm.fd_start_epochs")):
        with pytest.raises(ValueError, match=key):
            load_train_config({"trainer": "cmssm", "cmssm": bad})


def test_cmssm_trains_and_resumes_through_the_cli(tmp_path, capsys):
    """lesionkit train --config cmssm_tiny_isic2018 on synthetic data, then --resume to a later epoch."""
    from lesionkit.cli import main
    from lesionkit.engine import load_checkpoint

    out = tmp_path / "run"
    common = ["--data", "synthetic:8:0", "--val-data", "synthetic:4:1", "--image-size", "32", "--batch-size", "4",
              "--out", str(out), "--no-progress", "--set", "model.kwargs.dims=[8,16,32,64]", "model.kwargs.depths=[1,1,1,1]",
              "model.kwargs.depths_decoder=[1,1,1,1]", "data.num_workers=0", "time_budget=null",
              "scheduler.horizon=epochs", "cmssm.fd_start_steps=1"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # the shipped recipe uses no moved keys
        assert main(["train", "--config", "cmssm_tiny_isic2018", "--epochs", "1", *common]) == 0
    first = load_checkpoint(out / "last.pt")
    assert first["epoch"] == 1 and first["config"]["cmssm"]["fd_start_steps"] == 1
    assert main(["train", "--resume", str(out / "last.pt"), "--epochs", "2", *common]) == 0
    second = load_checkpoint(out / "last.pt")
    assert second["epoch"] == 2 and second["global_step"] == 4
    log = (out / "log.csv").read_text().splitlines()
    header = log[0].split(",")
    assert "cfd_loss" in "".join(header) and len(log) == 3
    cfd = [float(row.split(",")[[i for i, h in enumerate(header) if "cfd_loss" in h][0]]) for row in log[1:]]
    assert cfd[0] > 0 and cfd[1] > 0  # epoch 1 averages the warm-up step (0) and a distilled one


@pytest.mark.parametrize("method, baseline", [("cmssm_tiny_isic2018", "vmunet_tiny_isic2018"),
                                              ("cmssm_isic2018", "vmunet_isic2018"),
                                              ("cmssm_isic2017", "vmunet_isic2017"),
                                              *((f"cmssm_ablation_{row}", "vmunet_isic2017") for row in (
                                                  "t4_row1_baseline", "t4_row8_se_cmn_cra", "t5_row1_no_fd"))])
def test_method_and_baseline_recipes_differ_only_in_model_trainer_and_cmssm(method, baseline):
    """CM-SSM is compared with VM-UNet under one recipe (its Sec. 4.2 trains both alike): data,
    optimiser, schedule, loss, epochs and precision shared; only the model, its trainer and the
    cmssm: block (the distillation losses) differ."""
    keys = ("model", "trainer", "cmssm")
    assert recipe_without(method, *keys) == recipe_without(baseline, *keys)
