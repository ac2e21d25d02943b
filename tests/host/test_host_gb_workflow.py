"""The bundled GB workflow (API twin) executed by a real ComfyUI, serverless and over HTTP."""

from __future__ import annotations


import numpy as np
import pytest

import comfy_harness as harness

WORKFLOW = "api/xmgie_gb_composite.json"


node_of, pixel_mismatch = harness.node_of, harness.pixel_mismatch


@pytest.fixture(scope="module")
def expected() -> harness.CompositeExpectation:
    """What the workflow must produce, from the sample assets and the GB node's edge_width."""
    return harness.composite_expectation(harness.load_workflow(WORKFLOW))


def test_gb_workflow_composites_the_edit_into_the_source(runner, expected):
    """Far outside the mask: the source bit for bit; deep inside: the edit; the whole mask differs from the source."""
    prompt = harness.load_workflow(WORKFLOW)
    save_id = harness.provide_images_and_prefix(runner, prompt, f"xmgie_gb_{runner.name}")
    (image,) = runner.run(prompt).images(save_id)
    out = runner.read_image(image)
    assert out.shape == expected.source.shape and out.dtype == np.uint8, f"saved image {out.shape} {out.dtype}"
    problem = pixel_mismatch(out, expected.source, expected.far_outside)
    assert not problem, f"far outside the mask the result is not the source: {problem}"
    problem = pixel_mismatch(out, expected.mask_rgb, expected.deep_inside)
    assert not problem, f"deep inside the mask the result is not the edit: {problem}"
    same = expected.region & (out == expected.source).all(axis=-1)
    assert not same.any(), f"{int(same.sum())} pixels inside the mask still equal the source"


def test_gb_errors_reach_the_caller(runner):
    """A bad widget value fails validation and a missing source fails execution, each with ComfyUI's message."""
    prompt = harness.load_workflow(WORKFLOW)
    harness.provide_images_and_prefix(runner, prompt, f"xmgie_gb_errors_{runner.name}")
    gb_id, gb = node_of(prompt, "XMGIEGBCompositor")
    gb["inputs"]["mode"] = "no_such_mode"
    with pytest.raises(harness.PromptFailed, match="value_not_in_list"):
        runner.run(prompt)
    gb["inputs"]["mode"] = "composite"
    del gb["inputs"]["source"]
    with pytest.raises(harness.PromptFailed, match=rf"node {gb_id} \(XMGIEGBCompositor\).*connect the original"):
        runner.run(prompt)
