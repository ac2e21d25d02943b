"""The whole edit in a real ComfyUI: the bundled xmgie_edit (Instruction -> Region Predictor -> Crop For Edit -> CAM
-> PFB -> VAEDecode -> Stitch Edit -> GB) and xmgie_edit_face (+ ID Embedders, face protection, best-of-N, Identity
Score) on the tiny checkpoint, serverless and over HTTP: the saved photo has the input's size and is the source bit
for bit far outside the predicted region; a photo larger than the working size goes through the crop."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import comfy_harness as harness

EDIT = "api/xmgie_edit.json"
FACE = "api/xmgie_edit_face.json"


def test_edit_workflow_runs(runner, tiny_checkpoint):
    prompt = harness.bundled_edit_prompt(EDIT, tiny_checkpoint.name, 5 if runner.name == "http" else 6)
    harness.provide_images_and_prefix(runner, prompt, "unused")
    source = np.array(Image.open(harness.ASSETS_DIR / "xmgie_astronaut_source.png").convert("RGB"))
    harness.check_edit_inside_predicted_region(runner, prompt, f"xmgie_edit_{runner.name}", source)


def test_edit_workflow_on_a_photo_larger_than_the_working_size(serverless_runner, tiny_checkpoint, tmp_path):
    """The model sees the crop at the working size, not the 1536 x 1152 photo: the crop's image is saved too."""
    big = Image.open(harness.ASSETS_DIR / "xmgie_astronaut_source.png").convert("RGB").resize((1536, 1152),
                                                                                                Image.LANCZOS)
    path = tmp_path / "xmgie_large_photo.png"
    big.save(path)
    name = serverless_runner.provide_input(path)
    prompt = harness.bundled_edit_prompt(EDIT, tiny_checkpoint.name, 7, image=name)
    crop_id, crop = harness.node_of(prompt, "XMGIECropForEdit")
    prompt["92"] = {"class_type": "PreviewImage", "inputs": {"images": [crop_id, 0]}}
    run, _ = harness.check_edit_inside_predicted_region(serverless_runner, prompt, "xmgie_edit_large", np.array(big))
    (seen,) = [serverless_runner.read_image(image) for image in run.images("92")]
    working = crop["inputs"]["working_size"]
    assert max(seen.shape[:2]) == working < max(big.size), f"the model saw {seen.shape[:2]}, not a crop"
    assert all(side % int(crop["inputs"]["multiple"]) == 0 for side in seen.shape[:2])


def test_face_workflow_runs_and_scores_every_candidate(runner, tiny_checkpoint):
    prompt = harness.bundled_edit_prompt(FACE, tiny_checkpoint.name, 8 if runner.name == "http" else 9)
    harness.node_of(prompt, "XMGIEPFBSampler")[1]["inputs"]["candidates"] = 2
    harness.provide_images_and_prefix(runner, prompt, "unused")
    source = np.array(Image.open(harness.ASSETS_DIR / "xmgie_astronaut_source.png").convert("RGB"))
    run, _ = harness.check_edit_inside_predicted_region(runner, prompt, f"xmgie_edit_face_{runner.name}", source)
    score_id, _ = harness.node_of(prompt, "XMGIEIdentityScore")
    (report,) = run.outputs[score_id]["text"]
    assert "image 0: IPS" in report and "image 1: IPS" in report and "[dlib" in report, report
