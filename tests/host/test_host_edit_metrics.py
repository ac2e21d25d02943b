"""XMGIE Edit Metrics in a real ComfyUI, serverless and over HTTP: LoadImage of the bundled sample source and edit
(its alpha is the edit region) -> Edit Metrics (a tiny CLIP folder in models/clip_metrics) -> PreviewImage. The
previewed heat map, the leak figures and the CLIP metrics in the node's report equal xmgie_core's on the same pixels;
a CLIP folder that is not there passes validation and is named in the report, and the workflow finishes."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import comfy_harness as harness
from fixtures import tiny_eval_models

SOURCE, EDIT = "xmgie_astronaut_source.png", "xmgie_astronaut_edit.png"
INPUT_CAPTION, OUTPUT_CAPTION = "a photo of an astronaut", "a photo of an astronaut wearing a red scarf"


def install_clip(runner, tmp_path_factory) -> Path:
    """A tiny open_clip folder "tiny-clip": in the server's models/clip_metrics (looked up when the node runs, so the
    running server finds it), or in a clip_metrics folder added to the in-process ComfyUI's."""
    if runner.name == "http":
        folder = runner.server.base / "models" / "clip_metrics"
    else:
        import folder_paths

        folder = tmp_path_factory.getbasetemp() / "clip_metrics"
        folder_paths.add_model_folder_path("clip_metrics", str(folder))
    if not (folder / "tiny-clip").is_dir():
        tiny_eval_models.open_clip_folder(folder / "tiny-clip")
    return folder / "tiny-clip"


def prompt(clip_model: str) -> dict:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": SOURCE}},
        "2": {"class_type": "LoadImage", "inputs": {"image": EDIT}},
        "3": {"class_type": "XMGIEEditMetrics", "inputs": {
            "source": ["1", 0], "edited": ["2", 0], "mask": ["2", 1], "full_scale": 0.05, "margin": 0.0,
            "clip_model": clip_model, "input_caption": INPUT_CAPTION, "output_caption": OUTPUT_CAPTION}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}},
    }


def loaded() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The samples as LoadImage gives them: RGB / 255, and MASK = 1 - alpha / 255."""
    source = np.asarray(Image.open(harness.ASSETS_DIR / SOURCE).convert("RGB"), dtype=np.float32) / 255.0
    rgba = Image.open(harness.ASSETS_DIR / EDIT)
    edit = np.asarray(rgba.convert("RGB"), dtype=np.float32) / 255.0
    mask = 1.0 - np.asarray(rgba.getchannel("A"), dtype=np.float32) / 255.0
    return torch.from_numpy(source)[None], torch.from_numpy(edit)[None], torch.from_numpy(mask)[None]


def run(runner, clip_model: str) -> tuple[harness.PromptRun, dict]:
    for name in (SOURCE, EDIT):
        assert runner.provide_input(harness.ASSETS_DIR / name) == name
    result = runner.run(prompt(clip_model))
    return result, result.outputs["3"]


def test_edit_metrics_node_measures_the_sample_edit(runner, tmp_path_factory):
    from xmgie_core import drift
    from xmgie_core.metrics import semantic
    from xmgie_core.metrics.models import load_clip

    folder = install_clip(runner, tmp_path_factory)
    result, ui = run(runner, "tiny-clip")
    source, edit, mask = loaded()
    want = drift.drift_map(source, edit, mask)
    (preview,) = result.images("4")
    shown = runner.read_image(preview)
    expected = np.clip(255.0 * want.heat_map[0].numpy(), 0, 255).astype(np.uint8)
    assert shown.shape == expected.shape and np.abs(shown.astype(int) - expected).max() <= 1
    (on_node,) = ui["images"]
    assert np.array_equal(runner.read_image(on_node), shown)  # the node shows the same heat map
    (report,) = ui["text"]
    assert want.stats[0].describe() in report and 0 < want.stats[0].mean_abs < 0.05  # the sample's mild drift
    assert ui["xmgie_warning"] == []
    line = next(x for x in report.splitlines() if x.startswith("image 0: clip_"))
    got = {k: float(v) for k, v in re.findall(r"(clip_\w+) (-?[\d.]+)", line)}
    clip = load_clip(folder)
    emu = semantic.emu_clip(clip, source, edit, INPUT_CAPTION, OUTPUT_CAPTION)
    assert got == pytest.approx({"clip_t": semantic.clip_t(clip, edit, OUTPUT_CAPTION), **emu}, abs=6e-5)


def test_a_missing_clip_folder_is_named_and_the_workflow_finishes(runner):
    result, ui = run(runner, "clip-vit-base-patch32")
    (report,) = ui["text"]
    assert "CLIP metrics skipped: Model folder 'clip-vit-base-patch32' not found" in report
    assert ui["xmgie_warning"] == [next(x for x in report.splitlines() if x.startswith("CLIP metrics skipped"))]
    assert "image 0: outside the mask" in report and result.images("4")
