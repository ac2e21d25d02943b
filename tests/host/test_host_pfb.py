"""PFB in a real ComfyUI: the sampler node and the guider (through SamplerCustomAdvanced) on the tiny SD1.5
checkpoint with five samplers and both source modes; the input MODEL untouched; interruption; PFB with CAM
(the source branch is never masked); an inpainting U-Net whose source branch gets the same concat inputs;
layer maps of SD1.5 and SDXL U-Nets; user errors; the source cache; the bundled PFB workflow."""

from __future__ import annotations

import logging
import sys

import numpy as np
import pytest
import torch

import comfy_harness as harness

PROMPT = "a photo of a man wearing a red scarf"
SAMPLERS = ["euler", "euler_ancestral", "dpmpp_2m", "ddim", "uni_pc"]
WORKFLOW = "api/xmgie_pfb_edit.json"


@pytest.fixture(scope="module")
def sd15(comfy_host, tiny_checkpoint):
    return comfy_host.nodes.CheckpointLoaderSimple().load_checkpoint(tiny_checkpoint.name)[:3]


@pytest.fixture(scope="module")
def conds(comfy_host, sd15):
    encode = comfy_host.nodes.CLIPTextEncode().encode
    clip = sd15[1]
    return {name: encode(clip, text)[0] for name, text in
            (("positive", PROMPT), ("negative", "blurry"), ("source", "a photo of a man"))}


@pytest.fixture(scope="module")
def pfb_module(comfy_host):
    """The pack's nodes/pfb.py as ComfyUI loaded it (its SOURCE_CACHE)."""
    return sys.modules[comfy_host.nodes.NODE_CLASS_MAPPINGS["XMGIEPFBSampler"].__module__]


def source_latent(seed: int = 0, size: int = 16) -> dict:
    return {"samples": torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(seed))}


def box_mask(size: int = 128) -> torch.Tensor:
    mask = torch.zeros(1, size, size)
    mask[:, size // 4: 3 * size // 4, size // 4: size // 2] = 1
    return mask


def outside(size: int = 16) -> torch.Tensor:
    """Latent cells entirely outside box_mask (where a latent blend to the end keeps the source exactly)."""
    return torch.nn.functional.adaptive_avg_pool2d(box_mask()[None], size)[0, 0] == 0


def pfb_args(conds, **change) -> dict:
    args = dict(positive=conds["positive"], negative=conds["negative"], latent_image=source_latent(), seed=3, steps=3,
                cfg=7.0, sampler_name="euler", scheduler="normal", denoise=1.0, mask=box_mask(),
                source_mode="noised", layers="auto", outside_weight=0.0, blend_end_percent=1.0,
                latent_blend_end_percent=1.0, soft_edge=True, cache=False, cache_mb=256, source=conds["source"])
    return {**args, **change}


def run_sampler(comfy_host, model, conds, **change) -> torch.Tensor:
    node = comfy_host.nodes.NODE_CLASS_MAPPINGS["XMGIEPFBSampler"]()
    return node.sample(model, **pfb_args(conds, **change))[0]["samples"]


@pytest.mark.parametrize("mode", ["noised", "inverted"])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_sampler_node_edits_inside_and_keeps_the_source_outside(comfy_host, sd15, conds, sampler, mode):
    model = sd15[0]
    options = repr(model.model_options)
    src = source_latent()["samples"]
    out = run_sampler(comfy_host, model, conds, sampler_name=sampler, source_mode=mode)
    assert out.shape == src.shape and torch.isfinite(out).all()
    keep = outside()
    assert torch.equal(out[..., keep], src[..., keep]), "outside the mask the latent must be the source exactly"
    assert (out[..., ~keep] != src[..., ~keep]).any(), "nothing was edited inside the mask"
    assert repr(model.model_options) == options, "the input MODEL was changed"


@pytest.mark.parametrize("mode", ["noised", "inverted"])
def test_guider_in_sampler_custom_advanced_equals_the_sampler_node(comfy_host, sd15, conds, mode):
    nodes = comfy_host.nodes.NODE_CLASS_MAPPINGS
    model = sd15[0]
    args = pfb_args(conds, source_mode=mode, sampler_name="dpmpp_2m", latent_blend_end_percent=0.5)
    guider = nodes["XMGIEPFBGuider"]().get_guider(
        model, args["positive"], args["negative"], args["cfg"], args["mask"], mode, "auto", 0.0, 1.0, 0.5, True,
        False, 256, source=args["source"])[0]

    def call(name, *a):
        cls = nodes[name]
        return getattr(cls(), cls.FUNCTION)(*a)[0]

    result = call("SamplerCustomAdvanced", call("RandomNoise", args["seed"]), guider, call("KSamplerSelect", "dpmpp_2m"),
                  call("BasicScheduler", model, "normal", args["steps"], 1.0), args["latent_image"])
    direct = run_sampler(comfy_host, model, conds, source_mode=mode, sampler_name="dpmpp_2m",
                         latent_blend_end_percent=0.5)
    assert torch.equal(result["samples"], direct)


def test_interrupt_stops_sampling_and_inversion(comfy_host, sd15, conds):
    """A user's interrupt (POST /interrupt) during the edit steps, and during the inversion, stops the run."""
    import comfy.model_management as mm

    model = sd15[0].clone()
    interrupt = harness.interrupt_on_call(2)
    model.set_model_unet_function_wrapper(interrupt)
    for mode in ("noised", "inverted"):
        interrupt.calls.clear()
        with pytest.raises(mm.InterruptProcessingException):
            run_sampler(comfy_host, model, conds, source_mode=mode, steps=6)
        assert len(interrupt.calls) == 2 and not mm.processing_interrupted()


def count_attn2(model) -> int:
    return sum(1 for name, _ in model.model.diffusion_model.named_modules() if name.endswith("attn2"))


def test_cam_masks_the_edit_branch_only(comfy_host, sd15, conds, monkeypatch):
    """With cfg 1 each step is one source pass and one edit pass (the cond row alone): CAM's masked attention runs
    once per cross-attention layer per step, i.e. never in the source pass, and it changes the edit."""
    model, clip, _ = sd15
    cam_node = comfy_host.nodes.NODE_CLASS_MAPPINGS["XMGIECrossAttentionMask"]()
    cam_model, positive = cam_node.patch(model, clip, PROMPT, "red scarf", box_mask(), "renormalized", 0.5, 1.0,
                                         True, True, True, 0.0, 1.0)
    cam_module = sys.modules[type(cam_model.model_options["transformer_options"]["optimized_attention_override"])
                             .__module__]
    masked_rows = []
    real = cam_module.masked_cross_attention
    monkeypatch.setattr(cam_module, "masked_cross_attention",
                        lambda q, *a, **k: masked_rows.append(q.shape[0]) or real(q, *a, **k))
    steps = 3
    with_cam = run_sampler(comfy_host, cam_model, {**conds, "positive": positive}, cfg=1.0, steps=steps,
                           latent_blend_end_percent=0.0)
    assert masked_rows == [1] * (steps * count_attn2(model))
    without = run_sampler(comfy_host, model, conds, cfg=1.0, steps=steps, latent_blend_end_percent=0.0)
    assert not torch.equal(with_cam, without)


def test_source_cache_skips_the_source_pass_and_is_bit_identical(comfy_host, sd15, conds, pfb_module):
    model = sd15[0].clone()
    calls = []
    model.set_model_unet_function_wrapper(
        lambda apply_model, args: calls.append(args["input"].shape[0]) or apply_model(args["input"], args["timestep"],
                                                                                        **args["c"]))
    pfb_module.SOURCE_CACHE.clear()
    first = run_sampler(comfy_host, model, conds, cache=True, steps=4)
    assert calls == [1, 2] * 4  # per step: the source row, then cond + uncond
    calls.clear()
    again = run_sampler(comfy_host, model, conds, cache=True, steps=4)
    assert calls == [2] * 4 and torch.equal(first, again)
    calls.clear()
    run_sampler(comfy_host, model, conds, cache=True, steps=4, seed=99, mask=torch.ones(1, 128, 128))
    assert calls == [2] * 4  # new seed and mask, same source: still cached
    run_sampler(comfy_host, model, conds, cache=False, steps=4)
    assert len(pfb_module.SOURCE_CACHE) == 0  # cache off frees it


def test_layers_map_onto_sd15_and_sdxl_unets(comfy_host):
    """Reduced-width U-Nets with SD1.5's and SDXL's block layouts (built in code): the default layers are the
    two coarsest grids, named as ComfyUI numbers the blocks."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    unet_host = sys.modules[comfy_host.nodes.NODE_CLASS_MAPPINGS["XMGIEPFBSampler"].__module__.replace(
        "nodes.pfb", "xmgie_core.hosts.comfy.unet")]
    common = dict(in_channels=4, out_channels=4, model_channels=32, num_head_channels=8, context_dim=32,
                  use_spatial_transformer=True, use_linear_in_transformer=True, operations=comfy.ops.disable_weight_init)
    sd15 = UNetModel(image_size=32, num_res_blocks=2, channel_mult=[1, 2, 4, 4], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                     transformer_depth_output=[0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1], transformer_depth_middle=1, **common)
    sdxl = UNetModel(image_size=32, num_res_blocks=2, channel_mult=[1, 2, 4], transformer_depth=[0, 0, 1, 1, 1, 1],
                     transformer_depth_output=[0, 0, 0, 1, 1, 1, 1, 1, 1], transformer_depth_middle=1, **common)
    assert unet_host.layout(sd15).default_layers() == [
        "input_7", "input_8", "input_9", "input_10", "input_11", "middle", *(f"output_{k}" for k in range(5))]
    assert unet_host.layout(sdxl).default_layers() == [
        *(f"input_{k}" for k in range(4, 9)), "middle", *(f"output_{k}" for k in range(5))]


@pytest.mark.parametrize("change, message", [
    ({"layers": "output_20"}, "This model has no layer output_20. Its layers are: input_0, input_1, middle, output_0."),
    ({"mask": torch.ones(1, 64, 128)}, "The PFB mask is 64x128 .* aspect ratios differ"),
    ({"mask": torch.ones(3, 128, 128)}, "The PFB mask has batch 3 but the latent batch is 1"),
    ({"latent_image": {"samples": torch.randn(1, 16, 16, 16)}}, "this model works on \\[batch, 4, height, width\\]"),
    ({"mask": torch.full((1, 128, 128), float("nan"))}, "The PFB mask contains NaN"),
    ({"latent_blend_end_percent": 1.5}, "latent_blend_end_percent must be between 0 and 1"),
])
def test_user_errors(comfy_host, sd15, conds, change, message):
    with pytest.raises(ValueError, match=message):
        run_sampler(comfy_host, sd15[0], conds, **change)


def test_empty_mask_returns_the_source_with_a_warning(comfy_host, sd15, conds, caplog):
    latent = source_latent()
    with caplog.at_level(logging.WARNING):
        out = run_sampler(comfy_host, sd15[0], conds, mask=torch.zeros(1, 128, 128), latent_image=latent)
    assert torch.equal(out, latent["samples"]) and "mask is empty" in caplog.text


@pytest.mark.parametrize("latent_end", [0.5, 1.0])
def test_guider_with_an_empty_mask_returns_the_source_exactly(comfy_host, sd15, conds, latent_end, caplog):
    """The Guider route (SamplerCustomAdvanced) keeps the log's promise too, at the default latent blend end."""
    nodes = comfy_host.nodes.NODE_CLASS_MAPPINGS
    model, latent = sd15[0], source_latent(seed=5)
    with caplog.at_level(logging.WARNING):
        guider = nodes["XMGIEPFBGuider"]().get_guider(
            model, conds["positive"], conds["negative"], 7.0, torch.zeros(1, 128, 128), "noised", "auto", 0.0, 1.0,
            latent_end, True, False, 256, source=conds["source"])[0]

    def call(name, *a):
        cls = nodes[name]
        return getattr(cls(), cls.FUNCTION)(*a)[0]

    result = call("SamplerCustomAdvanced", call("RandomNoise", 11), guider, call("KSamplerSelect", "euler"),
                  call("BasicScheduler", model, "normal", 3, 1.0), latent)
    assert torch.equal(result["samples"], latent["samples"]) and "mask is empty" in caplog.text


@pytest.fixture(scope="module")
def inpaint_unet(comfy_host, tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint's U-Net widened to 9 input channels (the inpainting layout), loaded by UNETLoader."""
    import folder_paths
    from safetensors.torch import load_file, save_file

    sd = load_file(str(tiny_checkpoint))
    prefix = "model.diffusion_model."
    unet = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    w = unet["input_blocks.0.0.weight"]
    extra = torch.randn(w.shape[0], 5, *w.shape[2:], generator=torch.Generator().manual_seed(4)).to(w) * 0.1
    unet["input_blocks.0.0.weight"] = torch.cat([w, extra], dim=1).contiguous()
    folder = tmp_path_factory.mktemp("diffusion_models")
    save_file(unet, str(folder / "xmgie_tiny_inpaint.safetensors"))
    folder_paths.add_model_folder_path("diffusion_models", str(folder), is_default=True)
    return comfy_host.nodes.UNETLoader().load_unet("xmgie_tiny_inpaint.safetensors", "default")[0]


def test_inpainting_unet_source_branch_gets_the_concat_inputs(comfy_host, sd15, conds, inpaint_unet):
    """Through InpaintModelConditioning, and with a source conditioning that lacks the concat inputs: every U-Net
    call (source branch included) gets the same concat channels as the edit."""
    _, _, vae = sd15
    assert inpaint_unet.model.diffusion_model.input_blocks[0][0].weight.shape[1] == 9
    pixels = torch.rand(1, 128, 128, 3, generator=torch.Generator().manual_seed(6))
    positive, negative, latent = comfy_host.nodes.NODE_CLASS_MAPPINGS["InpaintModelConditioning"]().encode(
        conds["positive"], conds["negative"], pixels, vae, box_mask(), True)
    model = inpaint_unet.clone()
    concats = []
    model.set_model_unet_function_wrapper(
        lambda apply_model, args: concats.append(args["c"]["c_concat"].clone()) or apply_model(
            args["input"], args["timestep"], **args["c"]))
    for source in (None, conds["source"]):
        concats.clear()
        out = run_sampler(comfy_host, model, conds, positive=positive, negative=negative, latent_image=latent,
                          source=source, steps=2)
        assert torch.isfinite(out).all() and len(concats) == 4
        per_row = [c[:1] for c in concats]
        assert all(torch.equal(c, per_row[0]) for c in per_row), "the source branch got other concat inputs"


def pfb_workflow(runner, ckpt_name: str) -> tuple[dict, str]:
    prompt = harness.load_workflow(WORKFLOW)
    _, loader = harness.node_of(prompt, "CheckpointLoaderSimple")
    loader["inputs"]["ckpt_name"] = ckpt_name
    _, sampler = harness.node_of(prompt, "XMGIEPFBSampler")
    sampler["inputs"]["steps"] = 2
    save_id = harness.provide_images_and_prefix(runner, prompt, f"xmgie_pfb_edit_{runner.name}")
    return prompt, save_id


def test_pfb_workflow_wiring():
    """CAM's model and positive feed the PFB sampler; one mask drives CAM, PFB and GB; the source description
    drives the source branch; the VAE-encoded source is the latent."""
    prompt = harness.load_workflow(WORKFLOW)
    cam_id, cam = harness.node_of(prompt, "XMGIECrossAttentionMask")
    _, pfb = harness.node_of(prompt, "XMGIEPFBSampler")
    _, gb = harness.node_of(prompt, "XMGIEGBCompositor")
    assert pfb["inputs"]["model"] == [cam_id, 0] and pfb["inputs"]["positive"] == [cam_id, 1]
    assert pfb["inputs"]["mask"] == cam["inputs"]["mask"] == gb["inputs"]["mask"]
    assert prompt[pfb["inputs"]["latent_image"][0]]["class_type"] == "VAEEncode"
    source = prompt[pfb["inputs"]["source"][0]]
    assert source["class_type"] == "CLIPTextEncode" and "red scarf" not in source["inputs"]["text"]


def test_pfb_workflow_runs_and_keeps_the_source_outside(runner, tiny_checkpoint):
    prompt, save_id = pfb_workflow(runner, tiny_checkpoint.name)
    out = harness.check_edit_inside_only(runner, prompt, save_id)
    assert np.isfinite(out).all()


@pytest.fixture(scope="module")
def astronaut_faces(comfy_host):
    """The astronaut's ID_EMBED (dlib backend) and the image."""
    from skimage import data

    image = torch.from_numpy(data.astronaut().astype(np.float32) / 255.0)[None]
    embed, _ = comfy_host.nodes.NODE_CLASS_MAPPINGS["XMGIEIDEmbedder"]().embed(image, "dlib", -1, 8.0, False)
    return embed, image


def test_face_protection_keeps_the_overlapped_face_the_source(comfy_host, sd15, conds, astronaut_faces):
    """An edit region over the astronaut's lower face and neck: with id_embed at strength 1 and the latent
    blended to the end, latent cells inside the face are the source exactly; without it they are edited."""
    from xmgie_core.identity.masks import face_mask

    embed, _ = astronaut_faces
    mask = torch.zeros(1, 512, 512)
    mask[:, 120:300, 100:340] = 1  # 45% of the face: the lower face and the neck
    face = face_mask(embed.faces[0], 512, 512) > 1 - 1e-5
    cells = (torch.nn.functional.adaptive_avg_pool2d((face & mask[0].bool()).float()[None], 64)[0] == 1)
    assert cells.any()
    latent = source_latent(size=64)
    protected, _, report = run_full(comfy_host, sd15[0], conds, mask=mask, latent_image=latent, id_embed=embed)
    plain = run_sampler(comfy_host, sd15[0], conds, mask=mask, latent_image=latent)
    src = latent["samples"]
    assert torch.equal(protected["samples"][..., cells], src[..., cells]) and "protected" in report
    assert not torch.equal(plain[..., cells], src[..., cells])


def run_full(comfy_host, model, conds, **change):
    node = comfy_host.nodes.NODE_CLASS_MAPPINGS["XMGIEPFBSampler"]()
    return node.sample(model, **pfb_args(conds, **change))


class BlurringVAE:
    """Stands in for a VAE in best-of-N: candidate i decodes to the astronaut blurred by BLURS[i], so the
    candidates' identity scores have a known order; it records the latents it was given."""

    BLURS = (4.0, 0.0, 1.5)

    def __init__(self, image: torch.Tensor):
        self.image, self.seen = image, None

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        from PIL import Image, ImageFilter

        self.seen = samples.clone()
        pil = Image.fromarray((self.image[0].numpy() * 255).round().astype(np.uint8))
        return torch.stack([torch.from_numpy(np.asarray(pil.filter(ImageFilter.GaussianBlur(b))).astype(np.float32)
                                             / 255.0) for b in self.BLURS[:samples.shape[0]]])


def test_best_of_n_returns_the_candidates_sorted_by_identity(comfy_host, sd15, conds, astronaut_faces):
    embed, image = astronaut_faces
    vae = BlurringVAE(image)
    latent, ips, report = run_full(comfy_host, sd15[0], conds, id_embed=embed, candidates=3, vae=vae,
                                   mask=box_mask(512))
    assert latent["samples"].shape[0] == 3 and ips == sorted(ips, reverse=True) and len(set(ips)) == 3
    assert ips[0] == pytest.approx(1.0, abs=1e-6)  # the unblurred candidate
    order = [1, 2, 0]  # by blur: none, 1.5, 4
    assert all(torch.equal(latent["samples"][k], vae.seen[i]) for k, i in enumerate(order))
    assert report.splitlines()[-3].startswith("candidate 0 (image 1: IPS 1.000")
    assert not torch.equal(vae.seen[0], vae.seen[1])  # different noise per candidate
    with pytest.raises(ValueError, match="connect the vae input"):
        run_full(comfy_host, sd15[0], conds, id_embed=embed, candidates=2, mask=box_mask(512))
    two = {"samples": torch.randn(2, 4, 16, 16)}
    with pytest.raises(ValueError, match="the latent batch is 2"):
        run_full(comfy_host, sd15[0], conds, id_embed=embed, candidates=2, vae=vae, latent_image=two,
                 mask=box_mask(512))
