"""The headless whole edit (`python -m xmgie_core edit`, xmgie_core.apps.edit) on tiny random-weight
models: the written photo is the source bit for bit outside the blend zone of the region (given or predicted),
the edit arrives inside it, large photos go through the crop, the report says what ran (and that the models were
tiny), a diffusers checkpoint folder loads, and a missing model says exactly what to provide."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from xmgie_core.apps import cli
from xmgie_core.apps import edit as de
from xmgie_core.hosts.diffusers import models as models_of

ASSETS = Path(__file__).resolve().parent.parent / "workflows" / "assets"
SOURCE = ASSETS / "xmgie_astronaut_source.png"
INSTRUCTION = "give the astronaut a red scarf"
FAST = ["--steps", "2", "--draws", "2", "--working-size", "256"]


@pytest.fixture(scope="module")
def scarf_mask(tmp_path_factory) -> Path:
    """The sample edit's region (transparent = edit) as a white-on-black mask file."""
    alpha = np.array(Image.open(ASSETS / "xmgie_astronaut_edit.png"))[..., 3]
    path = tmp_path_factory.mktemp("mask") / "scarf_mask.png"
    Image.fromarray(np.where(alpha < 128, 255, 0).astype(np.uint8)).save(path)
    return path


def run(tmp_path: Path, *args: str) -> tuple[int, dict[str, Path]]:
    code = cli.main(["edit", "--instruction", INSTRUCTION, "--out", str(tmp_path), *args])
    files = {p.name.rsplit("_", 1)[-1].split(".")[0]: p for p in tmp_path.iterdir()}
    return code, files


def pixels(path: Path) -> np.ndarray:
    return np.array(Image.open(path).convert("RGB"))


def check_outside_is_source(out: np.ndarray, source: np.ndarray, region: np.ndarray) -> None:
    far = ndimage.distance_transform_edt(~region) > 17  # GB's edge_width 16 + 1
    assert out.shape == source.shape
    assert np.array_equal(out[far], source[far]), "far outside the region the photo changed"
    assert (out[region] != source[region]).any(axis=-1).mean() > 0.5, "the edit did not arrive in the region"


def test_tiny_edit_with_a_given_mask(tmp_path, scarf_mask):
    code, files = run(tmp_path, "--image", str(SOURCE), "--mask", str(scarf_mask), "--tiny", *FAST)
    assert code == 0 and set(files) == {"edit", "mask", "overlay", "report"}
    assert all("TINY-RANDOM-WEIGHTS" in p.name for p in files.values()), "tiny outputs must say so in their names"
    region = pixels(scarf_mask)[..., 0] >= 128
    check_outside_is_source(pixels(files["edit"]), pixels(SOURCE), region)
    assert np.array_equal(pixels(files["mask"])[..., 0] >= 128, region)
    report = json.loads(files["report"].read_text())
    assert report["tiny_random_models"] is True and "TINY" in report["warning"]
    assert report["edit_words"] == ["red scarf"] and report["plan"]["source_description"] == "a photo of the astronaut"
    assert set(report["timings_s"]) == set(de.STAGES)
    assert report["settings"]["steps"] == 2 and report["crop"]["work_size"][0] % 8 == 0
    assert report["region_pixels"] == int(region.sum())
    assert report["identity"].startswith("image 0: IPS") and len(report["ips"]) == 1  # dlib is installed here


def test_tiny_edit_predicts_the_region_itself(tmp_path):
    code, files = run(tmp_path, "--image", str(SOURCE), "--tiny", "--identity", "none", *FAST)
    assert code == 0
    region = pixels(files["mask"])[..., 0] >= 128
    assert region.any() and not region.all()
    check_outside_is_source(pixels(files["edit"]), pixels(SOURCE), region)
    report = json.loads(files["report"].read_text())
    assert report["ips"] is None and report["identity"].startswith("not scored")


def test_a_large_photo_is_edited_through_the_crop(tmp_path):
    big = Image.open(SOURCE).convert("RGB").resize((1600, 1200), Image.LANCZOS)
    photo, mask = tmp_path / "big.png", tmp_path / "big_mask.png"
    big.save(photo)
    region = np.zeros((1200, 1600), dtype=bool)
    region[500:700, 900:1150] = True
    Image.fromarray(region.astype(np.uint8) * 255).save(mask)
    out = tmp_path / "out"
    code, files = run(out, "--image", str(photo), "--mask", str(mask), "--tiny", "--identity", "none", *FAST)
    assert code == 0
    check_outside_is_source(pixels(files["edit"]), np.array(big), region)
    crop = json.loads(files["report"].read_text())["crop"]
    assert max(crop["work_size"]) == 256 and all(side % 8 == 0 for side in crop["work_size"])
    top, left, bottom, right = crop["box"]
    assert top <= 500 and left <= 900 and bottom >= 700 and right >= 1150 and (bottom - top) < 1200


def test_an_empty_mask_leaves_the_photo_unchanged(tmp_path):
    empty = tmp_path / "empty.png"
    Image.fromarray(np.zeros((512, 512), dtype=np.uint8)).save(empty)
    out = tmp_path / "out"
    code, files = run(out, "--image", str(SOURCE), "--mask", str(empty), "--tiny", "--identity", "none", *FAST)
    assert code == 0 and np.array_equal(pixels(files["edit"]), pixels(SOURCE))
    assert any("region is empty" in n for n in json.loads(files["report"].read_text())["notes"])


def test_same_seed_same_edit_other_seed_other_edit(scarf_mask, tmp_path):
    models = models_of.tiny_sd15(tmp_path / "tok")
    photo = torch.from_numpy(pixels(SOURCE)).float()[None] / 255
    mask = torch.from_numpy(pixels(scarf_mask)[..., 0] >= 128).float()[None]
    settings = lambda seed: de.EditSettings(INSTRUCTION, seed=seed, steps=2, working_size=256)  # noqa: E731
    a, b, c = (de.edit_photo(models, photo, settings(s), mask).image for s in (1, 1, 2))
    assert (a - b).abs().max() < 1e-5  # CPU kernels may sum in another order between runs (last-bit noise)
    assert (a - c).abs().max() > 0.1


def test_a_diffusers_checkpoint_folder_loads(tmp_path, scarf_mask):
    """The real loading path: a diffusers SD1.5 folder (here of the tiny models, saved as safetensors)."""
    from diffusers import StableDiffusionImg2ImgPipeline

    tiny = models_of.tiny_sd15(tmp_path / "tok")
    pipe = StableDiffusionImg2ImgPipeline(vae=tiny.vae, text_encoder=tiny.text_encoder, tokenizer=tiny.tokenizer,
                                          unet=tiny.unet, scheduler=tiny.scheduler, safety_checker=None,
                                          feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(tmp_path / "sd15", safe_serialization=True)
    code, files = run(tmp_path / "out", "--image", str(SOURCE), "--mask", str(scarf_mask), "--checkpoint",
                      str(tmp_path / "sd15"), "--identity", "none", *FAST)
    assert code == 0 and not any("TINY" in p.name for p in files.values())
    report = json.loads(files["report"].read_text())
    assert report["tiny_random_models"] is False and report["checkpoint"].endswith("sd15")
    check_outside_is_source(pixels(files["edit"]), pixels(SOURCE), pixels(scarf_mask)[..., 0] >= 128)


def test_a_checkpoint_cut_short_is_named(tmp_path, capsys):
    """A partly downloaded diffusers folder: its U-Net weights stop half way."""
    from diffusers import StableDiffusionImg2ImgPipeline

    tiny = models_of.tiny_sd15(tmp_path / "tok")
    StableDiffusionImg2ImgPipeline(vae=tiny.vae, text_encoder=tiny.text_encoder, tokenizer=tiny.tokenizer,
                                   unet=tiny.unet, scheduler=tiny.scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False).save_pretrained(tmp_path / "sd15")
    weights = tmp_path / "sd15" / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    code = cli.main(["edit", "--image", str(SOURCE), "--instruction", INSTRUCTION, "--out", str(tmp_path / "o"),
                     "--checkpoint", str(tmp_path / "sd15")])
    err = capsys.readouterr().err
    assert code == 2 and f"{weights} (the SD1.5 model of --checkpoint) looks truncated or corrupt" in err
    assert "sha256" in err and "Traceback" not in err and not (tmp_path / "o").exists()


@pytest.mark.parametrize("args, message", [
    ([], "No model: pass --checkpoint"),
    (["--tiny", "--checkpoint", "x.safetensors"], "exclude each other"),
    (["--checkpoint", "{tmp}/model.safetensors"], "pass --config with a local diffusers SD1.5 folder"),
    (["--checkpoint", "{tmp}/nowhere"], "not found"),
])
def test_a_missing_model_says_what_to_provide(tmp_path, capsys, args, message):
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 16)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    code = cli.main(["edit", "--image", str(SOURCE), "--instruction", INSTRUCTION, "--out", str(tmp_path / "o"),
                     *args])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_an_instruction_the_rules_do_not_read_is_an_error(tmp_path, capsys):
    code = cli.main(["edit", "--image", str(SOURCE), "--instruction", "???", "--tiny", "--out", str(tmp_path)])
    assert code == 2 and "Could not read the instruction" in capsys.readouterr().err


NUMBER_CASES = {  # every number of the edit is checked like its node widget, before anything loads
    "--steps 0": (["--steps", "0"], "argument --steps: steps must be between 1 and 10000, got 0"),
    "--steps -3": (["--steps", "-3"], "steps must be between 1 and 10000, got -3"),
    "--steps 2.5": (["--steps", "2.5"], "'2.5' is not a whole number"),
    "--denoise -1": (["--denoise", "-1"], "denoise must be between 0 and 1, got -1"),
    "--denoise 5": (["--denoise", "5"], "denoise must be between 0 and 1, got 5"),
    "--denoise 0": (["--denoise", "0"], "denoise is 0: no sampling step would run"),
    "--cfg nan": (["--cfg", "nan"], "argument --cfg: cfg must be between 0 and 100, got nan"),
    "--cfg inf": (["--cfg", "inf"], "cfg must be between 0 and 100, got inf"),
    "--seed 2^64": (["--seed", str(2**64)], "seed must be between 0 and 1.84467e\\+19, got 18446744073709551616"),
    "--seed -1": (["--seed", "-1"], "seed must be between 0 and"),
    "--draws 0": (["--draws", "0"], "region_draws must be between 1 and 64"),
    "--context-factor nan": (["--context-factor", "nan"], "context_factor must be between 1 and 10, got nan"),
    "--working-size 8": (["--working-size", "8"], "working_size must be between 64 and 4096"),
    "--face-protection 2": (["--face-protection", "2"], "face_protection must be between 0 and 1"),
}


@pytest.mark.parametrize("case", list(NUMBER_CASES))
def test_every_number_is_range_checked_before_any_work(tmp_path, capsys, case):
    argv, message = NUMBER_CASES[case]
    code = cli.main(["edit", "--image", str(SOURCE), "--instruction", INSTRUCTION, "--tiny", "--out",
                     str(tmp_path / "o"), *argv])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and re.search(message, err), err
    assert "VAE" not in err and not (tmp_path / "o").exists()


def test_a_second_run_into_the_same_out_never_replaces_the_first(tmp_path, scarf_mask):
    out = tmp_path / "out"
    args = ["--image", str(SOURCE), "--mask", str(scarf_mask), "--tiny", "--identity", "none", *FAST]
    assert run(out, *args, "--seed", "1")[0] == 0
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert run(out, *args, "--seed", "2")[0] == 0
    now = {p.name: p.read_bytes() for p in out.iterdir()}
    assert {name: now[name] for name in first} == first, "the first run's files were replaced"
    second = sorted(set(now) - set(first))
    assert len(second) == 4 and all("_xmgie_TINY-RANDOM-WEIGHTS_2_" in n for n in second), second
    assert now[second[0]] != first[second[0].replace("_2_", "_")]  # another seed, another edit


def test_a_photo_too_thin_to_crop_says_what_to_do(tmp_path, capsys):
    strip = tmp_path / "strip.png"
    Image.fromarray(np.full((100, 8000, 3), 120, np.uint8)).save(strip)
    full = tmp_path / "full.png"
    Image.fromarray(np.full((100, 8000), 255, np.uint8)).save(full)
    code = cli.main(["edit", "--image", str(strip), "--mask", str(full), "--instruction", INSTRUCTION, "--tiny",
                     "--identity", "none", "--out", str(tmp_path / "o"), *FAST])
    err = capsys.readouterr().err
    assert code == 2 and "thinner than the 64 px a model can edit" in err and not (tmp_path / "o").exists()


def test_a_gpu_device_on_a_machine_without_one_is_named_before_any_work(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    code = cli.main(["edit", "--image", str(SOURCE), "--instruction", INSTRUCTION, "--tiny", "--device", "cuda",
                     "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "--device cuda: no CUDA GPU is usable here" in err and "Pass --device cpu" in err
    assert not (tmp_path / "o").exists()
