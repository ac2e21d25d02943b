"""The diffusers host's model loaders. SD1.5: a diffusers folder, or a single .safetensors checkpoint plus a local
diffusers config folder (offline, safetensors only, no safety checker); or the tiny random-weight models
(xmgie_core.tiny) that check the plumbing. SD15 holds the parts the edit, the data builder and the benchmarks use.
DiT editors (FLUX.1 Kontext, Qwen-Image-Edit-2509): their diffusers folder, offline, safetensors only."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ...errors import XMGIEInputError
from ...weight_files import check_model_folder, check_safetensors, loading


def load_sd15_pipeline(path: Path, config: Path | None, device: str, dtype: torch.dtype,
                       flag: str = "--checkpoint", config_flag: str = "--config"):
    """A StableDiffusionImg2ImgPipeline (unet, vae, text_encoder, tokenizer, scheduler) from `path`.

    `flag` / `config_flag` name the command-line options in the error messages."""
    from diffusers import StableDiffusionImg2ImgPipeline

    path = Path(path)
    options = dict(local_files_only=True, dtype=dtype, safety_checker=None, requires_safety_checker=False)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise XMGIEInputError(f"{flag} {path} has no model_index.json: give a diffusers-format SD1.5 folder "
                                  "or a single .safetensors checkpoint.")
        what = f"the SD1.5 model of {flag}"
        check_model_folder(path, what)
        with loading(path, what):
            pipe = StableDiffusionImg2ImgPipeline.from_pretrained(str(path), use_safetensors=True, **options)
    elif path.is_file() and path.suffix == ".safetensors":
        if config is None or not (Path(config) / "model_index.json").is_file():
            raise XMGIEInputError(f"{flag} {path.name} is a single-file checkpoint; diffusers also needs the "
                                  f"SD1.5 configs and tokenizer to build it offline: pass {config_flag} with a "
                                  "local diffusers SD1.5 folder (its *.json and tokenizer files; weights not needed).")
        check_safetensors(path, f"the SD1.5 checkpoint of {flag}")
        check_model_folder(Path(config), f"the SD1.5 configs of {config_flag}")
        with loading(path, f"the SD1.5 checkpoint of {flag}, with the configs of {config_flag} {config}"):
            pipe = StableDiffusionImg2ImgPipeline.from_single_file(str(path), config=str(config), **options)
    else:
        raise XMGIEInputError(f"{flag} {path} not found (or not a .safetensors file): give a diffusers SD1.5 "
                              "folder or a .safetensors checkpoint (e.g. from ComfyUI/models/checkpoints/).")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


@dataclass
class SD15:
    """The parts of an SD1.5 checkpoint the edit uses (diffusers modules), and where they came from."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    source: str
    tiny: bool = False

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype


def ddim_scheduler(config: dict | None = None):
    """SD1.5's DDIM schedule (scaled-linear betas 0.00085..0.012, 1000 steps), or `config`'s."""
    from diffusers import DDIMScheduler

    if config is not None:
        return DDIMScheduler.from_config(config)
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


def load_sd15(path: Path, config: Path | None = None, device: str = "cpu", dtype: torch.dtype = torch.float32) -> SD15:
    """An SD1.5 checkpoint from a local diffusers folder or a single .safetensors file (+ `config` folder)."""
    pipe = load_sd15_pipeline(path, config, device, dtype)
    return SD15(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, ddim_scheduler(pipe.scheduler.config),
                str(path))


def tiny_sd15(tokenizer_dir: Path, device: str = "cpu") -> SD15:
    """Tiny random-weight SD1.5-shaped models (xmgie_core.tiny): the plumbing runs, the picture is noise."""
    from ...tiny import clip_tokenizer, tiny_clip_text, tiny_unet, tiny_vae

    return SD15(tiny_unet().to(device), tiny_vae().to(device), tiny_clip_text().to(device),
                clip_tokenizer(tokenizer_dir), ddim_scheduler(), "tiny random weights", tiny=True)


DIT_FOLDERS = {
    "kontext": ("FluxKontextPipeline", "FLUX.1-Kontext-dev", "transformer/, vae/, text_encoder/ (CLIP), text_encoder_2/ "
                "(T5), tokenizer/, tokenizer_2/, scheduler/"),
    "qwen-edit": ("QwenImageEditPlusPipeline", "Qwen-Image-Edit-2509", "transformer/, vae/, text_encoder/ "
                  "(Qwen2.5-VL), tokenizer/, processor/, scheduler/"),
}
"""--editor -> (diffusers pipeline class, the model users download, the folder's parts)."""


def load_dit_pipeline(path: Path, editor: str, device: str, dtype: torch.dtype, flag: str = "--checkpoint"):
    """The editor's diffusers pipeline from a local folder (never downloaded): its model_index.json must name the
    editor's pipeline class; every weight and JSON file is checked before loading."""
    import diffusers

    cls_name, model, parts = DIT_FOLDERS[editor]
    path = Path(path)
    index = path / "model_index.json"
    if not index.is_file():
        raise XMGIEInputError(f"{flag} {path} is not a diffusers folder (no model_index.json): --editor {editor} needs "
                              f"the local diffusers folder of {model} (model_index.json, {parts}).")
    what = f"the {model} pipeline of {flag}"
    check_model_folder(path, what)
    found = json.loads(index.read_text()).get("_class_name")
    if found != cls_name:
        other = [e for e, (c, _, _) in DIT_FOLDERS.items() if c == found]
        hint = f"use --editor {other[0]}" if other else f"give a {model} folder"
        raise XMGIEInputError(f"{flag} {path} holds a {found} pipeline, not the {cls_name} that --editor {editor} "
                              f"runs: {hint}.")
    with loading(path, what):
        pipe = getattr(diffusers, cls_name).from_pretrained(str(path), local_files_only=True, use_safetensors=True,
                                                            dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
