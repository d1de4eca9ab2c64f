"""GRCSF's MAE and residual maps (Eq. 3-5): the MAE trains, the residuals are right on known
inputs, the maps are seeded per image, and the residual-maps command caches by content."""

from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from lesionkit.cli import main
from lesionkit.engine.trainers.residual_maps import (
    ResidualMapCache,
    ResidualMapSettings,
    image_hash,
    load_mae,
    residual,
    residual_maps,
    ssim_map,
)
from lesionkit.layers.mae_decoder import MAEDecoder
from lesionkit.layers.patch_masking import patch_mask_to_pixels, patchify, random_patch_mask
from lesionkit.layers.pos_embed import sincos_pos_embed_2d
from lesionkit.layers.residual_maps import (_explicit_attention, _gelu_in_place, _GELUInPlace, _image_generator,
                                            _sum_over_maskings)
from lesionkit.models import create_model


@pytest.fixture(scope="module")
def mae_checkpoint(tmp_path_factory):
    """An mae_vit_tiny at 32 px trained one epoch on 8 synthetic images through the CLI."""
    out = tmp_path_factory.mktemp("mae")
    rc = main(["train", "--config", "grcsf_mae_tiny_isic2018", "--data", "synthetic:8", "--epochs", "1",
               "--batch-size", "4", "--image-size", "32", "--precision", "fp32", "--out", str(out), "--no-progress",
               "--set", "data.num_workers=0", "model.kwargs.img_size=32", "model.kwargs.depth=1", "time_budget=null",
               "scheduler.horizon=epochs"])
    assert rc == 0
    return out / "last.pt"


def test_mae_trains_a_step_and_its_loss_falls():
    torch.manual_seed(0)
    model = create_model("mae_vit_tiny", img_size=32, depth=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    from lesionkit.losses.reconstruction import MAEReconstructionLoss

    loss_fn = MAEReconstructionLoss(16)
    x = torch.rand(4, 3, 32, 32)
    losses = []
    for _ in range(5):
        torch.manual_seed(1)  # the same masks each step: the loss on them must fall
        out = model(x, mask_ratio=0.5)
        loss = loss_fn(out.reconstruction, x, out.mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert out.mask.sum(1).tolist() == [2, 2, 2, 2]  # half of the 2x2 patches
    assert losses[-1] < losses[0]


def test_mae_checkpoint_from_the_cli(mae_checkpoint):
    mae, state, digest = load_mae(mae_checkpoint)
    assert state["model_name"] == "mae_vit_tiny" and state["config"]["trainer"] == "mae"
    assert len(digest) == 16 and not mae.training


def test_absdiff_and_mse_on_known_values():
    image = torch.tensor([0.0, 0.5, 1.0, 0.25]).view(1, 1, 2, 2).expand(1, 2, 2, 2).clone()
    recon = torch.tensor([0.5, 0.5, 0.0, 1.0]).view(1, 1, 2, 2).expand(1, 2, 2, 2).clone()
    recon[:, 1] = image[:, 1]  # the second channel is exact: channel mean halves the residual
    expected_abs = torch.tensor([0.5, 0.0, 1.0, 0.75]).view(1, 1, 2, 2) / 2
    expected_mse = torch.tensor([0.25, 0.0, 1.0, 0.5625]).view(1, 1, 2, 2) / 2
    torch.testing.assert_close(residual(image, recon, "absdiff"), expected_abs)
    torch.testing.assert_close(residual(image, recon, "mse"), expected_mse)


def test_ssim_on_known_values():
    x = torch.rand(1, 3, 24, 24)
    torch.testing.assert_close(residual(x, x, "ssim"), torch.zeros(1, 1, 24, 24), atol=1e-6, rtol=0)
    # Constant images a and b: no variance, so SSIM = (2ab + C1) / (a^2 + b^2 + C1).
    a, b, c1 = 0.2, 0.7, 0.01**2
    s = ssim_map(torch.full((1, 1, 16, 16), a), torch.full((1, 1, 16, 16), b))
    torch.testing.assert_close(s, torch.full_like(s, (2 * a * b + c1) / (a * a + b * b + c1)))
    # x against its negative in [0, 1]: structure reversed, SSIM below 0, residual above 1/2.
    assert residual(x, 1 - x, "ssim").mean() > 0.5
    with pytest.raises(ValueError, match="kind should be one of"):
        residual(x, x, "l1")


def test_maps_are_seeded_per_image_not_per_batch():
    torch.manual_seed(0)
    mae = create_model("mae_vit_tiny", img_size=32, depth=1).eval()
    images = torch.rand(3, 3, 32, 32)
    settings = ResidualMapSettings(repeats=3)
    together = residual_maps(mae, images, settings)
    assert together.shape == (3, 2, 32, 32)
    alone = torch.cat([residual_maps(mae, images[i:i + 1], settings) for i in (2, 0, 1)])
    torch.testing.assert_close(alone, together[[2, 0, 1]], atol=1e-6, rtol=0)
    torch.manual_seed(123)  # the global generator plays no part
    torch.testing.assert_close(residual_maps(mae, images, settings), together, atol=1e-6, rtol=0)
    other_seed = residual_maps(mae, images, ResidualMapSettings(repeats=3, seed=1))
    assert (other_seed - together).abs().max() > 1e-3
    assert together.min() >= 0 and together.max() <= 1
    # A different size goes through the MAE at its own size and comes back at the image's.
    assert residual_maps(mae, torch.rand(1, 3, 48, 40), settings).shape == (1, 2, 48, 40)


def test_maps_equal_the_mean_of_full_reconstructions():
    """The fast path (each image embedded once, the decoder's last block and pixel head on masked
    patches only, the maskings' features averaged before the pixel head, sums in patch space)
    gives the maps of Eq. 3-5 written out with whole MAE forwards."""
    torch.manual_seed(0)
    mae = create_model("mae_vit_tiny", img_size=32, depth=1).eval()
    torch.nn.init.normal_(mae.decoder.pred.bias, std=0.2)  # MAE starts it at 0, which would hide a misplaced mean
    images = torch.rand(2, 3, 32, 32)
    settings = ResidualMapSettings(repeats=3)
    want = []
    with torch.no_grad():
        for image in images:
            gen = _image_generator(image_hash(image), settings.seed)
            per_ratio = []
            for ratio in settings.ratios:
                pm = random_patch_mask(3, 4, ratio, generator=gen)
                recon = mae(image[None].expand(3, -1, -1, -1), mask=pm).reconstruction
                hidden = patch_mask_to_pixels(pm.mask, 16, (2, 2)).float()
                count = hidden.sum(0)
                mean = torch.where(count > 0, (recon * hidden).sum(0) / count.clamp_min(1), image)
                per_ratio.append((image - mean).abs().mean(0))
            want.append(torch.stack(per_ratio))
    torch.testing.assert_close(residual_maps(mae, images, settings), torch.stack(want).clamp(0, 1), atol=1e-6, rtol=0)
    # The same patches straight from the model: forward's pixels at the masked patches.
    pm = random_patch_mask(4, 4, 0.5, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = mae(images.repeat_interleave(2, 0), mask=pm).reconstruction
        torch.testing.assert_close(mae.predict_masked_patches(images, pm, 2), patchify(full, 16)[pm.mask],
                                   atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r"mask should cover \(6, 4\) patches"):
        mae.predict_masked_patches(images, pm, 3)


def test_both_sums_over_maskings_agree():
    """The GPU's dense sum (scatter per masking, then sum) and the CPU's index_add_ give the same
    per-patch sums, bit for bit (both add the maskings in order)."""
    g = torch.Generator().manual_seed(5)
    mask = torch.rand(3 * 4, 6, generator=g) > 0.5
    pred = torch.randn(int(mask.sum()), 5, generator=g)
    dense = _sum_over_maskings(pred, mask, 4, dense=True)
    torch.testing.assert_close(_sum_over_maskings(pred, mask, 4, dense=False), dense, atol=0, rtol=0)
    want = torch.zeros(3, 6, 5)
    rows = iter(pred)
    for r in range(12):
        for j in range(6):
            if mask[r, j]:
                want[r // 4, j] += next(rows)
    torch.testing.assert_close(dense, want.flatten(0, 1), atol=1e-6, rtol=0)


def test_explicit_attention_is_the_same_attention_and_is_undone():
    torch.manual_seed(0)
    mae = create_model("mae_vit_tiny", img_size=32, depth=1).eval()
    x = torch.rand(2, 3, 32, 32)
    pm = random_patch_mask(2, 4, 0.5, generator=torch.Generator().manual_seed(1))
    layers = [m for m in mae.modules() if hasattr(m, "fused_attn")]
    assert len(layers) == 1 + 2 and all(m.fused_attn for m in layers)  # encoder + decoder blocks
    with torch.no_grad():
        fused = mae.predict_masked_patches(x, pm)
        with _explicit_attention(mae, True):
            assert not any(m.fused_attn for m in layers)
            explicit = mae.predict_masked_patches(x, pm)
    assert all(m.fused_attn for m in layers)
    torch.testing.assert_close(explicit, fused, atol=1e-5, rtol=0)




def test_gelu_in_place_gives_the_same_maps_and_is_undone():
    torch.manual_seed(0)
    mae = create_model("mae_vit_tiny", img_size=32, depth=1).eval()
    x = torch.rand(2, 3, 32, 32)
    pm = random_patch_mask(2, 4, 0.5, generator=torch.Generator().manual_seed(1))
    acts = [m.act for m in mae.modules() if hasattr(m, "fc1")]
    assert len(acts) == 1 + 2 and all(type(a) is torch.nn.GELU for a in acts)  # encoder + decoder MLPs
    with torch.no_grad():
        want = mae.predict_masked_patches(x, pm)
        with _gelu_in_place(mae):
            assert all(isinstance(m.act, _GELUInPlace) for m in mae.modules() if hasattr(m, "fc1"))
            got = mae.predict_masked_patches(x, pm)
    assert [m.act for m in mae.modules() if hasattr(m, "fc1")] == acts
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    h = torch.randn(5, 7)
    want = torch.nn.functional.gelu(h)
    assert _GELUInPlace()(h) is h and torch.equal(h, want)


@pytest.mark.parametrize("explicit", [False, True])
def test_decoder_last_block_on_the_selected_tokens_only(explicit):
    """The decoder runs its last block for the masked tokens only (their queries against every
    token's keys and values): the same values as the whole block, and that path is the one taken
    when every row selects as many tokens; rows that select different numbers, and training,
    run the whole block."""
    torch.manual_seed(0)
    decoder = MAEDecoder(24, 4, 3, embed_dim=32, depth=2, num_heads=4)
    for p in decoder.parameters():
        torch.nn.init.normal_(p, std=0.3)
    decoder.eval()
    pm = random_patch_mask(3, 16, 0.75, generator=torch.Generator().manual_seed(2))
    visible = torch.randn(3, 4, 24)
    last = decoder.blocks[-1]
    with torch.no_grad(), _explicit_attention(decoder, explicit):
        whole = decoder(visible, pm.ids_restore, (4, 4))  # (3, 16, 48), every block whole
        want = decoder.pred(decoder.norm(_whole_blocks_at(decoder, visible, pm)))
        last.forward = _refuse  # the selected path must not call the block itself
        got = decoder(visible, pm.ids_restore, (4, 4), pm.mask)
        del last.forward
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
        torch.testing.assert_close(got, whole[pm.mask], atol=1e-6, rtol=0)
        uneven = pm.mask.clone()
        uneven[0, (~uneven[0]).nonzero()[0]] = True  # one more token in the first row
        torch.testing.assert_close(decoder(visible, pm.ids_restore, (4, 4), uneven), whole[uneven], atol=1e-6, rtol=0)
    decoder.train()
    calls = []
    last.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        decoder(visible, pm.ids_restore, (4, 4), pm.mask)
    assert calls == [1]


def _refuse(*args, **kwargs):
    raise AssertionError("the whole last block ran")


def _whole_blocks_at(decoder, visible, pm):
    b, k, _ = visible.shape
    x = decoder.embed(visible)
    x = torch.cat([x, decoder.mask_token.expand(b, 16 - k, -1)], dim=1)
    x = torch.gather(x, 1, pm.ids_restore[..., None].expand(-1, -1, decoder.embed_dim))
    return decoder.blocks(x + sincos_pos_embed_2d(decoder.embed_dim, (4, 4)))[pm.mask]


def test_masked_patch_features_take_the_callers_embedding():
    """residual_maps embeds a chunk's images once and passes the tokens for every ratio's masks;
    the features are those of embedding inside, and tokens of the wrong shape are refused."""
    torch.manual_seed(0)
    mae = create_model("mae_vit_tiny", img_size=32, depth=1).eval()
    images = torch.rand(2, 3, 32, 32)
    pm = random_patch_mask(6, 4, 0.5, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        tokens = mae.embed(images)
        torch.testing.assert_close(mae.masked_patch_features(images, pm, 3, tokens),
                                   mae.masked_patch_features(images, pm, 3), atol=0, rtol=0)
        with pytest.raises(ValueError, match="tokens should be embed"):
            mae.masked_patch_features(images, pm, 3, tokens[:, :3])


def test_pixel_head_of_the_mean_feature_is_the_mean_of_the_pixels():
    """residual_maps averages the decoder's features over the maskings and runs the pixel head
    once per patch; the head is linear, so that is the mean of the maskings' pixels."""
    torch.manual_seed(0)
    mae = create_model("mae_vit_tiny", img_size=32, depth=1).eval()
    torch.nn.init.normal_(mae.decoder.pred.bias, std=0.5)  # MAE starts it at 0, which would hide a misplaced mean
    images = torch.rand(2, 3, 32, 32)
    pm = random_patch_mask(8, 4, 0.5, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        feats = mae.masked_patch_features(images, pm, 4)
        pixels = mae.predict_masked_patches(images, pm, 4)
        torch.testing.assert_close(mae.patch_pixels(feats), pixels, atol=0, rtol=0)
        count = pm.mask.view(2, 4, 4).sum(1).flatten()[:, None]
        hidden = count[:, 0] > 0
        assert hidden.sum() >= 6  # patches no masking hid keep the image's pixels in the maps
        mean_of_pixels = _sum_over_maskings(pixels, pm.mask, 4, dense=False) / count.clamp_min(1)
        pixels_of_mean = mae.patch_pixels(_sum_over_maskings(feats, pm.mask, 4, dense=False) / count.clamp_min(1))
    torch.testing.assert_close(pixels_of_mean[hidden], mean_of_pixels[hidden], atol=1e-5, rtol=0)
    assert feats.shape == (int(pm.mask.sum()), mae.cfg.decoder_embed_dim)


class RecordingMAE(torch.nn.Module):
    """A stand-in MAE: a new random reconstruction of every patch (visible ones too, as a real
    MAE decodes them) on each call, recording the masks it was given and what it returned."""

    def __init__(self, img_size=8, patch_size=2, in_chans=3):
        super().__init__()
        self.cfg = SimpleNamespace(img_size=img_size, in_chans=in_chans)
        self.patch_size = patch_size
        self.gen = torch.Generator().manual_seed(7)
        self.calls = []

    def embed(self, x):
        return x

    def masked_patch_features(self, x, mask, repeats, tokens=None):
        assert mask.mask.shape[0] == x.shape[0] * repeats and tokens is x
        recon = torch.rand((mask.mask.shape[0], *x.shape[1:]), generator=self.gen)
        self.calls.append((mask.mask.clone(), recon))
        return patchify(recon, self.patch_size)[mask.mask]

    def patch_pixels(self, features):  # the features here are the pixels already
        return features


@pytest.mark.parametrize("kind", ["absdiff", "mse"])
def test_map_averages_each_pixel_over_the_runs_that_masked_it(kind):
    """Eq. 3-5 on a hand-made case: the mean reconstruction of a pixel is taken over the n runs
    whose mask covered it (a pixel no run masked keeps the image's value), then the residual."""
    mae = RecordingMAE()
    image = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    settings = ResidualMapSettings(ratios=(0.25, 0.5), repeats=3, kind=kind)
    got = residual_maps(mae, image, settings)
    assert got.shape == (1, 2, 8, 8) and len(mae.calls) == 2
    for r, (masks, recon) in enumerate(mae.calls):
        assert masks.shape == (3, 16)
        want = torch.empty(8, 8)
        for i in range(8):
            for j in range(8):
                runs = [k for k in range(3) if masks[k, (i // 2) * 4 + j // 2]]
                mean = sum(recon[k, :, i, j] for k in runs) / len(runs) if runs else image[0, :, i, j]
                diff = image[0, :, i, j] - mean
                want[i, j] = (diff.abs() if kind == "absdiff" else diff.square()).mean()
        torch.testing.assert_close(got[0, r], want, rtol=1e-5, atol=1e-6)
        # The case tells the means apart: some pixels were masked in only some of the runs.
        counts = masks.sum(0)
        assert ((counts > 0) & (counts < 3)).any()


def test_bad_settings_name_the_value():
    with pytest.raises(ValueError, match=r"ratios.*\[1.0\]"):
        ResidualMapSettings(ratios=(1.0,))
    with pytest.raises(ValueError, match="repeats should be >= 1, got 0"):
        ResidualMapSettings(repeats=0)
    with pytest.raises(ValueError, match="kind should be one of"):
        ResidualMapSettings(kind="gradcam")


def test_command_caches_by_image_content(mae_checkpoint, tmp_path, capsys):
    data = tmp_path / "images"
    assert main(["data", "synth", "--out", str(data), "--n", "3", "--layout", "folder", "--image-size", "32"]) == 0
    spec = f"folder:{data}:train"
    out = tmp_path / "maps"
    args = ["residual-maps", "--checkpoint", str(mae_checkpoint), "--data", spec, "--out", str(out),
            "--repeats", "2", "--png", "--no-progress"]
    assert main(args) == 0
    assert "3 images, 3 computed, 0 cached" in capsys.readouterr().out
    assert main(args) == 0
    assert "3 images, 0 computed, 3 cached" in capsys.readouterr().out
    # Touch one image: only its maps are computed again.
    files = sorted(p for p in (data / "train" / "images").iterdir())
    img = Image.open(files[1]).convert("RGB")
    img.putpixel((3, 3), (255, 0, 0))
    img.save(files[1])
    assert main(args) == 0
    assert "3 images, 1 computed, 2 cached" in capsys.readouterr().out
    # Other settings are another cache.
    assert main([*args[:-4], "--repeats", "3", "--no-progress"]) == 0
    assert "3 images, 3 computed, 0 cached" in capsys.readouterr().out
    # The cached maps are what residual_maps gives for the same image (the seeding is per image).
    from lesionkit.data import from_spec

    mae, _, mae_hash = load_mae(mae_checkpoint)
    settings = ResidualMapSettings(repeats=2)
    cache = ResidualMapCache(out, mae_hash, settings)
    item = from_spec(spec, image_size=32)[1]
    cached = cache.load(image_hash(item["image"]))
    torch.testing.assert_close(cached, residual_maps(mae, item["image"][None], settings)[0], atol=1e-3, rtol=0)
    pngs = sorted((cache.dir / "png").glob("*.png"))
    assert len(pngs) == 6  # 3 images x 2 ratios, named by image id (the touched one rewritten)
    png = Image.open(pngs[0])
    assert png.mode in ("I;16", "I") and png.size == (32, 32)


@pytest.mark.parametrize("flags, settings", [
    ([], {}),
    (["--ratios", "0.25", "0.5", "0.9"], {"ratios": (0.25, 0.5, 0.9)}),
    (["--kind", "mse"], {"kind": "mse"}),
    (["--kind", "ssim"], {"kind": "ssim"}),
    (["--seed", "3"], {"seed": 3}),
])
def test_command_options_change_the_maps_written(mae_checkpoint, tmp_path, capsys, flags, settings):
    """--ratios / --kind / --seed reach the maps: the files are residual_maps() with those settings,
    and (but for the defaults) differ from the default settings' maps."""
    from lesionkit.data import from_spec

    out = tmp_path / "maps"
    assert main(["residual-maps", "--checkpoint", str(mae_checkpoint), "--data", "synthetic:2:5", "--out", str(out),
                 "--repeats", "2", "--image-size", "32", "--no-progress", *flags]) == 0
    mae, _, mae_hash = load_mae(mae_checkpoint)
    chosen, default = ResidualMapSettings(repeats=2, **settings), ResidualMapSettings(repeats=2)
    images = torch.stack([item["image"] for item in from_spec("synthetic:2:5", image_size=32)])
    cache = ResidualMapCache(out, mae_hash, chosen)
    written = torch.stack([cache.load(image_hash(image)) for image in images])
    assert written.shape == (2, len(chosen.ratios), 32, 32)
    torch.testing.assert_close(written, residual_maps(mae, images, chosen), atol=1e-3, rtol=0)
    if settings:
        other = residual_maps(mae, images, default)
        assert written.shape != other.shape or (written - other).abs().max() > 1e-2


def test_command_rejects_a_checkpoint_that_is_no_mae(tmp_path, capsys):
    ckpt = tmp_path / "seg"
    assert main(["train", "--model", "unet_tiny", "--data", "synthetic:4", "--epochs", "1", "--batch-size", "2",
                 "--image-size", "32", "--out", str(ckpt), "--no-progress", "--set", "data.num_workers=0",
                 "model.kwargs.widths=[4,8,16]", "data.val_fraction=0"]) == 0
    capsys.readouterr()
    assert main(["residual-maps", "--checkpoint", str(ckpt / "last.pt"), "--data", "synthetic:2",
                 "--out", str(tmp_path / "m")]) == 2
    assert "holds model 'unet_tiny', not an MAE" in capsys.readouterr().err


def test_bf16_maps_are_close_to_fp32_and_cached_apart():
    torch.manual_seed(0)
    mae = create_model("mae_vit_tiny", img_size=32, depth=1).eval()
    images = torch.rand(2, 3, 32, 32)
    fp32 = residual_maps(mae, images, ResidualMapSettings(repeats=2))
    bf16 = residual_maps(mae, images, ResidualMapSettings(repeats=2, precision="bf16"))
    assert 0 < (bf16 - fp32).abs().max() < 0.05  # the same maskings, rounded in the MAE
    # Batched images per forward give each image the maps it gets alone.
    torch.testing.assert_close(residual_maps(mae, images, ResidualMapSettings(repeats=2), images_per_forward=1),
                               fp32, atol=1e-6, rtol=0)
    assert ResidualMapSettings(precision="bf16").key() != ResidualMapSettings().key()
    assert ResidualMapSettings(precision="bf16").cli_flags() == "--precision bf16"
    with pytest.raises(ValueError, match="precision should be one of"):
        ResidualMapSettings(precision="fp16")
