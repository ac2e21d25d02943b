"""CAM kernel (eqs 10-12): naive reference, invariants, region grids."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from xmgie_core import cam, masks
from xmgie_core.attention import stock_attention
from xmgie_core.cam import TokenRestriction, masked_cross_attention
from xmgie_core.masks import RegionPyramid
from xmgie_core.errors import XMGIEInputError


def reference(q, k, v, heads, region, edit, background, strength, mode):
    """Eqs 10-12 with materialised matrices: A = softmax(QK^T/sqrt d), A^M = A * M, O = A^M V."""
    b, nq, c = q.shape
    d = c // heads
    qh, kh, vh = (t.double().view(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    a = torch.softmax(qh @ kh.transpose(-1, -2) / d**0.5, dim=-1)
    m = torch.ones(b, nq, k.shape[1], dtype=torch.float64)
    r = region.double().expand(b, nq)
    for t in edit:
        m[:, :, t] = 1 - strength * (1 - r)
    for t in background:
        m[:, :, t] = 1 - strength * r
    am = a * m[:, None]
    if mode == "renormalized":
        am = am / am.sum(-1, keepdim=True)
    return (am @ vh).transpose(1, 2).reshape(b, nq, c)


def _restriction(edit, background=(), strength=1.0):
    return TokenRestriction(torch.tensor(edit, dtype=torch.long), torch.tensor(background, dtype=torch.long), strength)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), b=st.integers(1, 3), nq=st.integers(1, 40), nk=st.integers(3, 20),
       heads=st.sampled_from([1, 2, 4]), d=st.sampled_from([4, 8]), mode=st.sampled_from(cam.MODES),
       strength=st.floats(0.0, 1.0), n_edit=st.integers(0, 2), n_back=st.integers(0, 2))
def test_kernel_matches_naive_reference(seed, b, nq, nk, heads, d, mode, strength, n_edit, n_back):
    g = torch.Generator().manual_seed(seed)
    q, k, v = torch.randn(b, nq, heads * d, generator=g), *torch.randn(2, b, nk, heads * d, generator=g)
    region = (torch.rand(b, nq, generator=g) > 0.5).float()
    perm = torch.randperm(nk - 1, generator=g) + 1  # token 0 (start) is never restricted
    edit, back = perm[:n_edit].tolist(), perm[n_edit:n_edit + n_back].tolist()
    got = masked_cross_attention(q, k, v, heads, region, _restriction(edit, back, strength), mode)
    want = reference(q, k, v, heads, region, edit, back, strength, mode)
    assert torch.allclose(got.double(), want, atol=2e-5), (got.double() - want).abs().max()


@pytest.mark.parametrize("mode", cam.MODES)
def test_all_ones_region_is_stock_attention(mode):
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 64, 32, generator=g), *torch.randn(2, 2, 77, 32, generator=g)
    out = masked_cross_attention(q, k, v, 4, torch.ones(1, 64), _restriction([5, 6, 30]), mode)
    assert (out - stock_attention(q, k, v, 4)).abs().max() <= 1e-5


@pytest.mark.parametrize("mode", cam.MODES)
def test_restricted_tokens_do_not_reach_outside_the_region(mode):
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(1, 48, 16, generator=g), *torch.randn(2, 1, 10, 16, generator=g)
    region = torch.zeros(1, 48)
    region[:, :20] = 1
    r = _restriction([3, 4])
    base = masked_cross_attention(q, k, v, 2, region, r, mode)
    v2, k2 = v.clone(), k.clone()
    v2[:, 3:5] = torch.randn(1, 2, 16, generator=g) * 10
    k2[:, 3:5] = torch.randn(1, 2, 16, generator=g) * 10
    # paper mode keeps the full softmax denominator (eq 10), so only values are free there
    changed = masked_cross_attention(q, k2 if mode == "renormalized" else k, v2, 2, region, r, mode)
    assert torch.allclose(changed[:, 20:], base[:, 20:], atol=2e-5)  # paper: O_stock - removed terms rounds
    assert not torch.allclose(changed[:, :20], base[:, :20], atol=1e-3)


def test_background_tokens_stay_out_of_the_region():
    g = torch.Generator().manual_seed(2)
    q, k, v = torch.randn(1, 30, 16, generator=g), *torch.randn(2, 1, 12, 16, generator=g)
    region = torch.zeros(1, 30)
    region[:, 10:] = 1
    r = _restriction([2], [7])
    base = masked_cross_attention(q, k, v, 2, region, r, "renormalized")
    v2 = v.clone()
    v2[:, 7] += 5
    out = masked_cross_attention(q, k, v2, 2, region, r, "renormalized")
    assert torch.allclose(out[:, 10:], base[:, 10:], atol=1e-6)
    assert not torch.allclose(out[:, :10], base[:, :10], atol=1e-3)


def test_zero_strength_is_stock_and_renormalized_rows_are_convex():
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(1, 20, 8, generator=g), torch.randn(1, 9, 8, generator=g)
    v = torch.ones(1, 9, 8)
    region = torch.zeros(1, 20)
    assert torch.allclose(masked_cross_attention(q, k, v, 1, region, _restriction([1, 2], strength=0.0), "paper"),
                          stock_attention(q, k, v, 1), atol=1e-6)
    out = masked_cross_attention(q, k, v, 1, region, _restriction([1, 2]), "renormalized")
    assert torch.allclose(out, torch.ones_like(out), atol=1e-6)  # weights still sum to 1
    paper = masked_cross_attention(q, k, v, 1, region, _restriction([1, 2]), "paper")
    assert bool((paper < 1).all())  # eq 11 does not renormalise


def test_fractional_weights_use_an_additive_mask_and_match_the_reference():
    """With 0 < s < 1 the weights are not 0/1, so the fused kernel must get log M as a float (additive) mask; with
    s = 1 a boolean mask suffices. Both must equal eqs 10-12 materialised."""
    r = _restriction([2, 3], [5], strength=0.7)
    region = (torch.arange(30) % 3 == 0).float()[None].expand(2, 30)
    for mode in cam.MODES:
        mask = cam.attention_mask(r.keep_rows(12, mode == "paper", torch.device("cpu")), region, torch.float32)
        assert mask.dtype == torch.float32 and bool((mask < 0).any()), "fractional weights need log M"
        g = torch.Generator().manual_seed(5)
        q, k, v = torch.randn(2, 30, 8, generator=g), *torch.randn(2, 2, 12, 8, generator=g)
        got = masked_cross_attention(q, k, v, 2, region, r, mode)
        assert torch.allclose(got.double(), reference(q, k, v, 2, region, [2, 3], [5], 0.7, mode), atol=2e-5)
    whole = cam.attention_mask(_restriction([2]).keep_rows(12, False, torch.device("cpu")), region, torch.float32)
    assert whole.dtype == torch.bool


def test_region_grid_thresholds_by_area_and_keeps_small_regions():
    mask = torch.zeros(1, 64, 64)
    mask[:, 0:40, 0:24] = 1  # covers 24/32 of column-cell 0 at 2x2
    pyr = RegionPyramid(mask, threshold=0.5)
    assert pyr.grid(2, 2).view(2, 2).tolist() == [[1.0, 0.0], [0.0, 0.0]]  # 0.75*0.625 >= 0.5; others < 0.5
    assert pyr.grid(64, 64).view(64, 64).sum() == 40 * 24
    assert pyr.grid(2, 2) is pyr.grid(2, 2)  # cached per resolution
    tiny = torch.zeros(1, 64, 64)
    tiny[:, 40:43, 50:53] = 1  # 9 pixels: less than one cell at 8x8
    g = RegionPyramid(tiny).grid(8, 8).view(8, 8)
    assert g.sum() == 1 and g[5, 6] == 1


def test_region_grid_row_major_and_batch():
    mask = torch.zeros(2, 4, 6)
    mask[0, 0, 5] = 1
    mask[1, 3, 0] = 1
    g = RegionPyramid(mask).grid(4, 6)
    assert g[0].nonzero().flatten().tolist() == [5] and g[1].nonzero().flatten().tolist() == [18]


def test_empty_mask_and_bad_threshold_are_rejected():
    with pytest.raises(XMGIEInputError, match="empty"):
        RegionPyramid(torch.zeros(1, 8, 8))
    with pytest.raises(XMGIEInputError, match="threshold"):
        RegionPyramid(torch.ones(1, 8, 8), threshold=0.0)


def test_tiled_positions_and_grid_inference():
    pos = torch.tensor([3, 4])
    assert cam.tiled_positions(pos, 77, 154).tolist() == [3, 4, 80, 81]
    with pytest.raises(XMGIEInputError, match="multiple"):
        cam.tiled_positions(pos, 154, 231)
    assert masks.infer_grid(64 * 48, (64, 48)) == (64, 48)
    assert masks.infer_grid(3 * 4, (9, 13)) == (3, 4)
    with pytest.raises(XMGIEInputError):
        masks.infer_grid(7, (64, 64))


def test_unknown_mode_and_out_of_range_tokens():
    q = torch.randn(1, 4, 8)
    with pytest.raises(XMGIEInputError, match="mode"):
        masked_cross_attention(q, q, q, 1, torch.ones(1, 4), _restriction([1]), "soft")
    with pytest.raises(XMGIEInputError, match="outside the context"):
        masked_cross_attention(q, q, q, 1, torch.ones(1, 4), _restriction([9]), "paper")


def test_mask_with_another_aspect_ratio_is_rejected():
    pyr = RegionPyramid(torch.ones(1, 96, 64))
    assert pyr.grid(3, 2).shape == (1, 6)  # 96x64 onto 3x2: same shape
    assert pyr.grid(12, 8).shape == (1, 96)
    assert pyr.grid(2, 1).shape == (1, 2)  # coarse grids round up
    with pytest.raises(XMGIEInputError, match="aspect"):
        pyr.grid(8, 12)
