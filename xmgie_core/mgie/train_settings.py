"""MGIE training's settings: one run's choices, checked up front, and what a resumed run must share with the run it
continues."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import XMGIEInputError
from ..training import RunSettings, run_signature


@dataclass(frozen=True)
class MGIETrainSettings(RunSettings):
    """One MGIE training run's choices (the command line's options); invalid values are refused together."""

    batch_size: int = 4
    alpha: float = 0.5
    """L_all = L_ins + alpha * L_edit."""
    text_drop: float = 0.05
    image_drop: float = 0.05
    both_drop: float = 0.05
    train_unet: bool = False
    lora_rank: int = 0
    lora_alpha: float | None = None
    """LoRA scale = lora_alpha / lora_rank; None: lora_alpha = lora_rank (scale 1)."""
    resolution: int = 256
    """Side of the square (centre-cropped) images the VAE encodes (ml-mgie: 256)."""
    grad_clip: float = 1.0
    """Clip the trained parameters' gradient norm to this (0: no clipping)."""

    def __post_init__(self) -> None:
        bad = self.problems(counts=("resolution",), non_negative=("alpha", "grad_clip", "lora_rank"))
        drops = (self.text_drop, self.image_drop, self.both_drop)
        if not all(0 <= d <= 1 for d in drops) or not sum(drops) <= 1:
            bad.append(f"--text-drop {self.text_drop} --image-drop {self.image_drop} --both-drop {self.both_drop}")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            bad.append(f"--lora-alpha {self.lora_alpha}")
        if bad:
            raise XMGIEInputError(f"Invalid training settings: {', '.join(bad)}. Steps, batch size, save-every and "
                                  "resolution must be >= 1, the learning rate and --lora-alpha > 0, weight decay, "
                                  "alpha, grad-clip and lora-rank >= 0, the three dropout probabilities in 0..1 "
                                  "with a sum of at most 1, every number finite and the seed in 0..2^64-1.")

    @property
    def lora_scale(self) -> float:
        return (self.lora_alpha if self.lora_alpha is not None else self.lora_rank) / max(self.lora_rank, 1)

    def signature(self) -> dict[str, Any]:
        """What a resumed run must share with the run it continues (steps and save_every may change)."""
        return run_signature(self, ("steps", "save_every"))
