"""Tiny random-weight DiT editors for the host tier, built from ComfyUI's own classes (ComfyUI must be imported).

- `tiny_dit_model(family)`: a ModelPatcher around ComfyUI's Flux (FLUX.1 Kontext layout) or Qwen-Image model at a
  small width, built in code (as a checkpoint loader would, through supported_models + model_base), with the
  family's real sampling (flow matching, CONST).
- `conditioning(...)`: CONDITIONING built directly ([[context [1, L, dim], {...}]]), since the real text encoders
  (T5-XXL, Qwen2.5-VL 7B) are too large to build; with `reference` the editor's reference latent as ReferenceLatent
  adds it.
- `write_detectable_checkpoint(family, path)`: a diffusion-model file ComfyUI's UNETLoader detects as Flux (Kontext)
  / Qwen-Image: detection reads the block counts from the keys and fixes the widths, so it keeps the real width
  (3072) with one block of each kind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from comfy_harness import randomized

FLUX, QWEN = "flux", "qwen_image"
FLUX_TINY = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "patch_size": 2, "vec_in_dim": 16,
             "context_in_dim": 32, "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 2, "depth": 2,
             "depth_single_blocks": 2, "axes_dim": [8, 12, 12], "theta": 10000, "qkv_bias": True,
             "guidance_embed": True}
QWEN_TINY = {"image_model": "qwen_image", "in_channels": 64, "out_channels": 16, "patch_size": 2, "num_layers": 3,
             "attention_head_dim": 32, "num_attention_heads": 2, "joint_attention_dim": 32,
             "axes_dims_rope": (8, 12, 12)}
CONTEXT_DIM = {FLUX: FLUX_TINY["context_in_dim"], QWEN: QWEN_TINY["joint_attention_dim"]}


def _config(family: str, unet_config: dict) -> Any:
    import comfy.supported_models

    cls = comfy.supported_models.Flux if family == FLUX else comfy.supported_models.QwenImage
    config = cls(dict(unet_config))
    config.set_inference_dtype(torch.float32, None)
    return config


def tiny_dit_model(family: str, seed: int = 0) -> Any:
    """A ModelPatcher (CPU, float32) around a tiny random Flux or Qwen-Image model."""
    import comfy.model_patcher

    config = _config(family, FLUX_TINY if family == FLUX else QWEN_TINY)
    model = config.get_model({}, device="cpu")
    state = randomized(model.diffusion_model.state_dict(), torch.Generator().manual_seed(seed))
    model.diffusion_model.load_state_dict(state)
    model.diffusion_model.to(torch.float32)
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"),
                                            offload_device=torch.device("cpu"))


def conditioning(family: str, tokens: int = 12, seed: int = 1, reference: torch.Tensor | None = None,
                 scale: float = 1.0) -> list:
    """CONDITIONING [[context [1, tokens, dim], extras]] with a seeded context (Flux also gets a pooled output and
    FluxGuidance's guidance); `reference` is added as ReferenceLatent does."""
    gen = torch.Generator().manual_seed(seed)
    context = torch.randn(1, tokens, CONTEXT_DIM[family], generator=gen) * scale
    extras: dict = {}
    if family == FLUX:
        extras["pooled_output"] = torch.randn(1, FLUX_TINY["vec_in_dim"], generator=gen)
        extras["guidance"] = 2.5
    if reference is not None:
        extras["reference_latents"] = [reference]
    return [[context, extras]]


def latent(family: str, h: int = 8, w: int = 8, seed: int = 2) -> torch.Tensor:
    """A random latent in the family's format: [1, 16, h, w] (Flux) or [1, 16, 1, h, w] (Qwen-Image, Wan 2.1 VAE)."""
    z = torch.randn(1, 16, h, w, generator=torch.Generator().manual_seed(seed))
    return z if family == FLUX else z[:, :, None]


DETECTABLE = {
    FLUX: {"image_model": "flux", "in_channels": 16, "out_channels": 16, "patch_size": 2, "vec_in_dim": 768,
           "context_in_dim": 4096, "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 1,
           "depth_single_blocks": 1, "axes_dim": [16, 56, 56], "theta": 10000, "qkv_bias": True,
           "guidance_embed": True},
    QWEN: {"image_model": "qwen_image", "in_channels": 64, "out_channels": 16, "num_layers": 1},
}


def write_detectable_checkpoint(family: str, path: Path, seed: int = 0) -> Path:
    """A bf16 diffusion-model safetensors that UNETLoader detects as `family` (real width, one block of each kind)."""
    from safetensors.torch import save_file

    model = _config(family, DETECTABLE[family]).get_model({}, device="cpu")
    state = randomized(model.diffusion_model.state_dict(), torch.Generator().manual_seed(seed))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in state.items()}, str(path))
    return path
