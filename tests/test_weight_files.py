"""The one loading guard (xmgie_core.weight_files): every kind of damaged model file, given to every loader of the
pack, is an XMGIEInputError that names the file, says it looks truncated or corrupt and what to do; never a raw
SafetensorError, KeyError or UnicodeDecodeError -> OSError traceback."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fixtures.tiny_clipseg import save_tiny_clipseg
from fixtures.tiny_mgie import save_tiny_mgie
from fixtures.tiny_region import save_tiny_predictor, save_tiny_t5
from fixtures.tiny_vlm import save_tiny_vlm
from xmgie_core.errors import XMGIEInputError
from xmgie_core.weight_files import check_pickle, check_safetensors, read_safetensors

CORRUPT = r"looks truncated or corrupt"
FIX = r"Replace the file: "


def cut(path: Path, keep: float = 0.5) -> Path:
    """A download that stopped part way: the first `keep` of the bytes."""
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    return path


DAMAGE = {
    "cut in half": lambda p: cut(p),
    "cut in the header": lambda p: cut(p, 0.001),
    "garbage bytes": lambda p: p.write_bytes(bytes(range(256)) * 40),
    "empty": lambda p: p.write_bytes(b""),
    "text": lambda p: p.write_text("these are not the weights\n"),
    "html page": lambda p: p.write_text("<!DOCTYPE html><html><body>429 Too Many Requests</body></html>"),
    "git-lfs pointer": lambda p: p.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 9\n"),
    "extra bytes": lambda p: p.write_bytes(p.read_bytes() + b"\0" * 10),
}
SAYS = {"text": "text", "html page": "HTML page", "git-lfs pointer": "git lfs pull", "cut in half": "missing",
        "extra bytes": "more than its header"}


def assert_names(error: str, path: Path) -> None:
    assert str(path) in error and re.search(CORRUPT, error) and re.search(FIX, error), error


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_every_damaged_safetensors_file_is_named_and_explained(tmp_path, damage):
    path = tmp_path / "model.safetensors"
    save_file({"a": torch.randn(64, 64), "b": torch.zeros(3)}, str(path), metadata={"k": "v"})
    check_safetensors(path, "a test model")  # whole: no error
    DAMAGE[damage](path)
    with pytest.raises(XMGIEInputError) as info:
        read_safetensors(path, "a test model")
    assert_names(str(info.value), path)
    assert SAYS.get(damage, "") in str(info.value) and "compare its size and sha256" in str(info.value)


@pytest.mark.parametrize("damage", ["cut in half", "garbage bytes", "empty", "text", "html page"])
def test_every_damaged_pickle_is_named_and_explained(tmp_path, damage):
    path = tmp_path / "unet.pt"
    torch.save({"a": torch.randn(64, 64)}, path)
    check_pickle(path, "a test checkpoint")
    DAMAGE[damage](path)
    with pytest.raises(XMGIEInputError) as info:
        check_pickle(path, "a test checkpoint")
    assert_names(str(info.value), path)


# --------------------------------------------------------------------------------------------------
# Every loader of the pack, each given a model whose weight file was cut short
# --------------------------------------------------------------------------------------------------

def _sd15_folder(root: Path) -> Path:
    from diffusers import StableDiffusionImg2ImgPipeline

    from xmgie_core.hosts.diffusers.models import tiny_sd15

    tiny = tiny_sd15(root / "tok")
    pipe = StableDiffusionImg2ImgPipeline(vae=tiny.vae, text_encoder=tiny.text_encoder, tokenizer=tiny.tokenizer,
                                          unet=tiny.unet, scheduler=tiny.scheduler, safety_checker=None,
                                          feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(root / "sd15", safe_serialization=True)
    return root / "sd15"


def sd15_folder(root: Path):
    from xmgie_core.hosts.diffusers.models import load_sd15_pipeline

    folder = _sd15_folder(root)
    return folder / "unet" / "diffusion_pytorch_model.safetensors", lambda: load_sd15_pipeline(folder, None, "cpu",
                                                                                               torch.float32)


def sd15_single_file(root: Path):
    from xmgie_core.hosts.diffusers.models import load_sd15_pipeline

    folder = _sd15_folder(root)
    single = root / "sd15.safetensors"
    save_file({"model.diffusion_model.out.2.bias": torch.zeros(4)}, str(single))
    return single, lambda: load_sd15_pipeline(single, folder, "cpu", torch.float32)


def mgie_folder(root: Path):
    from xmgie_core.mgie.folder import load_mgie_folder

    folder = save_tiny_mgie(root / "mgie")
    return folder / "mgie.safetensors", lambda: load_mgie_folder(folder)


def mgie_llm_weights(root: Path):
    from xmgie_core.mgie.folder import load_mgie_folder

    folder = save_tiny_mgie(root / "mgie")
    return folder / "model.safetensors", lambda: load_mgie_folder(folder)


def region_predictor(root: Path):
    from xmgie_core.region.predictor import load_predictor

    path = save_tiny_predictor(root / "region.safetensors")
    return path, lambda: load_predictor(path)


def clipseg(root: Path):
    from xmgie_core.region.clipseg import CLIPSeg

    folder = save_tiny_clipseg(root / "clipseg")
    return folder / "model.safetensors", lambda: CLIPSeg(folder)


def t5_encoder(root: Path):
    from xmgie_core.region.encoders import load_t5_instruction_encoder

    folder = save_tiny_t5(root / "t5")
    return folder / "model.safetensors", lambda: load_t5_instruction_encoder(folder)


def training_checkpoint(root: Path):
    from xmgie_core.training import load_checkpoint, save_checkpoint, Position

    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    path = root / "checkpoint.safetensors"
    save_checkpoint(path, model, optimizer, Position(), {"lr": 1.0}, "test-format")
    return path, lambda: load_checkpoint(path, model, optimizer, {"lr": 1.0}, "test-format", "test")


def local_vlm(root: Path):
    from xmgie_core.instruction.local import LocalVLM

    folder = save_tiny_vlm(root / "vlm")
    return next(folder.glob("*.safetensors")), lambda: LocalVLM(folder)


LOADERS = {f.__name__: f for f in (sd15_folder, sd15_single_file, mgie_folder, mgie_llm_weights, region_predictor,
                                   clipseg, t5_encoder, training_checkpoint, local_vlm)}


@pytest.mark.parametrize("loader", list(LOADERS))
def test_every_loader_names_a_weight_file_that_was_cut_short(tmp_path, loader):
    path, load = LOADERS[loader](tmp_path)
    cut(path)
    with pytest.raises(XMGIEInputError) as info:
        load()
    assert_names(str(info.value), path)


def test_a_broken_config_of_a_model_folder_is_named(tmp_path):
    from xmgie_core.region.clipseg import CLIPSeg

    folder = save_tiny_clipseg(tmp_path / "clipseg")
    cut(folder / "config.json")
    with pytest.raises(XMGIEInputError, match=r"config\.json .*looks truncated or corrupt: it is not valid JSON"):
        CLIPSeg(folder)


def test_an_unreadable_weight_file_is_named(tmp_path):
    folder = save_tiny_clipseg(tmp_path / "clipseg")
    (folder / "extra.safetensors").symlink_to(tmp_path / "gone.safetensors")
    from xmgie_core.region.clipseg import CLIPSeg

    with pytest.raises(XMGIEInputError, match=r"extra\.safetensors .*cannot be read"):
        CLIPSeg(folder)


def test_a_whole_model_still_loads(tmp_path):
    from xmgie_core.mgie.folder import load_mgie_folder

    assert load_mgie_folder(save_tiny_mgie(tmp_path / "mgie")).meta is not None
