"""SD1.5 from local files for the diffusers host: a diffusers folder, or a single .safetensors checkpoint plus a
local diffusers config folder; offline, safetensors only, no safety checker."""

from __future__ import annotations

from pathlib import Path

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
