"""GRCSF's GCU (Eq. 1-2) and RCU (Eq. 6) layers."""

import pytest
import torch
from torch.nn import functional as F

import lesionkit.kernels as K
from lesionkit.layers.grcsf import GlobalCompensationUnit, PatchImportance, RegionalCompensationUnit


def test_gcu_matches_eq_1_2_written_out():
    torch.manual_seed(0)
    gcu = GlobalCompensationUnit(skip_channels=8, down_channels=16, up_channels=16).eval()
    skip, down, up = torch.randn(2, 8, 8, 12), torch.randn(2, 16, 4, 6), torch.randn(2, 16, 8, 12)
    out, residual = gcu(skip, down, up)
    re_up = F.interpolate(gcu.align_down(down), size=(8, 12), mode="bilinear", align_corners=False)
    a = re_up * gcu.se_up(gcu.align_up(up))
    b = gcu.se_skip(skip)
    cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
    torch.testing.assert_close(residual.squeeze(1), cos, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, cos.unsqueeze(1) * skip + skip)
    assert residual.abs().max() <= 1 + 1e-6
    with pytest.raises(ValueError, match="skip feature's size"):
        gcu(skip, down, torch.randn(2, 16, 4, 6))


def _se_written_out(se, x):
    return x * se.fc(x.mean(dim=(2, 3)))[:, :, None, None]


def _gcu_written_out(gcu, skip, down, up):
    re_up = F.interpolate(gcu.align_down(down), size=skip.shape[-2:], mode="bilinear", align_corners=False)
    a = re_up * _se_written_out(gcu.se_up, gcu.align_up(up))
    b = _se_written_out(gcu.se_skip, skip)
    cos = (a * b).sum(1, keepdim=True) / (a.norm(dim=1, keepdim=True) * b.norm(dim=1, keepdim=True))
    return cos * skip + skip, cos


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_gcu_gradients_match_eq_1_2_written_out(layout):
    """The fused kernel's backward (and the SE means' layout-keeping gradient) against autograd
    through the formula, for the inputs and every parameter, both outputs used."""
    torch.manual_seed(3)
    gcu = GlobalCompensationUnit(skip_channels=16, down_channels=8, up_channels=8).to(memory_format=layout)
    inputs = [torch.randn(2, 16, 8, 12), torch.randn(2, 8, 4, 6), torch.randn(2, 8, 8, 12)]
    grad_out, grad_r = torch.randn(2, 16, 8, 12), torch.randn(2, 1, 8, 12)
    results = []
    for fn in (gcu, lambda *x: _gcu_written_out(gcu, *x)):
        xs = [t.contiguous(memory_format=layout).requires_grad_() for t in inputs]
        out, r = fn(*xs)
        params = list(gcu.parameters())
        results.append((out, r, torch.autograd.grad((out * grad_out).sum() + (r * grad_r).sum(), xs + params)))
    (out, r, grads), (want_out, want_r, want_grads) = results
    assert out.is_contiguous(memory_format=layout)  # C keeps F's layout
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r, want_r, rtol=1e-5, atol=1e-5)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_patch_importance_is_one_score_per_patch():
    torch.manual_seed(1)
    phi = PatchImportance(channels=4, patch_size=4, hidden=8)
    x = torch.randn(2, 4, 8, 12)
    score = phi(x)
    assert score.shape == (2, 1, 8, 12) and ((score > 0) & (score < 1)).all()
    blocks = score.reshape(2, 2, 4, 3, 4)
    assert torch.equal(blocks, blocks[:, :, :1, :, :1].expand_as(blocks))
    # A patch's score depends on that patch only.
    x2 = x.clone()
    x2[..., :4, :4] += 1.0
    changed = (phi(x2) != score)
    assert changed[..., :4, :4].all() and not changed[..., 4:, :].any() and not changed[..., :4, 4:].any()


def test_rcu_matches_eq_6_written_out():
    torch.manual_seed(2)
    rcu = RegionalCompensationUnit(channels=16, patch_size=4, heads=2)
    u = torch.randn(2, 16, 8, 8)
    maps = [torch.rand(2, 1, 16, 16), torch.rand(2, 1, 16, 16)]
    torch.testing.assert_close(rcu.weights.detach(), torch.full((2,), 0.1))  # the default gate_init
    with torch.no_grad():
        rcu.weights.copy_(torch.tensor([0.7, -0.3]))
    got = rcu(u, maps)
    q = rcu.query(u).reshape(2, 2, -1, 8, 8)
    v = rcu.value(u).reshape(2, 2, -1, 8, 8)
    want = u.clone()
    for w, key_proj, rm in zip(rcu.weights, rcu.keys, maps):
        mean, std = rm.mean(dim=(2, 3), keepdim=True), rm.std(dim=(2, 3), keepdim=True, unbiased=False)
        z = F.interpolate((rm - mean) / std, size=(8, 8), mode="bilinear", align_corners=False)
        embedded = F.gelu(key_proj[0](z))  # RM' of Eq. 6: the map embedded to C channels
        assert embedded.shape == (2, 16, 8, 8)
        k = key_proj[2](embedded).reshape(2, 2, -1, 8, 8)
        attn = K.patch_cross_attention_reference(q, k, v, 4).reshape(2, 16, 8, 8)
        want = want + w * rcu.out(attn * rcu.importance(u))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_rcu_gradients_match_eq_6_written_out(layout):
    """phi applied after the sum over the maps and the gradient's layout change are the same
    function and gradient as Eq. 6 written out (V scaled by phi, each map's output projected)."""
    torch.manual_seed(4)
    rcu = RegionalCompensationUnit(channels=16, patch_size=4, heads=2).to(memory_format=layout)
    with torch.no_grad():
        rcu.weights.copy_(torch.tensor([0.7, -0.3]))
    maps = [torch.rand(2, 1, 16, 16), torch.rand(2, 1, 16, 16)]

    def written_out(u):
        q = rcu.query(u).reshape(2, 2, -1, 8, 8)
        v = rcu.value(u).reshape(2, 2, -1, 8, 8) * rcu.importance(u).reshape(2, 1, 1, 8, 8)
        out = u
        for w, key_proj, rm in zip(rcu.weights, rcu.keys, maps):
            z = F.interpolate((rm - rm.mean(dim=(2, 3), keepdim=True)) / rm.std(dim=(2, 3), keepdim=True, unbiased=False),
                              size=(8, 8), mode="bilinear", align_corners=False)
            k = key_proj(z).reshape(2, 2, -1, 8, 8)
            out = out + w * rcu.out(K.patch_cross_attention_reference(q, k, v, 4).reshape(2, 16, 8, 8))
        return out

    u0 = torch.randn(2, 16, 8, 8).contiguous(memory_format=layout)
    cotangent = torch.randn(2, 16, 8, 8).contiguous(memory_format=layout)
    grads = []
    for fn in (lambda u: rcu(u, maps), written_out):
        u = u0.clone().requires_grad_()
        out = fn(u)
        grads.append((out, torch.autograd.grad((out * cotangent).sum(), [u, *rcu.parameters()])))
    (got, got_grads), (want, want_grads) = grads
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_rcu_uses_the_maps_from_the_start_and_only_their_shape_within_an_image():
    torch.manual_seed(5)
    rcu = RegionalCompensationUnit(channels=16, patch_size=4)
    u = torch.randn(2, 16, 8, 8)
    maps = [torch.rand(2, 1, 8, 8) * 0.3, torch.rand(2, 1, 8, 8) * 0.3]
    other = [m.flip(-1) for m in maps]
    assert (rcu(u, maps) - rcu(u, other)).abs().max() > 1e-3  # the maps move the output at init
    # Standardised per image: a map's offset and scale (the MAE's error level) do not matter...
    torch.testing.assert_close(rcu(u, [3 * m + 0.1 for m in maps]), rcu(u, maps), rtol=1e-4, atol=1e-5)
    # ... unless map_norm="none".
    raw = RegionalCompensationUnit(channels=16, patch_size=4, map_norm="none")
    raw.load_state_dict(rcu.state_dict())
    assert (raw(u, [3 * m + 0.1 for m in maps]) - raw(u, maps)).abs().max() > 1e-4
    # gate_init=0 is the identity at start (SAGAN's gamma); key_embed="linear" the 1x1 keys.
    torch.testing.assert_close(RegionalCompensationUnit(16, 4, gate_init=0.0)(u, maps), u)
    linear = RegionalCompensationUnit(16, 4, key_embed="linear")
    assert all(isinstance(k, torch.nn.Conv2d) and k.out_channels == linear.key_width for k in linear.keys)
    for field, value in [("map_norm", "batch"), ("key_embed", "mlp"), ("gate_lr_scale", 0.0)]:
        with pytest.raises(ValueError, match=field):
            RegionalCompensationUnit(16, 4, **{field: value})


def test_rcu_trains_every_parameter():
    torch.manual_seed(3)
    rcu = RegionalCompensationUnit(channels=8, patch_size=4, residual_channels=3)
    with torch.no_grad():
        rcu.weights.fill_(0.5)
    u = torch.randn(1, 8, 8, 8, requires_grad=True)
    rcu(u, [torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8)]).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in rcu.parameters())
    with pytest.raises(ValueError, match="residual_maps should hold 2 maps, got 1"):
        rcu(u, [torch.rand(1, 3, 8, 8)])
    with pytest.raises(ValueError, match="divisible by heads"):
        RegionalCompensationUnit(channels=8, patch_size=4, heads=3)


def test_rcu_without_importance_is_the_rcu_with_phi_one():
    torch.manual_seed(4)
    with_score = RegionalCompensationUnit(channels=16, patch_size=4)
    without = RegionalCompensationUnit(channels=16, patch_size=4, importance=False)
    assert without.importance is None
    missing, unexpected = without.load_state_dict(with_score.state_dict(), strict=False)
    assert not missing and all(k.startswith("importance.") for k in unexpected)
    with torch.no_grad():
        with_score.weights.fill_(0.7), without.weights.fill_(0.7)
    u, maps = torch.randn(2, 16, 8, 12), [torch.rand(2, 1, 8, 12), torch.rand(2, 1, 8, 12)]
    with_score.importance.forward = lambda x: torch.ones_like(x[:, :1])
    torch.testing.assert_close(without(u, maps), with_score(u, maps))
    with_score.importance.forward = lambda x: torch.full_like(x[:, :1], 0.5)
    assert (without(u, maps) - with_score(u, maps)).abs().max() > 1e-3
