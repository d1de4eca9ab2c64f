"""AMLP pre-training on the engine (trainer 'amlp', lesionkit pretrain) and the generic fine-tuning
options init_from / init_parts / data.label_fraction (docs/amlp.md, docs/engine.md)."""

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import lesionkit.layers.masked_patch_selection as mps
from lesionkit.cli import main
from lesionkit.data.splits import labelled_fraction
from lesionkit.engine import load_checkpoint
from lesionkit.engine.checkpoint import checkpoint_header, save_checkpoint
from lesionkit.engine.registry import build_trainer, load_train_config
from lesionkit.engine.trainer import Trainer
from lesionkit.engine.trainers.amlp import AMLPTrainer
from lesionkit.layers.masked_patch_selection import amr_mask_ratio, amr_tau, select_masked_patches
from lesionkit.layers.patch_masking import patchify
from lesionkit.models import create_model

WIDTHS = "[4, 8, 16]"  # 2 poolings: 32-px inputs, 8-px patches -> a 4x4 grid of 16 patches


def amlp_config(tmp_path, **over):
    sets = {"trainer": "amlp", "model.name": "amlp_unet_tiny", "model.kwargs.widths": WIDTHS,
            "model.kwargs.patch_size": 8, "data.train": "synthetic:8", "data.image_size": 32, "data.batch_size": 4,
            "data.val_fraction": 0.0, "data.num_workers": 0, "epochs": 2, "optim.lr": 0.01, "progress": "false",
            "out_dir": str(tmp_path)}
    sets.update(over)
    return load_train_config({"trainer": "amlp"}).with_overrides([f"{k}={v}" for k, v in sets.items()])


def lesion_batch(batch=4, size=32, seed=0):
    """Dark skin with a bright 16-px square lesion: patches 5, 6, 9, 10 of the 4x4 grid."""
    gen = torch.Generator().manual_seed(seed)
    images = 0.2 + 0.05 * torch.rand(batch, 3, size, size, generator=gen)
    images[:, :, 8:24, 8:24] += 0.6
    lesion = torch.zeros(16, dtype=torch.bool)
    lesion[[5, 6, 9, 10]] = True
    return {"image": images}, lesion


def read_log(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_pretrain_steps_reduce_the_reconstruction_loss(tmp_path):
    trainer = build_trainer(amlp_config(tmp_path, **{"amlp.amr": "false", "amlp.mask_ratio": 0.5}))
    assert isinstance(trainer, AMLPTrainer)
    assert not any(p.requires_grad for p in trainer.model.head.parameters())  # segmentation is frozen
    batch, _ = lesion_batch()
    first = trainer.optimize(trainer.training_step, batch)
    for _ in range(30):
        last = trainer.optimize(trainer.training_step, batch)
    assert set(first) == {"loss", "pred", "arl", "ccl", "mask_ratio"}
    assert last["pred"] < 0.8 * first["pred"] and last["loss"] < first["loss"]


@pytest.mark.parametrize("strategy", ["hard_to_easy", "easy_to_hard", "random"])
def test_trainer_masks_come_from_the_kernel_and_follow_the_strategy(tmp_path, monkeypatch, strategy):
    trainer = build_trainer(amlp_config(tmp_path, **{"amlp.strategy": strategy, "amlp.amr": "false",
                                                     "amlp.mask_ratio": 0.25}))
    calls = []
    kernel = mps.kmeans

    def spy(x, **kw):
        calls.append((tuple(x.shape), x.device))
        return kernel(x, **kw)

    monkeypatch.setattr(mps, "kmeans", spy)
    seen = []
    forward = trainer.forward
    monkeypatch.setattr(trainer, "forward", lambda x, **kw: seen.append(kw["patch_mask"]) or forward(x, **kw))
    batch, lesion = lesion_batch()
    trainer.optimize(trainer.training_step, batch)
    assert calls == [((4, 16, 3 * 8 * 8), torch.device("cpu"))]  # one batched call on the batch's device
    (mask,) = seen
    assert (mask.sum(1) == 4).all()  # floor(16 * 0.25)
    if strategy == "hard_to_easy":
        assert (mask == lesion).all()  # the lesion (the smaller cluster) first
    elif strategy == "easy_to_hard":
        assert not (mask & lesion).any()
    else:  # seeded per step: the same draw as the selection function with that generator
        gen = torch.Generator().manual_seed(trainer.cfg.seed * 1_000_003 + 0)
        expected = select_masked_patches(patchify(batch["image"], 8), 0.25, "random", generator=gen).mask
        assert torch.equal(mask, expected)


def test_switches_leave_their_parts_out(tmp_path):
    trainer = build_trainer(amlp_config(tmp_path, **{"amlp.arl_weight": 0, "amlp.ccl_weight": 0}))
    assert not any(p.requires_grad for p in trainer.model.fg_head.parameters())
    batch, _ = lesion_batch()
    logs = trainer.optimize(trainer.training_step, batch)
    assert set(logs) == {"loss", "pred", "mask_ratio"} and torch.equal(logs["loss"], logs["pred"])
    with pytest.raises(ValueError, match="amlp.strategy should be one of"):
        amlp_config(tmp_path, **{"amlp.strategy": "lesion_first"})
    with pytest.raises(ValueError, match="pre-trains amlp_unet"):
        build_trainer(amlp_config(tmp_path, **{"model.name": "unet_tiny", "model.kwargs": "{}"}))


def test_amr_ratio_grows_every_step_and_reaches_the_cap_at_the_last_epoch(tmp_path):
    trainer = build_trainer(amlp_config(tmp_path, epochs=3))
    assert trainer.cfg.amlp.amr_cap == 0.9  # above MAE's 75 %, Sec. 3.4
    tau = amr_tau(0.25, 0.9, 3)
    assert trainer.tau == pytest.approx(tau)
    spe = trainer.steps_per_epoch
    assert spe > 1
    # Eq. 9 at fractional epochs 1 + steps done / steps per epoch: it grows with every step.
    per_step = [amr_mask_ratio(1 + s / spe, 0.25, tau, 0.9) for s in range(3 * spe)]
    assert per_step[0] == 0.25 and per_step[2 * spe] == pytest.approx(0.9)
    assert all(a < b for a, b in zip(per_step[:2 * spe], per_step[1:2 * spe + 1]))
    assert [trainer.mask_ratio(e) for e in (1, 2, 3)] == pytest.approx([per_step[0], per_step[spe], per_step[2 * spe]])
    trainer.fit()
    rows = read_log(tmp_path / "log.csv")
    epoch_means = [sum(per_step[e * spe:(e + 1) * spe]) / spe for e in range(3)]
    assert [float(r["train_mask_ratio"]) for r in rows] == pytest.approx(epoch_means, rel=1e-5)
    # No validation while pre-training: every epoch is the best (the latest) one.
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == 3
    fixed = build_trainer(amlp_config(tmp_path / "fixed", **{"amlp.amr": "false", "amlp.mask_ratio": 0.6}))
    assert fixed.mask_ratio(1) == fixed.mask_ratio(5) == 0.6


def test_encoder_features_for_mps(tmp_path):
    trainer = build_trainer(amlp_config(tmp_path, **{"amlp.features": "encoder"}))
    batch, _ = lesion_batch()
    before = [b.clone() for b in trainer.model.buffers()]
    selection = trainer.select(batch["image"])
    assert selection.mask.shape == (4, 16)
    # The extra encoder pass runs in eval mode: BatchNorm statistics stay as they were.
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.buffers()))
    assert trainer.model.training


@pytest.mark.parametrize("features", ["encoder", "pixels"])
def test_mps_clusters_what_features_names(tmp_path, monkeypatch, features):
    """features: encoder clusters model.patch_vectors (the unmasked image's encoder features, in
    eval mode), features: pixels the raw patches. The encoder vectors here single out four corner
    patches; the pixels single out the lesion (patches 5, 6, 9, 10)."""
    trainer = build_trainer(amlp_config(tmp_path, **{"amlp.features": features, "amlp.amr": "false",
                                                     "amlp.mask_ratio": 0.25, "amlp.strategy": "hard_to_easy"}))
    batch, lesion = lesion_batch()
    corners = torch.zeros(16, dtype=torch.bool)
    corners[[0, 3, 12, 15]] = True
    calls = []

    def patch_vectors(images):
        calls.append((images, trainer.model.training))
        vectors = torch.zeros(images.shape[0], 16, 6)
        vectors[:, corners] = 1.0
        return vectors

    monkeypatch.setattr(trainer.model, "patch_vectors", patch_vectors)
    mask = trainer.select(batch["image"]).mask
    if features == "encoder":
        ((images, training),) = calls
        assert images is batch["image"] and not training
        assert (mask == corners).all()
    else:
        assert not calls and (mask == lesion).all()


def write_images(folder, n=8, size=40):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"img_{i}.png")


def pretrain_argv(data, out, *extra):
    return ["pretrain", "--config", "amlp_pretrain_tiny_isic2018", "--data", data, "--out", str(out),
            "--image-size", "32", "--batch-size", "4", "--epochs", "2", "--precision", "fp32", "--no-progress",
            "--set", f"model.kwargs.widths={WIDTHS}", "data.num_workers=0", "channels_last=false", *extra]


class StopAfterStep(AMLPTrainer):
    """Raises (like a kill) right after the mid-epoch checkpoint of global step 4 (epoch 2, batch 1)."""

    def save(self, path, full=True):
        super().save(path, full)
        if full and self.global_step == 4 and self._epoch_batches:
            raise KeyboardInterrupt


def test_pretrain_cli_on_images_without_masks_and_resume(tmp_path, monkeypatch, capsys):
    write_images(tmp_path / "unlabelled" / "images", n=12)  # no masks folder
    data = f"folder:{tmp_path / 'unlabelled'}"
    assert main(pretrain_argv(data, tmp_path / "full")) == 0
    assert "pre-trained 2 epochs" in capsys.readouterr().out
    full = load_checkpoint(tmp_path / "full" / "last.pt")
    assert full["model_name"] == "amlp_unet_tiny" and full["global_step"] == 6  # 12 images, batches of 4

    import lesionkit.engine.registry as registry

    monkeypatch.setitem(registry.TRAINERS, "amlp", StopAfterStep)
    with pytest.raises(KeyboardInterrupt):
        main(pretrain_argv(data, tmp_path / "cut", "checkpoint.every_steps=1"))
    monkeypatch.setitem(registry.TRAINERS, "amlp", AMLPTrainer)
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["global_step"] == 4
    assert main(["pretrain", "--resume", str(tmp_path / "cut" / "last.pt"), "--no-progress"]) == 0
    resumed = load_checkpoint(tmp_path / "cut" / "last.pt")
    assert resumed["global_step"] == 6
    for key, value in full["model"].items():
        assert torch.equal(value, resumed["model"][key]), key


def test_pretrain_cli_rejects_a_supervised_recipe(capsys):
    assert main(["pretrain", "--config", "unet_tiny_isic2018", "--data", "synthetic:8"]) == 2
    assert "trainer: amlp" in capsys.readouterr().err


def finetune_config(tmp_path, **over):
    sets = {"model.name": "unet_tiny", "model.kwargs.widths": WIDTHS, "data.train": "synthetic:40",
            "data.image_size": 32, "data.batch_size": 4, "data.val_fraction": 0.0, "data.num_workers": 0,
            "epochs": 1, "progress": "false", "out_dir": str(tmp_path)}
    sets.update(over)
    return load_train_config({}).with_overrides([f"{k}={v}" for k, v in sets.items()])


def save_pretrained(path, name="amlp_unet_tiny", **kwargs):
    torch.manual_seed(123)
    model = create_model(name, **kwargs)
    state = checkpoint_header(name, kwargs, {})
    state["model"] = model.state_dict()
    save_checkpoint(state, path)
    return model


def test_init_from_loads_the_encoder_and_reports_keys(tmp_path, capsys):
    source = save_pretrained(tmp_path / "pre.pt", widths=[4, 8, 16], patch_size=8)
    trainer = Trainer(finetune_config(tmp_path / "run", init_from=str(tmp_path / "pre.pt")))
    loaded = trainer.model.state_dict()
    for key, value in source.state_dict().items():
        if key.startswith(("stem.", "down.")):
            assert torch.equal(loaded[key], value), key
        elif key.startswith("up.") and value.ndim == 4:  # conv weights (BatchNorm starts at 1 either way)
            assert not torch.equal(loaded[key], value), key  # the decoder was not asked for
    report = trainer.init_report
    assert report.loaded and all(k.startswith(("stem.", "down.")) for k in report.loaded)
    assert report.missing == []
    assert {"recon_head.weight", "fg_head.weight", "up.0.up.weight"} <= set(report.unused)
    assert "init_from" in capsys.readouterr().out
    both = Trainer(finetune_config(tmp_path / "both", init_from=str(tmp_path / "pre.pt"), init_parts="encoder+decoder"))
    assert torch.equal(both.model.state_dict()["up.0.up.weight"], source.state_dict()["up.0.up.weight"])
    assert "head.weight" in both.init_report.unused  # the segmentation head starts fresh


def test_init_parts_all_loads_every_tensor_the_model_has(tmp_path, capsys):
    source = save_pretrained(tmp_path / "pre.pt", widths=[4, 8, 16], patch_size=8).state_dict()
    trainer = Trainer(finetune_config(tmp_path / "run", init_from=str(tmp_path / "pre.pt"), init_parts="all"))
    loaded = trainer.model.state_dict()
    for key, value in loaded.items():  # the head and the BatchNorm statistics too
        assert torch.equal(value, source[key]), key
    report = trainer.init_report
    assert sorted(report.loaded) == sorted(loaded) and report.missing == []
    assert sorted(report.unused) == sorted(k for k in source if k.startswith(("recon_head.", "fg_head.")))
    capsys.readouterr()
    # The CLI flag reaches the run and its checkpoint.
    argv = ["train", "--model", "unet_tiny", "--data", "synthetic:8", "--image-size", "32", "--batch-size", "4",
            "--epochs", "1", "--out", str(tmp_path / "cli"), "--no-progress", "--init-from", str(tmp_path / "pre.pt"),
            "--init-parts", "all", "--set", f"model.kwargs.widths={WIDTHS}", "data.num_workers=0",
            "data.val_fraction=0"]
    assert main(argv) == 0
    assert f"parts all): loaded {len(loaded)} tensors; missing 0;" in capsys.readouterr().out
    assert load_checkpoint(tmp_path / "cli" / "last.pt")["config"]["init_parts"] == "all"


def test_init_from_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="init_from.*does not exist"):
        Trainer(finetune_config(tmp_path, init_from=str(tmp_path / "missing.pt")))
    save_pretrained(tmp_path / "wide.pt", widths=[8, 16, 32], patch_size=8)
    with pytest.raises(ValueError, match="shapes differ for stem.0.weight"):
        Trainer(finetune_config(tmp_path, init_from=str(tmp_path / "wide.pt")))
    save_pretrained(tmp_path / "other.pt", name="unetpp_tiny")
    with pytest.raises(ValueError, match="none of its tensors matches the encoder"):
        Trainer(finetune_config(tmp_path, init_from=str(tmp_path / "other.pt")))
    with pytest.raises(ValueError, match="init_parts should be one of"):
        finetune_config(tmp_path, init_parts="decoder")


@pytest.mark.parametrize("fraction", [0, -0.1, 1.5])
def test_label_fraction_out_of_range(tmp_path, fraction):
    with pytest.raises(ValueError, match=r"data.label_fraction should be in \(0, 1\]"):
        finetune_config(tmp_path, **{"data.label_fraction": fraction})


def test_label_fraction_is_a_seeded_subset_kept_on_resume(tmp_path):
    cfg = finetune_config(tmp_path, **{"data.label_fraction": 0.25, "seed": 3, "epochs": 2})
    trainer = Trainer(cfg)
    expected = labelled_fraction(40, 0.25, 3)[0].tolist()
    assert len(trainer.train_data) == 10 and trainer.train_data.indices == expected
    assert trainer.label_subset["indices"] == expected and trainer.label_subset["seed"] == 3
    trainer.fit()
    recorded = load_checkpoint(tmp_path / "last.pt")["label_subset"]
    assert recorded["indices"] == expected and recorded["fraction"] == 0.25
    assert load_checkpoint(tmp_path / "best.pt")["label_subset"]["indices"] == expected
    # A resume draws nothing anew: another label seed in the config still trains on the recorded subset.
    other = Trainer(cfg.with_overrides(["data.label_seed=99", "epochs=3"]))
    assert other.train_data.indices != expected
    other.resume(tmp_path / "last.pt")
    assert other.train_data.indices == expected and other.steps_per_epoch == len(other.train_loader)
    Trainer(finetune_config(tmp_path / "plain")).fit()
    with pytest.raises(ValueError, match="trained on all labelled images"):
        Trainer(cfg).resume(tmp_path / "plain" / "last.pt")


def test_train_cli_label_fraction_and_init_from(tmp_path, capsys):
    save_pretrained(tmp_path / "pre.pt", widths=[4, 8, 16], patch_size=8)
    argv = ["train", "--model", "unet_tiny", "--data", "synthetic:40", "--image-size", "32", "--batch-size", "4",
            "--epochs", "1", "--out", str(tmp_path / "run"), "--no-progress", "--init-from", str(tmp_path / "pre.pt"),
            "--label-fraction", "0.1", "--set", f"model.kwargs.widths={WIDTHS}", "data.num_workers=0",
            "data.val_fraction=0"]
    assert main(argv) == 0
    assert "loaded" in capsys.readouterr().out
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert len(state["label_subset"]["indices"]) == 4 and state["config"]["init_from"] == str(tmp_path / "pre.pt")
    assert main(argv + ["--label-fraction", "0"]) == 2
    assert "data.label_fraction should be in (0, 1]" in capsys.readouterr().err


# ----------------------------------------------------------------------------------- ablation recipes
# AMLP's ablation tables, row by row, written from the paper: which of MPS (masked patch
# selection), AMR (adaptive masking ratio), L_arl (attention reconstruction, the paper's L_rcl)
# and L_ccl (category consistency) each row uses. L_l2 is in every row. MPS masks in the order of
# Table 4's bold "Ours" row (easy_to_hard; the text describes hard_to_easy, docs/amlp.md);
# without it patches are masked at random.
CONFIGS = Path(__file__).resolve().parents[1] / "lesionkit" / "configs"
TABLES = {  # recipe: (strategy, amr, arl, ccl)
    # Table 3: the component ablation (CRCL = L_arl + L_ccl).
    "t3_row1_base": ("random", False, False, False),
    "t3_row2_mps": ("easy_to_hard", False, False, False),
    "t3_row3_amr": ("random", True, False, False),
    "t3_row4_crcl": ("random", False, True, True),
    "t3_row5_mps_amr": ("easy_to_hard", True, False, False),
    "t3_row6_mps_crcl": ("easy_to_hard", False, True, True),
    "t3_row7_amr_crcl": ("random", True, True, True),
    "t3_row8_amlp": ("easy_to_hard", True, True, True),
    # Table 4: the masking strategy, the rest as the full AMLP.
    "t4_row1_random": ("random", True, True, True),
    "t4_row2_hard_to_easy": ("hard_to_easy", True, True, True),
    "t4_row3_easy_to_hard": ("easy_to_hard", True, True, True),
    # Table 5: the losses, on MPS + AMR.
    "t5_row1_l2": ("easy_to_hard", True, False, False),
    "t5_row2_l2_arl": ("easy_to_hard", True, True, False),
    "t5_row3_l2_ccl": ("easy_to_hard", True, False, True),
    "t5_row4_l2_arl_ccl": ("easy_to_hard", True, True, True),
}
SWITCHES = ("strategy", "amr", "arl_weight", "ccl_weight")


def test_every_ablation_recipe_is_a_table_row():
    assert sorted(p.stem.removeprefix("amlp_ablation_") for p in CONFIGS.glob("amlp_ablation_*.yaml")) == sorted(TABLES)


@pytest.mark.parametrize("row", sorted(TABLES))
def test_ablation_recipes_set_the_switches_of_the_papers_rows(row):
    cfg = load_train_config(CONFIGS / f"amlp_ablation_{row}.yaml")
    r = cfg.amlp
    assert cfg.trainer == "amlp" and cfg.model.name == "amlp_unet"
    assert (r.strategy, r.amr, r.arl_weight > 0, r.ccl_weight > 0) == TABLES[row]
    assert r.pred_weight > 0  # L_l2 in every row
    # Everything else is the paper's pre-training recipe, amlp_pretrain_isic2018.
    base = load_train_config(CONFIGS / "amlp_pretrain_isic2018.yaml").to_dict()
    mine = cfg.to_dict()
    for data in (base, mine):
        data.pop("out_dir")
        for key in SWITCHES:
            data["amlp"].pop(key)
    assert mine == base
