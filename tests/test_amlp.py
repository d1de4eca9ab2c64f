"""AMLP building blocks: masked patch selection, the AMR schedule, ARL and CCL (docs/amlp.md)."""

import math

import pytest
import torch

from lesionkit.layers.masked_patch_selection import (
    amr_mask_ratio,
    amr_tau,
    num_masked_patches,
    select_masked_patches,
)
from lesionkit.layers.patch_masking import patch_mask_to_pixels, patchify, unpatchify
from lesionkit.losses.amlp import (
    attention_reconstruction_loss,
    category_consistency_loss,
    relative_reconstruction_loss,
    update_patch_labels,
)


def lesion_images(batch=3, size=32, patch=8, seed=0):
    """Dark background with a bright square 'lesion' covering 4 of the 16 patches."""
    gen = torch.Generator().manual_seed(seed)
    images = 0.2 + 0.05 * torch.rand(batch, 3, size, size, generator=gen)
    images[:, :, 8:24, 8:24] += 0.6  # patches (1,1), (1,2), (2,1), (2,2)
    patches = images.reshape(batch, 3, size // patch, patch, size // patch, patch)
    vectors = patches.permute(0, 2, 4, 1, 3, 5).reshape(batch, (size // patch) ** 2, -1)
    lesion = torch.zeros(16, dtype=torch.bool)
    lesion[[5, 6, 9, 10]] = True
    return vectors, lesion


@pytest.mark.parametrize("layout", ["pqc", "cpq"])
def test_patchify_layouts_against_slicing_and_round_trip(layout):
    """AMLP's pixel vectors are channel-major ("cpq"), MAE's channel-last ("pqc"); one patchify serves both."""
    x = torch.randn(2, 3, 8, 12)
    p = 4
    got = patchify(x, p, layout=layout)
    assert got.shape == (2, 6, p * p * 3)
    for i in range(2):
        for j in range(3):
            patch = x[:, :, i * p:(i + 1) * p, j * p:(j + 1) * p]  # (B, C, P, P)
            want = patch.flatten(1) if layout == "cpq" else patch.permute(0, 2, 3, 1).flatten(1)
            assert torch.equal(got[:, i * 3 + j], want)
    assert torch.equal(unpatchify(got, p, (2, 3), 3, layout=layout), x)
    with pytest.raises(ValueError, match="layout"):
        patchify(x, p, layout="qpc")


def test_patch_mask_to_pixels_covers_each_masked_patch():
    mask = torch.tensor([[True, False, False, True, False, True]])
    pixels = patch_mask_to_pixels(mask, 4, (2, 3))
    assert pixels.shape == (1, 1, 8, 12)
    want = mask.view(1, 1, 2, 3).repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)
    assert torch.equal(pixels, want)


def test_mps_finds_the_lesion_and_masks_it_first():
    vectors, lesion = lesion_images()
    sel = select_masked_patches(vectors, ratio=0.25, strategy="hard_to_easy", seed=0)
    assert (sel.foreground == lesion).all()  # the smaller cluster is the lesion
    assert sel.num_masked == 4 and (sel.mask == lesion).all()
    # Ranked closest-first to the foreground centroid: the lesion patches lead.
    assert set(sel.rank[:, :4].flatten().tolist()) == {5, 6, 9, 10}


def test_mps_strategies():
    vectors, lesion = lesion_images()
    easy = select_masked_patches(vectors, ratio=0.5, strategy="easy_to_hard")
    assert (easy.mask.sum(1) == 8).all() and not (easy.mask & lesion).any()  # background first
    hard = select_masked_patches(vectors, ratio=0.5, strategy="hard_to_easy")
    assert (hard.mask[:, lesion]).all()
    gen = torch.Generator().manual_seed(3)
    rand = select_masked_patches(vectors, ratio=0.5, strategy="random", generator=gen)
    assert (rand.mask.sum(1) == 8).all()
    again = select_masked_patches(vectors, ratio=0.5, strategy="random",
                                  generator=torch.Generator().manual_seed(3))
    assert torch.equal(rand.mask, again.mask)
    with pytest.raises(ValueError, match="strategy should be one of"):
        select_masked_patches(vectors, 0.5, strategy="lesion_first")
    with pytest.raises(ValueError, match=r"vectors should be a \(B, N, D\)"):
        select_masked_patches(vectors[0], 0.5)


def test_num_masked_is_floor_of_n_sigma():
    assert num_masked_patches(196, 0.25) == 49
    assert num_masked_patches(10, 0.3) == 3
    assert num_masked_patches(196, 0.3) == math.floor(196 * 0.3)
    with pytest.raises(ValueError, match="ratio should be in"):
        num_masked_patches(10, 1.5)


def test_amr_schedule_eq9():
    assert amr_mask_ratio(1, sigma0=0.25, tau=4.0, cap=0.9) == 0.25  # ln 1 = 0
    assert amr_mask_ratio(10, sigma0=0.25, tau=4.0, cap=0.9) == pytest.approx(0.25 + math.log(10) / 4)
    assert amr_mask_ratio(10**6, sigma0=0.25, tau=4.0, cap=0.9) == 0.9
    ratios = [amr_mask_ratio(e, tau=3.0) for e in range(1, 50)]
    assert ratios == sorted(ratios)
    tau = amr_tau(0.25, 0.8, reach_epoch=100)
    assert amr_mask_ratio(100, 0.25, tau, 0.8) == pytest.approx(0.8)
    assert amr_mask_ratio(50, 0.25, tau, 0.8) < 0.8
    # Fractional epochs (the trainer's 1 + steps done / steps per epoch) lie on the same curve.
    assert ratios[0] < amr_mask_ratio(1.5, tau=3.0) < ratios[1]
    with pytest.raises(ValueError, match="epoch should be a number >= 1"):
        amr_mask_ratio(0)
    with pytest.raises(ValueError, match="tau should be > 0"):
        amr_mask_ratio(2, tau=0.0)


def test_relative_loss_eq6_over_masked_patches():
    loss = torch.tensor([[1.0, 3.0, 100.0, 2.0]])
    mask = torch.tensor([[True, True, False, True]])
    rrl = relative_reconstruction_loss(loss, mask)
    torch.testing.assert_close(rrl, torch.tensor([[0.5, 1.5, 0.0, 1.0]]))
    assert rrl[mask].mean().item() == pytest.approx(1.0)
    # All masked patches reconstructed perfectly: weight 1 each, no division by zero.
    zero = relative_reconstruction_loss(torch.zeros(1, 4), mask)
    torch.testing.assert_close(zero, mask.float())
    with pytest.raises(ValueError, match="at least one patch per image"):
        relative_reconstruction_loss(loss, torch.zeros(1, 4, dtype=torch.bool))


def test_arl_weights_hard_patches_and_detaches_the_weights():
    loss = torch.tensor([[1.0, 3.0, 100.0, 2.0]], requires_grad=True)
    mask = torch.tensor([[True, True, False, True]])
    arl = attention_reconstruction_loss(loss, mask)
    # (0.5 * 1 + 1.5 * 3 + 1 * 2) / 3
    assert arl.item() == pytest.approx(7.0 / 3)
    (grad,) = torch.autograd.grad(arl, loss)
    # d/dL_i of (1/n_m) sum w_i L_i with w detached: w_i / n_m; unmasked patches get none.
    torch.testing.assert_close(grad, torch.tensor([[0.5, 1.5, 0.0, 1.0]]) / 3)


def test_label_update_four_rules():
    label_ori = torch.tensor([[1, 0, 1, 0, 1]])
    rrl = torch.tensor([[1.5, 0.5, 0.5, 1.5, 1.0]])
    mask = torch.ones(1, 5, dtype=torch.bool)
    outcomes = set()
    for seed in range(40):
        new = update_patch_labels(label_ori, rrl, mask, torch.Generator().manual_seed(seed))
        assert new[0, 0] == 1 and new[0, 1] == 0 and new[0, 4] == 1  # rules (1), (2); >= mean
        outcomes.add((new[0, 2].item(), new[0, 3].item()))
    assert outcomes == {(0.0, 0.0), (0.0, 1.0), (1.0, 0.0), (1.0, 1.0)}  # rules (3), (4)
    same = [update_patch_labels(label_ori, rrl, mask, torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(*same)
    # Unmasked patches keep the k-means label.
    keep = update_patch_labels(label_ori, rrl, torch.zeros(1, 5, dtype=torch.bool))
    assert torch.equal(keep, label_ori.float())


def test_ccl_is_masked_bce_with_a_gradient():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]], requires_grad=True)
    label_new = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    mask = torch.tensor([[True, True, True, False]])
    ccl = category_consistency_loss(logits, label_new, mask)
    want = torch.nn.functional.binary_cross_entropy_with_logits(logits[0, :3], label_new[0, :3])
    assert ccl.item() == pytest.approx(want.item())
    (grad,) = torch.autograd.grad(ccl, logits)
    assert grad[0, 3] == 0 and (grad[0, :3] != 0).all()


def test_network_sees_nothing_of_the_masked_patches():
    """AMLPUNet(x, patch_mask): every output (segmentation, reconstruction, per-patch foreground
    logits) is a function of the visible patches only - new content under the mask changes
    nothing, new content in a visible patch changes the outputs."""
    from lesionkit.models import create_model

    torch.manual_seed(0)
    model = create_model("amlp_unet_tiny", widths=(4, 8, 16), patch_size=8).eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 32, 32, generator=gen)
    patch_mask = torch.zeros(2, 16, dtype=torch.bool)
    patch_mask[0, [0, 5, 6, 15]] = True
    patch_mask[1, [3, 9, 10, 12]] = True
    pixels = patch_mask_to_pixels(patch_mask, 8, (4, 4)).expand_as(x)
    noise = torch.rand(x.shape, generator=gen)
    with torch.no_grad():
        want = model(x, patch_mask=patch_mask)
        got = model(torch.where(pixels, noise, x), patch_mask=patch_mask)
        visible = model(torch.where(pixels, x, noise), patch_mask=patch_mask)
    for name, a, b, c in [("logits", got.logits, want.logits, visible.logits)] + [
            (k, got.extras[k], want.extras[k], visible.extras[k]) for k in ("reconstruction", "patch_logits")]:
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
        assert not torch.allclose(c, b), name
