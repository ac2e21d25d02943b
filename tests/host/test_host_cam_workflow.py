"""The bundled CAM edit workflow (API twin) executed by a real ComfyUI, serverless and over HTTP.

The workflow: source -> VAEEncode -> SetLatentNoiseMask(mask) -> KSampler (model and positive conditioning
from XMGIE Cross-Attention Mask, which encodes the prompt itself) -> VAEDecode -> XMGIE GB Compositor (composite,
source) -> SaveImage. The tiny random-weight checkpoint produces garbage inside the mask; what is tested
is the plumbing and the compositor's invariant: far outside the mask the saved image is the source.
"""

from __future__ import annotations


import numpy as np
import pytest

import comfy_harness as harness

WORKFLOW = "api/xmgie_cam_edit.json"
STEPS = 2
"""Sampler steps for the tests (the bundled 20 take minutes on a CPU even with the tiny UNet at 64x64 latents)."""


node_of = harness.node_of


@pytest.fixture(scope="module")
def expected() -> harness.CompositeExpectation:
    return harness.composite_expectation(harness.load_workflow(WORKFLOW))


def test_cam_workflow_wiring():
    """CAM's model and its own encoded prompt feed the sampler; one mask drives noise mask, CAM and GB."""
    prompt = harness.load_workflow(WORKFLOW)
    cam_id, cam = node_of(prompt, "XMGIECrossAttentionMask")
    _, sampler = node_of(prompt, "KSampler")
    _, noise_mask = node_of(prompt, "SetLatentNoiseMask")
    _, gb = node_of(prompt, "XMGIEGBCompositor")
    assert sampler["inputs"]["model"] == [cam_id, 0] and sampler["inputs"]["positive"] == [cam_id, 1]
    assert prompt[sampler["inputs"]["negative"][0]]["class_type"] == "CLIPTextEncode"
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
    save_id = harness.provide_images_and_prefix(runner, prompt, f"{prefix}_{runner.name}")
    return prompt, save_id


def test_cam_workflow_edits_only_inside_the_mask(runner, tiny_checkpoint, expected):
    """One image of the source size; far outside the mask the source bit for bit; inside, changed pixels."""
    prompt, save_id = prepared(runner, tiny_checkpoint.name)
    images = runner.run(prompt).images(save_id)
    assert len(images) == 1, f"expected one saved image, got {images}"
    out = runner.read_image(images[0])
    assert out.shape == expected.source.shape and out.dtype == np.uint8, f"saved image {out.shape} {out.dtype}"
    problem = harness.pixel_mismatch(out, expected.source, expected.far_outside)
    assert not problem, f"far outside the mask the result is not the source: {problem}"
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
            prompt["positive"] = {"class_type": "CLIPTextEncode",
                                  "inputs": {"text": cam["inputs"]["prompt"], "clip": cam["inputs"]["clip"]}}
            prompt[sampler_id]["inputs"]["positive"] = ["positive", 0]
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
