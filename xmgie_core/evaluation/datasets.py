"""Instruction-editing datasets read offline, in their published layouts.

MagicBrush release (the test split's zip; dev has the same layout): a split folder with
    edit_sessions.json          {img_id: [{"input": "<img_id>-input.png", "mask": "<img_id>-mask1.png",
                                           "instruction": "...", "output": "<img_id>-output1.png"}, ...]}  one per turn
    images/<img_id>/<files>     turn k's input is the previous turn's output (<img_id>-output<k-1>.png)
    local_descriptions.json     optional {img_id: {file name: caption}} (MagicBrush's CLIP-T captions)
    global_descriptions.json    optional, same form (used where a local caption is missing)
  A sample per turn, id "<img_id>_<turn>" (turn 1, 2, ...).
MagicBrush on the Hugging Face hub (osunlp/MagicBrush): data/<split>-*.parquet with columns img_id, turn_index,
  source_img, mask_img, instruction, target_img (images as {bytes, path}); split "train" or "dev"; id
  "<img_id>_<turn_index>"; no captions.
Emu Edit test set (facebook/emu_edit_test_set): data/<split>-*.parquet with columns instruction, image, task, split,
  idx, hash, input_caption, output_caption; split "validation" or "test"; id "<idx>"; no target image.
A plain table: a .csv or .jsonl file, one row per sample, columns source and instruction (required), and id, target,
  mask, input_caption, output_caption (optional; paths relative to the table's folder; id defaults to the source's
  file stem).
Masks: white = edit; a mask file with transparency reads transparent = edit (ComfyUI's and DALL-E's convention).
Reading checks every referenced file exists, before any edit runs.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from ..errors import XMGIEInputError
from ..image_io import load_image, load_mask

FORMATS = ("auto", "magicbrush", "magicbrush-hf", "emu-edit", "table")
DEFAULT_SPLIT = {"magicbrush-hf": "dev", "emu-edit": "test"}
TABLE_COLUMNS = ("id", "source", "instruction", "target", "mask", "input_caption", "output_caption")


@dataclass(frozen=True)
class ImageRef:
    """An image of a dataset: a file, or encoded bytes from a parquet row (`name` says where it came from)."""

    name: str
    path: Path | None = None
    data: bytes | None = None

    def _pil(self) -> Image.Image:
        try:
            img = Image.open(io.BytesIO(self.data))
            img.load()
            return img
        except (OSError, ValueError) as e:
            raise XMGIEInputError(f"{self.name} could not be read as an image ({e}); the dataset file may be "
                                  "damaged: download it again.") from None

    def image(self) -> torch.Tensor:
        """IMAGE [1,H,W,3] in 0..1."""
        if self.path is not None:
            return load_image(self.path)[0]
        rgb = np.asarray(self._pil().convert("RGB"), dtype=np.float32) / 255.0
        return torch.from_numpy(rgb)[None]

    def mask(self) -> torch.Tensor:
        """MASK [1,H,W], 1 = edit: 1 - alpha where the file has transparency, else its luminance."""
        if self.path is not None:
            transparent = load_image(self.path)[1]
            return transparent if transparent is not None and bool((transparent > 0).any()) else load_mask(self.path)
        img = self._pil()
        if "A" in img.getbands() and min(img.getchannel("A").getextrema()) < 255:
            return torch.from_numpy(1.0 - np.asarray(img.getchannel("A"), dtype=np.float32) / 255.0)[None]
        return torch.from_numpy(np.asarray(img.convert("L"), dtype=np.float32) / 255.0)[None]


@dataclass(frozen=True)
class Sample:
    id: str
    instruction: str
    source: ImageRef
    target: ImageRef | None = None
    mask: ImageRef | None = None
    input_caption: str | None = None
    output_caption: str | None = None
    info: dict = field(default_factory=dict)
    """What else the layout says (img_id, turn_index, task, ...), written with the results."""


@dataclass(frozen=True)
class Dataset:
    format: str
    root: Path
    split: str | None
    samples: list[Sample]


def _load_json(path: Path, what: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise XMGIEInputError(f"{path} ({what}) could not be read as JSON ({e}). Use the file as released.") from None


def _existing(path: Path, what: str) -> ImageRef:
    if not path.is_file():
        raise XMGIEInputError(f"{what} {path} is missing. Unpack the whole dataset (or fix the path in its "
                              "annotation file).")
    return ImageRef(str(path), path=path)


def read_magicbrush(root: Path) -> Dataset:
    """The MagicBrush release layout (module docstring)."""
    sessions = _load_json(root / "edit_sessions.json", "MagicBrush edit sessions")
    captions = {name: _load_json(root / f"{name}_descriptions.json", f"MagicBrush {name} descriptions")
                for name in ("local", "global") if (root / f"{name}_descriptions.json").is_file()}
    if not isinstance(sessions, dict):
        raise XMGIEInputError(f"{root / 'edit_sessions.json'} is not MagicBrush's {{img_id: [turns]}} mapping.")

    def caption(img_id: str, file: str) -> str | None:
        for name in ("local", "global"):
            text = captions.get(name, {}).get(img_id, {}).get(file)
            if text:
                return str(text)
        return None

    samples = []
    for img_id, turns in sessions.items():
        folder = root / "images" / str(img_id)
        for k, turn in enumerate(turns, start=1):
            try:
                files = {key: str(turn[key]) for key in ("input", "mask", "output")}
                instruction = str(turn["instruction"])
            except (KeyError, TypeError):
                raise XMGIEInputError(f"edit_sessions.json: turn {k} of image {img_id} lacks one of input, mask, "
                                      "instruction, output. Use the file as released.") from None
            samples.append(Sample(f"{img_id}_{k}", instruction, _existing(folder / files["input"], "Source image"),
                                  _existing(folder / files["output"], "Target image"),
                                  _existing(folder / files["mask"], "Mask"),
                                  caption(str(img_id), files["input"]), caption(str(img_id), files["output"]),
                                  {"img_id": str(img_id), "turn_index": k}))
    return Dataset("magicbrush", root, None, samples)


def _parquet_files(root: Path, split: str) -> list[Path]:
    files = [root] if root.suffix == ".parquet" else sorted((root / "data").glob(f"{split}-*.parquet"))
    if not files:
        found = sorted(p.name for p in (root / "data").glob("*.parquet")) if (root / "data").is_dir() else []
        raise XMGIEInputError(f"No data/{split}-*.parquet under {root}" + (f" (found {', '.join(found[:6])})" if found
                              else "") + ". Give the dataset's snapshot folder (the one holding data/) and a split "
                              "it has (--split).")
    return files


def _rows(root: Path, split: str, columns: tuple[str, ...]) -> Iterator[dict]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise XMGIEInputError("Reading the Hugging Face parquet layout needs pyarrow: pip install pyarrow.") from None
    for path in _parquet_files(root, split):
        try:
            table = pq.ParquetFile(path)
            missing = sorted(set(columns) - set(table.schema_arrow.names))
            if missing:
                raise XMGIEInputError(f"{path} lacks the columns {missing} (it has {table.schema_arrow.names}). Is it "
                                      "the dataset --format names?")
            for batch in table.iter_batches(batch_size=32, columns=list(columns)):
                yield from batch.to_pylist()
        except (OSError, pa.ArrowException) as e:
            raise XMGIEInputError(f"{path} could not be read as parquet ({e}); download it again.") from None


def _image_cell(cell, where: str) -> ImageRef:
    if not isinstance(cell, dict) or not cell.get("bytes"):
        raise XMGIEInputError(f"{where} has no image bytes; the parquet file is not the released one.")
    return ImageRef(where, data=cell["bytes"])


def read_magicbrush_hf(root: Path, split: str) -> Dataset:
    """osunlp/MagicBrush's parquet export (module docstring)."""
    samples = []
    for row in _rows(root, split, ("img_id", "turn_index", "source_img", "mask_img", "instruction", "target_img")):
        sid = f"{row['img_id']}_{row['turn_index']}"
        samples.append(Sample(sid, str(row["instruction"]), _image_cell(row["source_img"], f"{sid} source_img"),
                              _image_cell(row["target_img"], f"{sid} target_img"),
                              _image_cell(row["mask_img"], f"{sid} mask_img"),
                              info={"img_id": str(row["img_id"]), "turn_index": int(row["turn_index"])}))
    return Dataset("magicbrush-hf", root, split, samples)


def read_emu_edit(root: Path, split: str) -> Dataset:
    """facebook/emu_edit_test_set's parquet files (module docstring)."""
    samples = []
    for row in _rows(root, split, ("idx", "instruction", "image", "task", "input_caption", "output_caption")):
        sid = str(row["idx"])
        samples.append(Sample(sid, str(row["instruction"]), _image_cell(row["image"], f"sample {sid} image"),
                              input_caption=row["input_caption"] or None, output_caption=row["output_caption"] or None,
                              info={"idx": int(row["idx"]), "task": row["task"]}))
    return Dataset("emu-edit", root, split, samples)


def _table_rows(path: Path) -> list[dict]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise XMGIEInputError(f"{path} could not be read as UTF-8 text ({e}).") from None
    if path.suffix == ".csv":
        return list(csv.DictReader(io.StringIO(text)))
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                row = json.loads(line)
            except ValueError as e:
                raise XMGIEInputError(f"{path} line {n} is not JSON ({e}); write one JSON object per line.") from None
            if not isinstance(row, dict):
                raise XMGIEInputError(f"{path} line {n} is not a JSON object; write one object per line.")
            rows.append(row)
    return rows


def read_table(path: Path) -> Dataset:
    """A plain .csv / .jsonl table of samples (module docstring)."""
    base, samples, seen = path.parent, [], set()
    for n, row in enumerate(_table_rows(path), start=1):
        row = {k: (str(v).strip() if v is not None else "") for k, v in row.items()}
        if not row.get("source") or not row.get("instruction"):
            raise XMGIEInputError(f"{path} row {n} lacks a source or an instruction; every row needs both "
                                  f"(columns: {', '.join(TABLE_COLUMNS)}).")
        sid = row.get("id") or Path(row["source"]).stem
        if sid in seen:
            raise XMGIEInputError(f"{path} row {n}: the sample id {sid!r} is used twice; give each row its own id "
                                  "column value.")
        seen.add(sid)
        ref = lambda key, what: _existing(base / row[key], what) if row.get(key) else None  # noqa: E731
        samples.append(Sample(sid, row["instruction"], ref("source", "Source image"), ref("target", "Target image"),
                              ref("mask", "Mask"), row.get("input_caption") or None,
                              row.get("output_caption") or None,
                              {k: v for k, v in row.items() if k not in TABLE_COLUMNS}))
    return Dataset("table", path, None, samples)


def detect_format(path: Path) -> str:
    """The layout at `path`: a .csv/.jsonl file, a MagicBrush release folder, or a parquet snapshot (by columns)."""
    if path.is_file() and path.suffix in (".csv", ".jsonl"):
        return "table"
    if (path / "edit_sessions.json").is_file():
        return "magicbrush"
    parquet = [path] if path.suffix == ".parquet" else sorted((path / "data").glob("*.parquet"))
    if parquet:
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise XMGIEInputError("Reading the Hugging Face parquet layout needs pyarrow: pip install pyarrow.") \
                from None
        try:
            names = set(pq.read_schema(parquet[0]).names)
        except (OSError, pa.ArrowException) as e:
            raise XMGIEInputError(f"{parquet[0]} could not be read as parquet ({e}).") from None
        if "source_img" in names:
            return "magicbrush-hf"
        if "input_caption" in names:
            return "emu-edit"
    nested = sorted(p.parent.name for p in path.glob("*/edit_sessions.json")) if path.is_dir() else []
    hint = f" It holds MagicBrush splits {nested}: give one of those folders." if nested else ""
    raise XMGIEInputError(f"{path} is none of the dataset layouts read here: a MagicBrush folder (edit_sessions.json "
                          "+ images/), a Hugging Face snapshot of osunlp/MagicBrush or facebook/emu_edit_test_set "
                          f"(data/*.parquet), or a .csv / .jsonl table.{hint}")


def open_dataset(path: Path, format: str = "auto", split: str | None = None, limit: int | None = None) -> Dataset:
    """The dataset at `path` in `format` (FORMATS; auto detects it), its first `limit` samples if given."""
    path = Path(path).expanduser()
    if not path.exists():
        raise XMGIEInputError(f"Dataset {path} not found. Give a dataset folder or a .csv / .jsonl table.")
    if format not in FORMATS:
        raise XMGIEInputError(f"Unknown dataset format {format!r}; use one of {', '.join(FORMATS)}.")
    kind = detect_format(path) if format == "auto" else format
    split = split or DEFAULT_SPLIT.get(kind)
    data = {"magicbrush": lambda: read_magicbrush(path), "magicbrush-hf": lambda: read_magicbrush_hf(path, split),
            "emu-edit": lambda: read_emu_edit(path, split), "table": lambda: read_table(path)}[kind]()
    if not data.samples:
        raise XMGIEInputError(f"Dataset {path} ({kind}) holds no samples.")
    return Dataset(data.format, data.root, data.split, data.samples[:limit] if limit else data.samples)
