"""The bundled GB workflow (API twin) executed by a real ComfyUI, serverless and over HTTP."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

import comfy_harness as harness

WORKFLOW = "api/xmgie_gb_composite.json"


@dataclass(frozen=True)
class Expected:
    source: np.ndarray
    """uint8 [H,W,3] source pixels."""
    edit: np.ndarray
    """uint8 [H,W,3] edited pixels (RGB of the RGBA edit)."""
    region: np.ndarray
    """bool [H,W]: LoadImage's mask (1 - alpha) >= 0.5."""
    far_outside: np.ndarray
    """bool [H,W]: farther than edge_width + 1 px outside the region (must be the source exactly)."""
    deep_inside: np.ndarray
    """bool [H,W]: farther than edge_width + 1 px inside the region (must be the edit exactly)."""


def node_of(prompt: dict, class_type: str) -> tuple[str, dict]:
    """The single node of `class_type` in an API prompt."""
    found = [(nid, node) for nid, node in prompt.items() if node["class_type"] == class_type]
    assert len(found) == 1, f"expected one {class_type} in {WORKFLOW}, found {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def expected() -> Expected:
    """What the workflow must produce, from the sample assets and the GB node's edge_width."""
    prompt = harness.load_workflow(WORKFLOW)
    _, gb = node_of(prompt, "XMGIEGBCompositor")
    assert gb["inputs"]["mode"] == "composite"
    edited_name = prompt[gb["inputs"]["mask"][0]]["inputs"]["image"]
    source_name = prompt[gb["inputs"]["source"][0]]["inputs"]["image"]
    source = np.array(Image.open(harness.ASSETS_DIR / source_name).convert("RGB"))
    rgba = np.array(Image.open(harness.ASSETS_DIR / edited_name).convert("RGBA"))
    region = (1.0 - rgba[..., 3] / 255.0) >= 0.5
    margin = float(gb["inputs"]["edge_width"]) + 1.0
    far_outside = ndimage.distance_transform_edt(~region) > margin
    deep_inside = ndimage.distance_transform_edt(region) > margin
    assert far_outside.any() and deep_inside.any(), "sample edit region is empty, full, or too thin"
    return Expected(source, rgba[..., :3], region, far_outside, deep_inside)


def pixel_mismatch(actual: np.ndarray, want: np.ndarray, where: np.ndarray) -> str:
    """'' if actual == want at every `where` pixel, else a count and the first few coordinates."""
    bad = np.argwhere(where & (actual != want).any(axis=-1))
    if len(bad) == 0:
        return ""
    y, x = bad[0]
    return (f"{len(bad)} of {int(where.sum())} pixels differ, e.g. at (y={y}, x={x}): "
            f"got {actual[y, x].tolist()}, want {want[y, x].tolist()}")


def test_gb_workflow_composites_the_edit_into_the_source(runner, expected):
    """Far outside the mask: the source bit for bit; deep inside: the edit; the whole mask differs from the source."""
    prompt = harness.load_workflow(WORKFLOW)
    for node in prompt.values():
        if node["class_type"] == "LoadImage":
            name = node["inputs"]["image"]
            assert runner.provide_input(harness.ASSETS_DIR / name) == name
    save_id, save = node_of(prompt, "SaveImage")
    save["inputs"]["filename_prefix"] = f"xmgie_gb_{runner.name}"
    (image,) = runner.run(prompt).images(save_id)
    out = runner.read_image(image)
    assert out.shape == expected.source.shape and out.dtype == np.uint8, f"saved image {out.shape} {out.dtype}"
    problem = pixel_mismatch(out, expected.source, expected.far_outside)
    assert not problem, f"far outside the mask the result is not the source: {problem}"
    problem = pixel_mismatch(out, expected.edit, expected.deep_inside)
    assert not problem, f"deep inside the mask the result is not the edit: {problem}"
    same = expected.region & (out == expected.source).all(axis=-1)
    assert not same.any(), f"{int(same.sum())} pixels inside the mask still equal the source"


def test_gb_errors_reach_the_caller(runner):
    """A bad widget value fails validation and a missing source fails execution, each with ComfyUI's message."""
    prompt = harness.load_workflow(WORKFLOW)
    for node in prompt.values():
        if node["class_type"] == "LoadImage":
            runner.provide_input(harness.ASSETS_DIR / node["inputs"]["image"])
    gb_id, gb = node_of(prompt, "XMGIEGBCompositor")
    gb["inputs"]["mode"] = "no_such_mode"
    with pytest.raises(harness.PromptFailed, match="value_not_in_list"):
        runner.run(prompt)
    gb["inputs"]["mode"] = "composite"
    del gb["inputs"]["source"]
    with pytest.raises(harness.PromptFailed, match=rf"node {gb_id} \(XMGIEGBCompositor\).*connect the original"):
        runner.run(prompt)
