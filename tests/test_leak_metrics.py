"""The leak metrics (xmgie_core.metrics.leak) against values worked out by hand: L1 / PSNR / max change outside the
edit region (the dataset's mask first, else the editor's), an edit of another size resized like l1_src, a region
covering everything, and the drift map panel."""

from __future__ import annotations

import math

import pytest
import torch

from xmgie_core import drift
from xmgie_core.metrics import leak
from xmgie_core.metrics.registry import METRICS, PANELS, Item


def grey(value: float, h: int = 8, w: int = 10) -> torch.Tensor:
    return torch.full((1, h, w, 3), value)


def region(h: int = 8, w: int = 10, cols: int = 4) -> torch.Tensor:
    mask = torch.zeros(1, h, w)
    mask[:, :, :cols] = 1.0
    return mask


def leaked_edit() -> torch.Tensor:
    """Inside the 8x4 region everything changes; outside, one pixel's red +0.3 and one pixel -0.1 in all channels."""
    edit = grey(0.5)
    edit[:, :, :4] = 0.0
    edit[0, 2, 7, 0] += 0.3
    edit[0, 6, 9] -= 0.1
    return edit


def test_leak_metrics_by_hand():
    item = Item("a", grey(0.5), leaked_edit(), gt_mask=region())
    outside_values = 8 * 6 * 3  # 48 pixels outside, 3 channels
    assert leak.leak_l1(item) == pytest.approx((0.3 + 3 * 0.1) / outside_values)
    assert leak.leak_max(item) == pytest.approx(0.3)
    assert leak.leak_psnr(item) == pytest.approx(10 * math.log10(outside_values / (0.3**2 + 3 * 0.1**2)))


def test_the_datasets_mask_comes_before_the_editors():
    editor = region()
    editor[:, :, 6:] = 1.0  # the editor's region also holds both leaked pixels: it alone would show no leak
    assert leak.leak_max(Item("a", grey(0.5), leaked_edit(), pred_mask=editor)) == 0.0
    assert leak.leak_max(Item("a", grey(0.5), leaked_edit(), gt_mask=region(), pred_mask=editor)) == pytest.approx(0.3)


def test_an_unchanged_outside_is_infinite_psnr_and_zero_leak():
    edit = grey(0.5)
    edit[:, :, :4] = 1.0
    item = Item("a", grey(0.5), edit, pred_mask=region())
    assert (leak.leak_l1(item), leak.leak_max(item), leak.leak_psnr(item)) == (0.0, 0.0, math.inf)


def test_a_region_covering_the_photo_leaves_the_leak_undefined():
    item = Item("a", grey(0.5), grey(0.9), gt_mask=torch.ones(1, 8, 10))
    assert (leak.leak_l1(item), leak.leak_psnr(item), leak.leak_max(item)) == (None, None, None)


def test_an_edit_of_another_size_is_resized_to_the_source_first():
    """A flat edit stays flat through the bicubic resize: the leak is its level's difference (8-bit: 153/255)."""
    item = Item("a", grey(0.5), torch.full((1, 16, 20, 3), 0.6), gt_mask=region())
    assert leak.leak_l1(item) == pytest.approx(abs(153 / 255 - 0.5), abs=1e-6)


def test_registered_with_the_region_as_their_need_and_the_drift_map_panel():
    for name, higher in (("leak_l1", False), ("leak_psnr", True), ("leak_max", False)):
        assert METRICS[name].needs == ("edit_region",) and METRICS[name].higher_is_better is higher
        assert METRICS[name].model is None and "outside the edit region" in METRICS[name].source
    item = Item("a", grey(0.5), leaked_edit(), gt_mask=region())
    assert METRICS["leak_max"].compute(item, None) == pytest.approx(0.3)
    heat = PANELS["drift map"](item)
    assert torch.equal(heat, drift.drift_map(grey(0.5), leaked_edit(), region()).heat_map)
    assert torch.equal(heat[0, 2, 7], torch.ones(3))  # 0.3 saturates the hot map (full scale 0.05): white
    assert torch.equal(heat[0, 0, 9], torch.zeros(3))  # unchanged outside: black


def test_the_panel_without_a_region_shows_the_whole_photo_and_a_misfit_region_none():
    heat = PANELS["drift map"](Item("a", grey(0.5), grey(0.52)))
    assert torch.allclose(heat, drift.hot(torch.full((1, 8, 10), 0.02 / drift.FULL_SCALE)), atol=1e-5)
    misfit = Item("a", grey(0.5), grey(0.52), gt_mask=torch.ones(1, 4, 4))
    assert PANELS["drift map"](misfit) is None
    with pytest.raises(ValueError, match="does not match edited size"):
        leak.leak_l1(misfit)  # the evaluation notes this on the sample's row
