"""The metrics an evaluation runs, by name: what each needs from a sample, which model, where it comes from.

The built-in metrics and the "drift map" panel (leak.py: the leak metrics and drift heat map of xmgie_core.drift) are
registered below; another module adds its own with `register` (and the picture of a contact-sheet column,
evaluation.report.COLUMNS, with `register_panel`), e.g.

    register(Metric("region_share", ("edit_region",), None, lambda item, _: float(item.edit_region.mean()),
                    "share of the photo in the edit region"))

Every metric maps an Item (source, edit and what the sample has) and its model to a float, or None where the value
is undefined for that sample (e.g. IoU of two empty masks). A metric whose `needs` a sample lacks is not applicable
there; one whose model is missing or broken is skipped with a note (the run goes on).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..errors import XMGIEInputError
from . import leak, pixels, semantic
from .identity import ips_per_face


@dataclass
class Item:
    """One evaluated edit: IMAGE tensors [1,H,W,3] in 0..1 (as read from the 8-bit files), MASKs [1,H,W]."""

    sample_id: str
    source: torch.Tensor
    edit: torch.Tensor
    target: torch.Tensor | None = None
    gt_mask: torch.Tensor | None = None
    """The dataset's region (MagicBrush's mask)."""
    pred_mask: torch.Tensor | None = None
    """The editor's region (the xMGIE edit's predicted or given mask; a precomputed edit's _mask file)."""
    input_caption: str | None = None
    output_caption: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    """Per-metric extras written with the sample (e.g. IPS of every face)."""
    _memo: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def edit_region(self) -> torch.Tensor | None:
        """The region the edit was meant to stay in: the dataset's mask, else the editor's."""
        return self.gt_mask if self.gt_mask is not None else self.pred_mask

    def has(self, name: str) -> bool:
        return getattr(self, name) is not None

    def memo(self, key: str, compute: Callable[[], Any]) -> Any:
        """`compute()` once per item (metrics that share one model pass)."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]


@dataclass(frozen=True)
class Metric:
    name: str
    needs: tuple[str, ...]
    """Item attributes that must be present (not None)."""
    model: str | None
    """Key of the model it runs on (evaluation.models.MODEL_OPTIONS), None for none."""
    compute: Callable[[Item, Any], float | None]
    source: str
    """The reference it follows (shown in reports)."""
    higher_is_better: bool = True


METRICS: dict[str, Metric] = {}
PANELS: dict[str, Callable[[Item], torch.Tensor | None]] = {}
"""Contact-sheet pictures beside source | edit | mask, by title (IMAGE [1,H,W,3], or None: left blank)."""


def register(metric: Metric) -> Metric:
    if metric.name in METRICS:
        raise XMGIEInputError(f"A metric named {metric.name!r} is registered already; give the new one another name.")
    METRICS[metric.name] = metric
    return metric


def register_panel(title: str, picture: Callable[[Item], torch.Tensor | None]) -> None:
    PANELS[title] = picture


def _ips(item: Item, backend) -> float | None:
    faces = ips_per_face(backend, item.source, item.edit)
    item.details["ips_faces"] = faces
    return None if faces is None else min(faces)


def _emu(name: str) -> Callable[[Item, Any], float | None]:
    def compute(item: Item, clip) -> float | None:
        values = item.memo("emu_clip", lambda: semantic.emu_clip(clip, item.source, item.edit, item.input_caption,
                                                                  item.output_caption))
        return values.get(name)
    return compute


MB = "MagicBrush evaluation/image_eval.py"
EMU = "Emu Edit §5, as InstructPix2Pix metrics/clip_similarity.py"
LEAK = "xMGIE leak (metrics/leak.py): edit vs source outside the edit region,"
for _metric in (
    Metric("l1", ("target",), None, lambda i, _: pixels.l1(i.edit, i.target), f"{MB} eval_distance (edit vs target)",
           False),
    Metric("l2", ("target",), None, lambda i, _: pixels.l2(i.edit, i.target), f"{MB} eval_distance (edit vs target)",
           False),
    Metric("clip_i", ("target",), "clip_b32", lambda i, m: semantic.clip_i(m, i.edit, i.target),
           f"{MB} eval_clip_i, CLIP ViT-B/32"),
    Metric("clip_t", ("output_caption",), "clip_b32", lambda i, m: semantic.clip_t(m, i.edit, i.output_caption),
           f"{MB} eval_clip_t, CLIP ViT-B/32 (target caption)"),
    Metric("dino", ("target",), "dino", lambda i, m: semantic.dino(m, i.edit, i.target),
           f"{MB} eval_clip_i(metric='dino'), DINO ViT-S/16"),
    Metric("clip_dir", ("input_caption", "output_caption"), "clip_l14", _emu("clip_dir"), f"{EMU}, CLIP ViT-L/14"),
    Metric("clip_img", (), "clip_l14", _emu("clip_img"), f"{EMU}, CLIP ViT-L/14 (edit vs source)"),
    Metric("clip_out", ("output_caption",), "clip_l14", _emu("clip_out"), f"{EMU}, CLIP ViT-L/14"),
    Metric("l1_src", (), None, lambda i, _: pixels.l1(i.edit, i.source),
           "Emu Edit §5 L1 (edit vs source), with MagicBrush's eval_distance", False),
    Metric("dino_src", (), "dino", lambda i, m: semantic.dino(m, i.edit, i.source),
           "Emu Edit §5 DINO (edit vs source), with MagicBrush's DINO"),
    Metric("psnr", ("target",), None, lambda i, _: pixels.psnr(i.edit, i.target), "PSNR, data range 1 (vs target)"),
    Metric("ssim", ("target",), None, lambda i, _: pixels.ssim(i.edit, i.target),
           "SSIM, Wang et al. 2004, Gaussian 11x11 sigma 1.5, per RGB channel (vs target)"),
    Metric("region_iou", ("pred_mask", "gt_mask"), None, lambda i, _: pixels.region_iou(i.pred_mask, i.gt_mask),
           "IoU of the editor's region and the dataset's mask"),
    Metric("ips", (), "faces", _ips, "xMGIE §4.2 IPS, worst face (every face in ips_faces)"),
    Metric("leak_l1", ("edit_region",), None, leak.leak_l1, f"{LEAK} mean |change| (L1)", False),
    Metric("leak_psnr", ("edit_region",), None, leak.leak_psnr, f"{LEAK} PSNR, data range 1"),
    Metric("leak_max", ("edit_region",), None, leak.leak_max, f"{LEAK} max |change| of a pixel", False),
):
    register(_metric)
register_panel("drift map", leak.drift_panel)
