"""SDXL in a real ComfyUI: a tiny SDXL-family checkpoint built at test time (Segmind Vega's U-Net layout, which
ComfyUI loads as model_base.SDXL with the 2048-d CLIP-L + CLIP-G context and the 2816-d size/pooled adm) runs the
bundled region and whole-edit workflows serverless and over HTTP, the photo the source bit for bit far outside the
predicted region; PFB's auto layers are the ones SDXL's blocks give; CAM finds the edit words at the same positions in
SDXL's CLIP-G and CLIP-L token lists and masks them on the 2048-d context."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

import comfy_harness as harness

REGION = "api/xmgie_region_edit.json"
EDIT = "api/xmgie_edit.json"
PROMPT = "a photo of a man wearing a (red scarf:1.2), standing in a snowy park"
SDXL_AUTO_LAYERS = [*(f"input_{k}" for k in range(4, 9)), "middle", *(f"output_{k}" for k in range(5))]
"""README's PFB default for SDXL: every layer on the U-Net's two coarsest grids."""


@pytest.fixture(scope="module")
def sdxl(comfy_host, tiny_sdxl_checkpoint):
    """(model, clip, vae) of the tiny SDXL checkpoint, loaded by CheckpointLoaderSimple."""
    return comfy_host.nodes.CheckpointLoaderSimple().load_checkpoint(tiny_sdxl_checkpoint.name)[:3]


@pytest.fixture(scope="module")
def conds(comfy_host, sdxl):
    encode = comfy_host.nodes.CLIPTextEncode().encode
    return {name: encode(sdxl[1], text)[0] for name, text in
            (("positive", PROMPT), ("negative", "blurry"), ("source", "a photo of a man standing in a snowy park"))}


def test_checkpoint_loads_as_an_sdxl(sdxl, conds):
    import comfy.latent_formats
    import comfy.model_base
    import comfy.supported_models

    model, clip, _ = sdxl
    assert type(model.model) is comfy.model_base.SDXL
    assert isinstance(model.model.model_config, comfy.supported_models.SDXL)
    assert isinstance(model.get_model_object("latent_format"), comfy.latent_formats.SDXL)
    unet = model.model.diffusion_model
    assert unet.label_emb[0][0].in_features == 2816
    attn2 = [m.attn2 for m in unet.modules() if hasattr(m, "attn2")]
    assert attn2 and {a.to_k.in_features for a in attn2} == {2048}
    assert (len(unet.input_blocks), len(unet.output_blocks)) == (9, 9)  # SDXL 1.0's block numbering
    g = clip.cond_stage_model.clip_g.transformer.text_model
    assert (len(g.encoder.layers), g.embeddings.token_embedding.weight.shape[1]) == (32, 1280)  # full CLIP-G
    cond, extra = conds["positive"][0]
    assert cond.shape == (1, 77, 2048) and extra["pooled_output"].shape == (1, 1280)
    assert torch.isfinite(cond).all() and torch.isfinite(extra["pooled_output"]).all()


# -- PFB ------------------------------------------------------------------------------------------------------------

def box_mask(size: int = 128) -> torch.Tensor:
    mask = torch.zeros(1, size, size)
    mask[:, size // 4: 3 * size // 4, size // 4: size // 2] = 1
    return mask


def run_pfb(comfy_host, model, conds, layers: str) -> torch.Tensor:
    node = comfy_host.nodes.NODE_CLASS_MAPPINGS["XMGIEPFBSampler"]()
    latent = {"samples": torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))}
    return node.sample(model, conds["positive"], conds["negative"], latent, seed=3, steps=2, cfg=7.0,
                       sampler_name="euler", scheduler="normal", denoise=1.0, mask=box_mask(), source_mode="noised",
                       layers=layers, outside_weight=0.0, blend_end_percent=1.0, latent_blend_end_percent=1.0,
                       soft_edge=True, cache=False, cache_mb=256, source=conds["source"])[0]["samples"]


def test_pfb_layers_are_sdxls(comfy_host, sdxl, conds):
    """The model's layers are SDXL's blocks; `auto` blends exactly input_4-8, middle, output_0-4 while sampling."""
    model = sdxl[0]
    with pytest.raises(ValueError, match="no layer input_9") as err:
        run_pfb(comfy_host, model, conds, "input_9")
    listed = re.search(r"Its layers are: (.*)\.", str(err.value)).group(1).split(", ")
    # output_k is h entering decoder block k + 1, so the last of the 9 decoder blocks gives none
    assert listed == [*(f"input_{k}" for k in range(9)), "middle", *(f"output_{k}" for k in range(8))]
    auto = run_pfb(comfy_host, model, conds, "auto")
    assert torch.equal(auto, run_pfb(comfy_host, model, conds, ", ".join(SDXL_AUTO_LAYERS)))
    assert not torch.equal(auto, run_pfb(comfy_host, model, conds, "input_4-8, middle"))  # the layers matter


# -- CAM ------------------------------------------------------------------------------------------------------------

def cam_patch(comfy_host, model, clip, mask: torch.Tensor, background: str = "snowy park"):
    node = comfy_host.nodes.NODE_CLASS_MAPPINGS["XMGIECrossAttentionMask"]()
    return node.patch(model, clip, PROMPT, "red scarf", mask, "renormalized", 0.5, 1.0, True, True, True, 0.0, 1.0,
                      background)


def test_cam_finds_the_words_in_both_sdxl_token_lists(comfy_host, sdxl):
    model, clip, _ = sdxl
    patched, positive = cam_patch(comfy_host, model, clip, box_mask())
    spec = patched.model_options["transformer_options"]["optimized_attention_override"].spec
    tokens = clip.tokenize(PROMPT)
    assert spec.prompt_tokens == 77 == positive[0][0].shape[1]
    for key in ("g", "l"):
        ids = [t[0] for t in tokens[key][0]]
        for positions, words in ((spec.edit_positions, "red scarf"), (spec.background_positions, "snowy park")):
            want = getattr(clip.tokenizer, f"clip_{key}").tokenizer(words)["input_ids"][1:-1]
            assert [ids[p] for p in positions] == want, (key, words)


def ksample(comfy_host, model, conds, seed: int = 7) -> torch.Tensor:
    latent = {"samples": torch.zeros(1, 4, 16, 16)}
    return comfy_host.nodes.common_ksampler(model, seed, 2, 7.0, "euler", "normal", conds["positive"],
                                            conds["negative"], latent)[0]["samples"]


def test_cam_masks_on_the_sdxl_context(comfy_host, sdxl, conds):
    """A box mask changes the sample; an all-ones mask (no background words, which it would keep out everywhere)
    gives the unpatched model's; the input MODEL's options are untouched."""
    model, clip, _ = sdxl
    options = repr(model.model_options)
    before = ksample(comfy_host, model, conds)
    scale = float(before.abs().max())
    boxed = ksample(comfy_host, cam_patch(comfy_host, model, clip, box_mask())[0], conds)
    full = ksample(comfy_host, cam_patch(comfy_host, model, clip, torch.ones(1, 128, 128), background="")[0], conds)
    assert float((boxed - before).abs().max()) / scale > 1e-4
    assert float((full - before).abs().max()) / scale <= 1e-5
    assert repr(model.model_options) == options


# -- The bundled workflows -----------------------------------------------------------------------------------------
# At 256 px (the sample photo halved, the edit's working size 256): each U-Net pass of SDXL's 320-channel top level
# costs four times less on the shared CPU; nothing the checks look at depends on the size.

SIZE = 256


@pytest.fixture(scope="module")
def small_source(tmp_path_factory):
    """(path, pixels) of the bundled sample photo at SIZE x SIZE."""
    path = tmp_path_factory.mktemp("sdxl_input") / "xmgie_astronaut_256.png"
    Image.open(harness.ASSETS_DIR / "xmgie_astronaut_source.png").convert("RGB").resize((SIZE, SIZE),
                                                                                        Image.LANCZOS).save(path)
    return path, np.array(Image.open(path))


def prepared(runner, prompt: dict, small_source) -> tuple[dict, np.ndarray]:
    """`prompt` on the small photo, its input files given to `runner`."""
    harness.provide_images_and_prefix(runner, prompt, "unused")
    harness.node_of(prompt, "LoadImage")[1]["inputs"]["image"] = runner.provide_input(small_source[0])
    return prompt, small_source[1]


def region_prompt(checkpoint: str, seed: int, mode: str) -> dict:
    prompt = harness.bundled_edit_prompt(REGION, checkpoint, seed)
    harness.node_of(prompt, "XMGIERegionPredictor")[1]["inputs"].update(mode=mode, steps=2)
    return prompt


def test_region_workflow_on_sdxl(runner, sdxl_checkpoint_name, small_source):
    """The bundled region workflow as shipped (noise-difference on the checkpoint's U-Net)."""
    prompt, source = prepared(runner, region_prompt(sdxl_checkpoint_name, 30 if runner.name == "http" else 31,
                                                    "noise-difference"), small_source)
    harness.check_edit_inside_predicted_region(runner, prompt, f"xmgie_sdxl_region_{runner.name}", source)


def test_region_workflow_attention_mode_on_sdxl(serverless_runner, tiny_sdxl_checkpoint, small_source):
    """The attention mode records the edit words' columns of SDXL's 2048-d cross-attention (CPU time: one
    transport; the transports differ in nothing the mode touches)."""
    prompt, source = prepared(serverless_runner, region_prompt(tiny_sdxl_checkpoint.name, 32, "attention"),
                              small_source)
    harness.check_edit_inside_predicted_region(serverless_runner, prompt, "xmgie_sdxl_region_attention", source)


def test_edit_workflow_on_sdxl(runner, sdxl_checkpoint_name, small_source):
    prompt = harness.bundled_edit_prompt(EDIT, sdxl_checkpoint_name, 40 if runner.name == "http" else 41)
    harness.node_of(prompt, "XMGIECropForEdit")[1]["inputs"]["working_size"] = SIZE
    prompt, source = prepared(runner, prompt, small_source)
    harness.check_edit_inside_predicted_region(runner, prompt, f"xmgie_sdxl_edit_{runner.name}", source)
