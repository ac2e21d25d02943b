"""The DiT editor workflows in a real ComfyUI: xmgie_kontext_edit (FLUX.1 Kontext) and xmgie_qwen_edit
(Qwen-Image-Edit 2509), serverless and over HTTP, with the users' file names in the test ComfyUI's model folders.

What is real: UNETLoader loads a detectable random checkpoint of each editor (tiny_dit.write_detectable_checkpoint:
real width, one block of each kind) from models/diffusion_models under the file name ComfyUI's template uses;
VAELoader loads a random VAE of the real layout (Flux's 16-channel ae; Qwen's Wan 2.1 VAE, 5-d latents) from
models/vae; every other node of the workflow runs as shipped (Crop For Edit, VAEEncode, CLIPTextEncode,
ReferenceLatent, FluxGuidance, ConditioningZeroOut, ModelSamplingAuraFlow, CFGNorm, the PFB Sampler, the stock
KSampler, VAEDecode, Stitch Edit, GB Compositor, the Drift Maps).

What the test's copy of each prompt substitutes (CPU only, 2 cores):
- DualCLIPLoader / CLIPLoader -> XMGIETestTextEncoder, a test-only node registered in the test's ComfyUI (in process,
  and as a custom node of the test's server) that returns a stand-in CLIP: T5-XXL + CLIP-L and Qwen2.5-VL 7B are too
  large to build. Its CONDITIONING has the real shapes (Flux: context [1, 8, 4096] + pooled [1, 768]; Qwen:
  [1, 8, 3584]), seeded from the text, so the edit and the negative differ.
- Qwen only: each TextEncodeQwenImageEditPlus -> CLIPTextEncode (same prompt, the stand-in CLIP) + ReferenceLatent
  with the VAE-encoded crop: at the workflow's own crop size that is the reference the Plus node makes
  (test_the_editors_own_nodes_keep_the_crop_size checks it with the real node), but at the test's crop size the
  Plus node would rescale the reference to 1 megapixel.
- Crop For Edit: editor sd at 64 px (multiple 16) instead of the editor's ~1 megapixel size, and 2 steps: a
  real-width DiT over 4096 + 4096 image tokens takes minutes per step on this CPU.
- The xMGIE Drift Map's margin: 17 (GB's edge_width + 1), so its report must say that nothing changed there.

Checked: the saved photo has the input's size, is the source bit for bit farther than edge_width + 1 outside the
mask, differs inside; the Drift Map of xMGIE reports no change beyond the margin (and its heat map is black there),
the editor alone changes pixels outside the mask (the stock path pasted back).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

import comfy_harness as harness
import tiny_dit as td

WORKFLOWS = {  # workflow -> (family, diffusion model file, VAE file), the names ComfyUI's own templates use
    "xmgie_kontext_edit": (td.FLUX, "flux1-dev-kontext_fp8_scaled.safetensors", "ae.safetensors"),
    "xmgie_qwen_edit": (td.QWEN, "qwen_image_edit_2509_fp8_e4m3fn.safetensors", "qwen_image_vae.safetensors"),
}
TEST_NODE = '''"""Test-only: a stand-in text encoder (CLIP) for FLUX.1 Kontext and Qwen-Image-Edit, real shapes."""
import zlib

import torch

SHAPES = {"flux": (4096, 768), "qwen_image": (3584, None)}  # (context width, pooled width)


class StandInCLIP:
    def __init__(self, family):
        self.width, self.pooled = SHAPES[family]

    def tokenize(self, text, **kwargs):
        return {"text": text}

    def encode_from_tokens_scheduled(self, tokens, **kwargs):
        gen = torch.Generator().manual_seed(zlib.crc32(tokens["text"].encode()))
        extras = {"pooled_output": torch.randn(1, self.pooled, generator=gen)} if self.pooled else {}
        return [[torch.randn(1, 8, self.width, generator=gen), extras]]


class XMGIETestTextEncoder:
    CATEGORY = "xmgie_test"
    FUNCTION = "load"
    RETURN_TYPES = ("CLIP",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": (list(SHAPES),)}}

    def load(self, family):
        return (StandInCLIP(family),)


NODE_CLASS_MAPPINGS = {"XMGIETestTextEncoder": XMGIETestTextEncoder}
'''
MARGIN = 17.0  # GB's edge_width 16 + 1


def write_random_vae(family: str, path) -> None:
    """A random-weight VAE of the real layout that comfy.sd.VAE detects: Flux's ae (AutoencodingEngine, 16 latent
    channels; the layout is fixed by comfy/sd.py's default ddconfig) or Qwen-Image's Wan 2.1 VAE (dim 96)."""
    from safetensors.torch import save_file

    if family == td.FLUX:
        from comfy.ldm.models.autoencoder import AutoencodingEngine

        ddconfig = {"double_z": True, "z_channels": 16, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                    "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
        model = AutoencodingEngine(
            regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
            encoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Encoder", "params": ddconfig},
            decoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Decoder", "params": ddconfig})
    else:
        from comfy.ldm.wan.vae import WanVAE

        model = WanVAE(dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                       temperal_downsample=[False, True, True], dropout=0.0)
    state = harness.randomized(model.state_dict(), torch.Generator().manual_seed(3))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in state.items()}, str(path))


@pytest.fixture(scope="module")
def dit_models(comfy_host, tmp_path_factory):
    """models/diffusion_models and models/vae with the users' file names, and the stand-in text encoder node, in the
    in-process ComfyUI."""
    import folder_paths

    root = tmp_path_factory.mktemp("dit_models")
    for family, unet, vae in WORKFLOWS.values():
        td.write_detectable_checkpoint(family, root / "diffusion_models" / unet)
        write_random_vae(family, root / "vae" / vae)
    for kind in ("diffusion_models", "vae"):
        folder_paths.add_model_folder_path(kind, str(root / kind))
    namespace: dict = {}
    exec(compile(TEST_NODE, "xmgie_test_text_encoder", "exec"), namespace)
    comfy_host.nodes.NODE_CLASS_MAPPINGS.update(namespace["NODE_CLASS_MAPPINGS"])
    yield root
    comfy_host.nodes.NODE_CLASS_MAPPINGS.pop("XMGIETestTextEncoder")


@pytest.fixture(scope="module")
def dit_client(comfy_root, dit_models, tmp_path_factory):
    """A ComfyUI server whose base directory holds the pack, the stand-in text encoder node and the model files."""
    base = harness.make_base_directory(tmp_path_factory.mktemp("dit_server_base"))
    for kind in ("diffusion_models", "vae"):
        (base / "models" / kind).mkdir(parents=True, exist_ok=True)
        for f in (dit_models / kind).iterdir():
            (base / "models" / kind / f.name).symlink_to(f)
    node_dir = base / "custom_nodes" / "xmgie_test_text_encoder"
    node_dir.mkdir()
    (node_dir / "__init__.py").write_text(TEST_NODE)
    server = harness.ComfyServer(comfy_root, base)
    server.start()
    try:
        yield harness.ComfyClient(server)
    finally:
        server.stop()


@pytest.fixture(params=["serverless", "http"])
def dit_runner(request, dit_models) -> harness.PromptRunner:
    """The shared `runner`'s two transports; the HTTP one is this module's server (it needs the test node)."""
    return request.getfixturevalue("serverless_runner" if request.param == "serverless" else "dit_client")


def substituted_prompt(name: str, seed: int) -> dict:
    """The bundled API workflow with the substitutions of the module docstring."""
    family, _, _ = WORKFLOWS[name]
    prompt = harness.load_workflow(f"api/{name}.json")
    for node_id, node in list(prompt.items()):
        if node["class_type"] in ("DualCLIPLoader", "CLIPLoader"):
            prompt[node_id] = {"class_type": "XMGIETestTextEncoder", "inputs": {"family": family}}
    encode_id, _ = harness.node_of(prompt, "VAEEncode")
    for node_id, node in list(prompt.items()):
        if node["class_type"] == "TextEncodeQwenImageEditPlus":
            text_id = str(100 + int(node_id))
            prompt[text_id] = {"class_type": "CLIPTextEncode",
                               "inputs": {"text": node["inputs"]["prompt"], "clip": node["inputs"]["clip"]}}
            prompt[node_id] = {"class_type": "ReferenceLatent",
                               "inputs": {"conditioning": [text_id, 0], "latent": [encode_id, 0]}}
    harness.node_of(prompt, "XMGIECropForEdit")[1]["inputs"].update(editor="sd", working_size=64, multiple="16")
    for sampler in ("XMGIEPFBSampler", "KSampler"):
        harness.node_of(prompt, sampler)[1]["inputs"].update(steps=2, seed=seed)
    return prompt


def drift_nodes(prompt: dict) -> tuple[str, str]:
    """(id of the Drift Map of the xMGIE result, id of the one of the editor alone)."""
    gb_id, _ = harness.node_of(prompt, "XMGIEGBCompositor")
    drifts = {n["inputs"]["edited"][0] == gb_id: nid for nid, n in prompt.items()
              if n["class_type"] == "XMGIEDriftMap"}
    return drifts[True], drifts[False]


def max_change(report: str) -> float:
    (value,) = re.findall(r"max \|change\| ([0-9.]+)", report)
    return float(value)


@pytest.mark.parametrize("name", list(WORKFLOWS))
def test_dit_workflow_runs_and_keeps_the_photo_outside_the_mask(dit_runner, name):
    prompt = substituted_prompt(name, 11 if dit_runner.name == "http" else 12)
    save_id = harness.provide_images_and_prefix(dit_runner, prompt, f"{name}_{dit_runner.name}")
    ours, alone = drift_nodes(prompt)
    prompt[ours]["inputs"]["margin"] = MARGIN
    expected = harness.composite_expectation(prompt)
    run = dit_runner.run(prompt)
    (image,) = run.images(save_id)
    out = dit_runner.read_image(image)
    assert out.shape == expected.source.shape
    problem = harness.pixel_mismatch(out, expected.source, expected.far_outside)
    assert not problem, f"far outside the mask the result is not the source: {problem}"
    assert (expected.region & (out != expected.source).any(axis=-1)).any(), "the edit did not arrive"

    (report,) = run.outputs[ours]["text"]
    assert report.startswith("image 0: outside the mask") and max_change(report) == 0.0 and "PSNR inf" in report
    (heat,) = [dit_runner.read_image(entry) for entry in run.outputs[ours]["images"]]
    assert heat.shape == expected.source.shape and not heat[expected.far_outside].any(), "heat map not black"
    (alone_report,) = run.outputs[alone]["text"]
    assert max_change(alone_report) > 0, f"the editor alone changed nothing outside the mask: {alone_report}"
    (alone_heat,) = [dit_runner.read_image(entry) for entry in run.outputs[alone]["images"]]
    assert alone_heat[~expected.region].any(), "the editor alone's drift does not show on its heat map"


def test_the_editors_own_nodes_keep_the_crop_size(comfy_host, dit_models):
    """At Crop For Edit's DiT sizes the editors' own nodes leave the crop as it is: FluxKontextImageScale keeps its
    size (it is a Kontext bucket), and TextEncodeQwenImageEditPlus VAE-encodes exactly the crop's pixels as the
    reference (so the reference latent and the generated latent share one grid)."""
    mappings = comfy_host.nodes.NODE_CLASS_MAPPINGS
    crop_node = mappings["XMGIECropForEdit"]()
    clip = mappings["XMGIETestTextEncoder"]().load("qwen_image")[0]

    class RecordingVAE:
        def __init__(self) -> None:
            self.seen: list[torch.Tensor] = []

        def encode(self, pixels: torch.Tensor) -> torch.Tensor:
            self.seen.append(pixels)
            return torch.zeros(1, 16, 1, pixels.shape[1] // 8, pixels.shape[2] // 8)

    photo = torch.from_numpy(np.array(Image.open(harness.ASSETS_DIR / "xmgie_astronaut_source.png").convert("RGB"))
                             .astype(np.float32) / 255.0)[None]
    for size in [(512, 512), (300, 700), (900, 400), (1000, 1500)]:
        big = torch.nn.functional.interpolate(photo.permute(0, 3, 1, 2), size=size, mode="bilinear").permute(0, 2, 3, 1)
        mask = torch.zeros(1, *size)
        mask[:, size[0] // 3: size[0] // 2, size[1] // 4: size[1] // 2] = 1.0
        kontext_crop, _, _ = crop_node.crop(big, mask, 1.5, 512, "8", 4.0, "flux-kontext")
        scaled = mappings["FluxKontextImageScale"].execute(kontext_crop)
        assert tuple(scaled[0].shape) == tuple(kontext_crop.shape), size
        qwen_crop, _, _ = crop_node.crop(big, mask, 1.5, 512, "8", 4.0, "qwen-image-edit")
        vae = RecordingVAE()
        mappings["TextEncodeQwenImageEditPlus"].execute(clip, "make it red", vae=vae, image1=qwen_crop)
        (reference,) = vae.seen
        assert torch.equal(reference, qwen_crop), f"{size}: the Plus node resized the crop {tuple(qwen_crop.shape)}"
