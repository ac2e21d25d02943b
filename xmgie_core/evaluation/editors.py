"""What produces the edits an evaluation scores: precomputed edits from a folder (matched by sample id), or the
headless xMGIE edit (apps/edit.py edit_photo) with techniques switched off for ablations."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
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


class XmgieEditor:
    """The headless whole edit on an SD1.5 model. Ablations (ABLATIONS): cam / pfb -> EditSettings.cam / .pfb; gb ->
    edge_width 0 (GB's blend zone gone: the region pasted with a hard edge); region -> the whole photo as the region
    (no localisation). `given_masks`: the dataset's mask is the region instead of the predicted one."""

    kind = "xmgie"

    def __init__(self, models, settings, face_backend=None, off: tuple[str, ...] = (), given_masks: bool = False):
        unknown = sorted(set(off) - set(ABLATIONS))
        if unknown:
            raise XMGIEInputError(f"Unknown techniques to switch off: {unknown}; use {', '.join(ABLATIONS)}.")
        if given_masks and "region" in off:
            raise XMGIEInputError("--dataset-masks and --no-region exclude each other: one gives the dataset's "
                                  "region, the other the whole photo.")
        self.models, self.face_backend, self.off, self.given_masks = models, face_backend, tuple(off), given_masks
        self.settings = replace(settings, cam="cam" not in off, pfb="pfb" not in off,
                                edge_width=0.0 if "gb" in off else settings.edge_width)

    def edit(self, sample: Sample, source: torch.Tensor, gt_mask: torch.Tensor | None) -> Edited:
        from ..apps.edit import edit_photo

        mask = None
        if "region" in self.off:
            mask = torch.ones(source.shape[:3])
        elif self.given_masks:
            if gt_mask is None:
                raise XMGIEInputError(f"--dataset-masks: sample {sample.id} has no mask in the dataset.")
            mask = gt_mask
        result = edit_photo(self.models, source, replace(self.settings, instruction=sample.instruction), mask,
                            self.face_backend)
        return Edited(result.image, result.mask, result.notes, result.report(self.settings, self.models))

    def describe(self) -> dict:
        from dataclasses import asdict

        settings = asdict(self.settings)
        settings.pop("instruction")
        return {"kind": self.kind, "checkpoint": self.models.source, "tiny_random_models": self.models.tiny,
                "switched_off": list(self.off), "region": "whole photo" if "region" in self.off else
                "dataset mask" if self.given_masks else "predicted", "settings": settings}
