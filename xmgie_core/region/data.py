"""Training records for the region predictor ([Regions] §4): one JSON line each, {"image": path, "t_o": source
description, "t_ins": instruction, "t_e": target description, "render": path}. `render` is X_gen, a frozen generator's
render of t_e for that image, made once by the data builder (xmgie_core.apps.region_data) so training never runs the
generator. Relative paths resolve against the JSONL file's folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from ..errors import XMGIEInputError
from ..image_io import load_image
from ..training import field_error, read_jsonl, resolve
from .encoders import square_resize

TEXT_FIELDS = ("t_o", "t_ins", "t_e")
BUILD_HINT = ("build renders with `python -m xmgie_core.apps.region_data build --captions ... --out ... --generator "
              "<SD1.5 folder or .safetensors>`")


@dataclass(frozen=True)
class RegionRecord:
    image: Path
    t_o: str
    t_ins: str
    t_e: str
    render: Path | None
    line: int


def parse_record(data: Any, source: Path, line: int) -> RegionRecord:
    """One validated record; relative paths resolve against the JSONL's folder; files must exist."""
    if not isinstance(data, dict):
        raise XMGIEInputError(f"{source}, line {line}: a record must be a JSON object with the fields image, t_o, "
                              "t_ins, t_e, render.")
    for name in TEXT_FIELDS:
        if not isinstance(data.get(name), str) or not data[name].strip():
            raise field_error(source, line, name, "missing or empty; give a non-empty string")
    paths = {}
    for name in ("image", "render"):
        value = data.get(name)
        if value is None and name == "render":
            paths[name] = None
            continue
        if not isinstance(value, str) or not value.strip():
            raise field_error(source, line, name, "missing or not a path string; give the image file's path")
        path = resolve(value, source.parent)
        if not path.is_file():
            raise field_error(source, line, name, f"file not found: {path}")
        paths[name] = path
    return RegionRecord(paths["image"], data["t_o"].strip(), data["t_ins"].strip(), data["t_e"].strip(),
                        paths["render"], line)


def read_records(path: Path, need_renders: bool = True) -> list[RegionRecord]:
    """All records of a JSONL file (blank lines skipped); with `need_renders`, each must have its render."""
    records = read_jsonl(path, parse_record, "Make it with `python -m xmgie_core.apps.region_data build`.")
    missing = [r.line for r in records if r.render is None]
    if need_renders and missing:
        raise XMGIEInputError(f"{path}: {len(missing)} of {len(records)} records have no 'render' (X_gen), e.g. line "
                              f"{missing[0]}; training needs the generator's render of each t_e: {BUILD_HINT}.")
    return records


def load_pixels(path: Path, size: int) -> torch.Tensor:
    """An image file as [3, size, size] in 0..1 (the whole view squashed to a square, as the CLIP encoder sees it)."""
    image = load_image(path)[0].permute(0, 3, 1, 2)
    return square_resize(image, size)[0]


class RegionDataset(Dataset):
    """Records as training items: image X and render X_gen [3, S, S] at the image encoder's size, and the texts."""

    def __init__(self, records: list[RegionRecord], size: int):
        self.records, self.size = records, size

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        r = self.records[index]
        if r.render is None:
            raise XMGIEInputError(f"Record at line {r.line} ({r.image}) has no render; {BUILD_HINT}.")
        return {"image": load_pixels(r.image, self.size), "render": load_pixels(r.render, self.size),
                "t_o": r.t_o, "t_ins": r.t_ins, "t_e": r.t_e}


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack pixels, list texts."""
    return {k: torch.stack([i[k] for i in items]) if isinstance(items[0][k], torch.Tensor) else [i[k] for i in items]
            for k in items[0]}
