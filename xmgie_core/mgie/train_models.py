"""The models MGIE training uses: the MGIE folder, the InstructPix2Pix U-Net (the converter's single file or a
diffusers folder) and the VAE, loaded and checked to fit together; the trained U-Net written in ComfyUI's layout."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import XMGIEInputError
from ..weight_files import PICKLED, check_model_folder, check_safetensors, loading
from .folder import load_mgie_folder
from .llava import MGIE
from .unet_layout import UNET_FORMAT, diffusers_unet_to_ldm

UNET_CONFIG_KEY = "xmgie_unet_config"
"""Safetensors metadata key holding the diffusers config of a U-Net file written here."""
SD15_IP2P_UNET = dict(
    act_fn="silu", attention_head_dim=8, block_out_channels=[320, 640, 1280, 1280], center_input_sample=False,
    cross_attention_dim=768, down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                               "DownBlock2D"],
    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, in_channels=8, layers_per_block=2,
    mid_block_scale_factor=1, norm_eps=1e-5, norm_num_groups=32, out_channels=4, sample_size=64,
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"])
"""diffusers config of SD1.5 InstructPix2Pix's U-Net (SD1.5's with 8 input channels): what ml-mgie's unet.pt is."""
UNET_HINT = ("give the U-Net file `python -m xmgie_core.mgie convert` wrote (--out-unet), or a diffusers "
             "UNet2DConditionModel folder (config.json + diffusion_pytorch_model.safetensors)")


@dataclass
class Models:
    """The loaded models and what identifies them (for the resume check)."""

    mgie: MGIE
    unet: nn.Module
    vae: nn.Module
    names: dict[str, str]


def _diffusers_folder(path: Path, sub: str, option: str, what: str, weights: str) -> Path:
    """A diffusers model folder: `path` itself or its `sub`/ (a pipeline folder), with config.json + safetensors."""
    if not path.exists():
        raise XMGIEInputError(f"{option} {path} does not exist; give {what}.")
    folder = path / sub if not (path / "config.json").is_file() and (path / sub / "config.json").is_file() else path
    if not (folder / "config.json").is_file():
        raise XMGIEInputError(f"{option} {path} has no config.json (nor {sub}/config.json), so it is not a diffusers "
                              f"model folder; give {what}.")
    if not any(folder.glob("*.safetensors")):
        pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLED)
        found = f" (found only {', '.join(pickled)}: pickle files are never loaded, for safety; save the model with " \
                f"safe_serialization=True)" if pickled else ""
        raise XMGIEInputError(f"{option} {folder} has no {weights}{found}; give {what}.")
    return folder


def _unet_config(metadata: dict[str, str], config_file: Path | None) -> dict[str, Any]:
    if config_file is not None:
        try:
            config = json.loads(Path(config_file).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise XMGIEInputError(f"--unet-config {config_file} is not a readable JSON file ({e}); give the U-Net's "
                                  "diffusers config.json.") from None
        if not isinstance(config, dict):
            raise XMGIEInputError(f"--unet-config {config_file} must hold a JSON object (a diffusers config.json).")
        return config
    if UNET_CONFIG_KEY in metadata:
        return json.loads(metadata[UNET_CONFIG_KEY])
    return dict(SD15_IP2P_UNET)


def load_unet_file(path: Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                   config_file: Path | None = None) -> nn.Module:
    """One safetensors U-Net: the converter's (ComfyUI/LDM key names) or a diffusers-keyed state dict; its config
    from --unet-config, else from its metadata (files written here), else SD1.5 InstructPix2Pix's."""
    from diffusers import UNet2DConditionModel
    from safetensors import safe_open

    check_safetensors(path, "the U-Net of --unet")
    with loading(path, "the U-Net of --unet"), safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        keys = list(f.keys())
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
    config = _unet_config(metadata, config_file)
    try:
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(config)
    except Exception as e:  # diffusers rejects a config it cannot build with various error types
        raise XMGIEInputError(f"The U-Net config for {path} cannot be built ({e}); give --unet-config the U-Net's "
                              "diffusers config.json.") from None
    expected = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    mapping = {k: k for k in expected} if "conv_in.weight" in keys else diffusers_unet_to_ldm(expected)
    missing = sorted(k for k in expected if mapping[k] not in shapes)
    unused = sorted(set(shapes) - set(mapping.values()))
    wrong = sorted(k for k in expected if mapping[k] in shapes and shapes[mapping[k]] != expected[k])
    if missing or unused or wrong:
        source = "--unet-config" if config_file else ("its metadata" if UNET_CONFIG_KEY in metadata else
                                                      "SD1.5 InstructPix2Pix's (the default)")
        detail = "; ".join(([f"{len(missing)} tensors missing, e.g. {mapping[missing[0]]}"] if missing else [])
                           + ([f"{len(unused)} unused, e.g. {unused[0]}"] if unused else [])
                           + ([f"{len(wrong)} of another shape, e.g. {mapping[wrong[0]]}"] if wrong else []))
        raise XMGIEInputError(f"--unet {path} does not fit the U-Net config taken from {source} ({detail}). For an "
                              "U-Net that is not SD1.5's, pass its diffusers config.json with --unet-config, or "
                              f"{UNET_HINT}.")
    with loading(path, "the U-Net of --unet"), safe_open(str(path), framework="pt", device="cpu") as f:
        state = {k: f.get_tensor(mapping[k]).to(dtype) for k in expected}
    unet.load_state_dict(state, assign=True)
    if any(t.is_meta for t in (*unet.parameters(), *unet.buffers())):
        raise XMGIEInputError(f"--unet {path}: the U-Net config builds tensors the file does not hold; {UNET_HINT}.")
    return unet.to(device=device, dtype=dtype).eval()


def load_unet(path: Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
              config_file: Path | None = None) -> nn.Module:
    """--unet: a safetensors file (load_unet_file) or a diffusers UNet2DConditionModel folder (or a pipeline folder
    with unet/)."""
    from diffusers import UNet2DConditionModel

    path = Path(path)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise XMGIEInputError(f"--unet {path} is not a .safetensors file (pickles are never loaded, for safety); "
                                  f"{UNET_HINT}.")
        return load_unet_file(path, device, dtype, config_file)
    folder = _diffusers_folder(path, "unet", "--unet", UNET_HINT, "diffusion_pytorch_model.safetensors")
    check_model_folder(folder, "the U-Net of --unet")
    with loading(folder, "the U-Net of --unet"):
        unet = UNet2DConditionModel.from_pretrained(folder, local_files_only=True, use_safetensors=True,
                                                    torch_dtype=dtype)
    return unet.to(device).eval()


def load_vae(path: Path, device: torch.device | str = "cpu") -> nn.Module:
    """--vae: a diffusers AutoencoderKL folder (or a pipeline folder with vae/), float32 (SD's VAE overflows in
    float16)."""
    from diffusers import AutoencoderKL

    what = "a diffusers AutoencoderKL folder (e.g. stable-diffusion-v1-5/vae: config.json + " \
           "diffusion_pytorch_model.safetensors)"
    folder = _diffusers_folder(Path(path), "vae", "--vae", what, "diffusion_pytorch_model.safetensors")
    check_model_folder(folder, "the VAE of --vae")
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if config.get("_class_name") not in (None, "AutoencoderKL"):
        raise XMGIEInputError(f"--vae {folder} holds a {config.get('_class_name')}, not an AutoencoderKL; give {what}.")
    with loading(folder, "the VAE of --vae"):
        vae = AutoencoderKL.from_pretrained(folder, local_files_only=True, use_safetensors=True,
                                            torch_dtype=torch.float32)
    return vae.to(device).eval().requires_grad_(False)


def check_models(mgie: MGIE, unet: nn.Module, vae: nn.Module, resolution: int) -> None:
    """The MGIE edit head, the U-Net and the VAE must fit together; say which do not."""
    problems = []
    latent = vae.config.latent_channels
    if unet.config.in_channels != 2 * latent:
        problems.append(f"the U-Net takes {unet.config.in_channels} input channels, but InstructPix2Pix needs "
                        f"{2 * latent} (the VAE's {latent}-channel noisy latent ++ the input image's latent); give "
                        "MGIE's InstructPix2Pix U-Net, not a text-to-image one")
    if unet.config.out_channels != latent:
        problems.append(f"the U-Net predicts {unet.config.out_channels} channels but the VAE's latents have {latent}")
    if unet.config.cross_attention_dim != mgie.edit_head.config["out_dim"]:
        problems.append(f"the MGIE edit head writes {mgie.edit_head.config['out_dim']}-d conditioning but the U-Net's "
                        f"cross-attention takes {unet.config.cross_attention_dim}-d (MGIE pairs a 768-d head with "
                        "SD1.5's U-Net)")
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if resolution % factor:
        problems.append(f"--resolution {resolution} is not a multiple of the VAE's downsampling factor {factor}")
    if problems:
        raise XMGIEInputError(f"The models do not fit together: {'; '.join(problems)}.")


def _fingerprint(path: Path) -> str:
    """Names and sizes of a model file or folder's files (cheap; tells a resume that the models changed)."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    h = hashlib.sha1()
    for p in files:
        h.update(f"{p.relative_to(path) if p != path else p.name}:{p.stat().st_size};".encode())
    return f"{path.name}:{h.hexdigest()[:16]}"


def load_models(mgie: Path, unet: Path, vae: Path, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32, unet_config: Path | None = None,
                resolution: int = 256) -> Models:
    """The MGIE folder (in `dtype`), the U-Net (in `dtype`), the VAE (float32), checked to fit together."""
    loaded = load_mgie_folder(Path(mgie), device, dtype)
    u = load_unet(Path(unet), device, dtype, unet_config)
    v = load_vae(Path(vae), device)
    check_models(loaded, u, v, resolution)
    return Models(loaded, u, v, {"mgie": _fingerprint(mgie), "unet": _fingerprint(unet), "vae": _fingerprint(vae)})


def save_unet(unet: nn.Module, path: Path, metadata: dict[str, str] | None = None) -> Path:
    """The U-Net as one safetensors file with ComfyUI's (LDM) key names, like the converter's --out-unet, plus its
    diffusers config in the metadata (so --unet can load it back)."""
    from safetensors.torch import save_file

    state = unet.state_dict()
    mapping = diffusers_unet_to_ldm(state)
    config = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    meta = {"xmgie_format": UNET_FORMAT, UNET_CONFIG_KEY: json.dumps(config, default=list),
            "xmgie_layout": "ComfyUI/LDM UNetModel keys (InstructPix2Pix, in_channels "
                            f"{unet.config.in_channels})", **(metadata or {})}
    tmp = path.with_name(path.name + ".tmp")
    save_file({mapping[k]: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp), metadata=meta)
    tmp.replace(path)
    return path
