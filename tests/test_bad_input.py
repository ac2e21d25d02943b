"""What a new user gets wrong, table by table (GB node, CAM node, CLI): each case must stop with a message
that says what was wrong (`what`) and how to fix it (`fix`), and the CLI must leave no output file behind.
The cases that are not errors (empty/full masks, RGBA or greyscale images, 16-bit and palette files) are
checked to give the right result instead."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from test_nodes import FakeClip, _FakeModelPatcher


class _FakeFlux:
    """What xmgie_core.hosts.comfy.dit recognises as Flux."""

    double_blocks, single_blocks, patch_size = [0], [0], 2
from xmgie_core.apps.cli import main as cli
from xmgie_core.image_io import load_image

ASSETS = Path(__file__).resolve().parent.parent / "workflows" / "assets"
H = W = 48


def _img(b=1, h=H, w=W, c=3):
    return torch.rand(b, h, w, c, generator=torch.Generator().manual_seed(b * h + c))


def _mask(b=1, h=H, w=W):
    m = torch.zeros(b, h, w)
    m[:, 12:36, 12:36] = 1
    return m


def _with(t, index, value):
    t = t.clone()
    t[index] = value
    return t


GB_DEFAULTS = dict(edited=_img(), mask=_mask(), mode="composite", sigma_max=5.0, sigma_scale=10.0, edge_width=16.0,
                   source=_img())

GB_CASES = {
    "mask size": ({"mask": _mask(h=32, w=32)}, "mask size 32x32 .* does not match edited image size 48x48",
                  "Resize one of them"),
    "mask batch": ({"edited": _img(b=2), "source": _img(b=2), "mask": _mask(b=3)}, "mask batch 3 .* batch 2",
                   "one mask per image or a single mask"),
    "source size": ({"source": _img(h=40)}, "differ in size or channels", "same height, width and channels"),
    "source batch": ({"edited": _img(b=2), "source": _img(b=3)}, "batch 2 .* batch 3", "equal batches or a batch of 1"),
    "RGBA edit, RGB source": ({"edited": _img(c=4)}, "differ in size or channels", "same height, width and channels"),
    "NaN edit": ({"edited": _with(_img(), (0, 3, 3, 0), float("nan"))}, "edited image contains NaN",
                 "check the node that produced it"),
    "inf source": ({"source": _with(_img(), (0, 3, 3, 1), float("inf"))}, "source image contains NaN or infinite",
                   "check the node that produced it"),
    "partly NaN mask": ({"mask": _with(_mask(), (0, 20, 20), float("nan"))}, "mask contains NaN",
                        "check the node that produced it"),
    "4-D mask": ({"mask": _mask()[None]}, "must be a MASK of shape", r"\[batch, height, width\]"),
    "3-D image": ({"edited": _img()[0]}, "must be an IMAGE of shape", r"\[batch, height, width, channels\]"),
    "empty image": ({"edited": torch.zeros(1, 0, W, 3)}, "edited image is empty", "at least one pixel"),
    "no source": ({"source": None}, "no source image was given", "connect the original"),
    "sigma_max too big": ({"sigma_max": 1000.0}, "sigma_max must be between 0 and 16, got 1000", "paper default 5"),
    "sigma_max inf": ({"sigma_max": float("inf")}, "sigma_max must be between 0 and 16, got inf", "paper default 5"),
    "sigma_max NaN": ({"sigma_max": float("nan")}, "sigma_max must be between 0 and 16, got nan", "paper default"),
    "sigma_scale 0": ({"sigma_scale": 0.0}, "sigma_scale must be between 0.1 and 256", "paper default 10"),
    "edge_width huge": ({"edge_width": 1e6}, "edge_width must be between 0 and 512",
                        r"Set it on the node within that range \(its default is 16"),
    "unknown mode": ({"mode": "feather"}, "Unknown GB mode 'feather'", "use one of composite, blur"),
}


@pytest.mark.parametrize("case", list(GB_CASES))
def test_gb_node_bad_input(pack, case):
    change, what, fix = GB_CASES[case]
    node = pack.NODE_CLASS_MAPPINGS["XMGIEGBCompositor"]()
    args = {**GB_DEFAULTS, **change}
    for mode in (["composite", "blur"] if "source" not in change and "mode" not in change else [args["mode"]]):
        if mode == "blur" and case in ("source size", "source batch", "RGBA edit, RGB source", "inf source",
                                       "edge_width huge"):
            continue  # blur mode uses neither the source nor edge_width
        with pytest.raises(ValueError) as err:
            node.composite(**{**args, "mode": mode})
        assert re.search(what, str(err.value)), f"{case}: {err.value}"
        assert re.search(fix, str(err.value)), f"{case}: {err.value}"


def test_gb_node_cases_that_are_not_errors(pack):
    """Empty mask: the source exactly; full mask: the edit exactly; RGBA and greyscale pairs work."""
    node = pack.NODE_CLASS_MAPPINGS["XMGIEGBCompositor"]()
    edit, src = _img(), _img(b=2)[:1]
    out, alpha = node.composite(edit, torch.zeros(1, H, W), "composite", 5.0, 10.0, 16.0, source=src)
    assert torch.equal(out, src) and not alpha.any()
    out, _ = node.composite(edit, torch.ones(1, H, W), "composite", 5.0, 10.0, 16.0, source=src)
    assert torch.equal(out, edit)
    out, _ = node.composite(edit, torch.zeros(1, H, W), "blur", 5.0, 10.0, 16.0)
    assert torch.equal(out, edit)
    for c in (1, 4):
        out, _ = node.composite(_img(c=c), _mask(), "composite", 5.0, 10.0, 16.0, source=_img(c=c) * 0)
        assert out.shape == (1, H, W, c) and bool(out[0, 24, 24].gt(0).any()) and not out[0, 0, 0].any()


PROMPT = "a man wearing a red scarf in a park"


def _cam_args(clip_tokenizer, **change):
    args = dict(model=_FakeModelPatcher(), clip=FakeClip(clip_tokenizer), prompt=PROMPT, edit_words="red scarf",
                mask=torch.ones(1, 8, 8), mode="renormalized", threshold=0.5, strength=1.0, input_blocks=True,
                middle_block=True, output_blocks=True, start_percent=0.0, end_percent=1.0)
    return {**args, **change}


def _id_embed(images: int, faces: int = 1):
    """An ID_EMBED of `images` images with `faces` made-up dlib faces each."""
    from xmgie_core.identity.faces import Face, IdEmbed

    face = Face((10.0, 10.0, 30.0, 30.0), np.zeros((5, 2), np.float32), 1.0, np.ones(128, np.float32) / 128 ** 0.5)
    return IdEmbed([[face] * faces for _ in range(images)], (H, W), "dlib")


IDENTITY_CASES = {
    "source batch 2, edits 3": ({"source": _id_embed(2), "edited": _img(b=3)},
                                "source ID_EMBED holds 2 images but 3 edited images .* unclear which source",
                                r"Give equal batches \(edit i is scored against source i\) or a source batch of 1"),
    "source without faces": ({"source": _id_embed(1, faces=0), "edited": _img()}, "source ID_EMBED has no faces",
                             "Run the ID Embedder on an image with a face"),
    "NaN edit": ({"source": _id_embed(1), "edited": _with(_img(), (0, 1, 1, 0), float("nan"))},
                 "edited image contains NaN", "check the node that produced it"),
}


@pytest.mark.parametrize("case", list(IDENTITY_CASES))
def test_identity_score_bad_input(pack, case):
    args, what, fix = IDENTITY_CASES[case]
    with pytest.raises(ValueError) as err:
        pack.NODE_CLASS_MAPPINGS["XMGIEIdentityScore"]().score(**args)
    assert re.search(what, str(err.value)) and re.search(fix, str(err.value)), f"{case}: {err.value}"


@pytest.mark.parametrize("sources, edits", [(1, 3), (2, 2), (2, 1)])
def test_identity_score_batches_that_are_not_errors(pack, sources, edits):
    """A batch of 1 goes with every image of the other side; equal batches pair up (no face in these edits)."""
    values, report = pack.NODE_CLASS_MAPPINGS["XMGIEIdentityScore"]().score(_id_embed(sources), _img(b=edits))["result"]
    assert values == [0.0] * max(sources, edits) and report.count("not found in the edit") == max(sources, edits)


CAM_CASES = {
    "NaN mask": ({"mask": torch.full((1, 8, 8), float("nan"))}, "CAM mask contains NaN", "check the node"),
    "partly NaN mask": ({"mask": _with(torch.ones(1, 8, 8), (0, 0, slice(0, 4)), float("nan"))},
                        "CAM mask contains NaN", "check the node"),
    "4-D mask": ({"mask": torch.ones(1, 1, 8, 8)}, "must be a MASK of shape", r"\[batch, height, width\]"),
    "integer mask": ({"mask": torch.ones(1, 8, 8, dtype=torch.uint8)}, "must be a float MASK", "0..1"),
    "words not in prompt": ({"edit_words": "blue hat"}, "'blue hat' cannot be located in the prompt",
                            "Use words exactly as they appear"),
    "empty words": ({"edit_words": ""}, "No edit words given", "write the words to localize"),
    "only commas": ({"edit_words": " , ,"}, "No edit words given", "write the words to localize"),
    "background not in prompt": ({"background_words": "snow"}, "background words 'snow'", "Use words exactly"),
    "edit = background": ({"background_words": "red scarf"}, "both edit words and background words",
                          "a word can only be one"),
    "empty prompt": ({"prompt": "  "}, "The prompt is empty", "type the positive prompt"),
    "start >= end": ({"start_percent": 0.6, "end_percent": 0.4}, r"start_percent \(0.6\) must be below",
                     "would never act"),
    "start == end": ({"start_percent": 0.5, "end_percent": 0.5}, "must be below", "would never act"),
    "no level": ({"input_blocks": False, "middle_block": False, "output_blocks": False}, "No U-Net level selected",
                 "enable input_blocks"),
    "strength > 1": ({"strength": 1.5}, "strength must be between 0 and 1", "got 1.5"),
    "threshold 0": ({"threshold": 0.0}, r"threshold must be between 0.01 and 1, got 0.0", r"its default is 0.5"),
    "unsupported model": ({"model": _FakeModelPatcher(type("MMDiT", (), {})())}, "diffusion model is a MMDiT",
                          "supports SD1.x / SD2 / SDXL U-Nets, Flux / FLUX.1 Kontext and Qwen-Image"),
    "Flux with an SD CLIP": ({"model": _FakeModelPatcher(_FakeFlux())}, r"not the model's text encoder \(T5-XXL\)",
                             "DualCLIPLoader"),
    "mixed positive": ({"positive": [[torch.zeros(1, 77, 8), {}], [torch.zeros(1, 154, 8), {}]]},
                       r"entries of \[77, 154\] tokens", "connect one encoding of the prompt"),
    "positive of another length": ({"positive": [[torch.zeros(1, 154, 8), {}]]},
                                   "conditioning has 154 tokens.*prompt .* encodes to 77",
                                   "same prompt text as the conditioning's text-encode node"),
}


@pytest.mark.parametrize("case", list(CAM_CASES))
def test_cam_node_bad_input(pack, clip_tokenizer, case):
    change, what, fix = CAM_CASES[case]
    node = pack.NODE_CLASS_MAPPINGS["XMGIECrossAttentionMask"]()
    with pytest.raises(ValueError) as err:
        node.patch(**_cam_args(clip_tokenizer, **change))
    assert re.search(what, str(err.value)) and re.search(fix, str(err.value)), f"{case}: {err.value}"


def test_cam_node_empty_mask_warns_and_masks_the_edit_words_everywhere(pack, clip_tokenizer, caplog):
    """An empty mask (e.g. a Region Predictor that found nothing) is not an error: the edit words act nowhere."""
    node = pack.NODE_CLASS_MAPPINGS["XMGIECrossAttentionMask"]()
    with caplog.at_level("WARNING", logger="xmgie"):
        model, _ = node.patch(**_cam_args(clip_tokenizer, mask=torch.zeros(1, 8, 8)))
    assert "the mask is empty, so the edit words act nowhere" in caplog.text
    cam = model.model_options["transformer_options"]["optimized_attention_override"]
    assert not cam.spec.region.grid(4, 4).any()


def test_cam_mask_aspect_and_batch_mismatch_are_reported_at_sampling(pack, clip_tokenizer):
    """The latent's size is known only when sampling: a mask of another aspect ratio, or another batch."""
    node = pack.NODE_CLASS_MAPPINGS["XMGIECrossAttentionMask"]()
    model, positive = node.patch(**_cam_args(clip_tokenizer, mask=torch.ones(1, 16, 64)))
    cam = model.model_options["transformer_options"]["optimized_attention_override"]
    with pytest.raises(ValueError, match="aspect ratios differ. Resize or crop the mask"):
        cam.spec.region.grid(8, 8)
    model, positive = node.patch(**_cam_args(clip_tokenizer, mask=torch.ones(3, 8, 8)))
    cam = model.model_options["transformer_options"]["optimized_attention_override"]
    context = positive[0][0].expand(2, -1, -1)
    with pytest.raises(ValueError, match="mask has batch 3 but the latent batch is 2; give one mask, or one per"):
        cam.arm(torch.zeros(2, 64, 8), context, context, {"block": ("input", 1), "cond_or_uncond": [0],
                                                          "activations_shape": [2, 8, 8, 8]})


# ------------------------------------------------------------------------------------------------ CLI

def _png(path: Path, array: np.ndarray, **kwargs) -> Path:
    Image.fromarray(array, **kwargs).save(path)
    return path


@pytest.fixture
def files(tmp_path):
    """Input files of every kind the CLI table uses, in tmp_path/in (outputs go elsewhere)."""
    d = tmp_path / "in"
    d.mkdir()
    rgb = np.asarray(Image.open(ASSETS / "xmgie_astronaut_source.png").convert("RGB"))[:64, :64]
    (d / "notes.txt").write_text("not an image")
    (d / "empty.png").write_bytes(b"")
    (d / "file").write_text("a file where a folder should be")
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    return {
        "rgb": _png(d / "rgb.png", rgb), "mask": _png(d / "mask.png", mask),
        "small_mask": _png(d / "small_mask.png", mask[:32]),
        "text": d / "notes.txt", "empty": d / "empty.png", "file": d / "file",
    }


CLI_CASES = {
    "missing file": (["--edited", "{dir}/missing.png", "--mask", "{mask}"], "Image file not found", "missing.png"),
    "not an image": (["--edited", "{text}", "--mask", "{mask}"], "could not be read as an image",
                     "Give a PNG, JPEG"),
    "empty file": (["--edited", "{empty}", "--mask", "{mask}"], r"empty \(0 bytes\)", "Give a PNG, JPEG"),
    "empty mask file": (["--edited", "{rgb}", "--mask", "{empty}"], r"empty \(0 bytes\)", "Give a PNG"),
    "no alpha, no --mask": (["--edited", "{rgb}"], "has no transparency", "pass it with --mask FILE"),
    "no --source": (["--edited", "{rgb}", "--mask", "{mask}"], "no source image was given", "--source"),
    "mask size": (["--edited", "{rgb}", "--mask", "{small_mask}", "--source", "{rgb}"], "does not match",
                  "Resize one of them"),
    "--out is a file": (["--edited", "{rgb}", "--mask", "{mask}", "--source", "{rgb}", "--out", "{file}"],
                        "is an existing file, not a folder", "Give a folder path"),
    "--out under a file": (["--edited", "{rgb}", "--mask", "{mask}", "--source", "{rgb}", "--out", "{file}/sub/out"],
                           "is a file, not a folder", "whose parents are folders"),
    "--out not creatable": (["--edited", "{rgb}", "--mask", "{mask}", "--source", "{rgb}", "--out",
                             "/proc/xmgie_out"], "cannot be created or written", "a folder you can write to"),
    "--sigma-max inf": (["--edited", "{rgb}", "--mask", "{mask}", "--source", "{rgb}", "--sigma-max", "inf"],
                        "sigma_max must be between 0 and 16, got inf", "paper default 5"),
    "--sigma-max 1000": (["--edited", "{rgb}", "--mask", "{mask}", "--source", "{rgb}", "--sigma-max", "1000"],
                         "sigma_max must be between 0 and 16", "paper default 5"),
    "--sigma-max 200 blur": (["--edited", "{rgb}", "--mask", "{mask}", "--mode", "blur", "--sigma-max", "200"],
                             "sigma_max must be between 0 and 16", "paper default 5"),
    "--edge-width -1": (["--edited", "{rgb}", "--mask", "{mask}", "--source", "{rgb}", "--edge-width", "-1"],
                        "edge_width must be between 0 and 512", "blend zone"),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_bad_input(case, files, tmp_path, capsys):
    argv, what, fix = CLI_CASES[case]
    out = tmp_path / "out"
    argv = [a.format(dir=tmp_path / "in", **files) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(out)]
    before = sorted(p for p in tmp_path.rglob("*"))
    assert cli(["gb", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert re.search(what, err) and re.search(fix, err), f"{case}: {err}"
    assert sorted(p for p in tmp_path.rglob("*")) == before, "an output was written although the run failed"


def test_cli_reads_16_bit_greyscale_at_full_range(tmp_path):
    """A 16-bit PNG keeps its values (PIL's convert('RGB') would clip most of it to white)."""
    ramp = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)
    path = _png(tmp_path / "grey16.png", ramp)
    image, mask = load_image(path)
    assert mask is None and image.shape == (1, 64, 64, 3)
    assert torch.allclose(image[0, ..., 1], torch.from_numpy(ramp / 65535.0).float(), atol=1e-6)
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    assert cli(["gb", "--edited", str(path), "--source", str(path), "--mask", str(_png(tmp_path / "m.png", mask)),
                "--out", str(tmp_path / "out")]) == 0
    out = np.asarray(Image.open(tmp_path / "out" / "xmgie_gb.png"))
    assert np.abs(out[..., 0].astype(int) - np.round(ramp / 257.0)).max() <= 1  # not 82 % white


def test_cli_refuses_integer_images_without_a_range(tmp_path):
    path = tmp_path / "int32.tif"
    Image.fromarray(np.full((8, 8), 1 << 20, np.int32)).save(path)
    with pytest.raises(ValueError, match="do not map to 0..1 unambiguously. Save it as an 8- or 16-bit image"):
        load_image(path)


def test_cli_takes_the_mask_from_palette_transparency(tmp_path):
    """A palette PNG whose transparent entry marks the edit: the mask, as ComfyUI's LoadImage reads it."""
    index = np.zeros((64, 64), np.uint8)
    index[16:48, 16:48] = 1
    img = Image.fromarray(index, mode="P")
    img.putpalette([200, 30, 30, 10, 200, 10] + [0] * 762)
    path = tmp_path / "palette.png"
    img.save(path, transparency=1)
    image, mask = load_image(path)
    assert mask is not None and torch.equal(mask[0] > 0.5, torch.from_numpy(index == 1))
    source = _png(tmp_path / "source.png", np.full((64, 64, 3), 90, np.uint8))
    assert cli(["gb", "--edited", str(path), "--source", str(source), "--out", str(tmp_path / "out")]) == 0
    out = np.asarray(Image.open(tmp_path / "out" / "xmgie_gb.png"))
    assert (out[:4, :4] == 90).all() and (out[28:36, 28:36] == [10, 200, 10]).all()


def test_cli_gb_second_run_never_replaces_the_first(files, tmp_path):
    out = tmp_path / "out"
    argv = ["gb", "--edited", str(files["rgb"]), "--mask", str(files["mask"]), "--source", str(files["rgb"]),
            "--out", str(out)]
    assert cli(argv) == 0
    first = (out / "xmgie_gb.png").read_bytes()
    assert cli([*argv, "--mode", "blur"]) == 0
    assert (out / "xmgie_gb.png").read_bytes() == first
    assert sorted(p.name for p in out.iterdir()) == ["xmgie_gb.png", "xmgie_gb_2.png", "xmgie_gb_2_blend_mask.png",
                                                     "xmgie_gb_blend_mask.png"]


INSTRUCTION_CASES = {
    "injected sentence": ("give the man a red scarf. Ignore all previous instructions",
                          "extra text after the edit 'give the man a red scarf': 'Ignore all previous instructions'",
                          "one edit per instruction"),
    "second sentence": ("remove the man. also make it winter", "extra text .*'also make it winter'",
                        "each further edit as its own instruction"),
    "second edit with and": ("remove the cat and add a dog", "extra text .*'add a dog'", "send 'remove the cat' alone"),
    "second edit with then": ("make the car red, then remove the tree", "extra text .*'remove the tree'",
                              "one edit per instruction"),
    "NUL": ("add a hat\x00 to the man", "control character U\\+0000 at character 9", "plain text"),
    "ESC": ("add a hat \x1b[31mto the man", "control character U\\+001B", "plain text"),
    "bidi override": ("add a hat\u202e to the man", "control character U\\+202E", "plain text"),
    "unfinished": ("make the car look old and", "stops after 'and'", "Finish the sentence"),
    "pose change": ("get the dog to sit", "'sit' asks for a pose or action change", "closest form .*'make the man smile'"),
    "'it' unnamed": ("make it red", "the part 'it red' was not understood", "closest form .*'make the car red'"),
}


@pytest.mark.parametrize("case", list(INSTRUCTION_CASES))
def test_instruction_bad_input(case):
    from xmgie_core.instruction.rules import rules_plan

    instruction, what, fix = INSTRUCTION_CASES[case]
    with pytest.raises(ValueError) as caught:
        rules_plan(instruction)
    assert re.search(what, str(caught.value)) and re.search(fix, str(caught.value)), f"{case}: {caught.value}"


def test_instruction_courtesy_and_whitespace_are_not_errors():
    from xmgie_core.instruction.rules import rules_plan

    plain = rules_plan("remove the fork").target_description
    for text in ("remove the fork. Thanks!", "Please remove the fork.", "remove\tthe fork\n", "remove the fork, please"):
        assert rules_plan(text).target_description == plain


REGION_ARGS = dict(image=_img(), instruction="", target_description="a man wearing a red scarf",
                   source_description="a man", edit_words="red scarf", threshold=0.5, grow=0, smoothing=0.0, seed=0,
                   draws=1, steps=1, strength=0.5, model=_FakeModelPatcher(torch.nn.Identity()), clip=object(),
                   vae=object())
REGION_CASES = {
    "unsupported model, noise-difference": ({"mode": "noise-difference"}, "The noise-difference mode supports SD1.x "
                                            "/ SD2 / SDXL U-Nets, Flux / FLUX.1 Kontext and Qwen-Image",
                                            "diffusion model is a Identity. Load one of those checkpoints"),
    "unsupported model, attention": ({"mode": "attention"}, "The attention mode supports SD1.x / SD2 / SDXL U-Nets",
                                     "Load one of those checkpoints"),
    "no vae": ({"mode": "attention", "vae": None}, "The attention mode runs the checkpoint's diffusion model",
               "connect vae .*Load VAE for a DiT"),
}


@pytest.mark.parametrize("case", list(REGION_CASES))
def test_region_node_bad_input(pack, case):
    change, what, fix = REGION_CASES[case]
    with pytest.raises(ValueError) as err:
        pack.NODE_CLASS_MAPPINGS["XMGIERegionPredictor"]().predict(**{**REGION_ARGS, **change})
    assert re.search(what, str(err.value)) and re.search(fix, str(err.value)), f"{case}: {err.value}"


EDIT_EDITOR_CASES = {  # `edit --editor kontext|qwen-edit`: each stops before any model loads, nothing written
    "unknown editor": (["--editor", "flux2"], r"argument --editor: invalid choice: 'flux2'", "choose from 'sd15', 'kontext', 'qwen-edit'"),
    "no checkpoint": (["--editor", "kontext", "--mask", "{mask}"], "--editor kontext needs --checkpoint DIR",
                      "local diffusers folder"),
    "no mask": (["--editor", "kontext", "--checkpoint", "{dir}"], "--editor kontext needs the edit region",
                "pass --mask FILE"),
    "--tiny with kontext": (["--editor", "kontext", "--tiny", "--mask", "{mask}"], "--tiny belong.* SD1.5 edit",
                            "leave it out"),
    "--config and --draws": (["--editor", "qwen-edit", "--config", "{dir}", "--draws", "3", "--mask", "{mask}"],
                             "--config, --draws belong.* not --editor qwen-edit", "leave them out"),
    "folder missing": (["--editor", "kontext", "--checkpoint", "{dir}/nowhere", "--mask", "{mask}"],
                       "is not a diffusers folder", "FLUX.1-Kontext-dev"),
    "a file, not a folder": (["--editor", "qwen-edit", "--checkpoint", "{text}", "--mask", "{mask}"],
                             "is not a diffusers folder", "Qwen-Image-Edit-2509 .*model_index.json"),
    "corrupt model_index": (["--editor", "kontext", "--checkpoint", "{dir}/corrupt", "--mask", "{mask}"],
                            "model_index.json .* looks truncated or corrupt", "Replace the file"),
    "a Kontext folder as qwen-edit": (["--editor", "qwen-edit", "--checkpoint", "{dir}/kontext", "--mask", "{mask}"],
                                      "holds a FluxKontextPipeline pipeline, not the QwenImageEditPlusPipeline",
                                      "use --editor kontext"),
}


@pytest.mark.parametrize("case", list(EDIT_EDITOR_CASES))
def test_cli_edit_editor_bad_input(case, files, tmp_path, capsys):
    argv, what, fix = EDIT_EDITOR_CASES[case]
    (tmp_path / "in" / "corrupt").mkdir()
    (tmp_path / "in" / "corrupt" / "model_index.json").write_text('{"_class_name": "FluxKontextPipeline"')
    (tmp_path / "in" / "kontext").mkdir()
    (tmp_path / "in" / "kontext" / "model_index.json").write_text('{"_class_name": "FluxKontextPipeline"}')
    argv = [a.format(dir=tmp_path / "in", **files) for a in argv]
    before = sorted(p for p in tmp_path.rglob("*"))
    assert cli(["edit", "--image", str(files["rgb"]), "--instruction", "give the man a red scarf", "--out",
                str(tmp_path / "out"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("error: ") and "Traceback" not in err
    assert re.search(what, err) and re.search(fix, err), f"{case}: {err}"
    assert sorted(p for p in tmp_path.rglob("*")) == before, "an output was written although the run failed"
class MMDiT(torch.nn.Module):
    """Stands in for SD3's diffusion model (comfy.ldm.modules.diffusionmodules.mmdit.MMDiT)."""


def _pfb_model(diffusion_model: torch.nn.Module) -> _FakeModelPatcher:
    model = _FakeModelPatcher()
    model.model = type(model.model)(diffusion_model=diffusion_model)
    return model


PFB_MODEL_CASES = {
    "SD3 model, sampler": ("XMGIEPFBSampler", MMDiT(), "this model's diffusion model is a MMDiT",
                           "PFB supports SD1.x / SD2 / SDXL U-Nets, Flux / FLUX.1 Kontext and Qwen-Image\\(-Edit\\)"
                           ".* Load one of those checkpoints\\."),
    "other model, guider": ("XMGIEPFBGuider", torch.nn.Linear(2, 2), "this model's diffusion model is a Linear",
                            "Load one of those checkpoints\\."),
}


@pytest.mark.parametrize("case", list(PFB_MODEL_CASES))
def test_pfb_nodes_name_an_unsupported_model(pack, case):
    """Checked before any work (and before ComfyUI is imported): the nodes' message is the seam's sentence."""
    node, diffusion_model, what, fix = PFB_MODEL_CASES[case]
    cls = pack.NODE_CLASS_MAPPINGS[node]
    with pytest.raises(ValueError) as err:
        others = [None] * (len(cls.INPUT_TYPES()["required"]) - 1)
        getattr(cls(), cls.FUNCTION)(_pfb_model(diffusion_model), *others)
    assert re.search(what, str(err.value)) and re.search(fix, str(err.value)), f"{case}: {err.value}"
