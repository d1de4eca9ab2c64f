"""TrainConfig: YAML round trip, overrides, and errors that name the key."""

from pathlib import Path

import pytest

from lesionkit.engine import TrainConfig

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "lesionkit" / "configs").glob("*.yaml"))


def test_yaml_round_trip(tmp_path):
    cfg = TrainConfig().with_overrides(["optim.lr=0.02", "model.kwargs.widths=[8, 16]", "time_budget=30"])
    cfg.save_yaml(tmp_path / "c.yaml")
    again = TrainConfig.from_yaml(tmp_path / "c.yaml")
    assert again == cfg
    assert again.model.kwargs == {"widths": [8, 16]}
    assert again.time_budget == 30.0


def test_yaml_exponent_without_dot_is_a_number(tmp_path):
    (tmp_path / "c.yaml").write_text("optim:\n  lr: 1e-3\n")
    assert TrainConfig.from_yaml(tmp_path / "c.yaml").optim.lr == pytest.approx(1e-3)


@pytest.mark.parametrize("override, match", [
    ("optim.lrr=1", "unknown config key 'optim.lrr'.*'lr'"),
    ("epochs=ten", "epochs should be an integer, got 'ten'"),
    ("optim.lr=fast", "optim.lr should be a number"),
    ("precision=fp8", "precision should be one of"),
    ("scheduler.name=step", "scheduler.name should be one of"),
    ("data.augment=[shear]", r"data.augment has unknown entries \['shear'\]"),
    ("epochs.x=1", "'epochs' is not a mapping"),
    ("epochs", "key=value"),
    ("data.val_fraction=1.5", "val_fraction"),
])
def test_bad_overrides_name_the_key(override, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig().with_overrides([override])


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  name: sgd\n  moment: 0.9\n")
    with pytest.raises(ValueError, match=r"bad.yaml.*'optim.moment'"):
        TrainConfig.from_yaml(path)
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        TrainConfig.from_yaml(tmp_path / "missing.yaml")


def test_to_dict_is_primitives_only():
    def walk(v):
        if isinstance(v, dict):
            return all(isinstance(k, str) and walk(x) for k, x in v.items())
        if isinstance(v, list):
            return all(walk(x) for x in v)
        return v is None or isinstance(v, (bool, int, float, str))

    assert walk(TrainConfig().to_dict())


def test_shipped_configs_load():
    from lesionkit.engine import load_train_config

    assert CONFIGS, "lesionkit/configs/*.yaml should exist"
    for path in CONFIGS:  # each with the config class of the trainer it names
        load_train_config(path)


def test_demo_reads_its_recipe_file():
    from lesionkit.engine.demo import demo_config

    path = Path(__file__).resolve().parents[1] / "lesionkit" / "configs" / "demo_unet_tiny_synthetic.yaml"
    # The same precision on every machine: nothing but out_dir differs from the file.
    assert TrainConfig.from_yaml(path).with_overrides(["out_dir=x"]) == demo_config("x")


def test_recipes_by_name_and_the_former_configs_path():
    from lesionkit.configs import list_recipes, recipe_path, resolve_recipe
    from lesionkit.engine import load_train_config

    assert "segmae_isic2018" in list_recipes() and "demo_unet_tiny_synthetic" in list_recipes()
    by_name = load_train_config("segmae_isic2018")
    assert by_name == load_train_config(recipe_path("segmae_isic2018"))
    assert resolve_recipe("configs/segmae_isic2018.yaml") == recipe_path("segmae_isic2018")
    with pytest.raises(FileNotFoundError, match=r"no recipe named 'segmae_isic2019'.*segmae_isic2018"):
        load_train_config("segmae_isic2019")
    with pytest.raises(FileNotFoundError, match=r"config file 'nowhere/x.yaml' does not exist"):
        load_train_config("nowhere/x.yaml")
    # Recipes live in the package; the top-level configs/ folder only points there.
    top = Path(__file__).resolve().parents[1] / "configs"
    assert not list(top.glob("*.yaml")), "put recipes in lesionkit/configs/ so they ship in the wheel"


def test_data_augment_is_an_alias_of_the_flips_in_data_transforms():
    cfg = TrainConfig.from_dict({"data": {"augment": ["hflip", "rot90"], "transforms": {"rotation": 15}}})
    assert cfg.data.augment is None
    assert cfg.data.transforms == {"rotation": 15, "hflip": 0.5, "vflip": 0.0, "rot90": 0.5}
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"data.transforms.vflip is a probability"):
        TrainConfig.from_dict({"data": {"transforms": {"vflip": 2}}})


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_optimiser_takes_the_fused_update_and_it_matches_the_loop(name):
    """optim.fused: null picks torch's fused Adam / AdamW for CPU float parameters (2.4-4x
    faster on a CPU, docs/engine.md), true also SGD's; false keeps the per-parameter loop; both
    make the same step."""
    import torch

    from lesionkit.engine.builders import build_optimizer
    from lesionkit.engine.config import OptimConfig

    torch.manual_seed(0)
    nets = [torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Tanh(), torch.nn.Conv2d(4, 2, 3)) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    opts = [build_optimizer(OptimConfig(name=name, lr=0.01, weight_decay=0.01, fused=fused), net)
            for net, fused in zip(nets, (True if name == "sgd" else None, False))]
    assert all(g["fused"] for g in opts[0].param_groups)
    assert not any(g["fused"] for g in opts[1].param_groups)
    x = torch.randn(2, 3, 8, 8)
    for _ in range(3):
        for net, opt in zip(nets, opts):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_optimiser_fused_true_refuses_parameters_it_cannot_fuse():
    import torch

    from lesionkit.engine.builders import build_optimizer
    from lesionkit.engine.config import OptimConfig

    net = torch.nn.Linear(2, 2, device="meta")
    with pytest.raises(ValueError, match="optim.fused"):
        build_optimizer(OptimConfig(fused=True), net)
    assert build_optimizer(OptimConfig(), net).param_groups[0]["fused"] is None
