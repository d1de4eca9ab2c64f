"""The GRCSF model (UNet++ + GCU + RCU): shapes, switches, gradients, bad inputs, size, ablation recipes."""

from pathlib import Path

import pytest
import torch

from lesionkit.models import create_model, segmentation_logits
from lesionkit.models.grcsf import GRCSF, scaled_patch_sizes

from conftest import build_meta, recipe_without

SMALL = {"widths": (8, 16, 32, 64, 128), "img_size": 64}


def small(**kwargs) -> GRCSF:
    torch.manual_seed(0)
    return create_model("grcsf_tiny", **{**SMALL, **kwargs}).eval()


def inputs(batch=2, size=64, maps=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=g), torch.rand(batch, maps, size, size, generator=g)


def differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Apart by far more than float32 rounding (outputs are O(0.1))."""
    return (a - b).abs().max().item() > 1e-4


def open_rcus(model: GRCSF) -> None:
    """Open W1, W2 wide and sharpen the keys so the maps matter far above rounding."""
    with torch.no_grad():
        for rcu in model.rcus:
            rcu.weights.fill_(10.0)
            for key in rcu.keys:
                key[-1].weight.mul_(50.0)


def test_shapes_and_deep_supervision():
    x, rm = inputs()
    assert small()(x, rm).shape == (2, 1, 64, 64)
    assert small(num_classes=3)(x, residual_maps=rm).shape == (2, 3, 64, 64)
    out = small(deep_supervision=True)(x, rm)
    assert out.logits.shape == (2, 1, 64, 64) and len(out.extras) == 4
    # Other sizes work as long as every RCU stage splits into whole patches.
    x96, rm96 = inputs(batch=1, size=96)
    assert small()(x96, rm96).shape == (1, 1, 96, 96)


def test_patch_sizes_scale_with_the_input_size():
    assert scaled_patch_sizes((8, 8, 16), 224, 224) == (8, 8, 16)
    assert scaled_patch_sizes((8, 8, 16), 224, 512) == (16, 16, 32)  # the paper's orCaScore setting
    assert scaled_patch_sizes((8, 8, 16), 224, 128) == (4, 4, 8)
    assert create_model("grcsf_tiny").patch_sizes == (4, 4, 8)
    m = small()
    assert m.patch_sizes == (2, 2, 4)
    # The RCUs sit on the last three decoder stages, top stage last, with its patch size.
    assert m.rcu_levels == (2, 1, 0)
    assert [r.patch_size for r in m.rcus] == [2, 2, 4]
    assert [r.value.in_channels for r in m.rcus] == [64, 32, 16]  # U's channels: widths[level + 1]


def test_without_gcu_and_rcu_it_is_the_unetpp_backbone():
    base = create_model("unetpp_tiny", widths=SMALL["widths"]).eval()
    m = small(use_gcu=False, use_rcu=False)
    assert m.gcus is None and m.rcus is None
    assert sum(p.numel() for p in m.parameters()) == sum(p.numel() for p in base.parameters())
    m.backbone.load_state_dict(base.state_dict())
    x, _ = inputs()
    torch.testing.assert_close(m(x), base(x))


def test_rcu_uses_the_maps_from_the_start():
    x, rm = inputs()
    base = small(use_gcu=False, use_rcu=False)
    # A freshly built model: replacing the maps changes the logits (W1, W2 start at 0.1).
    for m in (small(use_gcu=False), create_model("grcsf_tiny", img_size=64)):
        assert differs(m(x, rm), m(x, rm.flip(-1)))
    m = small(use_gcu=False)
    # rcu_gate_init=0 starts as the backbone (SAGAN's gamma), the old behaviour.
    closed = small(use_gcu=False, rcu_gate_init=0.0)
    closed.load_state_dict({k: v for k, v in m.state_dict().items() if not k.endswith(".weights")}, strict=False)
    base.backbone.load_state_dict(m.backbone.state_dict())
    torch.testing.assert_close(closed(x, rm), base(x))
    open_rcus(m)
    out = m(x, rm)
    assert differs(out, base(x))
    assert differs(out, m(x, rm.flip(-1)))
    # Each map has its own weight: closing W2 makes the second map irrelevant.
    with torch.no_grad():
        for rcu in m.rcus:
            rcu.weights[1] = 0
    rm2 = rm.clone()
    rm2[:, 1] = torch.rand_like(rm2[:, 1])
    torch.testing.assert_close(m(x, rm), m(x, rm2))
    assert differs(m(x, rm), m(x, rm.flip(1)))


def test_rcu_gate_learning_rate_scale_reaches_the_optimiser():
    from lesionkit.engine.builders import build_optimizer
    from lesionkit.engine.config import OptimConfig

    m = small(rcu_gate_lr_scale=10.0)
    opt = build_optimizer(OptimConfig(name="adamw", lr=1e-3, weight_decay=1e-4), m)
    gates = {id(r.weights) for r in m.rcus}
    lrs = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert all(lrs[i] == pytest.approx(1e-2) for i in gates)
    assert all(lr == pytest.approx(1e-3) for i, lr in lrs.items() if i not in gates)
    assert len(lrs) == sum(1 for _ in m.parameters())
    assert len(build_optimizer(OptimConfig(lr=1e-3), small()).param_groups) == 1


def test_without_rcu_the_maps_are_optional_and_unused():
    x, rm = inputs()
    m = small(use_rcu=False)
    torch.testing.assert_close(m(x), m(x, rm))
    assert not any("rcus" in n for n, _ in m.named_parameters())


def test_gcu_switch_changes_the_output():
    x, rm = inputs()
    with_gcu, without = small(), small(use_gcu=False)
    without.backbone.load_state_dict(with_gcu.backbone.state_dict())
    without.rcus.load_state_dict(with_gcu.rcus.state_dict())
    assert differs(with_gcu(x, rm), without(x, rm))
    # One GCU per decoder node (every skip concatenation): 4 + 3 + 2 + 1 for 5 levels.
    assert [len(row) for row in with_gcu.gcus] == [4, 3, 2, 1]


def test_later_skip_modes_change_only_the_later_skips():
    x, rm = inputs()
    outs = {}
    for mode in ("add", "reweight", "none"):
        m = small(gcu_later_skips=mode)
        outs[mode] = m(x, rm)
        assert sum(p.numel() for p in m.parameters()) == sum(p.numel() for p in small().parameters())
    assert differs(outs["add"], outs["none"])
    assert differs(outs["reweight"], outs["none"])
    assert differs(outs["add"], outs["reweight"])


def test_importance_score_switch():
    x, rm = inputs()
    with_score, without = small(), small(use_importance_score=False)
    assert all(r.importance is not None for r in with_score.rcus)
    assert all(r.importance is None for r in without.rcus)
    missing, unexpected = without.load_state_dict(with_score.state_dict(), strict=False)
    assert not missing and unexpected and all(".importance." in k for k in unexpected)
    open_rcus(with_score), open_rcus(without)
    assert differs(with_score(x, rm), without(x, rm))


def test_number_of_maps_and_channels_per_map():
    x, _ = inputs()
    m = small(num_residual_maps=1)
    assert m(x, torch.rand(2, 1, 64, 64)).shape == (2, 1, 64, 64)
    with pytest.raises(ValueError, match=r"residual_maps should be \(B=2, 1, 64, 64\)"):
        m(x, torch.rand(2, 2, 64, 64))
    rgb = small(residual_channels=3)  # RGB residual maps: 2 maps x 3 channels
    assert rgb(x, torch.rand(2, 6, 64, 64)).shape == (2, 1, 64, 64)
    assert rgb.rcus[0].keys[0][0].in_channels == 3


def test_fewer_rcu_stages():
    m = small(patch_sizes=(16,), patch_reference_size=224, img_size=64)
    assert m.rcu_levels == (0,) and m.patch_sizes == (4,)  # 16 * 64 / 224 = 4.6 -> divisor 4
    x, rm = inputs()
    assert m(x, rm).shape == (2, 1, 64, 64)


@pytest.mark.parametrize("disconnected, levels, sizes", [((), (2, 1, 0), [16, 32, 64]), ((0,), (2, 1), [16, 32]),
                                                          ((1,), (2, 0), [16, 64]), ((2, 0), (1,), [32])])
def test_rcu_disconnected_from_chosen_levels(disconnected, levels, sizes):
    """rcu_disconnected leaves the named levels' U as it is (0 = the top, at the input's size):
    the RCUs that remain run at the other levels' sizes, deepest first, and the maps still
    reach the logits through them."""
    m = small(rcu_disconnected=disconnected)
    open_rcus(m)
    seen = []
    for rcu in m.rcus:
        rcu.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[-1]))
    x, rm = inputs()
    with torch.no_grad():
        out = m(x, rm)
        assert seen == sizes and m.rcu_levels == levels
        assert differs(out, m(x, rm.flip(0)))


def test_gradients_reach_every_parameter_and_input():
    # SE reduction 1: at these widths the default 16 leaves SE one hidden ReLU unit and 2 leaves
    # four, which a seed can leave all dead on these two similar images (zero gradient; seen with
    # He-initialised convolutions) - a property of the tiny width, not of the wiring.
    m = small(se_reduction=1).train()
    open_rcus(m)
    x, rm = inputs()
    x.requires_grad_(True), rm.requires_grad_(True)
    m(x, rm).square().mean().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0 and rm.grad.abs().sum() > 0


def test_bad_inputs_name_the_argument():
    m = small()
    x, rm = inputs()
    with pytest.raises(ValueError, match="residual_maps are required when use_rcu=True"):
        m(x)
    with pytest.raises(ValueError, match=r"residual_maps should be \(B=2, 2, 64, 64\).*got \(2, 3, 64, 64\)"):
        m(x, torch.rand(2, 3, 64, 64))
    with pytest.raises(ValueError, match=r"residual_maps should be.*got \(2, 2, 32, 32\)"):
        m(x, torch.rand(2, 2, 32, 32))
    with pytest.raises(ValueError, match=r"residual_maps should be.*got \(1, 2, 64, 64\)"):
        m(x, rm[:1])
    with pytest.raises(ValueError, match="residual_maps should be a tensor"):
        m(x, [rm[:, :1], rm[:, 1:]])
    with pytest.raises(ValueError, match=r"image should be \(B, 3, H, W\)"):
        m(x[:, :1], rm)
    with pytest.raises(ValueError, match="multiples of 16"):
        m(x[..., :56, :56], rm[..., :56, :56])
    # 80 px is a multiple of 16, but its level-2 stage (20 px) does not split into 8 x 8 patches.
    m8 = small(patch_sizes=(8, 8, 8), patch_reference_size=64)
    x80, rm80 = inputs(batch=1, size=80)
    with pytest.raises(ValueError, match=r"does not split into the RCU's 8x8 patches at decoder level 2"):
        m8(x80, rm80)


@pytest.mark.parametrize("field, value, match", [
    ("gcu_later_skips", "sum", "gcu_later_skips should be one of"),
    ("patch_sizes", (8, 8, 8, 8, 8), "patch_sizes should list 1 to 4"),
    ("num_residual_maps", 0, "num_residual_maps and residual_channels should be >= 1"),
    ("img_size", 100, "img_size should be a positive multiple of 16"),
    ("mae", "mae_vit_tiny", "mae should be a dict"),
    ("residual_kind", "gradcam", "kind should be one of"),
    ("rcu_disconnected", (3,), r"rcu_disconnected should list decoder levels of the 3 RCU stage\(s\), 0 to 2"),
    ("rcu_disconnected", (0, 1, 2), "leaves no RCU stage; set use_rcu=False"),
])
def test_bad_config_names_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        small(**{field: value})


def test_paper_size_parameter_count():
    # GRCSF reports 42.85M (Table 1); ours is 39.36M at 1 input channel - see docs/grcsf.md.
    m = create_model("grcsf_unetpp", in_chans=1)
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert count(m.backbone) == 36_628_481  # unetpp, the paper's 36.63M
    assert count(m.gcus) == 1_956_560
    assert count(m.rcus) == 875_548  # 771,836 with rcu_key_embed='linear'
    assert count(m) == 39_460_589
    linear = create_model("grcsf_unetpp", in_chans=1, rcu_key_embed="linear")
    assert count(linear.rcus) == 771_836 and count(linear) == 39_356_877
    assert m.patch_sizes == (8, 8, 16)


def test_registered_and_smoke_config_passes_maps():
    from lesionkit.models import smoke_test_config
    for name in ("grcsf_unetpp", "grcsf_tiny"):
        smoke = smoke_test_config(name)
        assert smoke["inputs"] == {"residual_maps": (2, 64, 64)}
        model = create_model(name, **smoke["kwargs"])
        x = torch.rand(1, *smoke["input_size"])
        out = segmentation_logits(model(x, **{k: torch.rand(1, *s) for k, s in smoke["inputs"].items()}))
        assert out.shape == (1, 1, 64, 64)


def test_a_model_with_its_mae_makes_the_maps_and_keeps_the_mae_frozen():
    torch.manual_seed(0)
    mae = {"name": "mae_vit_tiny", "kwargs": {"img_size": 64, "depth": 1}}
    model = small(mae=mae, residual_repeats=2)
    assert not any(p.requires_grad for p in model.mae.parameters())
    model.train()
    assert not model.mae.training  # frozen: never in training mode
    from lesionkit.engine.trainers.residual_maps import residual_maps

    image = torch.rand(2, 3, 64, 64)
    maps = residual_maps(model.mae, image, model.residual_settings)
    assert maps.shape == (2, 2, 64, 64)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(image), model(image, residual_maps=maps), atol=0, rtol=0)
    with pytest.raises(ValueError, match="num_residual_maps should equal len"):
        small(mae=mae, residual_ratios=(0.5,))


# ----------------------------------------------------------------------------------- ablation recipes
# The rows of GRCSF's Table 3 (component ablation) and Table 7's residual-map kinds, written from
# the paper: (GCU, RCU, importance score in the RCU, residual kind).
CONFIGS = Path(__file__).resolve().parents[1] / "lesionkit" / "configs"
TABLE3 = {  # row: (use_gcu, use_rcu, use_importance_score)
    "t3_row1_unetpp": (False, False, None),  # UNet++
    "t3_row2_no_rcu": (True, False, None),  # GRCSF w/o RCU (= Table 7 "GCU (Ours)")
    "t3_row3_no_importance_score": (True, True, False),  # GRCSF w/o Importance Score in RCU
    "t3_row4_full": (True, True, True),  # GRCSF
}
TABLE7_KINDS = {"t7_residual_absdiff": "absdiff", "t7_residual_mse": "mse", "t7_residual_ssim": "ssim"}
SWITCHES = ("use_gcu", "use_rcu", "use_importance_score", "residual_kind")


def recipe_without_switches(cfg):
    """The recipe as a dict without the ablation's switches, its output folder and the grcsf
    section (the MAE and maps, which follow from the RCU and are checked on their own)."""
    data = cfg.to_dict()
    for key in ("out_dir", "grcsf"):
        data.pop(key)
    data["model"]["kwargs"] = {k: v for k, v in data["model"]["kwargs"].items() if k not in SWITCHES}
    return data


def test_every_ablation_recipe_is_a_table_row():
    names = sorted(p.stem.removeprefix("grcsf_ablation_") for p in CONFIGS.glob("grcsf_ablation_*.yaml"))
    assert names == sorted(TABLE3) + sorted(TABLE7_KINDS)


@pytest.mark.parametrize("row", sorted(TABLE3) + sorted(TABLE7_KINDS))
def test_ablation_recipes_set_the_switches_of_the_papers_rows(row):
    from lesionkit.engine.registry import load_train_config

    cfg = load_train_config(CONFIGS / f"grcsf_ablation_{row}.yaml")
    gcu, rcu, importance = TABLE3.get(row, (True, True, True))  # Table 7's kinds are on the full GRCSF
    kind = TABLE7_KINDS.get(row, "absdiff")
    kwargs = cfg.model.kwargs
    assert cfg.trainer == "grcsf" and cfg.model.name == "grcsf_unetpp"
    assert (kwargs.get("use_gcu", True), kwargs.get("use_rcu", True)) == (gcu, rcu)
    if rcu:
        assert kwargs.get("use_importance_score", True) == importance and kwargs["residual_kind"] == kind
        assert cfg.grcsf.mae_checkpoint and cfg.grcsf.residual_maps  # the RCU's maps come from an MAE
    else:
        assert cfg.grcsf.mae_checkpoint is None and cfg.grcsf.residual_maps is None
    # The switches reach the model (built on the meta device: no memory, no init).
    model = build_meta("grcsf_unetpp", **{k: v for k, v in kwargs.items() if k in SWITCHES})
    assert (model.gcus is not None, model.rcus is not None) == (gcu, rcu)
    if rcu:
        assert all((u.importance is not None) == importance for u in model.rcus)
        assert model.residual_settings.kind == kind
    # Everything else is the paper's recipe, grcsf_unetpp_isic2018.
    base = load_train_config(CONFIGS / "grcsf_unetpp_isic2018.yaml")
    assert recipe_without_switches(cfg) == recipe_without_switches(base)


@pytest.mark.parametrize("method, baseline", [("grcsf_tiny_isic2018", "unetpp_tiny_isic2018"),
                                              ("grcsf_unetpp_isic2018", "grcsf_ablation_t3_row1_unetpp")])
def test_method_and_baseline_recipes_differ_only_in_model_trainer_and_grcsf(method, baseline):
    """GRCSF Table 3 compares UNet++ and GRCSF under one recipe: optimiser, schedule, loss,
    augmentation, batch, precision and budget shared; only the model, its trainer and the
    grcsf section (MAE, maps) differ."""
    keys = ("model", "trainer", "grcsf")
    assert recipe_without(method, *keys) == recipe_without(baseline, *keys)


def test_paper_recipe_follows_sec_4():
    """Adam from 1e-4 raised tenfold over 5 warm-up epochs, Dice + focal, early stopping on the
    validation loss after 10 epochs (GRCSF Sec. 4), He-initialised convolutions."""
    from lesionkit.engine.registry import load_train_config

    cfg = load_train_config(CONFIGS / "grcsf_unetpp_isic2018.yaml")
    assert (cfg.optim.name, cfg.optim.lr * cfg.scheduler.warmup_start, cfg.optim.lr) == ("adam", pytest.approx(1e-4), 1e-3)
    assert cfg.scheduler.warmup_epochs == 5 and cfg.loss.name == "dice_focal"
    assert cfg.monitor == "loss" and cfg.early_stopping_patience == 10
    assert cfg.model.kwargs.get("conv_init", "he") == "he"
