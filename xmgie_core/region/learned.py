"""Learned-mode inference: IMAGE + instruction -> P_region at the image's size (eqs 1-3, multi-scale)."""

from __future__ import annotations

from typing import Callable

import torch

from ..errors import XMGIEInputError
from .encoders import ImageEncoder, InstructionEncoder
from .multiscale import multiscale_probability
from .predictor import RegionPredictor

VIEW_BATCH = 16
"""Views per encoder call (bounds activation memory at high scales and batch sizes)."""


def predict_learned(predictor: RegionPredictor, image_encoder: ImageEncoder, instruction_encoder: InstructionEncoder,
                    images: torch.Tensor, instruction: str, scales: tuple[int, ...] | None = None,
                    progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """images [B, H, W, C] in 0..1 (ComfyUI IMAGE), one instruction for the batch -> P(x) [B, H, W] in [0, 1]."""
    if not instruction.strip():
        raise XMGIEInputError("The learned region predictor needs the edit instruction (t_ins), e.g. 'give the man a "
                              "red scarf': wire the Instruction node's instruction or type it.")
    config = predictor.config
    if image_encoder.size != config.image_size:
        raise XMGIEInputError(f"The CLIP vision model takes {image_encoder.size} px images but the region predictor "
                              f"was trained on {config.image_size} px ({config.image_encoder}); load that model.")
    with torch.inference_mode():
        f_ins, ins_mask = instruction_encoder([instruction.strip()])
        param = next(predictor.parameters())
        f_ins = f_ins.to(param)

        def predict(views: torch.Tensor) -> torch.Tensor:
            grids = [predictor.grid_probability(image_encoder(chunk)[1].to(param), f_ins, ins_mask.to(param.device))
                     for chunk in views.split(VIEW_BATCH)]
            return torch.cat(grids).float().cpu()

        pixels = images[..., :3].movedim(-1, 1).float()
        return multiscale_probability(predict, pixels, config.image_size, scales or config.scales, progress)
