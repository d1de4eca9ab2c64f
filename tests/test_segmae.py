"""SegMAE: model, masking, reconstruction loss, the two-stage trainer and the Table 4 configs."""

from pathlib import Path

import pytest
import torch

from lesionkit.engine import load_train_config
from lesionkit.engine.trainers.segmae import (
    SegMAERecipe,
    SegMAETrainConfig,
    SegMAETrainer,
    build_reconstruction_loss,
    build_segmentation_loss,
)
from lesionkit.layers import MAEDecoder, patchify, random_patch_mask, sincos_pos_embed_2d, unpatchify
from lesionkit.models import SegmentationOutput, create_model, segmentation_logits
from lesionkit.models.segmae import SegMAEOutput

from conftest import build_meta, count_params

CONFIGS = Path(__file__).resolve().parents[1] / "lesionkit" / "configs"
TABLE4 = {  # row: (mae_decoder, mae_epochs > 0, hybrid, patch_weight > 0 (L1), recon_patchwise (L2))
    1: (False, False, False, False, False),
    2: (True, False, True, False, False),
    3: (True, True, True, False, False),
    4: (True, False, True, True, False),
    5: (True, False, True, False, True),
    6: (True, False, True, True, True),
    7: (True, True, True, True, True),
}


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------- model


def test_segmae_r50_vit_b16_size():
    full = build_meta("segmae_r50_vit_b16", num_classes=2)
    baseline = build_meta("segmae_r50_vit_b16", num_classes=2, mae_decoder=False)
    assert count_params(baseline) == 105_276_066  # Table 4 row 1 is TransUNet
    assert count_params(full.mae) == 26_008_320  # MAE-B decoder: 512 wide, 8 blocks, 16 heads
    assert count_params(full) == 131_284_386  # ~131.3M: TransUNet + the MAE-B decoder (docs/models.md)
    assert full.mae.embed_dim == 512 and len(full.mae.blocks) == 8 and full.mae.blocks[0].attn.num_heads == 16


@pytest.mark.parametrize("mask_mode", ["token", "pixel"])
def test_masked_forward_backward_reaches_every_parameter(mask_mode):
    torch.manual_seed(0)
    model = create_model("segmae_tiny", mask_mode=mask_mode, mask_ratio=0.75)
    x = torch.rand(2, 3, 64, 64)
    out = model(x)  # training mode: masked
    assert isinstance(out, SegMAEOutput) and isinstance(out, SegmentationOutput)
    assert out.logits.shape == (2, 1, 64, 64) and out.reconstruction.shape == (2, 3, 64, 64)
    assert out.mask.shape == (2, 16) and out.mask.dtype == torch.bool
    assert out.mask.sum(1).tolist() == [12, 12]  # 75 % of the 4x4 patches
    assert out.extras["reconstruction"] is out.reconstruction and out.extras["mask"] is out.mask
    (out.logits.square().mean() + out.reconstruction.square().mean()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_unmasked_forward_backward_and_no_masking_at_inference():
    torch.manual_seed(0)
    model = create_model("segmae_tiny")
    x = torch.rand(2, 3, 64, 64)
    out = model(x, mask_ratio=0.0)
    assert out.reconstruction is None and out.mask is None and out.extras == {}
    out.logits.mean().backward()
    assert model.encoder.vit.blocks[0].attn.qkv.weight.grad is not None
    assert model.mae.pred.weight.grad is None  # nothing masked, nothing reconstructed
    model.eval()
    a, b = model(x), model(x)
    assert a.mask is None and a.reconstruction is None
    torch.testing.assert_close(a.logits, b.logits)  # deterministic: no random masking
    assert torch.equal(segmentation_logits(a), a.logits)


def test_reconstruction_only_pass_skips_the_segmentation_decoder():
    model = create_model("segmae_tiny")
    out = model(torch.rand(2, 3, 64, 64), segment=False)
    assert out.logits is None and out.reconstruction is not None
    out.reconstruction.mean().backward()
    assert all(p.grad is None for p in model.decoder.parameters())
    with pytest.raises(ValueError, match="segment=False with no masking"):
        model(torch.rand(1, 3, 64, 64), mask_ratio=0.0, segment=False)
    with pytest.raises(ValueError, match="mae_decoder=False"):
        create_model("segmae_tiny", mae_decoder=False)(torch.rand(1, 3, 64, 64), mask_ratio=0.5)


def _reconstruct(model, x, seed):
    torch.manual_seed(seed)  # the same random mask for every call
    return model(x, mask_ratio=0.75, segment=False)


@pytest.mark.parametrize("mask_mode, sees_masked_pixels", [("pixel", False), ("token", True)])
def test_mask_mode_decides_whether_the_cnn_sees_masked_pixels(mask_mode, sees_masked_pixels):
    torch.manual_seed(0)
    model = create_model("segmae_tiny", mask_mode=mask_mode).eval()
    x = torch.rand(1, 3, 64, 64)
    ref = _reconstruct(model, x, seed=3)
    pixel_mask = ref.mask.reshape(1, 1, 4, 1, 4, 1).expand(1, 1, 4, 16, 4, 16).reshape(1, 1, 64, 64)
    changed = torch.where(pixel_mask, torch.rand_like(x), x)  # new content in masked patches only
    out = _reconstruct(model, changed, seed=3)
    assert torch.equal(out.mask, ref.mask)
    differs = not torch.allclose(out.reconstruction, ref.reconstruction, atol=1e-6)
    assert differs == sees_masked_pixels


def test_mask_ratio_and_mode_are_validated():
    with pytest.raises(ValueError, match="mask_mode"):
        create_model("segmae_tiny", mask_mode="both")
    with pytest.raises(ValueError, match="mask_ratio"):
        create_model("segmae_tiny", mask_ratio=1.0)


# ----------------------------------------------------------------------------------- layers


def test_random_patch_mask_and_restore_order():
    g = torch.Generator().manual_seed(0)
    pm = random_patch_mask(3, 20, 0.6, generator=g)
    assert pm.mask.sum(1).tolist() == [12, 12, 12] and pm.num_visible == 8
    assert torch.equal(pm.ids_keep, pm.ids_keep.sort(1).values)
    assert not pm.mask.gather(1, pm.ids_keep).any()
    # [visible..., mask tokens...] gathered by ids_restore puts each visible token back at its
    # grid position and a mask token (-1 here) at every masked one.
    seq = torch.cat([pm.ids_keep, torch.full((3, 12), -1)], 1)
    grid = seq.gather(1, pm.ids_restore)
    assert torch.equal(grid == -1, pm.mask)
    assert torch.equal(grid[~pm.mask], torch.arange(20).expand(3, 20)[~pm.mask])
    assert torch.equal(pm.ids_restore.sort(1).values, torch.arange(20).expand(3, 20))  # a permutation
    with pytest.raises(ValueError, match="mask_ratio"):
        random_patch_mask(1, 4, 1.0)


def test_patchify_round_trip_and_row_major_order():
    x = torch.rand(2, 3, 32, 48)
    p = patchify(x, 16)
    assert p.shape == (2, 6, 16 * 16 * 3)
    torch.testing.assert_close(p[:, 4].reshape(2, 16, 16, 3).permute(0, 3, 1, 2), x[:, :, 16:32, 16:32])
    assert torch.equal(unpatchify(p, 16, (2, 3), 3), x)


def test_mae_decoder_outputs_every_patch_and_uses_mask_tokens():
    torch.manual_seed(0)
    dec = MAEDecoder(in_dim=32, patch_size=4, out_chans=3, embed_dim=16, depth=1, num_heads=2)
    pm = random_patch_mask(2, 9, 0.5)
    out = dec(torch.randn(2, pm.num_visible, 32), pm.ids_restore, (3, 3))
    assert out.shape == (2, 9, 4 * 4 * 3)
    out[pm.mask].sum().backward()
    assert dec.mask_token.grad is not None and dec.mask_token.grad.abs().sum() > 0


def test_sincos_pos_embed():
    e = sincos_pos_embed_2d(16, (3, 5))
    assert e.shape == (15, 16)
    assert torch.unique(e, dim=0).shape[0] == 15  # every position distinct
    # Row-major: positions 0-4 are row 0, whose row half is sin(0) = 0 then cos(0) = 1.
    torch.testing.assert_close(e[:5, :4], torch.zeros(5, 4))
    torch.testing.assert_close(e[:5, 4:8], torch.ones(5, 4))
    torch.testing.assert_close(e[::5, 8:12], torch.zeros(3, 4))  # column 0 likewise in the column half
    with pytest.raises(ValueError, match="multiple of 4"):
        sincos_pos_embed_2d(6, (2, 2))


# ----------------------------------------------------------------------------------- losses


@pytest.mark.parametrize("patchwise", [True, False])
def test_reconstruction_is_scored_on_masked_patches_only(patchwise):
    torch.manual_seed(0)
    recipe = SegMAERecipe(recon_patchwise=patchwise)
    loss_fn = build_reconstruction_loss(recipe, patch_size=8)
    target = torch.rand(2, 3, 32, 32)
    pred = torch.rand(2, 3, 32, 32, requires_grad=True)
    mask = random_patch_mask(2, 16, 0.75).mask
    base = loss_fn(pred, target, mask)
    pixel_mask = mask.reshape(2, 1, 4, 1, 4, 1).expand(2, 1, 4, 8, 4, 8).reshape(2, 1, 32, 32)
    visible_changed = torch.where(pixel_mask, pred, torch.rand_like(pred))
    torch.testing.assert_close(loss_fn(visible_changed, target, mask), base)
    masked_changed = torch.where(pixel_mask, torch.rand_like(pred), pred)
    assert not torch.allclose(loss_fn(masked_changed, target, mask), base)
    base.backward()
    assert pred.grad.masked_select(~pixel_mask.expand_as(pred)).abs().max() == 0
    assert pred.grad.masked_select(pixel_mask.expand_as(pred)).abs().max() > 0


def test_reconstruction_loss_values():
    from lesionkit.kernels import patchwise_softmax_loss

    torch.manual_seed(0)
    target, pred = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    mask = random_patch_mask(2, 16, 0.75).mask
    n_masked = 12
    plain = build_reconstruction_loss(SegMAERecipe(recon_patchwise=False), 8)(pred, target, mask)
    per_patch = (patchify(pred, 8) - patchify(target, 8)).square().mean(-1)
    torch.testing.assert_close(plain, per_patch[mask].mean())  # MAE: mean over masked patches
    eq8 = build_reconstruction_loss(SegMAERecipe(recon_beta=0.05, patchwise_scale="eq8"), 8)(pred, target, mask)
    torch.testing.assert_close(eq8, patchwise_softmax_loss(pred, target, 8, 0.05, mask=mask))
    mean = build_reconstruction_loss(SegMAERecipe(recon_beta=0.05), 8)(pred, target, mask)
    torch.testing.assert_close(mean, eq8 * n_masked)  # the softmax-weighted mean of patch errors
    huge_beta = build_reconstruction_loss(SegMAERecipe(recon_beta=1e9), 8)(pred, target, mask)
    torch.testing.assert_close(huge_beta, plain)  # beta -> inf: plain MSE over masked patches


def test_segmentation_loss_is_eq11_with_the_standard_dice():
    from lesionkit.kernels import patchwise_softmax_loss

    torch.manual_seed(0)
    logits, target = torch.randn(2, 1, 32, 32), (torch.rand(2, 1, 32, 32) > 0.6).float()
    out = build_segmentation_loss(SegMAERecipe(seg_patch_size=8, seg_beta=0.3))(logits, target)
    p = torch.sigmoid(logits)
    bce = torch.nn.functional.binary_cross_entropy(p, target)
    inter, total = (p * target).flatten(1).sum(1), (p + target).flatten(1).sum(1)
    dice = (1 - (2 * inter + 1) / (total + 1)).mean()  # smooth 1, per image
    patch = patchwise_softmax_loss(p, target, 8, 0.3) * 16
    torch.testing.assert_close(out["bce"], bce)
    torch.testing.assert_close(out["dice"], dice)
    torch.testing.assert_close(out["patchwise"], patch)
    torch.testing.assert_close(out["loss"], 1.2 * bce + 0.4 * dice + 0.8 * patch)
    no_l1 = build_segmentation_loss(SegMAERecipe(patch_weight=0.0))(logits, target)
    assert "patchwise" not in no_l1
    torch.testing.assert_close(no_l1["loss"], 1.2 * bce + 0.4 * dice)


def test_recipe_validation():
    with pytest.raises(ValueError, match="segmae.patchwise_scale"):
        SegMAERecipe(patchwise_scale="sum")
    with pytest.raises(ValueError, match="segmae.recon_beta"):
        SegMAERecipe(recon_beta=0.0)
    with pytest.raises(ValueError, match="segmae.mae_epochs"):
        SegMAERecipe(mae_epochs=-1)
    with pytest.raises(ValueError, match="segmae.stage_transition"):
        SegMAERecipe(stage_transition="fresh")
    with pytest.raises(ValueError, match="segmae.optimizers"):
        SegMAERecipe(optimizers="two")


# ----------------------------------------------------------------------------------- trainer


class Discs(torch.utils.data.Dataset):
    """Dark discs on bright skin, deterministic per index."""

    def __init__(self, n: int, size: int = 32, seed: int = 0) -> None:
        self.n, self.size, self.seed = n, size, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(self.seed * 1000 + i)
        s = self.size
        yy, xx = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
        cy, cx = (torch.rand(2, generator=g) * 0.5 + 0.25) * s
        mask = (((yy - cy) ** 2 + (xx - cx) ** 2).sqrt() < s * 0.25).float()[None]
        image = (0.8 - 0.5 * mask + 0.05 * torch.rand(3, s, s, generator=g)).clamp(0, 1)
        return {"image": image, "mask": mask, "id": f"disc_{i}", "orig_size": (s, s)}


def make_config(tmp_path, **overrides) -> SegMAETrainConfig:
    data = {
        "trainer": "segmae",
        "model": {"name": "segmae_tiny", "kwargs": {"img_size": 32}},
        "data": {"image_size": 32, "batch_size": 4, "num_workers": 0},
        "optim": {"name": "sgd", "lr": 0.05},
        "scheduler": {"name": "none"},
        "epochs": 1, "device": "cpu", "progress": False, "out_dir": str(tmp_path / "run"),
        "segmae": {"mae_epochs": 1, "seg_patch_size": 8},
    }
    for key, value in overrides.items():
        node = data
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return SegMAETrainConfig.from_dict(data)


def snapshot(module: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items() if v.is_floating_point()}


def changed(before: dict, module: torch.nn.Module) -> bool:
    after = module.state_dict()
    return any(not torch.equal(before[k], after[k]) for k in before)


def test_stage_one_trains_encoder_and_mae_decoder_with_segmentation_frozen(tmp_path):
    torch.manual_seed(0)
    trainer = SegMAETrainer(make_config(tmp_path), train_data=Discs(8), val_data=Discs(4, seed=1))
    model = trainer.model
    assert [s.name for s in trainer.stages()] == ["mae", "hybrid"]
    parts = {"encoder": model.encoder, "mae": model.mae, "decoder": model.decoder, "head": model.head}
    before = {name: snapshot(m) for name, m in parts.items()}
    after_stage_one = {}
    on_epoch_end = trainer.on_epoch_end

    def record(epoch, logs):
        if trainer.stage.name == "mae":
            after_stage_one.update({name: changed(before[name], m) for name, m in parts.items()})
            after_stage_one["frozen"] = not any(p.requires_grad for p in model.decoder.parameters())
        on_epoch_end(epoch, logs)

    trainer.on_epoch_end = record
    summary = trainer.fit()
    assert summary["epochs"] == 2 and trainer.global_step == 4
    assert after_stage_one == {"encoder": True, "mae": True, "decoder": False, "head": False, "frozen": True}
    rows = trainer.read_log()
    assert rows[0]["stage"] == "mae" and float(rows[0]["train_rec_loss"]) > 0 and rows[0].get("train_seg_loss", "") == ""
    assert rows[1]["stage"] == "hybrid" and float(rows[1]["train_seg_loss"]) > 0


def test_stage_two_alternates_a_segmentation_and_a_reconstruction_step(tmp_path, monkeypatch):
    torch.manual_seed(0)
    trainer = SegMAETrainer(make_config(tmp_path, **{"segmae.mae_epochs": 0}), train_data=Discs(8),
                            val_data=Discs(4, seed=1))
    tasks = []
    segment, reconstruct = type(trainer).segmentation_step, type(trainer).reconstruction_step

    def record(task, step):
        def wrapped(self, batch):
            tasks.append(task)
            return step(self, batch)
        return wrapped

    monkeypatch.setattr(type(trainer), "segmentation_step", record("segment", segment))
    monkeypatch.setattr(type(trainer), "reconstruction_step", record("reconstruct", reconstruct))
    model = trainer.model
    before = {name: snapshot(m) for name, m in (("mae", model.mae), ("decoder", model.decoder))}
    trainer.fit()
    assert tasks == ["segment", "reconstruct"] * 2  # two batches, two updates each
    assert all(p.requires_grad for p in model.parameters())
    assert changed(before["mae"], model.mae) and changed(before["decoder"], model.decoder)
    row = trainer.read_log()[0]
    assert row["stage"] == "hybrid"
    for key in ("train_seg_loss", "train_rec_loss", "train_bce", "train_dice", "train_patchwise", "val_dice"):
        assert key in row and row[key] != "", key


def test_two_stage_run_resets_best_and_unfreezes(tmp_path):
    torch.manual_seed(0)
    trainer = SegMAETrainer(make_config(tmp_path, epochs=1, early_stopping_patience=1),
                            train_data=Discs(8), val_data=Discs(4, seed=1))
    summary = trainer.fit()
    assert summary["epochs"] == 2 and summary["stop_reason"] == "epochs"
    assert summary["best_epoch"] == 2  # chosen in the segmentation stage, not behind the frozen decoder
    assert all(p.requires_grad for p in trainer.model.decoder.parameters())


def test_transunet_trains_as_the_single_branch_baseline(tmp_path):
    torch.manual_seed(0)
    cfg = make_config(tmp_path, **{"model.name": "transunet_tiny", "segmae.mae_epochs": 0, "segmae.hybrid": False})
    trainer = SegMAETrainer(cfg, train_data=Discs(8), val_data=Discs(4, seed=1))
    assert [s.name for s in trainer.stages()] == ["segment"]
    assert trainer.fit()["epochs"] == 1
    with pytest.raises(ValueError, match="need the MAE decoder"):
        SegMAETrainer(make_config(tmp_path, **{"model.name": "transunet_tiny"}), train_data=Discs(8))
    with pytest.raises(ValueError, match="trains SegMAE and TransUNet models"):
        SegMAETrainer(make_config(tmp_path, **{"model.name": "unet_tiny", "model.kwargs": {}}), train_data=Discs(8))


def adamw_cosine(tmp_path, **overrides) -> SegMAETrainConfig:
    """One MAE epoch and two hybrid epochs of 4 batches each, AdamW, cosine with half an epoch of warm-up."""
    return make_config(tmp_path, epochs=2, **{"optim.name": "adamw", "optim.lr": 1e-3, "scheduler.name": "cosine",
                                              "scheduler.warmup_epochs": 0.5, **overrides})


def record_updates(trainer: SegMAETrainer) -> list[tuple[str, str, float]]:
    """(stage, task, learning rate) of every optimiser update the trainer takes, in order."""
    trace, optimize = [], trainer.optimize

    def record(step_fn, batch, optimizer=None, scheduler=None):
        task = "rec" if step_fn.__name__ == "reconstruction_step" else "seg"
        trace.append((trainer.stage.name, task, (optimizer or trainer.optimizer).param_groups[0]["lr"]))
        return optimize(step_fn, batch, optimizer, scheduler)

    trainer.optimize = record
    return trace


def adam_steps(optimizer: torch.optim.Optimizer, param: torch.nn.Parameter) -> int:
    return int(optimizer.state[param]["step"]) if param in optimizer.state else 0


@pytest.mark.parametrize("optimizers", ["shared", "per_task"])
def test_stage_two_continues_the_schedule_and_optimiser_state(optimizers, tmp_path):
    torch.manual_seed(0)
    trainer = SegMAETrainer(adamw_cosine(tmp_path, **{"segmae.optimizers": optimizers}),
                            train_data=Discs(16), val_data=Discs(4, seed=1))
    trace = record_updates(trainer)
    end_of_stage_one = []
    on_epoch_end = trainer.on_epoch_end

    def note(epoch, logs):
        if trainer.stage.name == "mae":  # the rate stage 1 leaves behind, after its last schedule step
            end_of_stage_one.append((trainer.rec_optimizer or trainer.optimizer).param_groups[0]["lr"])
        on_epoch_end(epoch, logs)

    trainer.on_epoch_end = note
    trainer.fit()
    mae = [lr for stage, _, lr in trace if stage == "mae"]
    seg = [lr for stage, task, lr in trace if stage == "hybrid" and task == "seg"]
    assert len(mae) == 4 and len(seg) == 8
    assert mae[0] < mae[1] < mae[2]  # the one warm-up, at the start of stage 1
    assert seg[0] == pytest.approx(end_of_stage_one[0], rel=1e-9)  # no restart from zero
    assert all(a >= b for a, b in zip(seg, seg[1:]))  # and no second warm-up
    weight = next(trainer.model.encoder.parameters())
    if optimizers == "shared":  # one optimiser, its state carried over: 4 + 2 x 8 updates
        assert adam_steps(trainer.optimizer, weight) == 20
    else:
        assert (adam_steps(trainer.rec_optimizer, weight), adam_steps(trainer.optimizer, weight)) == (12, 8)


def test_restart_warms_up_again_when_the_recipe_asks(tmp_path):
    torch.manual_seed(0)
    trainer = SegMAETrainer(adamw_cosine(tmp_path, **{"segmae.stage_transition": "restart"}),
                            train_data=Discs(16), val_data=Discs(4, seed=1))
    trace = record_updates(trainer)
    trainer.fit()
    hybrid = [lr for stage, _, lr in trace if stage == "hybrid"]
    assert hybrid[0] < hybrid[2] < hybrid[4]  # a fresh warm-up over the first half epoch (2 updates per batch)
    assert adam_steps(trainer.optimizer, next(trainer.model.encoder.parameters())) == 16  # a fresh optimiser


def test_per_task_optimisers_hold_their_task_parameters(tmp_path):
    torch.manual_seed(0)
    trainer = SegMAETrainer(adamw_cosine(tmp_path, **{"segmae.optimizers": "per_task"}),
                            train_data=Discs(16), val_data=Discs(4, seed=1))
    model = trainer.model

    def ids(params):
        return {id(p) for p in params}

    seg = ids(p for g in trainer.optimizer.param_groups for p in g["params"])
    rec = ids(p for g in trainer.rec_optimizer.param_groups for p in g["params"])
    encoder, mae = ids(model.encoder.parameters()), ids(model.mae.parameters())
    cup = ids(model.decoder.parameters()) | ids(model.head.parameters())
    assert encoder <= seg & rec and cup <= seg and mae <= rec
    assert not (cup & rec) and not (mae & seg) and seg | rec == ids(model.parameters())
    trainer.fit()
    weight = next(model.encoder.parameters())
    assert not torch.equal(trainer.optimizer.state[weight]["exp_avg"], trainer.rec_optimizer.state[weight]["exp_avg"])


# ----------------------------------------------------------------------------------- configs


def table4_config(row: int) -> Path:
    (path,) = CONFIGS.glob(f"segmae_ablation_row{row}_*.yaml")
    return path


@pytest.mark.parametrize("row", sorted(TABLE4))
def test_every_table4_config_builds_and_trains_a_step(row, tmp_path):
    cfg = load_train_config(table4_config(row))
    assert isinstance(cfg, SegMAETrainConfig)
    r = cfg.segmae
    switches = (cfg.model.kwargs.get("mae_decoder", True), r.mae_epochs > 0, r.hybrid, r.patch_weight > 0, r.recon_patchwise)
    assert switches == TABLE4[row]
    # The same switches on the tiny model, one batch per stage.
    data = cfg.to_dict()
    data["model"] = {"name": "segmae_tiny",
                     "kwargs": {**{k: v for k, v in cfg.model.kwargs.items() if k != "pretrained"}, "img_size": 32}}
    small = SegMAETrainConfig.from_dict(data).with_overrides([
        "data.image_size=32", "data.batch_size=4", "data.num_workers=0", "epochs=1",
        f"segmae.mae_epochs={min(r.mae_epochs, 1)}", "segmae.seg_patch_size=8", "device=cpu", "progress=false",
        f"out_dir={tmp_path / 'run'}",
    ])
    torch.manual_seed(0)
    trainer = SegMAETrainer(small, train_data=Discs(4), val_data=Discs(4, seed=1))
    assert (trainer.mae is not None) == TABLE4[row][0]
    summary = trainer.fit()
    assert summary["epochs"] == 1 + int(TABLE4[row][1])
    assert trainer.global_step == summary["epochs"]
    assert summary["last_metrics"]["n_images"] == 4


@pytest.mark.parametrize("name", ["segmae_isic2018", "segmae_isic2017", "segmae_ph2"])
def test_paper_configs_hold_the_paper_recipe(name):
    cfg = load_train_config(CONFIGS / f"{name}.yaml")
    assert cfg.trainer == "segmae" and cfg.model.name == "segmae_r50_vit_b16"
    assert cfg.data.image_size == 224 and cfg.data.batch_size == 24
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay) == ("sgd", 0.008, 1e-3)
    assert cfg.scheduler.name == "plateau" and cfg.epochs == 100 and cfg.segmae.mae_epochs == 50
    assert (cfg.segmae.bce_weight, cfg.segmae.dice_weight, cfg.segmae.patch_weight) == (1.2, 0.4, 0.8)
    assert cfg.data.transforms["rotation"] == 15 and cfg.data.transforms["hflip"] == cfg.data.transforms["vflip"] == 0.5
    assert cfg.data.transforms["brightness"] > 0 and cfg.data.transforms["contrast"] > 0
    gray = cfg.model.kwargs.get("color_constancy", "none") == "gray_world"
    assert gray == (name == "segmae_isic2017")


@pytest.mark.parametrize("name", ["segmae_tiny_isic2018", "transunet_tiny_isic2018"])
def test_cli_trains_the_tiny_configs(name, tmp_path, capsys):
    from lesionkit.cli import main

    out = tmp_path / "run"
    rc = main(["train", "--config", str(CONFIGS / f"{name}.yaml"), "--data", "synthetic:8", "--val-data", "synthetic:4:1",
               "--image-size", "32", "--batch-size", "4", "--epochs", "1", "--out", str(out), "--device", "cpu",
               "--no-progress", "--set", "model.kwargs.img_size=32", "segmae.seg_patch_size=8", "data.num_workers=0"])
    assert rc == 0, capsys.readouterr().err
    assert "trained" in capsys.readouterr().out
    cfg = load_train_config(out / "config.yaml")
    assert isinstance(cfg, SegMAETrainConfig) and cfg.model.name == name.removesuffix("_isic2018")
    assert (out / "best.pt").is_file()


def test_tiny_configs_differ_only_in_the_mae_branch():
    seg = load_train_config(CONFIGS / "segmae_tiny_isic2018.yaml").to_dict()
    base = load_train_config(CONFIGS / "transunet_tiny_isic2018.yaml").to_dict()
    for key in ("data", "optim", "scheduler", "epochs", "time_budget"):
        assert seg[key] == base[key], key
    same = {k: v for k, v in seg["segmae"].items() if k not in ("mae_epochs", "hybrid", "recon_patchwise", "recon_beta")}
    assert same == {k: base["segmae"][k] for k in same}
    assert (seg["segmae"]["mae_epochs"], seg["segmae"]["hybrid"]) == (1, True)
    assert (base["segmae"]["mae_epochs"], base["segmae"]["hybrid"]) == (0, False)


@pytest.mark.parametrize("optimizers", ["shared", "per_task"])
@pytest.mark.parametrize("stop_after", [1, 2], ids=["stage-boundary", "inside-hybrid"])
def test_resume_matches_an_uninterrupted_run(stop_after, optimizers, tmp_path):
    def trainer_for(out):
        torch.manual_seed(0)
        cfg = adamw_cosine(tmp_path, out_dir=str(tmp_path / out), **{"segmae.optimizers": optimizers})
        return SegMAETrainer(cfg, train_data=Discs(8), val_data=Discs(4, seed=1))

    full = trainer_for("full")
    on_epoch_end = full.on_epoch_end

    def keep(epoch, logs):
        on_epoch_end(epoch, logs)
        if epoch == stop_after:  # what last.pt holds after a kill at this point
            full.save(tmp_path / "kept.pt")

    full.on_epoch_end = keep
    full.fit()
    resumed = trainer_for("resumed")
    resumed.resume(tmp_path / "kept.pt")
    assert resumed.epoch == stop_after
    resumed.fit()
    assert all(p.requires_grad for p in resumed.model.parameters())
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    for attr in ("optimizer", "rec_optimizer"):  # and the optimisers' moments and schedules, each task's
        a, b = getattr(full, attr), getattr(resumed, attr)
        assert (a is None) == (b is None) == (attr == "rec_optimizer" and optimizers == "shared")
        if a is not None:
            for sa, sb in zip(a.state_dict()["state"].values(), b.state_dict()["state"].values()):
                assert all(torch.equal(sa[k], sb[k]) for k in sa)
            assert [g["lr"] for g in a.param_groups] == [g["lr"] for g in b.param_groups]
