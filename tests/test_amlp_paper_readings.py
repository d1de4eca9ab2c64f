"""AMLP where the paper is explicit: CCL only where the updated label differs from the k-means
label (Sec. 3.3), the masking order its Table 4 reports as its own, AMR above MAE's 75 % and per
step (Eq. 9), and the optional draw from the ranked pool."""

import math

import pytest
import torch

from lesionkit.engine.registry import load_train_config
from lesionkit.layers.masked_patch_selection import select_masked_patches
from lesionkit.losses.amlp import category_consistency_loss, ccl_patches


def _labels():
    label_ori = torch.tensor([[1, 1, 0, 0, 1, 0], [0, 1, 0, 1, 0, 0]], dtype=torch.bool)
    label_new = torch.tensor([[1, 0, 0, 1, 1, 0], [1, 1, 0, 0, 0, 0]], dtype=torch.float)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    return label_ori, label_new, mask


def test_ccl_only_where_the_label_changed():
    label_ori, label_new, mask = _labels()
    changed = ccl_patches(label_ori, label_new, mask)
    assert changed.tolist() == [[False, True, False, True, False, False], [True, False, False, True, False, False]]
    logits = torch.randn(2, 6, requires_grad=True)
    loss = category_consistency_loss(logits, label_new, changed)
    # The direct formula: binary cross-entropy averaged over the four changed patches.
    idx = changed.nonzero(as_tuple=True)
    want = torch.nn.functional.binary_cross_entropy_with_logits(logits[idx], label_new[idx])
    torch.testing.assert_close(loss, want)
    # Patches whose labels agree contribute nothing: neither to the value nor to the gradient.
    other = logits.detach().clone()
    other[~changed] = torch.randn(int((~changed).sum())) * 10
    torch.testing.assert_close(category_consistency_loss(other, label_new, changed), want.detach())
    (grad,) = torch.autograd.grad(loss, logits)
    assert (grad[~changed] == 0).all() and (grad[changed] != 0).all()


def test_ccl_on_every_masked_patch_is_the_old_reading():
    label_ori, label_new, mask = _labels()
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 0]], dtype=torch.bool)  # 3 per image, as MPS
    assert torch.equal(ccl_patches(label_ori, label_new, mask, "masked"), mask)
    logits = torch.randn(2, 6)
    per_image = [torch.nn.functional.binary_cross_entropy_with_logits(logits[i][mask[i]], label_new[i][mask[i]])
                 for i in range(2)]
    torch.testing.assert_close(category_consistency_loss(logits, label_new, mask), torch.stack(per_image).mean())
    assert category_consistency_loss(logits, label_new, torch.zeros_like(mask)) == 0  # nothing selected
    with pytest.raises(ValueError, match="which should be one of"):
        ccl_patches(label_ori, label_new, mask, "all")


def _lesion_vectors(n_img=3):
    # 8x8 patches per image, a 3x3 lesion of bright patches (9 of 64), the rest dark with noise.
    g = torch.Generator().manual_seed(0)
    vectors = torch.rand(n_img, 64, 5, generator=g) * 0.1
    lesion = torch.zeros(64, dtype=torch.bool)
    for r in range(2, 5):
        lesion[r * 8 + 2:r * 8 + 5] = True
    vectors[:, lesion] += 1.0
    return vectors, lesion


@pytest.mark.parametrize("strategy", ["hard_to_easy", "easy_to_hard"])
def test_selection_pool_draws_from_the_first_ranked(strategy):
    vectors, _ = _lesion_vectors()
    ratio = 0.25  # n_m = 16 of 64
    fixed = select_masked_patches(vectors, ratio, strategy, seed=0)
    ordered = fixed.rank if strategy == "hard_to_easy" else fixed.rank.flip(1)
    assert torch.equal(fixed.mask, torch.zeros_like(fixed.mask).scatter(1, ordered[:, :16], True))
    # pool 0 is the deterministic selection, whatever the generator.
    same = select_masked_patches(vectors, ratio, strategy, seed=0, generator=torch.Generator().manual_seed(5), pool=0.0)
    assert torch.equal(same.mask, fixed.mask)
    draws = [select_masked_patches(vectors, ratio, strategy, seed=0, pool=0.5,
                                   generator=torch.Generator().manual_seed(s)).mask for s in range(4)]
    allowed = torch.zeros_like(fixed.mask).scatter(1, ordered[:, :24], True)  # ceil(16 * 1.5) = 24
    for m in draws:
        assert (m.sum(1) == 16).all() and not (m & ~allowed).any()
    assert any(not torch.equal(m, fixed.mask) for m in draws)
    assert not torch.equal(draws[0], draws[1])
    with pytest.raises(ValueError, match="pool"):
        select_masked_patches(vectors, ratio, strategy, pool=-1.0)


def test_hard_to_easy_with_a_pool_shows_the_lesion_sometimes():
    """The failure the pool addresses: deterministic hard_to_easy hides every lesion patch."""
    vectors, lesion = _lesion_vectors(1)
    fixed = select_masked_patches(vectors, 0.25, "hard_to_easy", seed=0)
    assert fixed.mask[0, lesion].all()
    seen = torch.zeros(64, dtype=torch.bool)
    for s in range(20):
        m = select_masked_patches(vectors, 0.25, "hard_to_easy", seed=0, pool=1.0,
                                  generator=torch.Generator().manual_seed(s)).mask[0]
        seen |= ~m & lesion
    assert seen.any()


def test_paper_recipe_values():
    cfg = load_train_config("amlp_pretrain_isic2018")
    recipe = cfg.amlp
    assert recipe.strategy == "easy_to_hard"  # Table 4's bold "Ours" row
    assert recipe.amr and recipe.amr_cap > 0.75  # Sec. 3.4: beyond MAE's upper limit
    assert recipe.ccl_patches == "changed" and recipe.selection_pool == 0.0
    base = load_train_config({"trainer": "amlp"}).amlp
    assert (base.strategy, base.amr_cap, base.ccl_patches) == ("easy_to_hard", 0.9, "changed")
    for bad, key in (({"ccl_patches": "some"}, "amlp.ccl_patches"), ({"selection_pool": math.nan}, "amlp.selection_pool")):
        with pytest.raises(ValueError, match=key):
            load_train_config({"trainer": "amlp", "amlp": bad})


@pytest.mark.parametrize("which", ["changed", "masked"])
def test_trainer_computes_ccl_on_the_configured_patches(tmp_path, monkeypatch, which):
    import lesionkit.engine.trainers.amlp as amlp_trainer
    from lesionkit.engine.registry import build_trainer

    cfg = load_train_config({"trainer": "amlp"}).with_overrides([f"{k}={v}" for k, v in {
        "model.name": "amlp_unet_tiny", "model.kwargs.widths": "[4, 8, 16]", "model.kwargs.patch_size": 8,
        "data.train": "synthetic:8", "data.image_size": 32, "data.batch_size": 4, "data.val_fraction": 0.0,
        "data.num_workers": 0, "epochs": 2, "progress": "false", "out_dir": str(tmp_path),
        "amlp.ccl_patches": which}.items()])
    trainer = build_trainer(cfg)
    seen = {}
    select = trainer.select
    monkeypatch.setattr(trainer, "select", lambda images: seen.setdefault("selection", select(images)))
    ccl = amlp_trainer.category_consistency_loss

    def spy(logits, label_new, patches):
        seen.update(label_new=label_new, patches=patches)
        return ccl(logits, label_new, patches)

    monkeypatch.setattr(amlp_trainer, "category_consistency_loss", spy)
    batch = next(iter(trainer.build_train_loader()))
    trainer.training_step(batch)
    sel = seen["selection"]
    want = sel.mask if which == "masked" else sel.mask & (seen["label_new"].bool() != sel.foreground)
    assert torch.equal(seen["patches"], want)
    assert which == "masked" or seen["patches"].sum() < sel.mask.sum()
