"""TransUNet: the official parameter count, timm weight layout, any input size, pretrained loading."""

import pytest
import torch

from lesionkit.models import create_model
from lesionkit.models.transunet import TransUNet

from conftest import build_meta, count_params


pytestmark = pytest.mark.usefixtures("one_thread")


def test_transunet_r50_vit_b16_has_the_official_parameter_count():
    # TransUNet's official code: 105,276,066 parameters for R50-ViT-B_16, 2 classes, 224 px.
    assert count_params(build_meta("transunet_r50_vit_b16", num_classes=2)) == 105_276_066
    # One class fewer removes one 3x3 filter over 16 channels and its bias.
    assert count_params(build_meta("transunet_r50_vit_b16")) == 105_276_066 - 16 * 9 - 1


def test_parts_breakdown_matches_transunet():
    model = build_meta("transunet_r50_vit_b16", num_classes=2)
    backbone = model.encoder.vit.patch_embed.backbone
    assert count_params(backbone) == 11_894_848  # the R50 (3, 4, 9) stem, as timm's vit_base_r50_s16_224 (docs/models.md)
    assert count_params(model.decoder) == 7_387_200  # CUP without the head
    assert model.encoder.vit.pos_embed.shape == (1, 196, 768)  # no class token, 14x14 grid
    assert model.encoder.vit.cls_token is None
    assert model.encoder.skip_channels == [512, 256, 64]


def test_encoder_is_timms_vit_base_r50_s16_224_layout():
    timm = pytest.importorskip("timm")
    with torch.device("meta"):
        ref = timm.create_model("vit_base_r50_s16_224", class_token=False, num_classes=0, global_pool="")
    ours = build_meta("transunet_r50_vit_b16").encoder.vit
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == {k: tuple(v.shape) for k, v in ref.state_dict().items()}


@pytest.mark.parametrize("size", [(128, 128), (96, 160), (64, 64)])
def test_tiny_forward_backward_at_any_multiple_of_16(size):
    torch.manual_seed(0)
    model = create_model("transunet_tiny", num_classes=2)
    x = torch.rand(2, 3, *size)
    logits = model(x)
    assert logits.shape == (2, 2, *size)
    logits.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_position_embedding_is_resampled_for_other_sizes():
    model = create_model("transunet_tiny")
    enc = model.encoder
    assert enc.grid_size == (8, 8)
    assert enc.pos_embed((8, 8)) is enc.vit.pos_embed  # the trained grid is used as is
    # An embedding that only varies down the rows must still do so, increasing, on a 4x12 grid:
    # rows and columns are not swapped and the row-major order is kept.
    with torch.no_grad():
        rows = torch.arange(8.0).repeat_interleave(8)  # (64,) row index of each token
        enc.vit.pos_embed.copy_(rows[None, :, None].expand_as(enc.vit.pos_embed))
    other = enc.pos_embed((4, 12)).reshape(4, 12, -1)
    assert other.shape[-1] == enc.embed_dim
    torch.testing.assert_close(other, other[:, :1].expand_as(other))  # constant along each row
    row_values = other[:, 0, 0]
    assert (row_values[1:] > row_values[:-1]).all()


def test_bad_inputs_name_the_problem():
    model = create_model("transunet_tiny")
    with pytest.raises(ValueError, match="multiples of 16, got 100x128"):
        model(torch.rand(1, 3, 100, 128))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.rand(1, 1, 64, 64))
    with pytest.raises(ValueError, match="n_skip"):
        create_model("transunet_tiny", n_skip=4)
    with pytest.raises(ValueError, match="img_size"):
        create_model("transunet_tiny", img_size=100)
    with pytest.raises(ValueError, match="color_constancy"):
        create_model("transunet_tiny", color_constancy="retinex")


def test_n_skip_removes_skip_inputs():
    full, none = create_model("transunet_tiny"), create_model("transunet_tiny", n_skip=0)
    assert [b.cskip for b in full.decoder.blocks] == [128, 64, 32, 0]
    assert [b.cskip for b in none.decoder.blocks] == [0, 0, 0, 0]
    assert none(torch.rand(1, 3, 64, 64)).shape == (1, 1, 64, 64)


def test_pretrained_without_cache_says_how_to_get_the_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import lesionkit.models.transunet as tu

    monkeypatch.setattr(tu, "cached_timm_weights", lambda: None)  # whatever this machine has cached
    with pytest.raises(ValueError, match=r"not in the local Hugging Face cache.*never downloads.*pretrained_file"):
        build_meta("transunet_r50_vit_b16", pretrained=True)
    with pytest.raises(ValueError, match="do not fit"):
        create_model("transunet_tiny", pretrained=True)


def test_cache_lookup_finds_the_cached_file_and_never_downloads(tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    import socket

    from huggingface_hub import constants

    import lesionkit.models.transunet as tu

    # huggingface_hub reads HF_HUB_CACHE once, at import: point the constant itself at this cache.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    connections = []

    def no_network(sock, address):
        connections.append(address)
        raise OSError(f"the cache lookup opened a connection to {address}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    assert tu.cached_timm_weights() is None  # an empty cache holds nothing
    # The file as the hub lays it out: refs/main names the snapshot that holds it.
    repo = tmp_path / ("models--" + tu.TIMM_WEIGHTS.replace("/", "--"))
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    (snapshot / "model.safetensors").write_bytes(b"weights")
    assert tu.cached_timm_weights() == snapshot / "model.safetensors"
    assert connections == []


def _timm_style_state(model: TransUNet, grid: int) -> dict:
    """The tiny encoder's weights laid out as timm saves a ViT: class token + its position first."""
    state = {k: v.clone() for k, v in model.encoder.vit.state_dict().items()}
    d = state["pos_embed"].shape[-1]
    state["cls_token"] = torch.randn(1, 1, d)
    state["pos_embed"] = torch.randn(1, 1 + grid * grid, d)
    state["head.weight"], state["head.bias"] = torch.randn(10, d), torch.randn(10)
    return state


def test_pretrained_file_loads_timm_layout_and_resamples_positions(tmp_path):
    torch.manual_seed(0)
    source = create_model("transunet_tiny")
    state = _timm_style_state(source, grid=4)
    path = tmp_path / "weights.pth"
    torch.save(state, path)
    loaded = create_model("transunet_tiny", pretrained_file=str(path))
    got = loaded.encoder.vit.state_dict()
    torch.testing.assert_close(got["blocks.0.attn.qkv.weight"], state["blocks.0.attn.qkv.weight"])
    torch.testing.assert_close(got["patch_embed.backbone.stem.conv.weight"], state["patch_embed.backbone.stem.conv.weight"])
    assert got["pos_embed"].shape == (1, 64, source.cfg.embed_dim)  # 4x4 grid without class token -> 8x8
    # The decoder is not part of the file: it keeps its own initialisation.
    assert not torch.equal(loaded.decoder.conv_more[0].weight, torch.zeros_like(loaded.decoder.conv_more[0].weight))


def test_pretrained_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        create_model("transunet_tiny", pretrained_file=str(tmp_path / "missing.pth"))
    bad = tmp_path / "bad.pth"
    torch.save({"foo.weight": torch.zeros(3)}, bad)
    with pytest.raises(ValueError, match="bad.pth does not hold vit_base_r50_s16_224 weights"):
        create_model("transunet_tiny", pretrained_file=str(bad))


def test_gray_world_equalises_channel_means():
    model = create_model("transunet_tiny", color_constancy="gray_world")
    x = torch.rand(2, 3, 32, 32) * torch.tensor([0.9, 0.5, 0.3]).view(1, 3, 1, 1)
    y = model.encoder.prepare_input(x)
    means = y.mean(dim=(-2, -1))
    torch.testing.assert_close(means, means.mean(dim=1, keepdim=True).expand_as(means), rtol=1e-4, atol=1e-4)
    assert torch.equal(create_model("transunet_tiny").encoder.prepare_input(x), x)
