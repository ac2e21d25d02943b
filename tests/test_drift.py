"""Drift outside the mask (xmgie_core.drift, the XMGIE Drift Map node): statistics against values worked out by
hand, the heat map's colours, the margin, batches, and errors."""

from __future__ import annotations

import math

import pytest
import torch

from xmgie_core import drift
from xmgie_core.errors import XMGIEInputError


def grey(value: float, h: int = 10, w: int = 10, b: int = 1) -> torch.Tensor:
    return torch.full((b, h, w, 3), value)


def left_half_mask(h: int = 10, w: int = 10) -> torch.Tensor:
    mask = torch.zeros(1, h, w)
    mask[:, :, : w // 2] = 1.0
    return mask


def test_statistics_outside_the_mask_match_hand_computed_values():
    source = grey(0.5)
    edited = source.clone()
    edited[:, :, :5] = 0.0  # inside the mask: ignored however large
    edited[0, 0, 9, 0] += 0.2  # one outside pixel, one channel: +0.2
    edited[0, 9, 9] -= 0.1  # one outside pixel, all channels: -0.1
    stats = drift.drift_map(source, edited, left_half_mask()).stats[0]
    assert stats.outside_pixels == 50
    assert stats.mean_abs == pytest.approx((0.2 + 3 * 0.1) / 150)
    assert stats.max_abs == pytest.approx(0.2)
    mse = (0.2**2 + 3 * 0.1**2) / 150
    assert stats.psnr == pytest.approx(10 * math.log10(1 / mse))


def test_identical_outside_is_infinite_psnr_and_a_black_heat_map():
    source = torch.rand(1, 12, 16, 3, generator=torch.Generator().manual_seed(0))
    edited = source.clone()
    edited[:, :, :8] = 1 - edited[:, :, :8]
    result = drift.drift_map(source, edited, left_half_mask(12, 16))
    s = result.stats[0]
    assert (s.mean_abs, s.max_abs, s.psnr) == (0.0, 0.0, math.inf)
    assert torch.equal(result.heat_map[:, :, 8:], torch.zeros(1, 12, 8, 3))
    # inside the mask: the source's grey level at a quarter of its brightness
    want = source[:, :, :8].mean(dim=-1, keepdim=True).expand(-1, -1, -1, 3) * drift.REGION_BRIGHTNESS
    assert torch.allclose(result.heat_map[:, :, :8], want)
    assert "PSNR inf (identical)" in result.report()


def test_heat_map_colours_follow_the_hot_map_and_saturate_at_full_scale():
    source = grey(0.2, 1, 4)
    edited = source.clone()
    edited[0, 0, 1] += 0.1 / 3  # t = 1/3 at full_scale 0.1: pure red
    edited[0, 0, 2, 1] += 0.2  # t = 2 -> saturates: white
    edited[0, 0, 3] -= 0.05  # t = 1/2: red, half green
    heat = drift.drift_map(source, edited, torch.zeros(1, 1, 4), full_scale=0.1).heat_map[0, 0]
    assert torch.allclose(heat, torch.tensor([[0, 0, 0], [1, 0, 0], [1, 1, 1], [1, 0.5, 0]]), atol=1e-5)


def test_margin_leaves_out_a_band_around_the_mask():
    source = grey(0.0, 1, 20)
    edited = grey(1.0, 1, 20)
    mask = torch.zeros(1, 1, 20)
    mask[:, :, :5] = 1.0  # region x < 5; x = 5..7 lies within 3 px of it
    assert drift.drift_map(source, edited, mask).stats[0].outside_pixels == 15
    assert drift.drift_map(source, edited, mask, margin=3.0).stats[0].outside_pixels == 12
    assert drift.drift_map(source, edited, mask, margin=2.5).stats[0].outside_pixels == 13


def test_batches_broadcast_and_report_each_image():
    source = grey(0.5)
    edited = torch.cat([grey(0.5), grey(0.6)])
    result = drift.drift_map(source, edited, left_half_mask())
    assert result.heat_map.shape == (2, 10, 10, 3)
    assert result.stats[0].max_abs == 0 and result.stats[1].max_abs == pytest.approx(0.1)
    lines = result.report().splitlines()
    assert lines[0].startswith("image 0: outside the mask (50 px)") and "25.5/255" in lines[1]


def test_a_mask_covering_everything_reports_nothing_to_compare():
    result = drift.drift_map(grey(0.1), grey(0.9), torch.ones(1, 10, 10))
    assert result.stats[0] == drift.DriftStats(0, None, None, None)
    assert "nothing outside the mask to compare" in result.report()


def test_errors_name_the_fix():
    with pytest.raises(XMGIEInputError, match="differ in size or channels"):
        drift.drift_map(grey(0.5), grey(0.5, 10, 12), left_half_mask())
    with pytest.raises(XMGIEInputError, match="does not match edited size"):
        drift.drift_map(grey(0.5), grey(0.5), left_half_mask(10, 12))
    with pytest.raises(XMGIEInputError, match="full_scale must be between .*shown white"):
        drift.drift_map(grey(0.5), grey(0.5), left_half_mask(), full_scale=0.0)
    with pytest.raises(XMGIEInputError, match="margin must be between .*edge_width"):
        drift.drift_map(grey(0.5), grey(0.5), left_half_mask(), margin=-1.0)


def test_node_returns_heat_map_and_report_and_shows_the_report(pack):
    node = pack.NODE_CLASS_MAPPINGS["XMGIEDriftMap"]()
    assert node.CATEGORY == "xMGIE/analysis" and node.OUTPUT_NODE
    out = node.measure(grey(0.5), grey(0.55), left_half_mask(), 0.05, 0.0)
    heat, report = out["result"]
    assert heat.shape == (1, 10, 10, 3) and out["ui"]["text"] == [report]
    assert "max |change| 0.05000" in report
    assert torch.allclose(heat[0, :, 5:], torch.ones(10, 5, 3))  # 0.05 at full scale 0.05: white
