"""Input standardisation (AMLP Sec. 4.1: images standardised by the dataset's mean and std):
model options input_mean / input_std, 'dataset' resolved by the trainer from the training images
or from the init_from checkpoint, recorded in checkpoints and applied by evaluation and
prediction (docs/amlp.md)."""

import warnings

import pytest
import torch

from lesionkit.cli import main
from lesionkit.data import from_spec
from lesionkit.data.splits import holdout_split
from lesionkit.engine import load_checkpoint
from lesionkit.engine.checkpoint import model_from_checkpoint
from lesionkit.engine.input_stats import image_statistics, resolve_input_statistics
from lesionkit.engine.registry import build_trainer, load_train_config
from lesionkit.models import create_model

WIDTHS = "[4, 8, 16]"
MEAN, STD = (0.6, 0.4, 0.3), (0.2, 0.25, 0.1)


def test_the_network_sees_the_standardised_image():
    torch.manual_seed(0)
    plain = create_model("unet_tiny", widths=(4, 8, 16)).eval()
    standard = create_model("unet_tiny", widths=(4, 8, 16), input_mean=MEAN, input_std=STD).eval()
    standard.load_state_dict(plain.state_dict())  # the statistics are options, not weights
    x = torch.rand(2, 3, 32, 32)
    z = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(standard(x), plain(z))
    assert not torch.allclose(standard(x), plain(x))


def test_amlp_masks_the_standardised_image_and_reconstructs_it():
    torch.manual_seed(0)
    model = create_model("amlp_unet_tiny", widths=(4, 8, 16), patch_size=8, input_mean=MEAN, input_std=STD).eval()
    x = torch.rand(1, 3, 32, 32)
    mask = torch.zeros(1, 16, dtype=torch.bool)
    mask[0, 5] = True
    # A masked patch is the dataset mean (0 after standardising): its pixels change nothing.
    other = x.clone()
    other[:, :, 8:16, 8:16] = torch.rand(1, 3, 8, 8)
    torch.testing.assert_close(model(x, patch_mask=mask).logits, model(other, patch_mask=mask).logits)
    # The encoder features MPS may cluster see the standardised image too.
    plain = create_model("amlp_unet_tiny", widths=(4, 8, 16), patch_size=8).eval()
    plain.load_state_dict(model.state_dict())
    z = model.standardize(x)
    torch.testing.assert_close(model.patch_vectors(x), plain.patch_vectors(z))


@pytest.mark.parametrize("kwargs, match", [
    ({"input_mean": MEAN}, "input_std should list in_chans=3"),
    ({"input_mean": MEAN[:2], "input_std": STD[:2]}, "input_mean should list in_chans=3"),
    ({"input_mean": MEAN, "input_std": (0.2, 0.0, 0.1)}, "input_std should be > 0"),
    ({"input_mean": "dataset", "input_std": "dataset"}, "resolved by the trainer"),
])
def test_bad_statistics_name_the_option(kwargs, match):
    with pytest.raises(ValueError, match=match):
        create_model("unet_tiny", widths=(4, 8, 16), **kwargs)


def config(tmp_path, **over):
    sets = {"model.name": "unet_tiny", "model.kwargs.widths": WIDTHS, "model.kwargs.input_mean": "dataset",
            "model.kwargs.input_std": "dataset", "data.train": "synthetic:12", "data.image_size": 32,
            "data.batch_size": 4, "data.val_fraction": 0.25, "data.num_workers": 0, "epochs": 1,
            "progress": "false", "out_dir": str(tmp_path / "run")}
    sets.update(over)
    return load_train_config({}).with_overrides([f"{k}={v}" for k, v in sets.items()])


def test_dataset_statistics_are_those_of_the_training_part(tmp_path):
    cfg = config(tmp_path)
    assert "training images" in resolve_input_statistics(cfg)
    # Directly: per-channel mean and std of the pixels of the 9 training images (3 held out).
    train, _ = holdout_split(from_spec("synthetic:12", image_size=32), 0.25, cfg.seed)
    pixels = torch.stack([train[i]["image"] for i in range(len(train))]).double()
    want_mean = pixels.mean(dim=(0, 2, 3))
    want_std = pixels.std(dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(torch.tensor(cfg.model.kwargs["input_mean"]).double(), want_mean, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(cfg.model.kwargs["input_std"]).double(), want_std, atol=1e-5, rtol=0)
    assert resolve_input_statistics(cfg) is None  # numbers now: nothing left to resolve


def test_image_statistics_sample_evenly_and_cap_the_count():
    data = [{"image": torch.full((1, 2, 2), float(i))} for i in range(10)]
    mean, std = image_statistics(data, max_images=2)  # images 0 and 9
    assert mean == [4.5] and std == [4.5]


def test_half_dataset_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="input_std.*give both as 'dataset'"):
        resolve_input_statistics(config(tmp_path, **{"model.kwargs.input_std": "null"}))


def test_fine_tuning_takes_the_pretrained_statistics_and_checkpoints_record_them(tmp_path, capsys):
    pre = build_trainer(config(tmp_path, out_dir=str(tmp_path / "pre")))
    pre.fit()
    recorded = load_checkpoint(tmp_path / "pre" / "last.pt")["model_kwargs"]
    assert isinstance(recorded["input_mean"], (list, tuple)) and len(recorded["input_mean"]) == 3
    # Fine-tuning on other images (a different synthetic set) keeps the pre-training's scale.
    argv = ["train", "--model", "unet_tiny", "--data", "synthetic:16", "--image-size", "32", "--batch-size", "4",
            "--epochs", "1", "--out", str(tmp_path / "ft"), "--no-progress", "--init-from", str(tmp_path / "pre" / "last.pt"),
            "--set", f"model.kwargs.widths={WIDTHS}", "model.kwargs.input_mean=dataset",
            "model.kwargs.input_std=dataset", "data.num_workers=0", "data.val_fraction=0.25"]
    assert main(argv) == 0
    assert "recorded by init_from" in capsys.readouterr().out
    state = load_checkpoint(tmp_path / "ft" / "last.pt")
    assert list(state["model_kwargs"]["input_mean"]) == list(recorded["input_mean"])
    assert list(state["model_kwargs"]["input_std"]) == list(recorded["input_std"])
    # The rebuilt model standardises as training did: evaluation and prediction use this path.
    model = model_from_checkpoint(state)
    assert model.standardises
    torch.testing.assert_close(model.input_mean.flatten(), torch.tensor(recorded["input_mean"], dtype=torch.float32))
    assert main(["evaluate", "--checkpoint", str(tmp_path / "ft" / "last.pt"), "--data", "synthetic:4",
                 "--out", str(tmp_path / "eval"), "--no-progress"]) == 0


def test_standardising_a_checkpoint_trained_on_raw_inputs_warns(tmp_path):
    pre = build_trainer(config(tmp_path, out_dir=str(tmp_path / "pre"), **{"model.kwargs.input_mean": "null",
                                                                           "model.kwargs.input_std": "null"}))
    pre.fit()
    cfg = config(tmp_path, init_from=str(tmp_path / "pre" / "last.pt"))
    with pytest.warns(UserWarning, match="unstandardised"):
        assert "training images" in resolve_input_statistics(cfg)
    quiet = config(tmp_path)  # no init_from: nothing to mismatch
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resolve_input_statistics(quiet)
