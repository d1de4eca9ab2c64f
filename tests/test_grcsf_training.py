"""GRCSF end to end through the CLI on tiny synthetic data: MAE -> residual maps -> train ->
evaluate -> predict; a missing map, resume, and a reloaded checkpoint."""

import pytest
import torch

from lesionkit.cli import main
from lesionkit.engine import load_checkpoint, model_from_checkpoint

SIZE = "32"
TRAIN, VAL = "synthetic:4", "synthetic:2:1"
# grcsf_tiny narrowed for a fast test; two MAE runs per ratio instead of five.
MODEL = ["model.kwargs.img_size=32", "model.kwargs.widths=[4,8,8,16,16]", "model.kwargs.residual_repeats=2",
         "model.kwargs.score_hidden=8"]


@pytest.fixture(autouse=True)
def grad_mode():
    yield
    # evaluate / predict run under no_grad inside; the CLI must not switch gradients off for the process
    assert torch.is_grad_enabled()


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("grcsf")
    mae = root / "mae"
    # The MAE is a pre-training recipe: `lesionkit pretrain` runs it (as `lesionkit train` does).
    assert main(["pretrain", "--config", "grcsf_mae_tiny_isic2018", "--data", TRAIN, "--epochs", "1", "--batch-size", "3",
                 "--image-size", SIZE, "--out", str(mae), "--no-progress", "--precision", "fp32",
                 "--set", "data.num_workers=0", "model.kwargs.img_size=32", "model.kwargs.depth=1",
                 "time_budget=null", "scheduler.horizon=epochs"]) == 0
    maps = root / "maps"
    for spec in (TRAIN, VAL):
        assert main(["residual-maps", "--checkpoint", str(mae / "last.pt"), "--data", spec, "--out", str(maps),
                     "--repeats", "2", "--image-size", SIZE, "--no-progress"]) == 0
    return root, mae / "last.pt", maps


def train_args(root, mae, maps, out, epochs=1, extra=()):
    return ["train", "--config", "grcsf_tiny_isic2018", "--data", TRAIN, "--val-data", VAL, "--epochs", str(epochs),
            "--batch-size", "2", "--image-size", SIZE, "--out", str(root / out), "--no-progress", "--precision", "fp32",
            "--set", "data.num_workers=0", "channels_last=false", "time_budget=null", "scheduler.horizon=epochs",
            f"grcsf.mae_checkpoint={mae}", f"grcsf.residual_maps={maps}", *MODEL, *extra]


@pytest.fixture(scope="module")
def trained(pipeline):
    root, mae, maps = pipeline
    assert main(train_args(root, mae, maps, "run")) == 0
    return root / "run" / "best.pt"


def test_train_evaluate_predict(trained, tmp_path, capsys):
    best = trained
    state = load_checkpoint(best)
    assert state["model_kwargs"]["mae"]["name"] == "mae_vit_tiny"
    assert any(k.startswith("mae.") for k in state["model"])  # the checkpoint carries its MAE
    capsys.readouterr()
    # Evaluation on images without cached maps: the model makes them.
    assert main(["evaluate", "--checkpoint", str(best), "--data", "synthetic:3:7", "--out", str(tmp_path / "ev"),
                 "--no-progress"]) == 0
    assert "dice" in capsys.readouterr().out
    assert main(["data", "synth", "--out", str(tmp_path / "new"), "--n", "2", "--layout", "folder",
                 "--image-size", "48"]) == 0
    assert main(["predict", "--checkpoint", str(best), str(tmp_path / "new" / "train" / "images"),
                 "--out", str(tmp_path / "pred")]) == 0
    assert len(list((tmp_path / "pred").glob("*_mask.png"))) == 2


def test_on_the_fly_maps_equal_the_cached_ones(pipeline, trained):
    from lesionkit.data import from_spec
    from lesionkit.engine.trainers.residual_maps import ResidualMapCache, image_hash

    root, mae, maps = pipeline
    model = model_from_checkpoint(load_checkpoint(trained)).eval()
    from lesionkit.engine.trainers.residual_maps import file_hash

    cache = ResidualMapCache(maps, file_hash(mae), model.residual_settings)
    items = [from_spec(VAL, image_size=32)[i] for i in range(2)]
    image = torch.stack([it["image"] for it in items])
    cached = torch.stack([cache.load(image_hash(it["image"])) for it in items])
    from lesionkit.engine.trainers.residual_maps import residual_maps

    with torch.no_grad():
        # The MAE restored from the GRCSF checkpoint makes the cached maps (stored in float16) ...
        made = residual_maps(model.mae, image, model.residual_settings)
        torch.testing.assert_close(made, cached, atol=1e-3, rtol=0)
        # ... and a forward without maps uses exactly those.
        torch.testing.assert_close(model(image), model(image, residual_maps=made), atol=0, rtol=0)
        for rcu in model.rcus:
            rcu.weights.fill_(1.0)  # W1, W2 start at 0; with weight, other maps give other logits
        assert (model(image) - model(image, residual_maps=torch.rand_like(made))).abs().max() > 1e-6


def test_training_with_maps_made_on_the_fly(pipeline, monkeypatch):
    """grcsf.residual_maps=null: the model makes each batch's maps with its MAE as it trains and
    validates - the maps the residual-maps command cached for those images (stored in float16)."""
    import lesionkit.layers.residual_maps as rm
    from lesionkit.engine.trainers.residual_maps import ResidualMapCache, file_hash, image_hash

    root, mae, maps = pipeline
    made = []
    make = rm.residual_maps

    def spy(mae_model, images, settings):
        out = make(mae_model, images, settings)
        made.extend(zip(images.detach().clone(), out, [settings] * len(out)))
        return out

    monkeypatch.setattr(rm, "residual_maps", spy)
    # No flips: a flipped image is another image, with maps of its own (not in the cache).
    no_flips = "data.transforms={hflip: 0, vflip: 0, rot90: 0}"
    assert main(train_args(root, mae, maps, "fly", extra=["grcsf.residual_maps=null", no_flips])) == 0
    assert load_checkpoint(root / "fly" / "last.pt")["config"]["grcsf"]["residual_maps"] is None
    assert len(made) >= 4 + 2  # every training image and every validation image, at least once
    cache = ResidualMapCache(maps, file_hash(mae), made[0][2])
    for image, got, _ in made:
        torch.testing.assert_close(got, cache.load(image_hash(image)), atol=1e-3, rtol=0)


def test_missing_map_names_the_image_and_the_command(pipeline, capsys):
    root, mae, maps = pipeline
    args = train_args(root, mae, maps, "missing")
    args[args.index("--val-data") + 1] = "synthetic:2:9"
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "no residual maps for image 'synthetic_9_000000'" in err
    assert (f"make them with: lesionkit residual-maps --checkpoint {mae} --data synthetic:2:9 --out {maps} "
            "--image-size 32 --repeats 2") in err


def test_without_an_mae_the_error_says_how_to_get_one(tmp_path, capsys):
    assert main(["train", "--config", "grcsf_tiny_isic2018", "--data", TRAIN, "--epochs", "1", "--image-size", SIZE,
                 "--out", str(tmp_path), "--set", "grcsf.mae_checkpoint=null", *MODEL]) == 2
    assert "grcsf.mae_checkpoint is not set" in capsys.readouterr().err


def test_resume_matches_an_uninterrupted_run(pipeline):
    root, mae, maps = pipeline
    constant = ["scheduler.name=none"]  # the same lr whether the run is 1 or 2 epochs long
    assert main(train_args(root, mae, maps, "full", epochs=2, extra=constant)) == 0
    assert main(train_args(root, mae, maps, "half", epochs=1, extra=constant)) == 0
    assert main(["train", "--resume", str(root / "half" / "last.pt"), "--epochs", "2", "--out", str(root / "half"),
                 "--no-progress"]) == 0
    full = load_checkpoint(root / "full" / "last.pt")["model"]
    half = load_checkpoint(root / "half" / "last.pt")["model"]
    assert full.keys() == half.keys()
    for k in full:
        torch.testing.assert_close(half[k], full[k], atol=1e-5, rtol=1e-4, msg=k)


def test_reloaded_checkpoint_reproduces_predictions(pipeline, trained):
    """The validation metrics stored in best.pt come back from the reloaded model on the same maps."""
    from lesionkit.data import from_spec
    from lesionkit.engine.evaluation import evaluate
    from lesionkit.engine.trainers.residual_maps import ResidualMapCache, ResidualMapDataset, file_hash

    root, mae, maps = pipeline
    state = load_checkpoint(trained)
    model = model_from_checkpoint(state).eval()
    data = ResidualMapDataset(from_spec(VAL, image_size=32), ResidualMapCache(maps, file_hash(mae), model.residual_settings), "")
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    result = evaluate(model, loader, torch.device("cpu"), hd95=False, model_inputs=("residual_maps",))
    stored = state["metrics"]
    for key in ("dice", "iou"):
        assert result.metrics["dataset"][key] == pytest.approx(stored["dataset"][key], abs=1e-6)
