"""MGIE in a real ComfyUI: the bundled xmgie_mgie_edit workflow (MGIE Guidance -> InstructPixToPixConditioning ->
the PFB Guider with text + image guidance -> SamplerCustomAdvanced -> GB) on a tiny converted MGIE U-Net and a tiny
MGIE folder, serverless and over HTTP; and the PFB Guider's dual guidance equal to ComfyUI's DualCFGGuider where
the mask covers everything (PFB then changes nothing)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import comfy_harness as harness
from fixtures.mgie_release import build_release, tiny_ip2p_unet
from fixtures.tiny_mgie import save_tiny_mgie

WORKFLOW = "api/xmgie_mgie_edit.json"
UNET_NAME = "xmgie_mgie_workflow_unet.safetensors"


@pytest.fixture(scope="module")
def mgie_files(comfy_host, tmp_path_factory):
    """(the converted U-Net file, registered in the in-process ComfyUI; a tiny MGIE folder whose edit head gives
    77 x 768 conditioning for the SD1.5-layout U-Net)."""
    import folder_paths

    from xmgie_core.mgie.convert import convert

    root = tmp_path_factory.mktemp("mgie_workflow")
    release = build_release(root / "release", unet=tiny_ip2p_unet(sd15_layout=True))
    result = convert(**release.args(), out_llm=root / "converted_llm", out_unet=root / "unet" / UNET_NAME,
                     progress=False, log=lambda _: None)
    folder_paths.add_model_folder_path("diffusion_models", str(result.unet_file.parent))
    folder = save_tiny_mgie(root / "LLM" / "mgie-tiny", edit_head={"out_dim": 768, "queries": 77})
    return result.unet_file, folder


def mgie_prompt(checkpoint: str, folder: str, seed: int) -> dict:
    prompt = harness.load_workflow(WORKFLOW)
    harness.node_of(prompt, "CheckpointLoaderSimple")[1]["inputs"]["ckpt_name"] = checkpoint
    harness.node_of(prompt, "UNETLoader")[1]["inputs"]["unet_name"] = UNET_NAME
    harness.node_of(prompt, "XMGIEMGIEGuidance")[1]["inputs"]["model_folder"] = folder
    harness.node_of(prompt, "BasicScheduler")[1]["inputs"]["steps"] = 2
    harness.node_of(prompt, "RandomNoise")[1]["inputs"]["noise_seed"] = seed
    return prompt


def test_mgie_workflow_wiring():
    prompt = harness.load_workflow(WORKFLOW)
    mgie_id, _ = harness.node_of(prompt, "XMGIEMGIEGuidance")
    ip2p_id, ip2p = harness.node_of(prompt, "InstructPixToPixConditioning")
    _, guider = harness.node_of(prompt, "XMGIEPFBGuider")
    assert (ip2p["inputs"]["positive"], ip2p["inputs"]["negative"]) == ([mgie_id, 0], [mgie_id, 1])
    assert (guider["inputs"]["positive"], guider["inputs"]["image_cond"], guider["inputs"]["negative"]) == \
        ([ip2p_id, 0], [ip2p_id, 1], [mgie_id, 1])
    assert (guider["inputs"]["cfg"], guider["inputs"]["image_cfg"]) == (7.5, 1.5)  # ml-mgie's demo


def test_mgie_workflow_runs(runner, tiny_checkpoint, mgie_files):
    unet_file, folder = mgie_files
    if runner.name == "http":  # the server has its own models folder
        target = runner.server.base / "models" / "diffusion_models"
        target.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(unet_file, target / UNET_NAME)
    prompt = mgie_prompt(tiny_checkpoint.name, str(folder), 3 if runner.name == "http" else 4)
    save_id = harness.provide_images_and_prefix(runner, prompt, f"xmgie_mgie_edit_{runner.name}")
    harness.check_edit_inside_only(runner, prompt, save_id)


def test_pfb_dual_guidance_equals_dual_cfg_guider_under_a_full_mask(comfy_host, tiny_checkpoint, mgie_files):
    import comfy_extras.nodes_custom_sampler as custom
    import nodes

    mappings = comfy_host.nodes.NODE_CLASS_MAPPINGS
    model = mappings["UNETLoader"]().load_unet(UNET_NAME, "default")[0]
    vae = nodes.CheckpointLoaderSimple().load_checkpoint(tiny_checkpoint.name)[2]
    image = torch.from_numpy(np.asarray(Image.open(harness.ASSETS_DIR / "xmgie_astronaut_source.png")
                                        .convert("RGB").resize((64, 64)), dtype=np.float32) / 255)[None]
    positive, negative, _ = mappings["XMGIEMGIEGuidance"]().guide(image, "make it dusk", str(mgie_files[1]), 0, 96,
                                                                   False)
    ip2p = mappings["InstructPixToPixConditioning"]
    ip2p_pos, ip2p_neg, _ = ip2p.execute(positive, negative, image, vae).result
    latent = {"samples": vae.encode(image)}
    noise = custom.RandomNoise().get_noise(7)[0]
    sampler = custom.KSamplerSelect().get_sampler("euler")[0]
    sigmas = custom.BasicScheduler().get_sigmas(model, "normal", 3, 1.0)[0]
    dual = custom.DualCFGGuider().get_guider(model, ip2p_pos, ip2p_neg, negative, 7.5, 1.5, "regular")[0]
    pfb = mappings["XMGIEPFBGuider"]().get_guider(model, ip2p_pos, negative, 7.5, torch.ones(1, 64, 64), "noised",
                                                  "auto", 0.0, 1.0, 0.5, True, False, 64, image_cond=ip2p_neg,
                                                  image_cfg=1.5)[0]
    run = custom.SamplerCustomAdvanced().sample
    want = run(noise, dual, sampler, sigmas, latent)[0]["samples"]
    got = run(noise, pfb, sampler, sigmas, latent)[0]["samples"]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    other = mappings["XMGIEPFBGuider"]().get_guider(model, ip2p_pos, negative, 7.5, torch.ones(1, 64, 64), "noised",
                                                    "auto", 0.0, 1.0, 0.5, True, False, 64, image_cond=ip2p_neg,
                                                    image_cfg=3.0)[0]
    assert not torch.allclose(run(noise, other, sampler, sigmas, latent)[0]["samples"], want, atol=1e-3)
