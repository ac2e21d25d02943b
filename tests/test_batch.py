"""Batch editing (`python -m xmgie_core batch`, xmgie_core.apps.batch) on the tiny random-weight models: each item is
the headless edit with its own seed, a bad item is recorded and the run goes on, Ray Data workers (a local Ray,
started once for this module) write the same files bit for bit, a killed run resumes without redoing finished items,
and a bad list or a missing Ray says what to do."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from test_edit_cli import check_outside_is_source, pixels
from xmgie_core.apps import batch
from xmgie_core.apps import cli
from xmgie_core.apps import edit as de
from xmgie_core.hosts.diffusers import models as models_of
from xmgie_core.image_io import save_image

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "workflows" / "assets" / "xmgie_astronaut_source.png"
SMALL = ["--steps", "2", "--draws", "2", "--working-size", "128", "--identity", "none", "--seed", "7", "--threads", "1"]
FAST = ["--tiny", *SMALL]
TAG = "TINY-RANDOM-WEIGHTS"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A list of four items: a (given mask, seed 1), missing (its photo is not there), b (region predicted, no seed:
    the --seed default), odd (seed -3)."""
    d = tmp_path_factory.mktemp("data")
    photo = Image.open(SOURCE).convert("RGB").resize((128, 128), Image.LANCZOS)
    photo.save(d / "a.png")
    photo.transpose(Image.FLIP_LEFT_RIGHT).save(d / "b.png")
    region = np.zeros((128, 128), np.uint8)
    region[64:100, 30:90] = 255
    Image.fromarray(region).save(d / "a_mask.png")
    (d / "items.csv").write_text("id,source,instruction,mask,seed\n"
                                 "a,a.png,give the astronaut a red scarf,a_mask.png,1\n"
                                 "missing,nowhere.png,give the astronaut a hat,,2\n"
                                 "b,b.png,give the astronaut a blue scarf,,\n"
                                 "odd,a.png,give the astronaut a hat,,-3\n")
    return d


def run_batch(data: Path, out: Path, *args: str) -> int:
    return cli.main(["batch", "--data", str(data / "items.csv"), "--out", str(out), *FAST, *args])


def files(out: Path) -> dict[str, bytes]:
    """Every output file and the report, by name (the records hold timings, which differ from run to run)."""
    return {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}


@pytest.fixture(scope="module")
def in_process(dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("in_process")
    assert run_batch(dataset, out) == 0
    return out


def report(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / batch.REPORT).read_text().splitlines()]


def test_each_item_is_the_headless_edit_with_its_seed_and_a_bad_item_is_recorded(dataset, in_process, tmp_path):
    lines = report(in_process)
    assert [(r["id"], r["status"]) for r in lines] == [("a", "ok"), ("missing", "failed"), ("b", "ok"),
                                                      ("odd", "failed")]
    assert "Image file not found" in lines[1]["error"] and "nowhere.png" in lines[1]["error"]
    assert "seed '-3' is not a whole number" in lines[3]["error"]
    assert [lines[0]["seed"], lines[2]["seed"]] == [1, 7]  # b has no seed: the --seed default
    assert set(files(in_process)) == {f"{i}_{TAG}_{k}.png" for i in "ab" for k in ("edit", "mask")} | {"report.jsonl"}
    assert all("timings_s" not in r and "seconds" not in r for r in lines)
    assert set(json.loads((in_process / "records" / "a.json").read_text())["timings_s"]) <= set(de.STAGES)

    models = models_of.tiny_sd15(tmp_path / "tok")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the batch's --threads 1: the thread count changes the last bits of a convolution
    for item, mask in (("a", dataset / "a_mask.png"), ("b", None)):
        settings = de.EditSettings(lines[0 if item == "a" else 2]["instruction"], seed=lines[0 if item == "a" else 2]
                                   ["seed"], steps=2, region_draws=2, working_size=128)
        photo = torch.from_numpy(pixels(dataset / f"{item}.png")).float()[None] / 255
        given = None if mask is None else torch.from_numpy(pixels(mask)[..., 0] >= 128).float()[None]
        try:
            alone = save_image(de.edit_photo(models, photo, settings, given).image, tmp_path / f"{item}.png")
        finally:
            torch.set_num_threads(threads)
        edit = pixels(in_process / f"{item}_{TAG}_edit.png")
        assert np.array_equal(edit, pixels(alone)), f"{item}: the batch's edit is not the headless edit"
        region = pixels(in_process / f"{item}_{TAG}_mask.png")[..., 0] >= 128
        check_outside_is_source(edit, pixels(dataset / f"{item}.png"), region)


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray (2 CPUs) for the module's Ray runs."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()


@pytest.mark.parametrize("workers", [1, 2])
def test_ray_workers_write_the_in_process_files_bit_for_bit(dataset, in_process, local_ray, tmp_path, workers,
                                                            capsys):
    assert run_batch(dataset, tmp_path, "--ray", "--workers", str(workers)) == 0
    assert f"Ray: {workers} worker(s), 1 CPU(s) each" in capsys.readouterr().err
    assert files(tmp_path) == files(in_process)


def test_ray_workers_must_fit_the_cpus(dataset, local_ray, tmp_path, capsys):
    """2 workers x 2 threads on 2 CPUs would crawl (OpenMP threads spinning on shared cores): said before any work."""
    code = cli.main(["batch", "--data", str(dataset / "items.csv"), "--out", str(tmp_path / "out"), *FAST, "--ray",
                     "--workers", "2", "--threads", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "--workers 2 with 2 CPU thread(s) each need 4 CPUs; this Ray has 2" in err
    assert "Pass --threads 1" in err and not (tmp_path / "out").exists()


def test_a_killed_run_resumes_without_redoing_finished_items(dataset, in_process, tmp_path):
    """Kill a run (SIGKILL) as soon as its first item is recorded, leave a half-written output behind, rerun: the
    finished item is skipped, the rest is edited, and every file equals an uninterrupted run's."""
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "xmgie_core", "batch", "--data", str(dataset / "items.csv"), "--out", str(out),
            *FAST]
    child = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    record_a = out / "records" / "a.json"
    while not record_a.exists() and child.poll() is None:
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert record_a.exists() and not (out / batch.REPORT).exists(), "the run ended before it could be killed"
    assert not (out / "records" / "b.json").exists()
    half = out / f"b_{TAG}_edit.partial.png"
    half.write_bytes(files(in_process)[f"b_{TAG}_edit.png"][:100])  # as if killed while writing b
    (out / f"b_{TAG}_edit.png").write_bytes(b"")  # an output without its record never counts
    done = {p: p.stat().st_mtime_ns for p in [record_a, *out.glob(f"a_{TAG}_*.png")]}

    resumed = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "1 done already (skipped), 3 to edit" in resumed.stderr
    assert not re.search(r"^a: ", resumed.stderr, re.M) and re.search(r"^b: ok", resumed.stderr, re.M)
    assert {p: p.stat().st_mtime_ns for p in done} == done, "a finished item was edited again"
    assert not half.exists()
    assert files(out) == files(in_process)


def test_ray_without_ray_installed_says_how_to_install_it(dataset, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError, as without the package
    monkeypatch.setitem(sys.modules, "ray.data", None)
    assert run_batch(dataset, tmp_path / "out", "--ray") == 2
    err = capsys.readouterr().err
    assert 'pip install "ray[data]"' in err and "leave out --ray" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


ONE = "id,source,instruction\na,a.png,x\n"
BATCH_CASES = {  # list file name, its text (None: absent), arguments -> what was wrong, how to fix it
    "no list": ("items.csv", None, ["--tiny"], r"--data .*items.csv not found", "Give a .csv or .jsonl list"),
    "not a list": ("items.txt", ONE, ["--tiny"], "is neither .csv nor .jsonl", "JSON Lines"),
    "no column": ("items.csv", "id,photo,instruction\na,a.png,x\n", ["--tiny"], "has no column source",
                  "The first row must name the columns id, source, instruction"),
    "empty cell": ("items.csv", "id,source,instruction\na,,make it red\n", ["--tiny"], "line 2: no source",
                   "Every item needs id, source, instruction"),
    "repeated id": ("items.csv", "id,source,instruction\na,a.png,x\na,b.png,y\n", ["--tiny"],
                    r"line 3: id 'a' is used again \(first on line 2\)", "Give every item its own id"),
    "id with a slash": ("items.jsonl", '{"id": "../a", "source": "a.png", "instruction": "x"}\n', ["--tiny"],
                        "id '../a' cannot name output files", "letters, digits"),
    "bad JSON": ("items.jsonl", '{"id": "a"\n', ["--tiny"], "line 1: not valid JSON", "one JSON object per line"),
    "JSON list": ("items.jsonl", '["a", "a.png", "x"]\n', ["--tiny"], "line 1: a JSON list, not an object",
                  "one object a line"),
    "empty JSONL": ("items.jsonl", "\n", ["--tiny"], "holds no records", "one object a line with id, source"),
    "no items": ("items.csv", "id,source,instruction\n", ["--tiny"], "lists no items", "Add rows with the columns"),
    "--workers alone": ("items.csv", ONE, ["--tiny", "--workers", "2"],
                        "--ray-address and --workers spread the batch over Ray", "add --ray"),
    "--workers 0": ("items.csv", ONE, ["--tiny", "--ray", "--workers", "0"],
                    "argument --workers: '0' is not a whole number of at least 1", "--help"),
    "GPU index": ("items.csv", ONE, ["--tiny", "--ray", "--device", "cuda:1"], "every Ray worker gets its own GPU",
                  "pass --device cuda or cpu"),
    "no model": ("items.csv", ONE, [], "No model", "pass --checkpoint with an SD1.5 checkpoint"),
}


@pytest.mark.parametrize("case", list(BATCH_CASES))
def test_a_bad_list_or_option_says_what_to_do_before_any_work(case, tmp_path, capsys):
    name, text, extra, what, fix = BATCH_CASES[case]
    if text is not None:
        (tmp_path / name).write_text(text)
    code = cli.main(["batch", "--data", str(tmp_path / name), "--out", str(tmp_path / "out"), *SMALL, *extra])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "Traceback" not in err
    assert re.search(what, err) and re.search(fix, err), f"{case}: {err}"
    assert not (tmp_path / "out").exists(), "a failed run wrote an output folder"


def test_a_folder_with_one_list_is_read_and_paths_are_relative_to_it(tmp_path):
    (tmp_path / "list.jsonl").write_text('{"id": "x1", "source": "p/x.png", "instruction": "make it red", '
                                         '"seed": 5}\n\n{"id": "x2", "source": "y.png", "mask": "m.png", '
                                         '"instruction": "add a hat"}\n')
    assert batch.items(tmp_path) == [
        {"id": "x1", "source": str(tmp_path / "p/x.png"), "instruction": "make it red", "mask": None, "seed": 5},
        {"id": "x2", "source": str(tmp_path / "y.png"), "instruction": "add a hat", "mask": str(tmp_path / "m.png"),
         "seed": None}]
    (tmp_path / "other.csv").write_text("id,source,instruction\n")
    with pytest.raises(ValueError, match=r"holds 2 .csv/.jsonl files \(list.jsonl, other.csv\); pass the list file"):
        batch.items(tmp_path)
