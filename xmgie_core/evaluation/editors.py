"""What an editor hands the evaluation (Edited), and the editor of precomputed edits from a folder (matched by sample
id). The headless xMGIE edit with its ablations is an application's (apps/evaluate.py XmgieEditor)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import XMGIEInputError
from ..image_io import load_image, load_mask
from .datasets import Sample

EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
ABLATIONS = {"cam": "--no-cam", "pfb": "--no-pfb", "gb": "--no-gb", "region": "--no-region"}
"""The techniques an ablation can switch off, and the option that does it."""


@dataclass
class Edited:
    image: torch.Tensor
    """IMAGE [1,H,W,3]."""
    mask: torch.Tensor | None
    """The editor's region, MASK [1,H,W] (None: the editor gives none)."""
    notes: list[str] = field(default_factory=list)
    report: dict = field(default_factory=dict)


class PrecomputedEdits:
    """Edits read from a folder: <id>.png (or .jpg/.jpeg/.webp, or <id>_edit.png), an optional <id>_mask.png as the
    editor's region; MagicBrush samples also as MagicBrush's own result layout, <img_id>/<img_id>_1.png for turn 1
    and <img_id>/<img_id>_inde_<k>.png for turn k (its evaluation README)."""

    kind = "precomputed"

    def __init__(self, folder: Path):
        if not Path(folder).is_dir():
            raise XMGIEInputError(f"--edits {folder} is not a folder. Give the folder of edited images, named by "
                                  "sample id (<id>.png).")
        self.folder = Path(folder)

    def candidates(self, sample: Sample) -> list[Path]:
        names = [f"{sample.id}{ext}" for ext in EXTENSIONS] + [f"{sample.id}_edit.png"]
        if "img_id" in sample.info and "turn_index" in sample.info:
            img, k = sample.info["img_id"], sample.info["turn_index"]
            names.append(f"{img}/{img}_1.png" if k == 1 else f"{img}/{img}_inde_{k}.png")
        return [self.folder / n for n in names]

    def edit(self, sample: Sample, source: torch.Tensor, gt_mask: torch.Tensor | None) -> Edited:
        found = next((p for p in self.candidates(sample) if p.is_file()), None)
        if found is None:
            raise XMGIEInputError(f"no edit for sample {sample.id} in {self.folder} (looked for "
                                  f"{', '.join(p.name for p in self.candidates(sample)[:3])}, ...)")
        mask_file = self.folder / f"{sample.id}_mask.png"
        return Edited(load_image(found)[0], load_mask(mask_file) if mask_file.is_file() else None,
                      report={"edit_file": str(found)})

    def describe(self) -> dict:
        return {"kind": self.kind, "folder": str(self.folder)}
