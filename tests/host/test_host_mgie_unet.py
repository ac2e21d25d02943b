"""Host tier: the U-Net file `python -m xmgie_core.mgie convert` writes is loaded by ComfyUI's own UNETLoader as an
SD1.5 InstructPix2Pix model, computes what the diffusers U-Net it came from computes, and samples through
InstructPixToPixConditioning in a real prompt.

The U-Net is a reduced SD1.5 layout ComfyUI's detection recognises (320 channels, context 768, conv proj_in) with
8 input channels and 3 levels, so every key pattern of the real one (attention or not, down/upsamplers, an
upsampler after an attention) goes through ComfyUI's loader.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import comfy_harness as harness
from fixtures.mgie_release import build_release, tiny_ip2p_unet

UNET_NAME = "xmgie_mgie_tiny_unet.safetensors"


@pytest.fixture(scope="module")
def mgie_unet(comfy_host: harness.ComfyHost, tmp_path_factory: pytest.TempPathFactory):
    """(the diffusers U-Net, the converted file), the file registered in ComfyUI's diffusion_models folder."""
    import folder_paths

    from xmgie_core.mgie.convert import convert

    root = tmp_path_factory.mktemp("mgie_host")
    unet = tiny_ip2p_unet(sd15_layout=True)
    release = build_release(root / "release", unet=unet)
    result = convert(**release.args(), out_llm=root / "models" / "LLM" / "mgie_tiny",
                     out_unet=root / "models" / "diffusion_models" / UNET_NAME, progress=False, log=lambda _: None)
    folder_paths.add_model_folder_path("diffusion_models", str(result.unet_file.parent))
    return unet, result.unet_file


@pytest.fixture(scope="module")
def loaded(comfy_host: harness.ComfyHost, mgie_unet):
    """The MODEL ComfyUI's UNETLoader node returns for the converted file."""
    return comfy_host.nodes.NODE_CLASS_MAPPINGS["UNETLoader"]().load_unet(UNET_NAME, "default")[0]


def test_unet_loader_detects_instructpix2pix(loaded, mgie_unet):
    import comfy.model_base
    import comfy.supported_models
    from safetensors.torch import load_file

    assert isinstance(loaded.model, comfy.model_base.SD15_instructpix2pix)
    assert type(loaded.model.model_config) is comfy.supported_models.SD15_instructpix2pix
    assert loaded.model.model_config.unet_config["in_channels"] == 8
    written = load_file(str(mgie_unet[1]))
    assert set(written) == set(loaded.model.diffusion_model.state_dict()), "file keys != ComfyUI's U-Net keys"


def test_same_output_as_the_diffusers_unet(loaded, mgie_unet):
    """ComfyUI's U-Net on the converted weights = the diffusers U-Net on the same (fp16-rounded) weights."""
    unet = mgie_unet[0]
    gen = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 8, 16, 16, generator=gen), torch.randn(2, 77, 768, generator=gen)
    t = torch.tensor([999.0, 250.0])
    reference = unet.to(torch.float16).to(torch.float32)  # the file is fp16 (the converter's default)
    with torch.no_grad():
        want = reference(x, t, encoder_hidden_states=context).sample
        diffusion_model = loaded.model.diffusion_model
        dtype = next(diffusion_model.parameters()).dtype
        got = diffusion_model(x.to(dtype), timesteps=t, context=context.to(dtype)).float()
    assert got.shape == want.shape == (2, 4, 16, 16)
    err = (got - want).abs().max().item()
    assert err <= 1e-4 * want.abs().max().item(), f"max |ComfyUI - diffusers| = {err}"


def test_mapping_equals_comfyui_for_the_full_sd15_instructpix2pix_layout(comfy_host):
    """Full-size SD1.5 with 8 input channels (meta tensors): ComfyUI detects it as SD15_instructpix2pix and its own
    diffusers -> LDM key map, on all 686 tensors, equals the converter's."""
    import comfy.model_detection
    import comfy.supported_models
    import comfy.utils
    from diffusers import UNet2DConditionModel

    from xmgie_core.mgie.unet_layout import diffusers_unet_to_ldm

    with torch.device("meta"):
        sd = UNet2DConditionModel(in_channels=8, cross_attention_dim=768, attention_head_dim=8).state_dict()
    mine = diffusers_unet_to_ldm(sd)
    ldm = {mine[k]: v for k, v in sd.items()}
    config = comfy.model_detection.detect_unet_config(ldm, "")
    assert type(comfy.model_detection.model_config_from_unet_config(config, ldm)) is \
        comfy.supported_models.SD15_instructpix2pix
    theirs = comfy.utils.unet_to_diffusers(config)  # also lists optional keys SD1.5 lacks (add_embedding, ...)
    assert set(sd) <= set(theirs)
    assert {k: theirs[k] for k in sd} == mine


def _ip2p_prompt(ckpt_name: str, image: str, prefix: str) -> dict:
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": UNET_NAME, "weight_dtype": "default"}},
        "2": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "give the man a red scarf", "clip": ["2", 1]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["2", 1]}},
        "5": {"class_type": "LoadImage", "inputs": {"image": image}},
        "6": {"class_type": "InstructPixToPixConditioning", "inputs": {
            "positive": ["3", 0], "negative": ["4", 0], "vae": ["2", 2], "pixels": ["5", 0]}},
        "7": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "seed": 7, "steps": 2, "cfg": 3.0, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["6", 0], "negative": ["6", 1], "latent_image": ["6", 2], "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["2", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": prefix}},
    }


def test_samples_in_an_instructpix2pix_prompt(comfy_host, mgie_unet, tiny_checkpoint: Path,
                                              serverless_runner: harness.InProcessRunner, tmp_path: Path):
    """UNETLoader (converted file) + CLIP/VAE of the tiny checkpoint -> InstructPixToPixConditioning -> KSampler.
    Same seed and text, another source image: another result (the image reaches the U-Net's extra 4 channels)."""
    results = []
    for i in range(2):
        source = tmp_path / f"xmgie_mgie_source_{i}.png"
        Image.fromarray((np.random.default_rng(i).random((64, 64, 3)) * 255).astype(np.uint8)).save(source)
        prompt = _ip2p_prompt(tiny_checkpoint.name, serverless_runner.provide_input(source), f"xmgie_mgie_ip2p_{i}")
        run = serverless_runner.run(prompt)
        results.append(serverless_runner.read_image(run.images("9")[0]))
    assert results[0].shape[:2] == (64, 64)
    assert not np.array_equal(results[0], results[1])
