"""CM-SSM's Cross-Region Attention against Eq. 2-7 written out with the module's parameters.

Every parameter and BatchNorm statistic is set to random values here, so the test does not
depend on the layer's initialisation (a near-identity start would hide a missing gate)."""

import pytest
import torch

from lesionkit.layers.cross_region_attention import CrossRegionAttention


def randomised_cra(dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    cra = CrossRegionAttention(dim)
    with torch.no_grad():
        for conv in (cra.conv1, cra.conv_h, cra.conv_w):
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) / conv.weight.shape[1] ** 0.5)
            conv.bias.copy_(0.5 * torch.randn(conv.bias.shape, generator=g))
        bn = cra.bn1
        bn.weight.copy_(1 + 0.3 * torch.randn(bn.weight.shape, generator=g))
        bn.bias.copy_(0.3 * torch.randn(bn.bias.shape, generator=g))
        bn.running_mean.copy_(0.2 * torch.randn(bn.running_mean.shape, generator=g))
        bn.running_var.copy_(0.5 + torch.rand(bn.running_var.shape, generator=g))
    return cra


def coordinate_attention(cra, x, batch_statistics=False):
    """Eq. 2-7 per direction, with explicit loops over rows and columns where the paper sums.

    z^h_c(i) = mean_j x_c(i, j), z^w_c(j) = mean_i x_c(i, j) (Eq. 2-3); f = h-swish(BN(F1 [z^h, z^w]))
    with one 1x1 conv F1 shared by both directions and BN over the concatenation (Eq. 4);
    g^h = sigmoid(F_h f^h), g^w = sigmoid(F_w f^w) (Eq. 5-6); y_c(i, j) = x_c(i, j) g^h_c(i) g^w_c(j) (Eq. 7)."""
    b, c, h, w = x.shape
    z_h = torch.stack([x[:, :, i, :].mean(dim=-1) for i in range(h)], dim=-1)  # (B, C, H)
    z_w = torch.stack([x[:, :, :, j].mean(dim=-1) for j in range(w)], dim=-1)  # (B, C, W)

    def conv1x1(conv, t):  # (B, C_in, L) -> (B, C_out, L)
        return torch.einsum("oi,bil->bol", conv.weight[:, :, 0, 0], t) + conv.bias[None, :, None]

    f = conv1x1(cra.conv1, torch.cat([z_h, z_w], dim=-1))  # (B, mip, H + W)
    bn = cra.bn1
    if batch_statistics:
        mean, var = f.mean(dim=(0, 2)), f.var(dim=(0, 2), unbiased=False)
    else:
        mean, var = bn.running_mean, bn.running_var
    f = (f - mean[None, :, None]) / torch.sqrt(var[None, :, None] + bn.eps)
    f = f * bn.weight[None, :, None] + bn.bias[None, :, None]
    f = f * torch.clamp(f + 3, 0, 6) / 6  # h-swish
    g_h = torch.sigmoid(conv1x1(cra.conv_h, f[:, :, :h]))  # (B, C, H)
    g_w = torch.sigmoid(conv1x1(cra.conv_w, f[:, :, h:]))  # (B, C, W)
    return x * g_h[:, :, :, None] * g_w[:, :, None, :]


@pytest.mark.parametrize("shape", [(2, 16, 5, 7), (1, 64, 8, 8)])
def test_cra_matches_eq_2_to_7_in_eval_mode(shape):
    cra = randomised_cra(shape[1]).eval()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    want = coordinate_attention(cra, x)
    torch.testing.assert_close(cra(x), want, rtol=1e-5, atol=1e-6)
    # Both gates matter here: neither is close to a constant over its axis.
    assert (want / x).std() > 0.05


def test_cra_matches_eq_2_to_7_with_batch_statistics():
    cra = randomised_cra(16, seed=3).train()
    x = torch.randn(3, 16, 6, 4, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(cra(x), coordinate_attention(cra, x, batch_statistics=True), rtol=1e-5, atol=1e-5)


def test_each_gate_follows_its_own_axis():
    """y / x = g^h_c(i) g^w_c(j): a rank-one map per channel that varies along H and along W.
    Without the height gate it is constant along H, without the width gate along W."""
    cra = randomised_cra(16, seed=4).eval()
    x = 4 * torch.rand(1, 16, 6, 5, generator=torch.Generator().manual_seed(5)) + 0.1
    ratio = (cra(x) / x)[0]  # (C, H, W)
    outer = ratio[:, :, :1] * ratio[:, :1, :] / ratio[:, :1, :1]
    torch.testing.assert_close(outer, ratio, rtol=1e-5, atol=1e-6)
    assert ratio.std(dim=1).mean() > 0.01 and ratio.std(dim=2).mean() > 0.01
