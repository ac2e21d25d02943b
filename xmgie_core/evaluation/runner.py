"""One evaluation: every sample of a dataset edited (or its precomputed edit read), its edit saved as an 8-bit PNG and
read back (the references score image files), then every registered metric that applies scored on it."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..errors import XMGIEInputError
from ..image_io import load_image, save_image
from ..metrics.registry import METRICS, Item, Metric
from .datasets import Dataset, Sample
from .models import Models, Unavailable

Log = Callable[[str], None]


@dataclass
class Row:
    """One sample's results."""

    id: str
    instruction: str
    info: dict
    metrics: dict[str, float | None] = field(default_factory=dict)
    details: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    files: dict[str, str] = field(default_factory=dict)
    """edit / mask / source / target / gt_mask: paths relative to the run folder or absolute dataset paths."""

    def as_dict(self) -> dict:
        return {"id": self.id, "instruction": self.instruction, **self.info, "metrics": self.metrics,
                "details": self.details, "notes": self.notes, "error": self.error, "files": self.files}


@dataclass
class Outcome:
    rows: list[Row]
    skipped: dict[str, str]
    """metric -> why it was skipped (its model missing or broken)."""
    not_applicable: dict[str, str]
    """metric -> what no sample had."""
    items: dict[str, Item]
    """The first `keep` scored items by sample id (for the contact sheet; the others are not kept in memory)."""


def file_stem(sample_id: str) -> str:
    """A sample id as a safe file name part."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", sample_id) or "sample"


def selected(names: list[str] | None) -> list[Metric]:
    if not names:
        return list(METRICS.values())
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise XMGIEInputError(f"Unknown metrics {unknown}; choose among {', '.join(METRICS)}.")
    return [METRICS[n] for n in names]


def score(item: Item, metrics: list[Metric], models: Models, skipped: dict[str, str], row: Row) -> None:
    """row.metrics[name] for every applicable metric whose model is usable (module docstring)."""
    for metric in metrics:
        if not all(item.has(n) for n in metric.needs):
            continue
        model = None
        if metric.model is not None:
            try:
                model = models.get(metric.model)
            except Unavailable as e:
                skipped[metric.name] = str(e)
                continue
        try:
            value = metric.compute(item, model)
        except XMGIEInputError as e:
            row.notes.append(f"{metric.name}: {e}")
            value = None
        if value is not None and not math.isfinite(value):
            row.notes.append(f"{metric.name}: {value} (e.g. PSNR of an edit equal to its reference), left out of "
                             "the mean")
            row.details[metric.name] = str(value)
            value = None
        row.metrics[metric.name] = value
    row.details.update(item.details)


def _inputs(sample: Sample) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    return (sample.source.image(), sample.target.image() if sample.target else None,
            sample.mask.mask() if sample.mask else None)


def evaluate(dataset: Dataset, editor, models: Models, folder: Path, metric_names: list[str] | None = None,
             log: Log | None = None, keep: int = 24) -> Outcome:
    """Edit and score every sample; the edits (and the editor's masks) are written to folder/images/."""
    metrics, skipped, rows, items = selected(metric_names), {}, [], {}
    images = folder / "images"
    for n, sample in enumerate(dataset.samples, start=1):
        if log:
            log(f"[{n}/{len(dataset.samples)}] {sample.id}")
        row = Row(sample.id, sample.instruction, dict(sample.info))
        rows.append(row)
        try:
            source, target, gt_mask = _inputs(sample)
            edited = editor.edit(sample, source, gt_mask)
        except XMGIEInputError as e:
            row.error = str(e)
            continue
        stem = file_stem(sample.id)
        edit_path = save_image(edited.image, images / f"{stem}_edit.png")
        row.files["edit"] = str(edit_path.relative_to(folder))
        if edited.mask is not None:
            row.files["mask"] = str(save_image(edited.mask, images / f"{stem}_mask.png").relative_to(folder))
        row.notes.extend(edited.notes)
        row.details.update({k: edited.report[k] for k in ("edit_file", "edit_words", "region_pixels", "timings_s")
                            if k in edited.report})
        item = Item(sample.id, source, load_image(edit_path)[0], target, gt_mask, edited.mask,
                    sample.input_caption, sample.output_caption)
        score(item, metrics, models, skipped, row)
        if len(items) < keep:
            items[sample.id] = item
    scored = {name for row in rows for name in row.metrics}
    not_applicable = {m.name: f"no sample has {' and '.join(m.needs) or 'an edit'}" for m in metrics
                      if m.name not in scored and m.name not in skipped}
    return Outcome(rows, skipped, not_applicable, items)
