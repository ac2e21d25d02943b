"""The seam for ComfyUI's SD U-Net family (comfy/ldm/modules/diffusionmodules/openaimodel.py: UNetModel, SD1.x, SD2,
SDXL and their inpainting / InstructPix2Pix variants): where its cross-attention layers are, which blocks are PFB's
fusion points, how its sampling maps noise to latents. Every technique's ComfyUI adapter asks here; a DiT family
gets a module of its own beside this one (docs/comfyui-internals.md §3.2, §3.3, §3.5, §8).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import torch

from ...errors import XMGIEInputError
from ...pfb import BlockLayout

Hook = Callable[[str, torch.Tensor], torch.Tensor]


def require_unet(diffusion_model: torch.nn.Module, technique: str, instead: str) -> None:
    """A DiT (Flux, SD3, Qwen-Image ...) has no U-Net blocks: say so, and what to use instead."""
    if not all(hasattr(diffusion_model, a) for a in ("input_blocks", "middle_block", "output_blocks")):
        raise XMGIEInputError(f"{technique}, but this model's diffusion model is a {type(diffusion_model).__name__} "
                              f"without U-Net blocks (a DiT such as Flux or SD3): {instead}.")


def _levels(diffusion_model: torch.nn.Module) -> Iterator[tuple[str, int, torch.nn.Module]]:
    yield from (("input", n, b) for n, b in enumerate(diffusion_model.input_blocks))
    yield "middle", 0, diffusion_model.middle_block
    yield from (("output", n, b) for n, b in enumerate(diffusion_model.output_blocks))


def _transformer(block: torch.nn.Module) -> torch.nn.Module | None:
    """The SpatialTransformer of a U-Net block (None for a block without cross-attention)."""
    return next((m for m in block.modules() if hasattr(m, "transformer_blocks")), None)


def attn2_keys(diffusion_model: torch.nn.Module) -> list[tuple[str, int, int]]:
    """(block name, block number, index inside its SpatialTransformer) of every cross-attention: the keys
    ModelPatcher.set_model_attn2_replace takes."""
    require_unet(diffusion_model, "The attention mode reads U-Net cross-attention",
                 "use an SD1.x, SD2 or SDXL checkpoint, or the noise-difference or CLIPSeg mode")
    return [(kind, number, i) for kind, number, block in _levels(diffusion_model)
            if (t := _transformer(block)) is not None for i in range(len(t.transformer_blocks))]


def find_attn2(diffusion_model: torch.nn.Module, block: tuple, block_index: int) -> torch.nn.Module:
    """The cross-attention module ComfyUI is running at transformer_options' block/block_index."""
    kind, number = block
    container = diffusion_model.middle_block if kind == "middle" else getattr(diffusion_model, f"{kind}_blocks")[number]
    found = _transformer(container)
    if found is None:
        raise XMGIEInputError(f"No cross-attention found in U-Net block {block}.")
    return found.transformer_blocks[block_index].attn2


def layout(diffusion_model: torch.nn.Module) -> BlockLayout:
    """PFB's blendable layers of the U-Net, from where it down- and upsamples."""
    require_unet(diffusion_model, "PFB blends U-Net blocks",
                 "use an SD1.x, SD2 or SDXL checkpoint (or their inpainting versions)")

    def scale(block: torch.nn.Module, kind: str) -> int:
        return 2 if any(type(m).__name__ == kind for m in block.modules()) else 1

    return BlockLayout.from_blocks([scale(b, "Downsample") for b in diffusion_model.input_blocks],
                                  [scale(b, "Upsample") for b in diffusion_model.output_blocks])


class BlockPatch:
    """PFB's fusion points as block patches: input_block_patch_after_skip (`input_k`: h after it was pushed as a
    skip) and output_block_patch (`middle` at output 0, `output_k` at output k + 1), each calling hook(layer, h)."""

    def __init__(self, hook: Hook):
        self.hook = hook

    def __deepcopy__(self, memo: dict) -> "BlockPatch":
        return self

    # -- h = p(h, transformer_options)
    def after_skip(self, h: torch.Tensor, transformer_options: dict) -> torch.Tensor:
        return self.hook(f"input_{transformer_options['block'][1]}", h)

    # -- h, hsp = p(h, hsp, transformer_options)
    def output(self, h: torch.Tensor, hsp: torch.Tensor, transformer_options: dict) -> tuple[torch.Tensor, torch.Tensor]:
        k = transformer_options["block"][1]
        return self.hook("middle" if k == 0 else f"output_{k - 1}", h), hsp


def with_block_patch(model_options: dict, patch: BlockPatch) -> dict:
    """A copy of model_options with `patch` appended to the block patch lists (the original is untouched)."""
    options = dict(model_options)
    to = options["transformer_options"] = dict(options.get("transformer_options", {}))
    patches = to["patches"] = dict(to.get("patches", {}))
    patches["input_block_patch_after_skip"] = patches.get("input_block_patch_after_skip", []) + [patch.after_skip]
    patches["output_block_patch"] = patches.get("output_block_patch", []) + [patch.output]
    return options


def noise_for(model_sampling: Any, sigma: torch.Tensor, x: torch.Tensor, x0: torch.Tensor,
              max_denoise: bool = False) -> torch.Tensor:
    """The noise n with noise_scaling(sigma, n, x0) = x: noise_scaling is affine in the noise, so
    n = (x - noise_scaling(sigma, 0, x0)) / noise_scaling(sigma, 1, 0). With x the model input and x0 its denoised
    output this is the model's noise prediction."""
    zero = torch.zeros_like(x)
    return (x - model_sampling.noise_scaling(sigma, zero, x0, max_denoise)) \
        / model_sampling.noise_scaling(sigma, torch.ones_like(x), zero, max_denoise)
