"""The bundled CAM edit workflow (API twin) executed by a real ComfyUI, serverless and over HTTP.

The workflow: source -> VAEEncode -> SetLatentNoiseMask(mask) -> KSampler (model patched by XMGIE
Cross-Attention Mask with the positive prompt's text) -> VAEDecode -> XMGIE GB Compositor (composite,
source) -> SaveImage. The tiny random-weight checkpoint produces garbage inside the mask; what is tested
is the plumbing and the compositor's invariant: far outside the mask the saved image is the source.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

import comfy_harness as harness

WORKFLOW = "api/xmgie_cam_edit.json"
STEPS = 2
"""Sampler steps for the tests (the bundled 20 take minutes on a CPU even with the tiny UNet at 64x64 latents)."""


def node_of(prompt: dict, class_type: str) -> tuple[str, dict]:
    """The single node of `class_type` in an API prompt."""
    found = [(nid, node) for nid, node in prompt.items() if node["class_type"] == class_type]
    assert len(found) == 1, f"expected one {class_type} in {WORKFLOW}, found {len(found)}"
    return found[0]


@dataclass(frozen=True)
class Expected:
    source: np.ndarray
    """uint8 [H,W,3]: the image the GB compositor's `source` input loads."""
    region: np.ndarray
    """bool [H,W]: the mask the workflow uses (LoadImage MASK = 1 - alpha) >= 0.5."""
    far_outside: np.ndarray
    """bool [H,W]: farther than edge_width + 1 px outside the region (must be the source exactly)."""


@pytest.fixture(scope="module")
def expected() -> Expected:
    prompt = harness.load_workflow(WORKFLOW)
    _, gb = node_of(prompt, "XMGIEGBCompositor")
    assert gb["inputs"]["mode"] == "composite"
    mask_loader, mask_slot = gb["inputs"]["mask"]
    source_loader, source_slot = gb["inputs"]["source"]
    assert (mask_slot, source_slot) == (1, 0)
    source_name = prompt[source_loader]["inputs"]["image"]
    mask_name = prompt[mask_loader]["inputs"]["image"]
    source = np.array(Image.open(harness.ASSETS_DIR / source_name).convert("RGB"))
    alpha = np.array(Image.open(harness.ASSETS_DIR / mask_name).convert("RGBA"))[..., 3]
    region = (1.0 - alpha / 255.0) >= 0.5
    assert region.shape == source.shape[:2]
    far_outside = ndimage.distance_transform_edt(~region) > float(gb["inputs"]["edge_width"]) + 1.0
    assert region.any() and far_outside.any(), "sample mask is empty or covers everything"
    return Expected(source, region, far_outside)


def test_cam_workflow_wiring():
    """CAM gets the positive prompt's exact text and feeds the sampler; one mask drives noise mask, CAM and GB."""
    prompt = harness.load_workflow(WORKFLOW)
    cam_id, cam = node_of(prompt, "XMGIECrossAttentionMask")
    _, sampler = node_of(prompt, "KSampler")
    _, noise_mask = node_of(prompt, "SetLatentNoiseMask")
    _, gb = node_of(prompt, "XMGIEGBCompositor")
    assert sampler["inputs"]["model"] == [cam_id, 0]
    positive = prompt[sampler["inputs"]["positive"][0]]
    assert positive["class_type"] == "CLIPTextEncode" and positive["inputs"]["text"] == cam["inputs"]["prompt"]
    assert positive["inputs"]["clip"] == cam["inputs"]["clip"]
    assert cam["inputs"]["edit_words"] in cam["inputs"]["prompt"]
    assert prompt[sampler["inputs"]["latent_image"][0]]["class_type"] == "SetLatentNoiseMask"
    assert noise_mask["inputs"]["mask"] == cam["inputs"]["mask"] == gb["inputs"]["mask"]
    assert prompt[gb["inputs"]["edited"][0]]["class_type"] == "VAEDecode"
    assert prompt[noise_mask["inputs"]["samples"][0]]["inputs"]["pixels"] == gb["inputs"]["source"]
    assert 0.0 < sampler["inputs"]["denoise"] < 1.0


def prepared(runner, ckpt_name: str, prefix: str = "xmgie_cam_edit") -> tuple[dict, str]:
    """The bundled API prompt with the tiny checkpoint and STEPS steps, its images provided, a per-transport
    file prefix."""
    prompt = harness.load_workflow(WORKFLOW)
    _, loader = node_of(prompt, "CheckpointLoaderSimple")
    loader["inputs"]["ckpt_name"] = ckpt_name
    _, sampler = node_of(prompt, "KSampler")
    sampler["inputs"]["steps"] = STEPS
    for node in prompt.values():
        if node["class_type"] == "LoadImage":
            name = node["inputs"]["image"]
            assert runner.provide_input(harness.ASSETS_DIR / name) == name
    save_id, save = node_of(prompt, "SaveImage")
    save["inputs"]["filename_prefix"] = f"{prefix}_{runner.name}"
    return prompt, save_id


def test_cam_workflow_edits_only_inside_the_mask(runner, tiny_checkpoint, expected):
    """One image of the source size; far outside the mask the source bit for bit; inside, changed pixels."""
    prompt, save_id = prepared(runner, tiny_checkpoint.name)
    images = runner.run(prompt).images(save_id)
    assert len(images) == 1, f"expected one saved image, got {images}"
    out = runner.read_image(images[0])
    assert out.shape == expected.source.shape and out.dtype == np.uint8, f"saved image {out.shape} {out.dtype}"
    bad = np.argwhere(expected.far_outside & (out != expected.source).any(axis=-1))
    assert len(bad) == 0, (f"{len(bad)} of {int(expected.far_outside.sum())} pixels far outside the mask differ "
                           f"from the source, e.g. at (y, x) = {bad[0].tolist()}: got {out[tuple(bad[0])].tolist()}, "
                           f"want {expected.source[tuple(bad[0])].tolist()}")
    changed = expected.region & (out != expected.source).any(axis=-1)
    assert changed.any(), "no pixel inside the mask differs from the source: the edit did not arrive"


def test_cam_patch_reaches_the_sampler(serverless_runner, tiny_checkpoint, expected):
    """Bypassing the CAM node (KSampler fed the checkpoint's model) changes the result inside the mask."""
    outputs = {}
    for variant in ("cam", "bypass"):
        prompt, save_id = prepared(serverless_runner, tiny_checkpoint.name, f"xmgie_cam_edit_{variant}")
        if variant == "bypass":
            cam_id, cam = node_of(prompt, "XMGIECrossAttentionMask")
            sampler_id, _ = node_of(prompt, "KSampler")
            prompt[sampler_id]["inputs"]["model"] = cam["inputs"]["model"]
            del prompt[cam_id]
        (image,) = serverless_runner.run(prompt).images(save_id)
        outputs[variant] = serverless_runner.read_image(image)
    differs = (outputs["cam"] != outputs["bypass"]).any(axis=-1)
    assert differs[expected.region].any(), "the CAM node had no effect on the sampled edit"
    assert not differs[expected.far_outside].any(), "far outside the mask both must be the source"


def test_ci_core_node_table_matches_comfyui(comfy_host):
    """tests/test_workflows.py's hand-written CORE_NODES (CI has no ComfyUI) agrees with the real classes:
    widget order (control_after_generate and image_upload add a value), required inputs, output types."""
    import test_workflows

    problems = []
    for class_type, want in test_workflows.CORE_NODES.items():
        cls = comfy_host.nodes.NODE_CLASS_MAPPINGS[class_type]
        inputs = cls.INPUT_TYPES()
        widgets = []
        for section in ("required", "optional"):
            for name, (kind, *opts) in inputs.get(section, {}).items():
                options = opts[0] if opts else {}
                if (isinstance(kind, list) or str(kind) in test_workflows.WIDGET_TYPES) and not options.get("forceInput"):
                    widgets.append(name)
                    if options.get("control_after_generate"):
                        widgets.append(f"{name}:control_after_generate")
                    if options.get("image_upload"):
                        widgets.append("upload")
        got = {"widgets": widgets, "required": list(inputs.get("required", {})),
               "outputs": [str(t) for t in cls.RETURN_TYPES]}
        if got != want:
            problems.append(f"{class_type}: CORE_NODES {want} but ComfyUI has {got}")
    assert not problems, "\n".join(problems)
