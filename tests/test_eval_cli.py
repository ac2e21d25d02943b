"""`python -m xmgie_core eval` end to end on tiny synthetic datasets: precomputed edits scored (values equal the metric
functions on the written files, summary = mean ± t interval of the rows), runs never overwritten, a missing or broken
model skips its metrics with a note, a failed sample is recorded and the run goes on, `--compare` pairs two runs,
a registered metric (the leak-metric hook) runs with the rest, and the headless xMGIE edit on tiny models."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
from PIL import Image
from scipy import stats

from fixtures import eval_datasets as d
from fixtures import tiny_eval_models
from xmgie_core.apps.cli import main
from xmgie_core.evaluation.datasets import open_dataset
from xmgie_core.image_io import load_image
from xmgie_core.metrics import pixels
from xmgie_core.metrics.registry import METRICS, Metric


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    return tiny_eval_models.all_folders(tmp_path_factory.mktemp("encoders"))


@pytest.fixture
def magicbrush(tmp_path):
    """A MagicBrush release folder and edits for it: 100_1 by sample id, 207's turns in MagicBrush's own result
    layout (<img_id>/<img_id>_1.png, _inde_2.png)."""
    root = d.magicbrush_release(tmp_path / "test")
    edits = tmp_path / "edits"
    (edits / "207").mkdir(parents=True)
    for seed, name in ((900, "100_1.png"), (901, "207/207_1.png"), (902, "207/207_inde_2.png")):
        Image.fromarray(d.picture(seed)).save(edits / name)
    return root, edits


def run_eval(tmp_path, *args) -> int:
    return main(["eval", "--out", str(tmp_path / "runs"), "--identity", "none", *map(str, args)])


def rows_of(run) -> dict[str, dict]:
    return {r["id"]: r for r in map(json.loads, (run / "samples.jsonl").read_text().splitlines())}


def t_interval(values) -> tuple[float, float]:
    v = np.asarray(values, dtype=np.float64)
    return v.mean(), stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v))


def test_precomputed_magicbrush_edits_are_scored_and_reported(tmp_path, magicbrush, encoders):
    root, edits = magicbrush
    Image.fromarray(d.square_mask(4)).save(edits / "100_1_mask.png")  # the editor's region for one sample
    assert run_eval(tmp_path, "--dataset", root, "--edits", edits, "--clip-b32", encoders["open_clip"],
                    "--dino", encoders["dino"]) == 0
    run = tmp_path / "runs" / "eval"
    assert {"samples.jsonl", "samples.csv", "summary.json", "summary.md", "run.json", "contact_sheet.png",
            "index.html"} <= {p.name for p in run.iterdir()}
    rows = rows_of(run)
    assert list(rows) == ["100_1", "207_1", "207_2"]
    for sid, seed in (("100_1", 900), ("207_1", 901), ("207_2", 902)):
        sample = next(s for s in open_dataset(root).samples if s.id == sid)
        edit, target = load_image(run / rows[sid]["files"]["edit"])[0], sample.target.image()
        assert np.array_equal((edit[0].numpy() * 255).round().astype(np.uint8), d.picture(seed))
        assert rows[sid]["metrics"]["l1"] == pytest.approx(pixels.l1(edit, target))
        assert rows[sid]["metrics"]["ssim"] == pytest.approx(pixels.ssim(edit, target))
        assert {"clip_i", "clip_t", "dino", "dino_src", "psnr"} <= set(rows[sid]["metrics"])
    assert rows["100_1"]["metrics"]["region_iou"] == pytest.approx(1.0)  # the mask given equals the dataset's
    assert "region_iou" not in rows["207_1"]["metrics"]
    summary = json.loads((run / "summary.json").read_text())
    mean, ci = t_interval([r["metrics"]["l1"] for r in rows.values()])
    assert summary["metrics"]["l1"]["mean"] == pytest.approx(mean)
    assert summary["metrics"]["l1"]["ci"] == pytest.approx(ci)
    assert summary["metrics"]["region_iou"]["n"] == 1 and summary["metrics"]["region_iou"]["ci"] is None
    assert "--clip-l14" in summary["skipped"]["clip_dir"] and "no face backend" in summary["skipped"]["ips"]
    md = (run / "summary.md").read_text()
    assert f"| l1 | {mean:.4f} ± {ci:.4f} (n=3)" in md and "not the reference ViT-B/32" in md
    sheet = Image.open(run / "contact_sheet.png")
    assert sheet.width == 4 * 128 and sheet.height > 3 * 128
    page = (run / "index.html").read_text()
    assert "data:image/png;base64," in page and "http" not in page and "207_2" in page
    csv_head = (run / "samples.csv").read_text().splitlines()[0].split(",")
    assert csv_head[:3] == ["id", "instruction", "l1"] and "clip_dir" not in csv_head


def test_a_second_run_never_replaces_the_first(tmp_path, magicbrush):
    root, edits = magicbrush
    assert run_eval(tmp_path, "--dataset", root, "--edits", edits, "--metrics", "l1") == 0
    first = (tmp_path / "runs" / "eval" / "samples.jsonl").read_bytes()
    shutil.rmtree(edits / "207")
    assert run_eval(tmp_path, "--dataset", root, "--edits", edits, "--metrics", "l1") == 0
    assert (tmp_path / "runs" / "eval" / "samples.jsonl").read_bytes() == first
    second = rows_of(tmp_path / "runs" / "eval_2")
    assert second["207_1"]["error"].startswith("no edit for sample 207_1") and "l1" in second["100_1"]["metrics"]
    assert "2 of 3 samples failed" in (tmp_path / "runs" / "eval_2" / "summary.md").read_text()


def test_a_broken_model_folder_skips_its_metrics_with_a_note(tmp_path, magicbrush, encoders):
    root, edits = magicbrush
    broken = shutil.copytree(encoders["dino"], tmp_path / "dino_cut")
    (broken / "model.safetensors").write_bytes((broken / "model.safetensors").read_bytes()[:-64])
    assert run_eval(tmp_path, "--dataset", root, "--edits", edits, "--dino", broken, "--metrics", "l1,dino") == 0
    summary = json.loads((tmp_path / "runs" / "eval" / "summary.json").read_text())
    assert "truncated" in summary["skipped"]["dino"] and "model.safetensors" in summary["skipped"]["dino"]
    assert summary["metrics"]["l1"]["n"] == 3 and "dino" not in summary["metrics"]


def test_compare_pairs_two_runs(tmp_path, magicbrush):
    root, edits = magicbrush
    assert run_eval(tmp_path, "--dataset", root, "--edits", edits, "--metrics", "l1,psnr", "--name", "A") == 0
    perfect = tmp_path / "perfect"  # B: the targets themselves (L1 0, PSNR +inf: left out)
    perfect.mkdir()
    for s in open_dataset(root).samples[:2]:
        shutil.copy(s.target.path, perfect / f"{s.id}.png")
    assert run_eval(tmp_path, "--dataset", root, "--edits", perfect, "--metrics", "l1,psnr", "--name", "B") == 0
    runs = tmp_path / "runs"
    assert run_eval(tmp_path, "--compare", runs / "A", runs / "B") == 0
    result = json.loads((runs / "compare_A_vs_B" / "compare.json").read_text())
    a = rows_of(runs / "A")
    diffs = [-a[k]["metrics"]["l1"] for k in ("100_1", "207_1")]
    mean, ci = t_interval(diffs)
    assert result["common"] == 3
    assert result["metrics"]["l1"]["b_minus_a"]["n"] == 2
    assert result["metrics"]["l1"]["b_minus_a"]["mean"] == pytest.approx(mean)
    assert result["metrics"]["l1"]["b_minus_a"]["ci"] == pytest.approx(ci)
    assert result["metrics"]["psnr"]["b_minus_a"]["n"] == 0  # B's PSNRs are +inf: nothing pairs
    assert "| l1 |" in (runs / "compare_A_vs_B" / "compare.md").read_text()
    assert (runs / "compare_A_vs_B" / "compare.html").is_file()


def test_compare_without_common_samples_is_refused(tmp_path, magicbrush):
    root, edits = magicbrush
    assert run_eval(tmp_path, "--dataset", root, "--edits", edits, "--metrics", "l1", "--name", "A") == 0
    other = tmp_path / "other"
    other.mkdir()
    (other / "samples.jsonl").write_text(json.dumps({"id": "zzz", "metrics": {"l1": 0.1}}) + "\n")
    assert run_eval(tmp_path, "--compare", tmp_path / "runs" / "A", other) == 2
    assert run_eval(tmp_path, "--compare", tmp_path / "runs" / "A", tmp_path) == 2
    assert not list((tmp_path / "runs").glob("compare_*"))


def test_emu_edit_with_a_transformers_clip(tmp_path, encoders):
    pytest.importorskip("pyarrow")
    root = d.emu_edit(tmp_path / "emu")
    edits = tmp_path / "edits"
    edits.mkdir()
    for i in range(3):
        Image.fromarray(d.picture(300 + i)).save(edits / f"{10 + i}.png")
    assert run_eval(tmp_path, "--dataset", root, "--edits", edits, "--clip-l14", encoders["hf_clip"]) == 0
    rows = rows_of(tmp_path / "runs" / "eval")
    assert set(rows) == {"10", "11", "12"} and rows["11"]["task"] == "local"
    assert {"clip_dir", "clip_img", "clip_out", "l1_src"} <= set(rows["11"]["metrics"])
    summary = json.loads((tmp_path / "runs" / "eval" / "summary.json").read_text())
    assert "l1" not in summary["metrics"] and "target" in summary["not_applicable"]["l1"]


def test_a_registered_metric_runs_with_the_others(tmp_path, magicbrush, monkeypatch):
    """The hook leak metrics plug into: a metric registered by another module is scored and summarised."""
    root, edits = magicbrush
    monkeypatch.setitem(METRICS, "region_share", Metric("region_share", ("gt_mask",), None,
                                                        lambda item, _: float(item.edit_region.mean()), "test"))
    assert run_eval(tmp_path, "--dataset", root, "--edits", edits, "--metrics", "l1,region_share") == 0
    rows = rows_of(tmp_path / "runs" / "eval")
    assert rows["207_2"]["metrics"]["region_share"] == pytest.approx((d.square_mask(8) > 0).mean())


@pytest.mark.parametrize("args, message", [
    (["--edits", "E", "--tiny"], "Give one or the other"),
    ([], "Nothing to evaluate"),
    (["--edits", "E", "--metrics", "l1,nope"], "Unknown metrics"),
    (["--tiny", "--steps", "0"], "steps must be between 1 and"),
    (["--edits", "E", "--clip-b32", "E", "--metrics", "l1", "--format", "emu-edit"], "No data/test-"),
])
def test_bad_invocations_write_nothing(tmp_path, magicbrush, capsys, args, message):
    root, edits = magicbrush
    args = [str(edits) if a == "E" else a for a in args]
    assert run_eval(tmp_path, "--dataset", root, *args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_the_command_runs_on_its_own(tmp_path, magicbrush, capsys):
    from xmgie_core.apps import evaluate

    root, edits = magicbrush
    assert evaluate.main(["--dataset", str(root), "--edits", str(edits), "--metrics", "l1", "--identity", "none",
                          "--out", str(tmp_path)]) == 0
    assert "wrote" in capsys.readouterr().out and (tmp_path / "eval" / "samples.jsonl").is_file()
    assert evaluate.main(["--dataset", str(root), "--out", str(tmp_path), "--identity", "none"]) == 2


def test_the_tiny_xmgie_edit_is_evaluated(tmp_path):
    from skimage import data

    photo = Image.fromarray(data.astronaut()).resize((64, 64), Image.BICUBIC)
    photo.save(tmp_path / "astronaut.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[28:52, 16:48] = 255
    Image.fromarray(mask).save(tmp_path / "scarf.png")
    (tmp_path / "set.csv").write_text("source,instruction,mask\nastronaut.png,give the astronaut a red scarf,"
                                      "scarf.png\n")
    assert run_eval(tmp_path, "--dataset", tmp_path / "set.csv", "--tiny", "--steps", "2", "--draws", "2",
                    "--working-size", "64") == 0
    run = tmp_path / "runs" / "eval"
    row = rows_of(run)["astronaut"]
    assert row["error"] is None and {"edit", "mask"} <= set(row["files"])
    assert {"region_iou", "l1_src"} <= set(row["metrics"]) and 0 <= row["metrics"]["region_iou"] <= 1
    assert row["details"]["edit_words"] == ["red scarf"]
    editor = json.loads((run / "run.json").read_text())["editor"]
    assert editor["kind"] == "xmgie" and editor["tiny_random_models"] and editor["region"] == "predicted"
    assert editor["settings"]["steps"] == 2 and editor["settings"]["cam"] and editor["settings"]["pfb"]


def test_leak_metrics_and_the_drift_map_panel(tmp_path, magicbrush):
    """100_1's edit: the source outside the dataset's mask but for one pixel whose red moves 40 levels; the leak
    metrics are worked out by hand, and the contact sheet's 4th tile is that drift map (no longer blank)."""
    root, edits = magicbrush
    source, inside = d.picture(0), d.square_mask(4) > 0  # sample 100_1: input picture(0), mask rows/cols 4..15
    edit = np.where(inside[..., None], d.picture(900), source)
    red = int(edit[30, 30, 0])
    edit[30, 30, 0] = red + 40 if red < 215 else red - 40
    Image.fromarray(edit).save(edits / "100_1.png")
    assert run_eval(tmp_path, "--dataset", root, "--edits", edits, "--metrics", "l1,leak_l1,leak_psnr,leak_max") == 0
    run = tmp_path / "runs" / "eval"
    rows = rows_of(run)
    outside = (~inside).sum() * 3
    leak = rows["100_1"]["metrics"]
    assert leak["leak_l1"] == pytest.approx(40 / 255 / outside)
    assert leak["leak_max"] == pytest.approx(40 / 255)
    assert leak["leak_psnr"] == pytest.approx(10 * math.log10(outside / (40 / 255) ** 2))
    assert {"leak_l1", "leak_psnr", "leak_max"} <= set(rows["207_2"]["metrics"])
    md = (run / "summary.md").read_text()
    assert "| leak_l1 |" in md and "| leak_max |" in md and "outside the edit region" in md
    sheet = np.asarray(Image.open(run / "contact_sheet.png").convert("RGB"))
    tile = sheet[16:16 + 128, 3 * 128:4 * 128]  # row 100_1, column "drift map": the 32x32 map at 4x, nearest
    assert (tile[4 * 30:4 * 31, 4 * 30:4 * 31] == 255).all()  # the leaked pixel: 40/255 > full scale, white
    outside_tile = np.kron(~inside, np.ones((4, 4), bool))
    outside_tile[4 * 30:4 * 31, 4 * 30:4 * 31] = False
    assert (tile[outside_tile] == 0).all()  # unchanged outside: black
    region = tile[~outside_tile & np.kron(inside, np.ones((4, 4), bool))]
    assert (region[:, 0] == region[:, 1]).all() and (region[:, 1] == region[:, 2]).all() and region.max() <= 64
