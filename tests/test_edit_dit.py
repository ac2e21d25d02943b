"""The headless DiT editors (`python -m xmgie_core edit --editor kontext|qwen-edit --checkpoint DIR`) on tiny
random-weight FluxKontextPipeline / QwenImageEditPlusPipeline folders in diffusers' layout
(tests/fixtures/tiny_dit_pipelines.py, built offline, tokenizers included): the
seam's token layout and hooks (hosts/diffusers/dit.py), CAM on the joint attention against a naive eqs 10-12, PFB's
invariants through the pipeline's own call (hosts/diffusers/dit_edit.py), the CLI end to end, the model unchanged,
and the errors a user can cause."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from test_edit_cli import INSTRUCTION, SOURCE, check_outside_is_source, pixels, scarf_mask  # noqa: F401
from fixtures.tiny_dit_pipelines import kontext_inputs, save_kontext, save_qwen_edit
from xmgie_core.apps import cli
from xmgie_core.cam import TokenRestriction
from xmgie_core.errors import XMGIEInputError
from xmgie_core.hosts.diffusers import dit
from xmgie_core.hosts.diffusers.dit_edit import CAMSettings, DiTEditor, dit_edit, restriction, to_pil
from xmgie_core.hosts.diffusers.models import load_dit_pipeline
from xmgie_core.masks import RegionPyramid
from xmgie_core.pfb import PFBSettings
from xmgie_core.token_grid import TokenGrid

TARGET, SOURCE_TEXT = "a photo of the astronaut with a red scarf", "a photo of the astronaut"
FAST = ["--steps", "2", "--working-size", "128", "--identity", "none"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return save_kontext(tmp_path_factory.mktemp("kontext") / "FLUX.1-Kontext-tiny")


def load(folder: Path, editor: str) -> DiTEditor:
    return DiTEditor(load_dit_pipeline(folder, editor, "cpu", torch.float32), editor, str(folder))


@pytest.fixture(scope="module")
def editor(folder) -> DiTEditor:
    return load(folder, "kontext")


@pytest.fixture(scope="module")
def photo() -> torch.Tensor:
    """64 x 64, quantised to 8 bits (so a PIL copy of it is the same picture)."""
    return (kontext_inputs(0, 64) * 255).round() / 255


def box(value: float = 1.0) -> torch.Tensor:
    mask = torch.zeros(1, 64, 64)
    mask[:, 16:48, 16:40] = value
    return mask


def fingerprint(module: torch.nn.Module) -> tuple:
    """Weights, attention processor classes and every hook of the module tree."""
    return ({k: v.clone() for k, v in module.state_dict().items()},
            {k: type(v) for k, v in module.attn_processors.items()},
            sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules()))


def same_model(a: tuple, b: tuple) -> bool:
    return a[1:] == b[1:] and all(torch.equal(a[0][k], b[0][k]) for k in a[0])


# ------------------------------------------------------------------------------------------ seam

def test_pack_is_the_pipelines_packing(editor):
    z = torch.randn(2, 16, 6, 10)
    assert torch.equal(dit.pack(z), editor.pipe._pack_latents(z, 2, 16, 6, 10))
    assert torch.equal(dit.unpack(dit.pack(z), z), z)
    assert torch.equal(dit.unpack(dit.pack(z[:, :, None]), z[:, :, None]), z[:, :, None])  # Qwen's 5-d latents


def test_layout_names_the_double_and_single_blocks(editor):
    blocks = dit.find(editor.pipe.transformer)
    assert blocks.family == dit.FLUX and blocks.layout().names == ["double_0", "double_1", "single_0", "single_1"]
    assert blocks.layout().default_layers() == ["double_0", "double_1"]
    assert blocks.block("single_1") is editor.pipe.transformer.single_transformer_blocks[1]
    with pytest.raises(XMGIEInputError, match="not a FluxTransformer2DModel or QwenImageTransformer2DModel"):
        dit.require_dit(torch.nn.Linear(2, 2), "The pipeline's transformer")


def transformer_inputs(editor, h=4, w=6, ref=True, text=9, seed=0):
    """One transformer call as FluxKontextPipeline makes it: [generated | reference] image tokens, text apart."""
    g = torch.Generator().manual_seed(seed)
    t = editor.pipe.transformer
    n = (h // 2) * (w // 2)
    ids = editor.pipe._prepare_latent_image_ids(1, h // 2, w // 2, "cpu", torch.float32)
    ref_ids = ids.clone()
    ref_ids[:, 0] = 1
    return dict(hidden_states=torch.randn(1, n * (2 if ref else 1), 64, generator=g),
                encoder_hidden_states=torch.randn(1, text, t.config.joint_attention_dim, generator=g),
                pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.7]),
                guidance=torch.tensor([2.5]), txt_ids=torch.zeros(text, 3),
                img_ids=torch.cat([ids, ref_ids]) if ref else ids, return_dict=False)


@pytest.mark.parametrize("layer", ["double_1", "single_0"])
def test_block_hooks_change_the_generated_tokens_only(editor, layer):
    """Double and single blocks alike return (text, [generated | reference]): the hook gets the generated tokens
    as [B, D, h, w] and the text and reference tokens leave the block untouched."""
    blocks, grid = dit.find(editor.pipe.transformer), TokenGrid(2, 3)
    seen, outputs = [], []

    def block_output():  # a hook registered after the seam's runs after it: it sees what the next block gets
        capture = blocks.block(layer).register_forward_hook(lambda m, a, out: outputs.append(out))
        try:
            forward(editor)
        finally:
            capture.remove()

    block_output()
    with dit.block_hooks(blocks, [layer], grid, lambda name, h: seen.append((name, h.shape)) or h + 1):
        block_output()
    (text0, image0), (text1, image1) = outputs
    assert seen == [(layer, torch.Size([1, 32, 2, 3]))]
    assert torch.equal(text1, text0) and torch.equal(image1[:, 6:], image0[:, 6:])
    assert torch.allclose(image1[:, :6], image0[:, :6] + 1)
    assert not blocks.block(layer)._forward_hooks


# ------------------------------------------------------------------------------------------ CAM

def naive_cam(q, k, v, text, grid, region, edit, background, mode):
    """Eqs 10-12 written out on [B, N, H, d]: A = softmax(S); for generated queries M = 1 - (1 - R) on edit words'
    columns and 1 - R on background words'; 'paper' O = (A * M) V, 'renormalized' O = softmax(S + log M) V."""
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    weight = torch.ones(q.shape[1], k.shape[1])
    r = region.flatten()
    rows = slice(text + grid.start, text + grid.stop)
    weight[rows, edit] = r[:, None]
    weight[rows, background] = 1 - r[:, None]
    probs = s.softmax(-1) * weight if mode == "paper" else (s + weight.log()).softmax(-1)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v).flatten(2)


@pytest.mark.parametrize("mode", ["renormalized", "paper"])
def test_joint_cam_equals_a_naive_reference(mode):
    g = torch.Generator().manual_seed(3)
    text, grid = 7, TokenGrid(3, 4)
    q, k, v = (torch.randn(1, text + 2 * grid.count, 2, 8, generator=g) for _ in range(3))
    mask = torch.zeros(1, 3, 4)
    mask[:, :2, 1:3] = 1
    edit, background = [2, 3], [5]
    cam = dit.JointCAM(TokenRestriction(torch.tensor(edit), torch.tensor(background)), RegionPyramid(mask), grid,
                       mode, active=True)
    out = dit.joint_attention(q, k, v, text, cam)
    expected = naive_cam(q, k, v, text, grid, mask, edit, background, mode)
    assert (out - expected).abs().max() < 1e-5 and cam.calls == 1
    cam.active = False
    plain = dit.joint_attention(q, k, v, text, cam)
    assert (plain - naive_cam(q, k, v, text, grid, torch.ones(1, 3, 4), [], [], mode)).abs().max() < 1e-5
    assert (out - plain)[:, text + grid.count:].abs().max() < 1e-6, "reference queries must attend as usual"


def forward(editor, **kw):
    with torch.no_grad():
        return editor.pipe.transformer(**transformer_inputs(editor, **kw))[0]


def test_cam_processors_with_the_region_everywhere_equal_the_stock_transformer(editor):
    grid = TokenGrid(2, 3)
    before = fingerprint(editor.pipe.transformer)
    stock = forward(editor)
    cam = dit.JointCAM(TokenRestriction(torch.tensor([1, 4])), RegionPyramid(torch.ones(1, 2, 3)), grid,
                       text=9, active=True)
    with dit.joint_attention_processors(editor.pipe.transformer, cam):
        everywhere = forward(editor)
        calls = cam.calls
        cam.region = RegionPyramid(box()[:, ::8, ::8][:, :4, :6])
        partial = forward(editor)
        cam.active = False
        inactive = forward(editor)
    assert calls == 4, "every joint attention (2 double + 2 single blocks) ran CAM"
    assert (everywhere - stock).abs().max() < 1e-5 and (inactive - stock).abs().max() < 1e-5
    assert (partial - stock).abs().max() > 1e-4
    assert same_model(fingerprint(editor.pipe.transformer), before)


# ------------------------------------------------------------------------------------------ PFB + CAM in the pipeline

def edit(editor, photo, mask, cam_mask=None, **kw):
    settings = PFBSettings(mask, layers=kw.pop("layers", "auto"), latent_end=kw.pop("latent_end", 1.0))
    cam = None if cam_mask is None else CAMSettings(TokenRestriction(torch.tensor([7, 8])), cam_mask)
    return dit_edit(editor, photo, TARGET, SOURCE_TEXT, settings, cam, steps=kw.pop("steps", 3), cfg=2.5,
                    seed=kw.pop("seed", 1), **kw)


def test_full_mask_with_cam_is_the_pipelines_own_edit(editor, photo):
    """Inside the mask alpha = 1, eq 23 keeps the model's latent and the edit words act everywhere: the result is
    FluxKontextPipeline's own output for the same seed and prompt."""
    before = fingerprint(editor.pipe.transformer)
    ours = edit(editor, photo, torch.ones(1, 64, 64), torch.ones(1, 64, 64))
    pil = Image.fromarray((photo[0].numpy() * 255).round().astype(np.uint8))
    with torch.no_grad():
        stock = editor.pipe(image=pil, prompt=TARGET, height=64, width=64, max_area=64 * 64, _auto_resize=False,
                            num_inference_steps=3, guidance_scale=2.5, generator=torch.Generator().manual_seed(1),
                            output_type="pt").images.movedim(1, -1)
    assert (ours - stock).abs().max() < 1e-4
    assert same_model(fingerprint(editor.pipe.transformer), before)
    other_seed = edit(editor, photo, torch.ones(1, 64, 64), seed=2)
    assert (other_seed - ours).abs().max() > 1e-2


def decoded_latents(editor, run):
    """The latents the pipeline hands its VAE (unpacked, unscaled), captured."""
    seen = []
    decode = editor.pipe.vae.decode
    editor.pipe.vae.decode = lambda latents, **kw: seen.append(latents.clone()) or decode(latents, **kw)
    try:
        run()
    finally:
        del editor.pipe.vae.decode
    return seen[-1]


def source_latent(editor, photo):
    with torch.no_grad():
        z = editor.pipe._encode_vae_image(editor.pipe.image_processor.preprocess(photo.movedim(-1, 1), 64, 64), None)
    return z / editor.pipe.vae.config.scaling_factor + editor.pipe.vae.config.shift_factor


def test_empty_mask_gives_the_source_latent_exactly(editor, photo):
    out = decoded_latents(editor, lambda: edit(editor, photo, torch.zeros(1, 64, 64)))
    assert torch.equal(out, source_latent(editor, photo))


def test_outside_the_mask_the_latent_is_the_source_exactly(editor, photo):
    """latent_end 1: eq 23 to the end, so every latent cell the mask does not touch is the source's, bit for bit;
    inside, the edit arrives."""
    out = decoded_latents(editor, lambda: edit(editor, photo, box(), box(), layers="double_0-1, single_0"))
    z = source_latent(editor, photo)
    outside = torch.nn.functional.adaptive_avg_pool2d(box()[:, None], (8, 8))[0, 0] == 0
    assert outside.any() and torch.equal(out[..., outside], z[..., outside])
    assert (out[..., ~outside] - z[..., ~outside]).abs().max() > 1e-2


def test_blending_changes_the_edit_and_the_source_pass_stops_after_the_deepest_blended_block(editor, photo):
    calls = {name: 0 for name in ("double_0", "double_1", "single_1")}
    blocks = dit.find(editor.pipe.transformer)
    handles = [blocks.block(n).register_forward_hook(lambda m, a, o, n=n: calls.__setitem__(n, calls[n] + 1))
               for n in calls]
    try:
        blended = edit(editor, photo, box(), layers="double_0", latent_end=0.0)
    finally:
        for h in handles:
            h.remove()
    assert calls == {"double_0": 6, "double_1": 3, "single_1": 3}, "3 edit calls + 3 source passes cut after double_0"
    unblended = edit(editor, photo, box(), layers="double_0:1", latent_end=0.0)  # alpha = 1: nothing blended
    assert (blended - unblended).abs().max() > 1e-3
    assert torch.equal(unblended, edit(editor, photo, box(), layers="single_1:1", latent_end=0.0))


def test_what_the_dit_loop_refuses(editor, photo):
    with pytest.raises(XMGIEInputError, match="This model has no layer double_5"):
        edit(editor, photo, box(), layers="double_5")
    with pytest.raises(XMGIEInputError, match="'noised' only"):
        dit_edit(editor, photo, TARGET, SOURCE_TEXT, PFBSettings(box(), source_mode="inverted"), steps=2)


# ------------------------------------------------------------------------------------------ CLI

def run(out: Path, *args: str) -> tuple[int, dict[str, Path]]:
    code = cli.main(["edit", "--instruction", INSTRUCTION, "--image", str(SOURCE), "--out", str(out), *args])
    return code, ({p.name.rsplit("_", 1)[-1].split(".")[0]: p for p in out.iterdir()} if out.exists() else {})


def test_cli_edits_with_kontext_end_to_end(folder, scarf_mask, tmp_path):
    code, files = run(tmp_path, "--editor", "kontext", "--checkpoint", str(folder), "--mask", str(scarf_mask), *FAST)
    assert code == 0 and set(files) == {"edit", "mask", "overlay", "report"}
    check_outside_is_source(pixels(files["edit"]), pixels(SOURCE), pixels(scarf_mask)[..., 0] >= 128)
    report = json.loads(files["report"].read_text())
    assert report["editor"] == "kontext" and report["checkpoint"] == str(folder) and not report["tiny_random_models"]
    assert report["settings"]["steps"] == 2 and report["settings"]["cfg"] == 2.5  # Kontext's guidance default
    assert report["settings"]["denoise"] == 1.0 and all(s % 16 == 0 for s in report["crop"]["work_size"])
    assert "decode" not in report["timings_s"] and "sampling" in report["timings_s"]


def test_cli_empty_mask_returns_the_photo(folder, tmp_path):
    empty = tmp_path / "empty.png"
    Image.fromarray(np.zeros((512, 512), np.uint8)).save(empty)
    code, files = run(tmp_path / "out", "--editor", "kontext", "--checkpoint", str(folder), "--mask", str(empty),
                      *FAST)
    assert code == 0 and np.array_equal(pixels(files["edit"]), pixels(SOURCE))


def test_a_kontext_folder_cut_short_is_named(folder, scarf_mask, tmp_path, capsys):
    import shutil

    broken = shutil.copytree(folder, tmp_path / "broken")
    weights = broken / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    code, _ = run(tmp_path / "o", "--editor", "kontext", "--checkpoint", str(broken), "--mask", str(scarf_mask))
    err = capsys.readouterr().err
    assert code == 2 and f"{weights} (the FLUX.1-Kontext-dev pipeline of --checkpoint) looks truncated" in err
    assert "Traceback" not in err and not (tmp_path / "o").exists()


def test_an_sd15_folder_given_as_kontext_names_the_editor_to_use(scarf_mask, tmp_path, capsys):
    (tmp_path / "sd").mkdir()
    (tmp_path / "sd" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    code, _ = run(tmp_path / "o", "--editor", "kontext", "--checkpoint", str(tmp_path / "sd"), "--mask",
                  str(scarf_mask))
    err = capsys.readouterr().err
    assert code == 2 and "holds a StableDiffusionPipeline pipeline, not the FluxKontextPipeline" in err


# ------------------------------------------------------------------------------------------ Qwen-Image-Edit

@pytest.fixture
def small_reference(monkeypatch):
    """The Qwen pipeline encodes its reference image at ~1 MP (VAE_IMAGE_SIZE), 20 s on CPU for the tiny VAE: the
    tests shrink that constant (the pipeline's own code reads it at call time; both sides of each comparison run
    under it)."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as module

    monkeypatch.setattr(module, "VAE_IMAGE_SIZE", 64 * 64)


@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory) -> Path:
    return save_qwen_edit(tmp_path_factory.mktemp("qwen") / "Qwen-Image-Edit-tiny")


@pytest.fixture(scope="module")
def qwen(qwen_folder) -> DiTEditor:
    return load(qwen_folder, "qwen-edit")


def test_qwen_layout_has_double_blocks_only(qwen):
    blocks = dit.find(qwen.pipe.transformer)
    assert blocks.family == dit.QWEN_IMAGE and blocks.layout().names == ["double_0", "double_1"]
    z = torch.randn(1, 16, 1, 6, 8)
    assert torch.equal(dit.pack(z), qwen.pipe._pack_latents(z[:, :, 0], 1, 16, 6, 8))


def test_qwen_edit_words_are_found_through_the_chat_template_and_image_placeholder(qwen, photo):
    """Qwen2.5-VL's text model is causal: two prompts that differ from the edit word on encode to the same states
    up to the position found for it, and differ there (template, 'Picture 1:' with the expanded image tokens and
    the dropped system prefix all counted)."""
    prompts = ("give the astronaut a red scarf", "give the astronaut a blue scarf")
    position = restriction(qwen, photo, prompts[0], ["red"]).edit.tolist()
    assert len(position) == 1 and restriction(qwen, photo, prompts[1], ["blue"]).edit.tolist() == position
    assert restriction(qwen, photo, prompts[0], ["red scarf"]).edit.tolist() == [position[0], position[0] + 1]
    condition = qwen.pipe.image_processor.resize(to_pil(photo), 384, 384)  # as the pipeline reads a square photo
    with torch.no_grad():
        a, b = (qwen.pipe.encode_prompt(p, image=[condition], device="cpu")[0] for p in prompts)
    p = position[0]
    assert a.shape == b.shape and p < a.shape[1]
    assert torch.allclose(a[:, :p], b[:, :p], atol=1e-6) and not torch.allclose(a[:, p], b[:, p], atol=1e-4)
    with pytest.raises(XMGIEInputError, match="cannot be located in the prompt"):
        restriction(qwen, photo, prompts[0], ["green hat"])


def test_qwen_full_mask_with_cam_is_the_pipelines_own_edit(qwen, photo, small_reference):
    """True CFG (two calls per step, both blended, CAM on the edit prompt's) with a full mask: exactly the
    pipeline's own output."""
    prompt = "give the astronaut a red scarf"
    before = fingerprint(qwen.pipe.transformer)
    cam = CAMSettings(restriction(qwen, photo, prompt, ["red scarf"]), torch.ones(1, 64, 64))
    ours = dit_edit(qwen, photo, prompt, SOURCE_TEXT, PFBSettings(torch.ones(1, 64, 64), latent_end=1.0), cam,
                    steps=2, cfg=4.0, seed=1)
    with torch.no_grad():
        stock = qwen.pipe(image=to_pil(photo), prompt=prompt, negative_prompt=" ", true_cfg_scale=4.0, height=64,
                          width=64, num_inference_steps=2, generator=torch.Generator().manual_seed(1),
                          output_type="pt").images.movedim(1, -1)
    assert (ours - stock).abs().max() < 1e-4
    assert same_model(fingerprint(qwen.pipe.transformer), before)


def test_qwen_outside_the_mask_the_latent_is_the_source_exactly(qwen, photo, small_reference):
    pipe = qwen.pipe
    out = decoded_latents(qwen, lambda: dit_edit(qwen, photo, "give the astronaut a red scarf", SOURCE_TEXT,
                                                 PFBSettings(box(), latent_end=1.0), steps=2, cfg=4.0, seed=1))
    with torch.no_grad():
        z = pipe._encode_vae_image(pipe.image_processor.preprocess(photo.movedim(-1, 1), 64, 64)[:, :, None], None)
    mean = torch.tensor(pipe.vae.config.latents_mean).view(1, 16, 1, 1, 1)
    std = 1.0 / torch.tensor(pipe.vae.config.latents_std).view(1, 16, 1, 1, 1)
    outside = torch.nn.functional.adaptive_avg_pool2d(box()[:, None], (8, 8))[0, 0] == 0
    expected = z / std + mean  # the pipeline's own unnormalisation before its VAE
    assert torch.equal(out[..., outside], expected[..., outside])
    assert (out[..., ~outside] - expected[..., ~outside]).abs().max() > 1e-2


def test_cli_edits_with_qwen_edit_end_to_end(qwen_folder, scarf_mask, tmp_path, small_reference):
    code, files = run(tmp_path, "--editor", "qwen-edit", "--checkpoint", str(qwen_folder), "--mask",
                      str(scarf_mask), *FAST)
    assert code == 0
    check_outside_is_source(pixels(files["edit"]), pixels(SOURCE), pixels(scarf_mask)[..., 0] >= 128)
    report = json.loads(files["report"].read_text())
    assert report["editor"] == "qwen-edit" and report["settings"]["cfg"] == 4.0
