"""Dataset readers (xmgie_core.evaluation.datasets) on tiny synthetic datasets built in the exact published layouts
(fixtures/eval_datasets): MagicBrush's release folder, the osunlp/MagicBrush and facebook/emu_edit_test_set parquet
snapshots, and plain CSV / JSONL tables."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from fixtures import eval_datasets as d
from xmgie_core.errors import XMGIEInputError
from xmgie_core.evaluation.datasets import open_dataset


def as_uint8(image: torch.Tensor) -> np.ndarray:
    return (image[0].numpy() * 255).round().astype(np.uint8)


def test_magicbrush_release_gives_one_sample_per_turn_chained(tmp_path):
    root = d.magicbrush_release(tmp_path / "test")
    data = open_dataset(root)
    assert data.format == "magicbrush" and [s.id for s in data.samples] == ["100_1", "207_1", "207_2"]
    first, second = data.samples[1], data.samples[2]
    assert np.array_equal(as_uint8(first.source.image()), d.picture(10))
    assert np.array_equal(as_uint8(second.source.image()), d.picture(11)), "turn 2 starts from turn 1's output"
    assert np.array_equal(as_uint8(second.target.image()), d.picture(12))
    assert torch.equal(second.mask.mask()[0] >= 0.5, torch.from_numpy(d.square_mask(8) > 0))
    assert second.instruction == "turn 2 of 207" and second.info == {"img_id": "207", "turn_index": 2}
    assert second.output_caption == "edited photo 207 turn 2" and second.input_caption == "edited photo 207 turn 1"
    assert data.samples[0].input_caption == "a photo number 100"


def test_magicbrush_release_with_a_missing_file_names_it(tmp_path):
    root = d.magicbrush_release(tmp_path / "test")
    (root / "images" / "207" / "207-mask2.png").unlink()
    with pytest.raises(XMGIEInputError, match="207-mask2.png is missing"):
        open_dataset(root)


def test_a_folder_above_the_split_is_pointed_to_the_split(tmp_path):
    d.magicbrush_release(tmp_path / "test")
    with pytest.raises(XMGIEInputError, match=r"MagicBrush splits \['test'\]"):
        open_dataset(tmp_path)


def test_magicbrush_parquet_export(tmp_path):
    pytest.importorskip("pyarrow")
    data = open_dataset(d.magicbrush_hf(tmp_path / "MagicBrush"))
    assert data.format == "magicbrush-hf" and data.split == "dev"
    assert [s.id for s in data.samples] == ["500_1", "501_1", "502_1"]
    s = data.samples[1]
    assert np.array_equal(as_uint8(s.source.image()), d.picture(1))
    assert np.array_equal(as_uint8(s.target.image()), d.picture(101))
    assert torch.equal(s.mask.mask()[0] >= 0.5, torch.from_numpy(d.square_mask() > 0))
    assert s.output_caption is None and s.info["turn_index"] == 1
    with pytest.raises(XMGIEInputError, match=r"No data/train-\*.parquet.*dev-00000-of-00001.parquet"):
        open_dataset(tmp_path / "MagicBrush", split="train")


def test_emu_edit_parquet(tmp_path):
    pytest.importorskip("pyarrow")
    data = open_dataset(d.emu_edit(tmp_path / "emu"), limit=2)
    assert data.format == "emu-edit" and data.split == "test" and [s.id for s in data.samples] == ["10", "11"]
    s = data.samples[1]
    assert np.array_equal(as_uint8(s.source.image()), d.picture(201))
    assert (s.input_caption, s.output_caption, s.instruction) == ("a scene 1", "a changed scene 1", "make it 1")
    assert s.target is None and s.mask is None and s.info == {"idx": 11, "task": "local"}


def test_csv_and_jsonl_tables(tmp_path):
    for name in ("a", "b", "m"):
        Image.fromarray(d.picture(ord(name)) if name != "m" else d.square_mask()).save(tmp_path / f"{name}.png")
    (tmp_path / "set.csv").write_text("source,instruction,target,mask,output_caption\n"
                                      "a.png,make it red,b.png,m.png,a red thing\nb.png,make it blue,,,\n")
    data = open_dataset(tmp_path / "set.csv")
    assert data.format == "table" and [s.id for s in data.samples] == ["a", "b"]
    assert data.samples[0].target.path == tmp_path / "b.png" and data.samples[0].output_caption == "a red thing"
    assert data.samples[1].target is None and data.samples[1].mask is None
    rows = [{"id": "x1", "source": "a.png", "instruction": "one", "input_caption": "c", "extra": 3}]
    (tmp_path / "set.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    s = open_dataset(tmp_path / "set.jsonl").samples[0]
    assert (s.id, s.input_caption, s.info) == ("x1", "c", {"extra": "3"})


@pytest.mark.parametrize("content, message", [
    ("source,instruction\na.png,one\na.png,two\n", "id 'a' is used twice"),
    ("source,target\na.png,a.png\n", "lacks a source or an instruction"),
    ("source,instruction\nnope.png,one\n", "nope.png is missing"),
])
def test_bad_tables_say_what_to_fix(tmp_path, content, message):
    Image.fromarray(d.picture(1)).save(tmp_path / "a.png")
    (tmp_path / "t.csv").write_text(content)
    with pytest.raises(XMGIEInputError, match=message):
        open_dataset(tmp_path / "t.csv")


def test_a_transparent_mask_reads_transparent_as_edit(tmp_path):
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 3] = 255
    rgba[4:10, 4:10, 3] = 0
    Image.fromarray(rgba).save(tmp_path / "m.png")
    Image.fromarray(d.picture(1)).save(tmp_path / "a.png")
    (tmp_path / "t.csv").write_text("source,instruction,mask\na.png,x,m.png\n")
    mask = open_dataset(tmp_path / "t.csv").samples[0].mask.mask()[0]
    assert int((mask >= 0.5).sum()) == 36 and bool(mask[5, 5] == 1)


def test_unknown_layouts_are_refused(tmp_path):
    with pytest.raises(XMGIEInputError, match="none of the dataset layouts"):
        open_dataset(tmp_path)
    with pytest.raises(XMGIEInputError, match="not found"):
        open_dataset(tmp_path / "nothing")
