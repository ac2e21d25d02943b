"""GB compositor ([xMGIE] §3.6, eqs 18-19): equations, reference, invariants, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from gb_reference import exact_variable_blur
from xmgie_core import gb
from xmgie_core.distance import distance_to_boundary, distance_to_outside
from xmgie_core.errors import XMGIEInputError
from xmgie_core.gaussian import blur_levels, gaussian_kernel_1d, variable_gaussian_blur

ONE_LEVEL = 1.0 / 255


def test_sigma_map_at_known_distances():
    d = torch.tensor([0.0, 10.0, 20.0, math.inf])
    got = gb.sigma_map(d, sigma_max=5.0, sigma_scale=10.0)
    want = torch.tensor([5.0, 5.0 * math.exp(-0.5), 5.0 * math.exp(-2.0), 0.0])
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(gb.sigma_map(torch.tensor([3.0]), 2.0, 1.5), torch.tensor([2.0 * math.exp(-2.0)]))


def test_distance_transform_matches_scipy():
    rng = np.random.default_rng(1)
    m = torch.from_numpy(rng.random((3, 37, 52)) > 0.35)
    got = distance_to_outside(m).numpy()
    for i in range(3):
        np.testing.assert_allclose(got[i], ndimage.distance_transform_edt(m[i].numpy()), atol=1e-4)
    d_in, d_out = distance_to_boundary(m)
    np.testing.assert_allclose(d_out[0].numpy(), ndimage.distance_transform_edt(~m[0].numpy()), atol=1e-4)
    assert torch.equal(d_in, torch.from_numpy(got))


def test_distance_of_full_and_empty_masks():
    full = torch.ones(1, 5, 6, dtype=torch.bool)
    assert torch.isinf(distance_to_outside(full)).all()
    assert (distance_to_outside(~full) == 0).all()


def test_single_pixel_mask_blurs_only_that_pixel():
    img = torch.rand(1, 45, 45, 3, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(45, 45)
    mask[22, 22] = 1
    out = gb.gb_blur(img, mask).image
    sigma = 5.0 * math.exp(-1.0 / 200.0)  # D = 1: the nearest unedited pixel is a neighbour
    r = math.ceil(4 * sigma)
    i = np.arange(-r, r + 1)
    k = np.exp(-(i[:, None] ** 2 + i[None, :] ** 2) / (2 * sigma**2))
    k /= k.sum()
    window = img[0, 22 - r:22 + r + 1, 22 - r:22 + r + 1].double().numpy()
    want = (window * k[:, :, None]).sum(axis=(0, 1))
    np.testing.assert_allclose(out[0, 22, 22].double().numpy(), want, atol=ONE_LEVEL)
    assert abs(out[0, 22, 22] - img[0, 22, 22]).max() > 0.01
    keep = torch.ones(45, 45, dtype=torch.bool)
    keep[22, 22] = False
    assert torch.equal(out[0][keep], img[0][keep])


def test_step_edge_follows_the_1d_gaussian_cdf():
    """Left half 0, right half 1 and masked: pixel j columns inside sees D = j + 1."""
    h, w = 8, 60
    img = torch.zeros(1, h, w, 3)
    img[:, :, w // 2:] = 1.0
    mask = torch.zeros(1, h, w)
    mask[:, :, w // 2:] = 1.0
    out = gb.gb_blur(img, mask, sigma_max=5.0, sigma_scale=10.0).image
    for j in range(0, 12):
        sigma = 5.0 * math.exp(-((j + 1) ** 2) / 200.0)
        r = math.ceil(4 * sigma)
        offs = np.arange(-r, r + 1)
        g = np.exp(-(offs**2) / (2 * sigma**2))
        want = g[offs >= -j].sum() / g.sum()  # columns at offset >= -j are still in the white half
        assert float(out[0, 4, w // 2 + j, 0]) == pytest.approx(want, abs=ONE_LEVEL)
    assert torch.equal(out[:, :, : w // 2], img[:, :, : w // 2])


def test_blur_levels_are_increasing_and_end_at_sigma_max():
    lv = blur_levels(5.0)
    assert lv[0] == 0.0 and lv[-1] == 5.0
    assert all(a < b for a, b in zip(lv, lv[1:]))


@pytest.mark.parametrize("shape", [(23, 41), (40, 37)])
@pytest.mark.parametrize("content", ["noise", "checker"])
def test_variable_blur_matches_exact_reference(shape, content):
    rng = np.random.default_rng(sum(shape))
    h, w = shape
    if content == "noise":
        x = (rng.random((3, h, w)) > 0.5).astype(np.float64)
    else:
        yy, xx = np.mgrid[:h, :w]
        x = np.stack([((yy // 3 + xx // 3) % 2).astype(np.float64)] * 2)
    sigma = rng.random((h, w)) * 5.0
    sigma[rng.random((h, w)) < 0.2] = 0.0
    ref = exact_variable_blur(x, sigma)
    got = variable_gaussian_blur(torch.from_numpy(x).float()[None], torch.from_numpy(sigma).float()[None], 5.0, tile=16)
    assert np.abs(got[0].double().numpy() - ref).max() <= ONE_LEVEL


def test_gb_blur_matches_eq19_with_exact_reference():
    rng = np.random.default_rng(7)
    h, w = 36, 44
    img = rng.random((h, w, 3))
    m = np.zeros((h, w), bool)
    m[6:30, 10:38] = True
    m[12:18, 20:26] = False
    d = ndimage.distance_transform_edt(m)
    sigma = 5.0 * np.exp(-(d**2) / 200.0) * m
    ref = exact_variable_blur(img.transpose(2, 0, 1), sigma).transpose(1, 2, 0)
    want = np.where(m[..., None], ref, img)  # eq 19
    got = gb.gb_blur(torch.from_numpy(img).float()[None], torch.from_numpy(m).float()).image[0].double().numpy()
    assert np.abs(got - want).max() <= ONE_LEVEL


def _random_mask(draw_seed: int, h: int, w: int, kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(draw_seed)
    if kind == "noise":
        return (torch.rand(h, w, generator=g) > 0.6).float()
    if kind == "blob":
        yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        c = torch.rand(2, generator=g)
        r = 2 + torch.rand(1, generator=g) * max(h, w) / 2
        return (((yy - c[0] * h) ** 2 + (xx - c[1] * w) ** 2) < r**2).float()
    return torch.rand(h, w, generator=g)  # soft mask, binarised at 0.5 inside


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), h=st.integers(1, 48), w=st.integers(1, 48),
       kind=st.sampled_from(["noise", "blob", "soft"]), edge=st.floats(0.0, 30.0),
       sigma_max=st.floats(0.0, 8.0), sigma_scale=st.floats(0.5, 20.0))
def test_composite_outside_mask_is_source_and_deep_inside_is_edit(seed, h, w, kind, edge, sigma_max, sigma_scale):
    g = torch.Generator().manual_seed(seed)
    src, edit = torch.rand(2, h, w, 3, generator=g)
    mask = _random_mask(seed, h, w, kind)
    res = gb.gb_composite(edit[None], src[None], mask, sigma_max, sigma_scale, edge)
    d_in, d_out = distance_to_boundary((mask >= 0.5)[None])
    far_out, deep_in = d_out[0] > edge, d_in[0] > edge
    assert torch.equal(res.image[0][far_out], src[far_out])
    assert torch.equal(res.image[0][deep_in], edit[deep_in])
    assert torch.equal(res.mask[0][far_out], torch.zeros_like(res.mask[0][far_out]))
    assert float(res.mask.min()) >= 0.0 and float(res.mask.max()) <= 1.0
    lo, hi = torch.minimum(src, edit), torch.maximum(src, edit)
    assert bool(((res.image[0] >= lo - 1e-6) & (res.image[0] <= hi + 1e-6)).all())


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), h=st.integers(1, 40), w=st.integers(1, 40), kind=st.sampled_from(["noise", "blob"]))
def test_blur_mode_leaves_pixels_outside_the_mask_unchanged(seed, h, w, kind):
    img = torch.rand(1, h, w, 3, generator=torch.Generator().manual_seed(seed))
    mask = _random_mask(seed, h, w, kind)
    out = gb.gb_blur(img, mask).image
    outside = mask < 0.5
    assert torch.equal(out[0][outside], img[0][outside])


def test_composite_soft_edge_is_soft():
    src, edit = torch.zeros(1, 64, 64, 3), torch.ones(1, 64, 64, 3)
    mask = torch.zeros(64, 64)
    mask[:, 32:] = 1
    res = gb.gb_composite(edit, src, mask)
    row = res.mask[0, 32]
    assert 0.3 < float(row[31]) < 0.5 < float(row[32]) < 0.7
    assert bool((row[1:] >= row[:-1] - 1e-5).all())  # monotone across the edge (up to float rounding)
    assert float(row[25]) > 0.0 and float(row[38]) < 1.0


def test_empty_and_full_masks():
    g = torch.Generator().manual_seed(3)
    src, edit = torch.rand(2, 1, 20, 24, 3, generator=g)
    empty, full = torch.zeros(20, 24), torch.ones(20, 24)
    assert torch.equal(gb.gb_composite(edit, src, empty).image, src)
    assert torch.equal(gb.gb_blur(edit, empty).image, edit)
    assert torch.equal(gb.gb_composite(edit, src, full).image, edit)
    assert torch.equal(gb.gb_blur(edit, full).image, edit)  # no border, nothing to blur


def test_soft_mask_is_binarised_at_half():
    src, edit = torch.zeros(1, 40, 40, 3), torch.ones(1, 40, 40, 3)
    soft = torch.full((40, 40), 0.49)
    soft[10:30, 10:30] = 0.5
    hard = (soft >= 0.5).float()
    assert torch.equal(gb.gb_composite(edit, src, soft).image, gb.gb_composite(edit, src, hard).image)


def test_batches_and_broadcast_masks():
    g = torch.Generator().manual_seed(5)
    src, edit = torch.rand(2, 3, 30, 34, 3, generator=g)
    masks = torch.stack([_random_mask(1, 30, 34, "blob"), _random_mask(2, 30, 34, "blob")])
    whole = gb.gb_composite(edit[:2], src[:2], masks).image
    for i in range(2):  # batched convolutions may round differently, hence allclose
        assert torch.allclose(whole[i], gb.gb_composite(edit[i:i + 1], src[i:i + 1], masks[i]).image[0], atol=1e-6)
    assert not torch.allclose(whole[0], gb.gb_composite(edit[:1], src[:1], masks[1]).image[0], atol=1e-3)
    shared = gb.gb_composite(edit, src, masks[0]).image
    assert torch.allclose(shared[2], gb.gb_composite(edit[2:], src[2:], masks[0]).image[0], atol=1e-6)
    one_source = gb.gb_composite(edit, src[:1], masks[0]).image
    assert torch.allclose(one_source[1], gb.gb_composite(edit[1:2], src[:1], masks[0]).image[0], atol=1e-6)


def test_float16_is_preserved_and_close():
    g = torch.Generator().manual_seed(9)
    src, edit = torch.rand(2, 1, 32, 32, 3, generator=g)
    mask = _random_mask(4, 32, 32, "blob")
    f32 = gb.gb_composite(edit, src, mask)
    f16 = gb.gb_composite(edit.half(), src.half(), mask.half())
    assert f16.image.dtype == torch.float16 and f16.mask.dtype == torch.float16
    assert (f16.image.float() - f32.image).abs().max() <= 2 * ONE_LEVEL
    b16 = gb.gb_blur(edit.half(), mask)
    assert b16.image.dtype == torch.float16


def test_odd_sizes_and_four_channels():
    img = torch.rand(1, 17, 5, 4)
    mask = torch.zeros(17, 5)
    mask[4:12, 1:4] = 1
    out = gb.gb_blur(img, mask)
    assert out.image.shape == img.shape and out.mask.shape == (1, 17, 5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_tensors_stay_on_cuda():
    src, edit = torch.rand(2, 1, 32, 32, 3, device="cuda")
    mask = torch.zeros(32, 32, device="cuda")
    mask[8:24, 8:24] = 1
    res = gb.gb_composite(edit, src, mask)
    cpu = gb.gb_composite(edit.cpu(), src.cpu(), mask.cpu())
    assert res.image.device.type == "cuda"
    assert (res.image.cpu() - cpu.image).abs().max() <= 1e-5


def test_size_mismatch_names_both_shapes():
    with pytest.raises(XMGIEInputError, match=r"32x30.*64x64|64x64.*32x30"):
        gb.gb_composite(torch.rand(1, 64, 64, 3), torch.rand(1, 64, 64, 3), torch.ones(32, 30))
    with pytest.raises(XMGIEInputError, match=r"1x64x64x3.*1x48x64x3"):
        gb.gb_composite(torch.rand(1, 64, 64, 3), torch.rand(1, 48, 64, 3), torch.ones(64, 64))


def test_batch_mismatch_names_both_shapes():
    with pytest.raises(XMGIEInputError, match=r"2x16x16.*3x16x16x3"):
        gb.gb_blur(torch.rand(3, 16, 16, 3), torch.ones(2, 16, 16))
    with pytest.raises(XMGIEInputError, match=r"3x16x16x3.*2x16x16x3"):
        gb.gb_composite(torch.rand(3, 16, 16, 3), torch.rand(2, 16, 16, 3), torch.ones(16, 16))


def test_composite_without_source_says_what_to_connect():
    with pytest.raises(XMGIEInputError, match="source"):
        gb.apply_gb(torch.rand(1, 8, 8, 3), torch.ones(8, 8), mode="composite")
    assert gb.apply_gb(torch.rand(1, 8, 8, 3), torch.ones(8, 8), mode="blur").image.shape == (1, 8, 8, 3)


def test_bad_values_are_rejected():
    img = torch.rand(1, 8, 8, 3)
    nan = img.clone()
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(XMGIEInputError, match="NaN"):
        gb.gb_blur(nan, torch.ones(8, 8))
    with pytest.raises(XMGIEInputError, match="sigma_scale"):
        gb.gb_blur(img, torch.ones(8, 8), sigma_scale=0.0)
    with pytest.raises(XMGIEInputError, match="IMAGE"):
        gb.gb_blur(img[0], torch.ones(8, 8))
    with pytest.raises(XMGIEInputError, match="mode"):
        gb.apply_gb(img, torch.ones(8, 8), mode="sharpen")


def test_kernel_is_normalised_and_truncated_at_four_sigma():
    k = gaussian_kernel_1d(2.5)
    assert k.shape == (2 * 10 + 1,) and k.sum() == pytest.approx(1.0)
    assert k[10] == k.max()


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), h=st.integers(1, 40), w=st.integers(1, 40), kind=st.sampled_from(["noise", "blob"]),
       cap=st.floats(0.0, 12.0))
def test_windowed_distances_are_exact_up_to_the_cap(seed, h, w, kind, cap):
    m = (_random_mask(seed, h, w, kind) >= 0.5)[None]
    d_in, d_out = distance_to_boundary(m, cap)
    full_in = ndimage.distance_transform_edt(m[0].numpy()) if not m.all() else np.full((h, w), np.inf)
    full_out = ndimage.distance_transform_edt(~m[0].numpy()) if m.any() else np.full((h, w), np.inf)
    np.testing.assert_allclose(d_in[0].numpy(), full_in, atol=1e-4)
    near = full_out <= cap
    np.testing.assert_allclose(d_out[0].numpy()[near], full_out[near], atol=1e-4)
    assert bool((d_out[0].numpy()[~near] > cap - 1e-4).all())  # float32 distances
    np.testing.assert_allclose(distance_to_outside(m)[0].numpy(), full_in, atol=1e-4)


def test_blur_reports_progress_and_can_be_interrupted():
    img = torch.rand(1, 40, 40, 3)
    mask = torch.zeros(40, 40)
    mask[10:30, 10:30] = 1
    calls = []
    gb.gb_blur(img, mask, progress=lambda done, total: calls.append((done, total)))
    total = calls[-1][1]
    assert calls == [(k, total) for k in range(1, total + 1)] and total > 5

    def interrupt(done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        gb.gb_blur(img, mask, progress=interrupt)
