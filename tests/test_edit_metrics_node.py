"""XMGIE Edit Metrics, checked without ComfyUI: its outputs equal the metric functions' values (the leak metrics of
metrics/leak.py, MagicBrush's L1 / PSNR without a mask, CLIP-T and Emu Edit's CLIP metrics of metrics/semantic.py on
a tiny CLIP folder), batches, a mask covering everything, the heat map shown on the node, and a missing, damaged or
unchosen CLIP model noted in the report without stopping the workflow."""

from __future__ import annotations

import math
import re
import shutil
import types

import numpy as np
import pytest
import torch
from PIL import Image

from fixtures import tiny_eval_models
from xmgie_core import drift
from xmgie_core.metrics import leak, pixels, semantic
from xmgie_core.metrics.models import load_clip
from xmgie_core.metrics.registry import Item

INPUT_CAPTION, OUTPUT_CAPTION = "a photo of a man", "a photo of a man wearing a red scarf"


def picture(seed: int, h: int = 24, w: int = 32) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (h, w, 3)).astype(np.float32) / 255)[None]


def region(h: int = 24, w: int = 32) -> torch.Tensor:
    mask = torch.zeros(1, h, w)
    mask[:, 4:16, 6:20] = 1.0
    return mask


def leaked(source: torch.Tensor, seed: int = 1) -> torch.Tensor:
    """The source with its region replaced and a faint change everywhere outside."""
    edit = (source + 0.01 * picture(seed + 50)).clamp(0, 1)
    return torch.where(region()[..., None] > 0.5, picture(seed), edit)


@pytest.fixture
def node(pack):
    return pack.NODE_CLASS_MAPPINGS["XMGIEEditMetrics"]()


@pytest.fixture
def comfy(tmp_path, monkeypatch):
    """A stand-in folder_paths: models/clip_metrics under tmp_path, previews saved in tmp_path/temp."""
    models, temp = tmp_path / "clip_metrics", tmp_path / "temp"
    models.mkdir()
    temp.mkdir()
    fake = types.SimpleNamespace(
        get_folder_paths=lambda kind: [str(models)] if kind == "clip_metrics" else [],
        get_temp_directory=lambda: str(temp),
        get_save_image_path=lambda prefix, folder, w, h: (folder, prefix, 1, "", prefix))
    monkeypatch.setitem(__import__("sys").modules, "folder_paths", fake)
    return types.SimpleNamespace(models=models, temp=temp)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return tiny_eval_models.open_clip_folder(tmp_path_factory.mktemp("clip") / "tiny-clip")


def measure(node, source, edited, mask=None, **options):
    out = node.measure(source, edited, drift.FULL_SCALE, 0.0, mask=mask, **options)
    heat, l1, psnr, mx, report = out["result"]
    return out["ui"], heat, l1, psnr, mx, report


def test_outputs_equal_the_leak_metrics_and_the_drift_map(node):
    source = picture(0)
    edit = leaked(source)
    ui, heat, l1, psnr, mx, report = measure(node, source, edit, region())
    item = Item("x", source, edit, gt_mask=region())
    assert l1 == [pytest.approx(leak.leak_l1(item))] and mx == [pytest.approx(leak.leak_max(item))]
    assert psnr == [pytest.approx(leak.leak_psnr(item))]
    assert 0 < l1[0] < 0.01 and mx[0] <= 0.01 + 1e-6  # only the faint change outside counts, not the region's
    assert torch.equal(heat, drift.drift_map(source, edit, region()).heat_map)
    assert ui["text"] == [report] and ui["images"] == [] and ui["xmgie_warning"] == []
    assert report.startswith("image 0: outside the mask (600 px)") and "CLIP metrics: off" in report


def test_without_a_mask_the_whole_image_counts(node):
    source, edit = picture(2), picture(3)
    _, heat, l1, psnr, mx, report = measure(node, source, edit)
    assert l1 == [pytest.approx(pixels.l1(edit, source))] and psnr == [pytest.approx(pixels.psnr(edit, source))]
    assert mx == [pytest.approx(float((edit - source).abs().max()))]
    assert report.startswith("no mask connected: the whole image counts as outside")
    assert torch.equal(heat, drift.hot(((edit - source).abs().amax(-1) / drift.FULL_SCALE).clamp(0, 1)))


def test_batches_broadcast_pair_up_or_are_refused(node):
    source = picture(4)
    edits = torch.cat([leaked(source, 1), source])
    _, heat, l1, psnr, mx, report = measure(node, source, edits, region())
    assert heat.shape == (2, 24, 32, 3) and mx[1] == 0.0 and psnr[1] == math.inf and l1[0] > 0
    assert "image 1: outside the mask" in report
    sources = torch.cat([source, picture(5)])
    _, _, l1, _, _, _ = measure(node, sources, torch.cat([source, source]))
    assert l1 == [0.0, pytest.approx(pixels.l1(source, picture(5)))]
    with pytest.raises(ValueError, match="source batch 2 .* does not match edited batch 3 .* use equal batches or a batch of 1"):
        measure(node, sources, torch.cat([source] * 3))


def test_a_mask_covering_everything_gives_nan_and_says_why(node):
    _, _, l1, psnr, mx, report = measure(node, picture(6), picture(7), torch.ones(1, 24, 32))
    assert all(math.isnan(v[0]) for v in (l1, psnr, mx))
    assert "nothing outside the mask to compare" in report


def test_the_heat_map_is_previewed_on_the_node(node, comfy):
    source = picture(8)
    ui, heat, *_ = measure(node, source, leaked(source), region())
    (entry,) = ui["images"]
    assert entry["type"] == "temp" and entry["filename"].startswith("xmgie_edit_metrics_temp_")
    shown = np.asarray(Image.open(comfy.temp / entry["filename"]))
    assert np.array_equal(shown, np.clip(255 * heat[0].numpy(), 0, 255).astype(np.uint8))


def clip_values(report: str, image: int = 0) -> dict[str, float]:
    line = next(x for x in report.splitlines() if x.startswith(f"image {image}: clip_"))
    return {k: float(v) for k, v in re.findall(r"(clip_\w+) (-?[\d.]+)", line)}


def test_clip_metrics_equal_the_metric_functions(node, comfy, tiny_clip, pack):
    shutil.copytree(tiny_clip, comfy.models / "tiny-clip")
    assert pack.NODE_CLASS_MAPPINGS["XMGIEEditMetrics"].INPUT_TYPES()["optional"]["clip_model"][0] == ["none",
                                                                                                      "tiny-clip"]
    source = picture(9)
    edits = torch.cat([leaked(source, 1), leaked(source, 2)])
    ui, *_, report = measure(node, source, edits, region(), clip_model="tiny-clip", input_caption=INPUT_CAPTION,
                             output_caption=OUTPUT_CAPTION)
    clip = load_clip(tiny_clip)
    for i in range(2):
        emu = semantic.emu_clip(clip, source, edits[i:i + 1], INPUT_CAPTION, OUTPUT_CAPTION)
        want = {"clip_t": semantic.clip_t(clip, edits[i:i + 1], OUTPUT_CAPTION), **emu}
        assert clip_values(report, i) == pytest.approx(want, abs=6e-5)
    assert clip_values(report, 0) != clip_values(report, 1)  # each edit scored against the source
    assert "CLIP model: open_clip folder" in report and "not the reference ViT-B/32" in report
    assert ui["xmgie_warning"] == []


def test_clip_without_captions_scores_clip_img_only(node, comfy, tiny_clip):
    source = picture(10)
    *_, report = measure(node, source, leaked(source), clip_model=str(tiny_clip), input_caption=INPUT_CAPTION)
    assert set(clip_values(report)) == {"clip_img"} and "need output_caption" in report


def test_no_model_chosen_is_noted_and_captions_are_not_scored(node, comfy):
    *_, report = measure(node, picture(11), picture(12), output_caption=OUTPUT_CAPTION)
    assert "CLIP metrics: off (choose a CLIP folder from ComfyUI/models/clip_metrics/ as clip_model to score the " \
           "captions)" in report and "clip_t" not in report


def test_a_missing_clip_folder_is_noted_not_raised(node, comfy, pack):
    assert pack.NODE_CLASS_MAPPINGS["XMGIEEditMetrics"].VALIDATE_INPUTS(clip_model="gone") is True
    ui, _, l1, *_, report = measure(node, picture(13), picture(14), clip_model="gone", output_caption=OUTPUT_CAPTION)
    assert l1 == [pytest.approx(pixels.l1(picture(14), picture(13)))]
    assert f"CLIP metrics skipped: Model folder 'gone' not found; looked in: {comfy.models}" in report
    assert ui["xmgie_warning"] == [next(x for x in report.splitlines() if x.startswith("CLIP metrics skipped"))]


def test_a_damaged_clip_folder_is_named(node, comfy, tiny_clip):
    broken = shutil.copytree(tiny_clip, comfy.models / "broken")
    weights = broken / "open_clip_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    ui, *_, report = measure(node, picture(15), picture(16), clip_model="broken", output_caption=OUTPUT_CAPTION)
    assert "CLIP metrics skipped" in report and "open_clip_model.safetensors" in report and "truncated" in report
    assert ui["xmgie_warning"] and "clip_t" not in report
