"""The XMGIE Region Predictor in a real ComfyUI: ComfyUI's own CLIP vision model as the learned mode's encoder (same
features as transformers'), the learned mode from models/xmgie, and the bundled region workflow with each zero-shot
mode feeding CAM, PFB and GB — serverless and over HTTP, the result equal to the source outside the predicted region."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

import comfy_harness as harness
from fixtures import tiny_models
from fixtures.tiny_clipseg import save_tiny_clipseg
from fixtures.tiny_region import save_tiny_predictor, save_tiny_t5

WORKFLOW = "api/xmgie_region_edit.json"
MODES = ("noise-difference", "attention", "clipseg")


@pytest.fixture(scope="module")
def comfy_clip_vision(comfy_host, tmp_path_factory):
    """A ComfyUI ClipVisionModel with the tiny transformers CLIP vision's weights (and that model)."""
    import comfy.clip_vision

    reference = tiny_models.tiny_clip_vision()
    config = {"hidden_act": "quick_gelu", "model_type": "clip_vision_model", "num_channels": 3,
              **{k: getattr(reference.config, k) for k in ("hidden_size", "image_size", "intermediate_size",
                                                           "num_attention_heads", "num_hidden_layers", "patch_size",
                                                           "projection_dim", "layer_norm_eps")}}
    path = tmp_path_factory.mktemp("clip_vision") / "tiny_clip_vision.json"
    path.write_text(json.dumps(config))
    cv = comfy.clip_vision.ClipVisionModel(str(path))
    missing, unexpected = cv.load_sd(reference.state_dict())
    assert not unexpected and all("position_ids" in k for k in missing)
    # ComfyUI keeps most weights in its text-encoder dtype (fp16 here): give the reference exactly the same values
    reference.load_state_dict({k: v.float() for k, v in cv.get_sd().items()}, strict=False)
    return cv, reference


def test_comfy_clip_vision_gives_the_same_patch_features_as_transformers(comfy_clip_vision):
    from xmgie_core.hosts.comfy.clip_vision import ComfyCLIPImageEncoder
    from xmgie_core.region.encoders import CLIPImageEncoder

    cv, reference = comfy_clip_vision
    pixels = torch.rand(2, 3, 48, 40)
    with torch.no_grad():
        ours, theirs = ComfyCLIPImageEncoder(cv)(pixels), CLIPImageEncoder(reference)(pixels)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.float().cpu(), b, atol=1e-4, rtol=1e-4)


def test_learned_mode_from_models_xmgie(comfy_host, comfy_clip_vision, tmp_path):
    import folder_paths

    folder_paths.add_model_folder_path("xmgie", str(tmp_path / "xmgie"))
    save_tiny_predictor(tmp_path / "xmgie" / "tiny_region.safetensors")
    t5 = save_tiny_t5(tmp_path / "text_encoders" / "tiny-t5")
    cls = comfy_host.nodes.NODE_CLASS_MAPPINGS["XMGIERegionPredictor"]
    assert "tiny_region.safetensors" in cls.INPUT_TYPES()["optional"]["predictor"][0]
    node = cls()
    args = dict(mode="learned", instruction="make the cup red", target_description="", source_description="",
                edit_words="", threshold=0.5, grow=0, smoothing=0.0, seed=0, draws=1, steps=1, strength=0.5,
                clip_vision=comfy_clip_vision[0], predictor="tiny_region.safetensors", t5_folder=str(t5))
    mask, soft, preview = node.predict(torch.rand(2, 40, 52, 3), **args)["result"]
    assert mask.shape == soft.shape == (2, 40, 52) and preview.shape == (2, 40, 52, 3)
    assert torch.equal(mask, (soft >= 0.5).float())
    models = sys.modules[cls.__module__.replace("nodes.region_predictor", "xmgie_core.model_cache")].MODELS
    node.predict(torch.rand(1, 32, 32, 3), **{**args, "keep_loaded": True})
    assert len(models.keys("region-learned")) == 1
    node.predict(torch.rand(1, 32, 32, 3), **args)
    assert len(models.keys("region-learned")) == 0
    with pytest.raises(ValueError, match="'missing.safetensors' not found in ComfyUI/models/xmgie"):
        node.predict(torch.rand(1, 32, 32, 3), **{**args, "predictor": "missing.safetensors"})


@pytest.fixture(scope="module")
def clipseg_dir(tmp_path_factory):
    return save_tiny_clipseg(tmp_path_factory.mktemp("clipseg") / "clipseg-tiny")


def region_prompt(mode: str, checkpoint: str, clipseg: str, seed: int) -> dict:
    """The bundled workflow in `mode` with 2 sampling steps."""
    prompt = harness.load_workflow(WORKFLOW)
    _, loader = harness.node_of(prompt, "CheckpointLoaderSimple")
    loader["inputs"]["ckpt_name"] = checkpoint
    _, sampler = harness.node_of(prompt, "XMGIEPFBSampler")
    sampler["inputs"].update(steps=2, seed=seed)
    region_id, region = harness.node_of(prompt, "XMGIERegionPredictor")
    region["inputs"].update(mode=mode, draws=2, steps=2, seed=seed, clipseg_folder=clipseg,
                            threshold=0.5 if mode != "clipseg" else 0.45)
    return prompt


def test_region_workflow_wiring():
    prompt = harness.load_workflow(WORKFLOW)
    region_id, region = harness.node_of(prompt, "XMGIERegionPredictor")
    instr_id, _ = harness.node_of(prompt, "XMGIEInstruction")
    assert (region["inputs"]["target_description"], region["inputs"]["source_description"],
            region["inputs"]["edit_words"]) == ([instr_id, 2], [instr_id, 1], [instr_id, 3])
    for cls, key in (("XMGIECrossAttentionMask", "mask"), ("XMGIEPFBSampler", "mask"), ("XMGIEGBCompositor", "mask")):
        assert harness.node_of(prompt, cls)[1]["inputs"][key] == [region_id, 0]


@pytest.mark.parametrize("mode", MODES)
def test_region_workflow_runs_each_zero_shot_mode(runner, tiny_checkpoint, clipseg_dir, mode):
    seed = MODES.index(mode) + (10 if runner.name == "http" else 0)
    prompt = region_prompt(mode, tiny_checkpoint.name, str(clipseg_dir), seed)
    save_id = harness.provide_images_and_prefix(runner, prompt, f"xmgie_region_edit_{mode}_{runner.name}")
    region_id, _ = harness.node_of(prompt, "XMGIERegionPredictor")
    prompt["90"] = {"class_type": "MaskToImage", "inputs": {"mask": [region_id, 0]}}
    prompt["91"] = {"class_type": "SaveImage", "inputs": {"images": ["90", 0], "filename_prefix": f"mask_{mode}"}}
    source = np.array(Image.open(harness.ASSETS_DIR / prompt["1"]["inputs"]["image"]).convert("RGB"))
    run = runner.run(prompt)
    out = runner.read_image(run.images(save_id)[0])
    region = runner.read_image(run.images("91")[0])[..., 0] >= 128
    assert out.shape == source.shape and region.shape == source.shape[:2]
    assert region.any() and not region.all(), f"{mode}: the predicted region is {'full' if region.any() else 'empty'}"
    far_outside = ndimage.distance_transform_edt(~region) > 17
    problem = harness.pixel_mismatch(out, source, far_outside)
    assert not problem, f"{mode}: far outside the predicted region the result is not the source: {problem}"
