"""VM-UNet on the SS2D kernels: the layer against VM-UNet's sequence-layout SS2D, backends,
parameter counts, checkpoint interop, bad inputs, weight-decay groups and torch.compile."""

import math

import pytest
import torch
from torch.nn import functional as F

import lesionkit.kernels as K
from lesionkit.engine.param_groups import parameter_groups
from lesionkit.kernels.reference.selective_scan import selective_scan_sequential_reference
from lesionkit.layers.ss2d import SS2D
from lesionkit.layers.vss_block import VSSBlock
from lesionkit.layers.vss_patches import FinalPatchExpand2D, _NormHead
from lesionkit.models import create_model
from lesionkit.models.vmunet_checkpoint import load_pretrained

from conftest import backend_params

SCAN_2D_BACKENDS = backend_params("selective_scan_2d")
RTOL, ATOL = 6e-4, 2e-3  # mamba's float32 tolerances (docs/ss2d.md)


def _randomise(module, seed=0):
    """Non-trivial values everywhere (the trained-looking case; zero biases hide layout bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("A_logs") or name.endswith("dt_projs_bias"):
                continue  # keep the stable initial ranges
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return module


def vmunet_v0_ss2d_forward(layer: SS2D, x: torch.Tensor) -> torch.Tensor:
    """VM-UNet's SS2D forward as its code writes it, in sequence layout: stack row-major and
    column-major flattenings, append their flips, project per direction with einsum over
    (b, k, d, l), one selective scan over 4*d channels, flip / transpose the results back."""
    b, h, w, _ = x.shape
    L, k = h * w, 4
    xz = layer.in_proj(x)
    xx, z = xz.chunk(2, dim=-1)
    xx = F.silu(layer.conv2d(xx.permute(0, 3, 1, 2).contiguous()))
    x_hwwh = torch.stack([xx.reshape(b, -1, L), xx.transpose(2, 3).contiguous().reshape(b, -1, L)], dim=1)
    xs = torch.cat([x_hwwh, torch.flip(x_hwwh, dims=[-1])], dim=1)
    x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, layer.x_proj_weight)
    dts, Bs, Cs = torch.split(x_dbl, [layer.dt_rank, layer.d_state, layer.d_state], dim=2)
    dts = torch.einsum("bkrl,kdr->bkdl", dts, layer.dt_projs_weight)
    out = selective_scan_sequential_reference(
        xs.reshape(b, -1, L), dts.reshape(b, -1, L), -torch.exp(layer.A_logs.float()), Bs, Cs, layer.Ds.float(),
        None, layer.dt_projs_bias.float().reshape(-1), True).reshape(b, k, -1, L)
    inv = torch.flip(out[:, 2:4], dims=[-1])
    wh = out[:, 1].reshape(b, -1, w, h).transpose(2, 3).reshape(b, -1, L)
    invwh = inv[:, 1].reshape(b, -1, w, h).transpose(2, 3).reshape(b, -1, L)
    y = (out[:, 0] + inv[:, 0] + wh + invwh).transpose(1, 2).reshape(b, h, w, -1)
    y = layer.out_norm(y) * F.silu(z)
    return layer.out_proj(y)


@pytest.mark.parametrize("shape", [(2, 5, 7, 16), (1, 8, 8, 24)])
def test_ss2d_equals_vmunet_sequence_layout(shape):
    torch.manual_seed(0)
    layer = _randomise(SS2D(shape[-1], d_state=4))
    x = torch.randn(shape)
    with K.use_backend("reference"):
        got = layer(x)
    torch.testing.assert_close(got, vmunet_v0_ss2d_forward(layer, x), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("backend,device", SCAN_2D_BACKENDS)
def test_ss2d_forward_backends_agree(backend, device):
    torch.manual_seed(0)
    layer = _randomise(SS2D(16)).to(device)
    x = torch.randn(2, 6, 10, 16, device=device)
    with K.use_backend("reference"):
        want = layer(x)
    with K.use_backend(backend):
        got = layer(x)
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("backend,device", SCAN_2D_BACKENDS)
def test_vss_block_gradients_backends_agree(backend, device):
    torch.manual_seed(0)
    block = _randomise(VSSBlock(16, se=True, cmn=True)).to(device)
    x = torch.randn(2, 6, 5, 16, device=device)

    def grads(name):
        block.zero_grad()
        xi = x.clone().requires_grad_(True)
        with K.use_backend(name):
            out = block(xi)
        out.square().mean().backward()
        return out.detach(), xi.grad, {n: p.grad.clone() for n, p in block.named_parameters()}

    want_out, want_dx, want = grads("reference")
    got_out, got_dx, got = grads(backend)
    torch.testing.assert_close(got_out, want_out, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(got_dx, want_dx, rtol=2 * RTOL, atol=2 * ATOL)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=5e-3, atol=5e-3, msg=name)


def test_triton_backend_is_refused_for_the_fused_scan():
    # selective_scan_2d has no Triton kernel: asking for one says so instead of falling back.
    layer = SS2D(8)
    with K.use_backend("triton"), pytest.raises(K.BackendUnavailableError):
        layer(torch.randn(1, 4, 4, 8))


def test_vmunet_parameter_count_is_the_official_one():
    assert sum(p.numel() for p in create_model("vmunet").parameters()) == 27_427_561


def test_ss2d_initialisation():
    torch.manual_seed(0)
    layer = SS2D(32)
    assert layer.dt_rank == 2 and layer.d_inner == 64
    assert layer.x_proj_weight.shape == (4, 2 + 32, 64)
    assert layer.dt_projs_weight.shape == (4, 64, 2) and layer.dt_projs_bias.shape == (4, 64)
    dt = F.softplus(layer.dt_projs_bias)
    assert dt.min() >= 1e-4 - 1e-7 and dt.max() <= 0.1 + 1e-6
    torch.testing.assert_close(torch.exp(layer.A_logs), torch.arange(1.0, 17.0).repeat(256, 1))
    assert torch.equal(layer.Ds, torch.ones(256))


def test_no_weight_decay_marking_reaches_the_optimiser():
    model = create_model("vmunet_tiny")
    groups = parameter_groups(model, 0.01)
    assert len(groups) == 2 and groups[1]["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    exempt = {names[id(p)].rsplit(".", 1)[-1] for p in groups[1]["params"]}
    assert exempt == {"A_logs", "Ds"}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    opt = torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.01)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]
    # Without a marking nothing changes: one group.
    assert len(parameter_groups(create_model("unet_tiny"), 0.01)) == 1


@pytest.mark.parametrize("size, match", [((1, 3, 48, 64), "multiples of 32.*48x64"),
                                         ((1, 3, 64, 40), "multiples of 32.*64x40"),
                                         ((1, 4, 64, 64), r"\(B, 3, H, W\).*\(1, 4, 64, 64\)")])
def test_bad_inputs_name_the_size(size, match):
    model = create_model("vmunet_tiny")
    with pytest.raises(ValueError, match=match):
        model(torch.rand(size))


def test_one_channel_input_is_repeated():
    torch.manual_seed(0)
    model = create_model("vmunet_tiny").eval()
    x = torch.rand(1, 1, 64, 64)
    torch.testing.assert_close(model(x), model(x.repeat(1, 3, 1, 1)))


@pytest.mark.parametrize("kwargs, match", [({"dims": (16, 48, 64, 128)}, "double"), ({"depths": (2, 2, 2)}, "same length"),
                                          ({"in_chans": 4}, "in_chans"), ({"dims": (18, 36, 72, 144)}, "divisible by 4")])
def test_bad_config_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        create_model("vmunet_tiny", **kwargs)


# ------------------------------------------------------------------------------ the whole network
# VM-UNet's forward as its code (models/vmunet/vmamba.py, VSSM) writes it, composed here from the
# model's VSS blocks with the resolution changes written out, so a wiring change in VMUNet.forward
# (a skip dropped or taken from the wrong stage) or in the patch layers shows in the logits.

def official_patch_merging(merge, x):
    """VM-UNet's PatchMerging2D: x0 = x[0::2, 0::2], x1 = x[1::2, 0::2], x2 = x[0::2, 1::2],
    x3 = x[1::2, 1::2] concatenated in that order, LayerNorm(4C), Linear 4C -> 2C."""
    x0, x1, x2, x3 = x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]
    x = torch.cat([x0, x1, x2, x3], dim=-1)
    x = F.layer_norm(x, x.shape[-1:], merge.norm.weight, merge.norm.bias, merge.norm.eps)
    return x @ merge.reduction.weight.t()


def official_patch_expand(expand, x, scale):
    """VM-UNet's (Final_)PatchExpand2D: Linear, 'b h w (p1 p2 c) -> b (h p1) (w p2) c', LayerNorm."""
    x = x @ expand.expand.weight.t()
    b, h, w, ch = x.shape
    c = ch // (scale * scale)
    out = x.new_empty(b, h * scale, w * scale, c)
    for p1 in range(scale):
        for p2 in range(scale):
            k = (p1 * scale + p2) * c
            out[:, p1::scale, p2::scale] = x[..., k:k + c]
    return F.layer_norm(out, (c,), expand.norm.weight, expand.norm.bias, expand.norm.eps)


def official_vmunet_forward(model, x, skips=True):
    """VSSM.forward: forward_features (skip_list gets each stage's input), forward_features_up
    (layer_up(x + skip_list[-inx]) for inx > 0), forward_final (4x expand, 1x1 conv).
    ``skips=False`` leaves the skips out (to show that the comparison can see them)."""
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    embed = model.patch_embed
    x = F.conv2d(x, embed.proj.weight, embed.proj.bias, stride=4).permute(0, 2, 3, 1)
    x = F.layer_norm(x, x.shape[-1:], embed.norm.weight, embed.norm.bias, embed.norm.eps)
    skip_list = []
    for layer in model.layers:
        skip_list.append(x)
        for blk in layer.blocks:
            x = blk(x)
        if layer.downsample is not None:
            x = official_patch_merging(layer.downsample, x)
    for inx, layer_up in enumerate(model.layers_up):
        if inx != 0:
            if skips:
                x = x + skip_list[-inx]
            x = official_patch_expand(layer_up.upsample, x, 2)
        for blk in layer_up.blocks:
            x = blk(x)
    x = official_patch_expand(model.final_up, x, 4).permute(0, 3, 1, 2)
    return F.conv2d(x, model.final_conv.weight, model.final_conv.bias)


def test_patch_merging_is_the_official_formula():
    from lesionkit.layers.vss_patches import PatchMerging2D

    merge = _randomise(PatchMerging2D(6), seed=3)
    x = torch.randn(2, 4, 6, 6)
    torch.testing.assert_close(merge(x), official_patch_merging(merge, x))
    # Position matters: the four neighbours are not interchangeable.
    swapped = x.clone()
    swapped[:, 1::2, 0::2], swapped[:, 0::2, 1::2] = x[:, 0::2, 1::2], x[:, 1::2, 0::2]
    assert not torch.allclose(merge(swapped), merge(x), atol=1e-3)


@pytest.mark.parametrize("in_chans", [3, 1])
def test_vmunet_forward_is_the_official_one(in_chans):
    torch.manual_seed(0)
    model = create_model("vmunet", dims=(8, 16, 32, 64), depths=(1, 1, 1, 1), depths_decoder=(1, 1, 1, 1), d_state=4)
    model = _randomise(model, seed=1).eval()
    x = torch.rand(2, in_chans, 64, 32)
    with torch.no_grad(), K.use_backend("reference"):
        got = model(x)
        want = official_vmunet_forward(model, x)
        no_skips = official_vmunet_forward(model, x, skips=False)
    assert got.shape == (2, 1, 64, 32)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert (no_skips - want).abs().max() > 1e-2  # the skips carry information here



def _final_head_case(classes, dtype=torch.float64):
    torch.manual_seed(0)
    up = FinalPatchExpand2D(24).to(dtype)
    head = torch.nn.Conv2d(6, classes, 1).to(dtype)
    with torch.no_grad():  # away from LayerNorm's initial identity, so gamma and beta matter
        up.norm.weight.normal_(1.0, 0.5)
        up.norm.bias.normal_(0.0, 0.5)
    x = (torch.randn(2, 3, 5, 24, dtype=dtype) * 2 + 0.5).requires_grad_(True)
    return up, head, x


@pytest.mark.parametrize("classes", [1, 3])
def test_final_head_is_layer_norm_then_conv(classes):
    # forward_head folds the final LayerNorm and the 1x1 head into one function with a written
    # backward; values and every gradient must be those of LayerNorm -> rearrange -> conv.
    up, head, x = _final_head_case(classes)
    params = [x, up.expand.weight, up.norm.weight, up.norm.bias, head.weight, head.bias]
    want = head(up.forward(x).permute(0, 3, 1, 2))
    got = up.forward_head(x, head)
    assert got.shape == want.shape == (2, classes, 12, 20)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    grad_out = torch.randn_like(want)
    for g_got, g_want in zip(torch.autograd.grad(got, params, grad_out), torch.autograd.grad(want, params, grad_out)):
        torch.testing.assert_close(g_got, g_want, rtol=1e-9, atol=1e-10)
    with torch.no_grad():  # the inference path (no autograd function) gives the same values
        torch.testing.assert_close(up.forward_head(x, head), want.detach(), rtol=1e-10, atol=1e-10)
        # a channels-last model (model.to(memory_format=torch.channels_last)) has a strided head weight
        channels_last = head.to(memory_format=torch.channels_last)
        torch.testing.assert_close(up.forward_head(x, channels_last), want.detach(), rtol=1e-10, atol=1e-10)


def test_final_head_gradcheck_and_bf16():
    rows = torch.randn(9, 6, dtype=torch.float64, requires_grad=True)
    gamma, beta = (torch.randn(6, dtype=torch.float64, requires_grad=True) for _ in range(2))
    weight = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: _NormHead.apply(*a, 1e-5), (rows, gamma, beta, weight, bias))
    up, head, x = _final_head_case(1, torch.float32)
    want = head(up.forward_channels_first(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = up.forward_head(x, head)
    assert got.dtype == torch.bfloat16  # what the convolution returns under autocast
    assert (got.float() - want).abs().max() < 0.05 * want.abs().max()


def test_final_head_is_not_folded_where_it_cannot_be():
    up, _, x = _final_head_case(1)
    hooked = torch.nn.Conv2d(6, 1, 1).double()
    hooked.register_forward_hook(lambda *_: None)
    assert up.folds(torch.nn.Conv2d(6, 1, 1)) and not up.folds(hooked)
    assert not up.folds(torch.nn.Conv2d(6, 1, 3, padding=1)) and not up.folds(torch.nn.Conv2d(12, 1, 1))
    with pytest.raises(ValueError, match="head should be a 1x1"):
        up.forward_head(x, hooked)
    model = create_model("vmunet", dims=(8, 16, 32, 64), depths=(1, 1, 1, 1), depths_decoder=(1, 1, 1, 1), d_state=4)
    model = _randomise(model, seed=1).eval()
    seen = []
    model.final_conv.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.no_grad():
        out = model(torch.rand(1, 3, 32, 32))
    assert seen == [out.shape]  # a hooked head runs as a module, so its hook fires


# ------------------------------------------------------------------------------ checkpoints
# The key names and shapes below are written from VM-UNet's model code (VMUNet -> VSSM ->
# PatchEmbed2D / VSSLayer / VSSLayer_up / VSSBlock / SS2D / PatchMerging2D / PatchExpand2D /
# Final_PatchExpand2D), independently of lesionkit's modules, so the round trip checks the names.

def official_ss2d_shapes(prefix, dim, d_state=16):
    d_inner, r = 2 * dim, math.ceil(dim / 16)
    return {f"{prefix}.ln_1.weight": (dim,), f"{prefix}.ln_1.bias": (dim,),
            f"{prefix}.self_attention.in_proj.weight": (2 * d_inner, dim),
            f"{prefix}.self_attention.conv2d.weight": (d_inner, 1, 3, 3),
            f"{prefix}.self_attention.conv2d.bias": (d_inner,),
            f"{prefix}.self_attention.x_proj_weight": (4, r + 2 * d_state, d_inner),
            f"{prefix}.self_attention.dt_projs_weight": (4, d_inner, r),
            f"{prefix}.self_attention.dt_projs_bias": (4, d_inner),
            f"{prefix}.self_attention.A_logs": (4 * d_inner, d_state),
            f"{prefix}.self_attention.Ds": (4 * d_inner,),
            f"{prefix}.self_attention.out_norm.weight": (d_inner,),
            f"{prefix}.self_attention.out_norm.bias": (d_inner,),
            f"{prefix}.self_attention.out_proj.weight": (dim, d_inner)}


def official_encoder_shapes(dims, depths):
    s = {"patch_embed.proj.weight": (dims[0], 3, 4, 4), "patch_embed.proj.bias": (dims[0],),
         "patch_embed.norm.weight": (dims[0],), "patch_embed.norm.bias": (dims[0],)}
    for i, (dim, depth) in enumerate(zip(dims, depths)):
        for j in range(depth):
            s.update(official_ss2d_shapes(f"layers.{i}.blocks.{j}", dim))
        if i < len(dims) - 1:
            s.update({f"layers.{i}.downsample.reduction.weight": (2 * dim, 4 * dim),
                      f"layers.{i}.downsample.norm.weight": (4 * dim,), f"layers.{i}.downsample.norm.bias": (4 * dim,)})
    return s


def official_vmunet_shapes(dims, depths, depths_decoder, num_classes=1):
    s = official_encoder_shapes(dims, depths)
    for i, (dim, depth) in enumerate(zip(dims[::-1], depths_decoder)):
        for j in range(depth):
            s.update(official_ss2d_shapes(f"layers_up.{i}.blocks.{j}", dim))
        if i > 0:
            s.update({f"layers_up.{i}.upsample.expand.weight": (4 * dim, 2 * dim),
                      f"layers_up.{i}.upsample.norm.weight": (dim,), f"layers_up.{i}.upsample.norm.bias": (dim,)})
    c = dims[0]
    s.update({"final_up.expand.weight": (4 * c, c), "final_up.norm.weight": (c // 4,), "final_up.norm.bias": (c // 4,),
              "final_conv.weight": (num_classes, c // 4, 1, 1), "final_conv.bias": (num_classes,)})
    return s


def _random_state(shapes, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v, generator=g) for k, v in shapes.items()}


def test_state_dict_has_the_official_names_and_shapes():
    model = create_model("vmunet")
    want = official_vmunet_shapes([96, 192, 384, 768], [2, 2, 2, 2], [2, 2, 2, 1])
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == want
    assert sum(math.prod(v) for v in want.values()) == 27_427_561


SMALL = {"dims": (16, 32, 64, 128)}


def test_official_vmunet_checkpoint_round_trip(tmp_path):
    shapes = official_vmunet_shapes(SMALL["dims"], [2, 2, 2, 2], [2, 2, 2, 1])
    state = _random_state(shapes, 1)
    path = tmp_path / "best.pth"
    torch.save({f"vmunet.{k}": v for k, v in state.items()}, path)
    model = create_model("vmunet", pretrained_file=str(path), **SMALL)
    got = model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in state.items())
    assert model.pretrained_report.format == "vmunet" and not model.pretrained_report.missing
    # latest.pth style ({"model_state_dict": ...}) and a DDP prefix load too.
    torch.save({"epoch": 3, "model_state_dict": {f"module.vmunet.{k}": v for k, v in state.items()}}, path)
    model = create_model("vmunet", pretrained_file=str(path), **SMALL)
    assert torch.equal(model.state_dict()["final_conv.weight"], state["final_conv.weight"])


def test_official_checkpoint_loads_strictly(tmp_path):
    shapes = official_vmunet_shapes(SMALL["dims"], [2, 2, 2, 2], [2, 2, 2, 1])
    state = {f"vmunet.{k}": v for k, v in _random_state(shapes, 1).items()}
    del state["vmunet.layers_up.3.blocks.0.self_attention.Ds"]
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(RuntimeError, match="Missing key.*layers_up.3.blocks.0.self_attention.Ds"):
        create_model("vmunet", pretrained_file=str(tmp_path / "bad.pth"), **SMALL)


def test_vmamba_classification_checkpoint_fills_encoder_and_mirrored_decoder(tmp_path):
    # A VMamba v0 classifier (VMamba-S has depths 2, 2, 27, 2) with its final norm and head.
    shapes = official_encoder_shapes(SMALL["dims"], [2, 2, 5, 2])
    shapes.update({"norm.weight": (128,), "norm.bias": (128,), "head.weight": (1000, 128), "head.bias": (1000,)})
    state = _random_state(shapes, 2)
    torch.save({"model": state}, tmp_path / "vmamba_small.pth")
    model = create_model("vmunet", pretrained_file=str(tmp_path / "vmamba_small.pth"), **SMALL)
    got, report = model.state_dict(), model.pretrained_report
    assert report.format == "vmamba"
    for k in ("patch_embed.proj.weight", "layers.2.blocks.1.self_attention.A_logs", "layers.0.downsample.reduction.weight"):
        assert torch.equal(got[k], state[k])
    # Decoder stage n-1-i takes encoder stage i's blocks (as many as it has).
    pairs = {"layers_up.0.blocks.1.self_attention.x_proj_weight": "layers.3.blocks.1.self_attention.x_proj_weight",
             "layers_up.2.blocks.0.ln_1.weight": "layers.1.blocks.0.ln_1.weight",
             "layers_up.3.blocks.0.self_attention.out_proj.weight": "layers.0.blocks.0.self_attention.out_proj.weight"}
    for dec, enc in pairs.items():
        assert torch.equal(got[dec], state[enc])
    missing = set(report.missing)
    assert all(k.startswith(("layers_up.1.upsample", "layers_up.2.upsample", "layers_up.3.upsample", "final_"))
               for k in missing) and "final_conv.weight" in missing
    assert {"head.weight", "norm.weight", "layers.2.blocks.4.ln_1.weight"} <= set(report.unused)
    assert "layers.0.blocks.1.ln_1.weight" not in report.unused  # it went to the encoder
    assert len(report.loaded) + len(missing) == len(got)


def test_vmamba_checkpoint_of_another_size_is_refused(tmp_path):
    torch.save({"model": _random_state(official_encoder_shapes([96, 192, 384, 768], [2, 2, 2, 2]), 3)},
               tmp_path / "vmamba.pth")
    with pytest.raises(ValueError, match="does not fit.*patch_embed"):
        create_model("vmunet", pretrained_file=str(tmp_path / "vmamba.pth"), **SMALL)


def test_unknown_checkpoint_format(tmp_path):
    torch.save({"weight": torch.zeros(1)}, tmp_path / "x.pth")
    with pytest.raises(ValueError, match="neither a VM-UNet"):
        load_pretrained(create_model("vmunet_tiny"), tmp_path / "x.pth")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        create_model("vmunet_tiny", pretrained_file=str(tmp_path / "none.pth"))


# ------------------------------------------------------------------------------ compile

def test_torch_compile_of_vmunet_tiny_matches_eager():
    torch.manual_seed(0)
    model = create_model("vmunet_tiny", depths=(1, 1, 1, 1), depths_decoder=(1, 1, 1, 1)).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        want = model(x)
        got = torch.compile(model)(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["vmunet_tiny", "cmssm_tiny"])
def test_bf16_autocast_training_step_follows_fp32(name):
    """The recipes' bf16 path: under CPU autocast every layer runs (the scan on 16-bit inputs
    with float32 state), the logits stay within bf16 rounding of fp32's and the gradients
    point the same way; the final expand's float32 LayerNorm hands back the input's dtype."""
    torch.manual_seed(0)
    # eval(): no drop path, so both passes compute the same function; gradients still flow.
    model = _randomise(create_model(name, depths=(1, 1, 1, 1), depths_decoder=(1, 1, 1, 1)), seed=2).eval()
    x = torch.rand(2, 3, 64, 64)
    y = (torch.rand(2, 1, 64, 64) > 0.5).float()

    def grads(precision):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(x)
            loss = F.binary_cross_entropy_with_logits(logits.float(), y)
        loss.backward()
        return logits.float().detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    want_logits, want_grad = grads("fp32")
    got_logits, got_grad = grads("bf16")
    assert torch.isfinite(got_grad).all() and got_grad.numel() == want_grad.numel()
    assert (got_logits - want_logits).norm() / want_logits.norm() < 0.03
    assert F.cosine_similarity(got_grad, want_grad, dim=0) > 0.98
    feats = torch.randn(2, 16, 16, model.cfg.dims[0], dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.final_up.forward_channels_first(feats).dtype == torch.bfloat16
