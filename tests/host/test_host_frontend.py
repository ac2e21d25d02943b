"""The web extension in ComfyUI's real frontend (headless Chromium): it loads without errors, colours
xMGIE nodes, flags a composite-mode GB node without a source and a Cross-Attention Mask whose 'positive'
output feeds nothing, shows a node's run warning (the Region Predictor's empty region), and every bundled UI
workflow opens with every node known and every saved widget value in its widget.

Then two workflows are run from the page, as a user would: the edit workflow (`xmgie_edit`, or
`xmgie_region_edit` while that is absent) with the tiny checkpoint and 2 steps chosen in its widgets, queued
with app.queuePrompt (what the Queue button calls); the Region Predictor must then show its preview (the
region in red over the photo, saved in ComfyUI's temp folder like PreviewImage's) on the node. And the
identity workflow with the dlib backend: the Identity Score node must show its report in a read-only text
widget that is neither saved in the workflow nor queued. Screenshots of the canvas go to out/ under the
repository root (frontend_<workflow>.png: the whole graph; frontend_<workflow>_<node>.png: the node at 100 %).

Needs node, npm (playwright-core is installed into a temporary folder) and a Chromium binary
(CHROMIUM or /usr/bin/chromium, e.g. Debian's `chromium` package); skipped, with the reason, without them.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import comfy_harness as harness

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
OUT_DIR = harness.REPO_ROOT / "out"
EDIT = "xmgie_edit" if (harness.WORKFLOWS_DIR / "xmgie_edit.json").is_file() else "xmgie_region_edit"
IDENTITY = "xmgie_identity_edit"
SEED = random.Random().randrange(1, 10**9)
"""A fresh seed per session for the run's first seeded node: nothing of the run comes from ComfyUI's cache of
an earlier test's prompt (a cached node may replay no UI output)."""


@pytest.fixture(scope="module")
def frontend_runner(tmp_path_factory) -> Path:
    missing = [tool for tool in ("node", "npm") if shutil.which(tool) is None]
    if missing or not Path(CHROMIUM).exists():
        pytest.skip(f"needs node, npm and Chromium (missing: {', '.join(missing) or CHROMIUM})")
    folder = tmp_path_factory.mktemp("frontend")
    npm = subprocess.run(["npm", "install", "--silent", "--prefix", str(folder), "playwright-core@1"],
                         capture_output=True, text=True, timeout=300)
    if npm.returncode:
        pytest.skip(f"could not install playwright-core from the npm registry: {npm.stderr[-500:]}")
    script = folder / "frontend_check.mjs"
    shutil.copyfile(Path(__file__).with_name("frontend_check.mjs"), script)
    return script


def frontend_runs(shots: Path) -> list[dict]:
    """What the page sets, queues and photographs (frontend_check.mjs, XMGIE_RUNS)."""
    tiny = {"CheckpointLoaderSimple": {"ckpt_name": harness.TINY_CHECKPOINT_NAME}}
    return [
        {"file": str(harness.WORKFLOWS_DIR / f"{EDIT}.json"), "timeout_s": 600,
         "widgets": {**tiny, "XMGIEPFBSampler": {"steps": 2},
                     "XMGIERegionPredictor": {"draws": 2, "steps": 2, "seed": SEED}},
         "wait_images": ["XMGIERegionPredictor"], "screenshot": str(shots / f"{EDIT}.png"),
         "closeups": {"XMGIERegionPredictor": str(shots / f"{EDIT}_region.png")}},
        {"file": str(harness.WORKFLOWS_DIR / f"{IDENTITY}.json"), "timeout_s": 600,
         "widgets": {**tiny, "XMGIEPFBSampler": {"steps": 2, "seed": SEED}, "XMGIEIDEmbedder": {"backend": "dlib"}},
         "screenshot": str(shots / f"{IDENTITY}.png"),
         "closeups": {"XMGIEIdentityScore": str(shots / f"{IDENTITY}_score.png")}},
    ]


@pytest.fixture(scope="module")
def frontend_report(frontend_runner, comfy_server, tmp_path_factory) -> dict:
    """One browser session: every bundled workflow opened and checked, then the two runs."""
    shots = tmp_path_factory.mktemp("screenshots")
    files = sorted(harness.WORKFLOWS_DIR.glob("*.json"))
    env = {**os.environ, "CHROMIUM": CHROMIUM, "XMGIE_RUNS": json.dumps(frontend_runs(shots))}
    run = subprocess.run(["node", str(frontend_runner), comfy_server.url, *map(str, files)], capture_output=True,
                         text=True, timeout=1500, env=env)
    assert run.returncode == 0, run.stderr[-2000:] + "\n" + comfy_server.log_tail()
    report = json.loads(run.stdout.strip().splitlines()[-1])
    OUT_DIR.mkdir(exist_ok=True)
    for result in report["runs"].values():  # keep the pictures for a person to look at
        for shot in filter(None, [result.get("screenshot"), *result.get("closeups", {}).values()]):
            shutil.copyfile(shot, OUT_DIR / f"frontend_{Path(shot).name}")
    return report


def test_extension_and_workflows_in_the_frontend(frontend_report):
    report = frontend_report
    ours = [e for e in report["errors"] if "xmgie" in e.lower()]
    assert not ours, "\n".join(ours)
    files = sorted(harness.WORKFLOWS_DIR.glob("*.json"))
    for f in files:
        result = report["workflows"][f.stem]
        assert len(result["types"]) == len(json.loads(f.read_text())["nodes"]), f"{f.name}: nodes missing"
        assert not result["missing"], f"{f.name}: node types the frontend does not know: {result['missing']}"
        assert result["colours"] and set(result["colours"]) == {"#2b3a55"}, f"{f.name}: extension did not colour"
        assert not result["before"].endswith("(connect source)")
        assert result["after"] == result["before"] + " (connect source)"
        if result["regionBefore"] is not None:  # a run that reported an empty region is shown on the node
            warned = result["regionWarned"]
            assert warned["title"] == result["regionBefore"] + " (warning: see log)", warned
            assert "region is empty" in warned["warning"] and warned["bg"] != "#1d2638"
            assert result["regionCleared"] == result["regionBefore"]
        if result["camBefore"] is not None:  # a CAM whose own prompt no longer reaches a sampler is flagged
            assert not result["camBefore"].endswith("(connect positive)"), f"{f.name}: CAM flagged while wired"
            assert result["camAfter"] == result["camBefore"] + " (connect positive)", f"{f.name}: {result['camAfter']}"


def test_saved_widget_values_line_up_with_the_frontends_widgets(frontend_report):
    """widgets_values is positional: one value fewer than the frontend's widgets (it adds a 'control after
    generate' combo after every INT input named 'seed') moves every later value into the wrong widget, and
    the workflow then fails validation when queued."""
    bad = {name: result["misaligned"] for name, result in frontend_report["workflows"].items() if result["misaligned"]}
    assert not bad, "saved widgets_values do not match the frontend's widgets:\n" + "\n".join(
        f"{name}.json node {m['id']} {m['type']}: {m['file']} values for {m['frontend']} widgets {m['widgets']}"
        for name, ms in bad.items() for m in ms)


def finished(frontend_report: dict, name: str) -> dict:
    """The run of `name` from the page: queued with our widget values, no unknown node, finished successfully."""
    result = frontend_report["runs"][name]
    summary = json.dumps({k: v for k, v in result.items() if k not in ("nodes", "sent")})[:4000]
    assert not result["missing"] and not result["unknown"], summary
    assert result["queued"] and not result["queued"]["node_errors"], f"{name}: not queued:\n{summary}"
    assert result["status"] == "execution_success", f"{name}: {result['status']}:\n{summary}"
    return result


def only_node(result: dict, node_type: str) -> dict:
    (node,) = result["nodes"][node_type]
    return node


def test_edit_workflow_run_from_the_page_shows_the_region_on_its_node(frontend_report, comfy_client):
    result = finished(frontend_report, EDIT)
    sent = result["sent"]
    loader = next(n for n in sent.values() if n["class_type"] == "CheckpointLoaderSimple")
    sampler = next(n for n in sent.values() if n["class_type"] == "XMGIEPFBSampler")
    assert loader["inputs"]["ckpt_name"] == harness.TINY_CHECKPOINT_NAME and sampler["inputs"]["steps"] == 2
    region = only_node(result, "XMGIERegionPredictor")
    stored = region["outputs"]
    assert stored and stored["xmgie_warning"] == [] and len(stored["images"]) == 1, stored
    (entry,) = stored["images"]
    assert entry["type"] == "temp" and entry["filename"].endswith(".png"), entry
    assert len(region["imgs"]) == 1 and "type=temp" in region["imgs"][0]["src"], region["imgs"]
    # what the node shows is the preview: the photo darkened outside the region, tinted red inside
    shown = harness.decode_png(comfy_client.get_image(entry)).astype(int)
    source = np.array(Image.open(harness.ASSETS_DIR / "xmgie_astronaut_source.png").convert("RGB")).astype(int)
    assert shown.shape == source.shape and (region["imgs"][0]["width"], region["imgs"][0]["height"]) == (
        source.shape[1], source.shape[0])
    outside = (np.abs(shown - np.floor(source * 0.6)) <= 1).all(axis=-1)
    inside = ~outside
    assert inside.any() and outside.any(), f"region covers {inside.mean():.1%} of the photo"
    redness = lambda img: (img[..., 0] - img[..., 1:].mean(axis=-1))[inside].mean()  # noqa: E731
    assert redness(shown) > redness(source) + 5, "the region is not tinted red"
    shot = OUT_DIR / f"frontend_{EDIT}.png"
    assert shot.is_file() and Image.open(shot).size[0] > 1000, shot
    assert (OUT_DIR / f"frontend_{EDIT}_region.png").is_file()


def test_identity_workflow_run_from_the_page_shows_the_report_on_its_node(frontend_report):
    result = finished(frontend_report, IDENTITY)
    embedder = next(n for n in result["sent"].values() if n["class_type"] == "XMGIEIDEmbedder")
    assert embedder["inputs"]["backend"] == "dlib"
    score = only_node(result, "XMGIEIdentityScore")
    (report,) = score["outputs"]["text"]
    shown = [w for w in score["widgets"] if w["name"] == "xmgie_report"]
    assert len(shown) == 1, score["widgets"]
    assert shown[0]["value"] == report and report.startswith("image 0: IPS"), shown
    assert shown[0]["readOnly"] is True and shown[0]["type"] == "customtext"
    assert report not in json.dumps(score["saved"]), "the report is saved in the workflow"
    assert "xmgie_report" not in (score["queuedAgain"] or {}), "the report would be queued as an input"
    assert (OUT_DIR / f"frontend_{IDENTITY}.png").is_file() and (OUT_DIR / f"frontend_{IDENTITY}_score.png").is_file()


def test_region_preview_is_saved_like_preview_image(comfy_host):
    """In-process: the Region Predictor's ui images are PNGs in ComfyUI's temp folder, named and listed as
    PreviewImage names and lists them, and hold the preview's pixels."""
    import folder_paths

    cls = comfy_host.nodes.NODE_CLASS_MAPPINGS["XMGIERegionPredictor"]
    save = sys.modules[cls.__module__].preview_ui_images
    preview = torch.rand(2, 24, 40, 3)
    entries = save(preview)
    assert [e["type"] for e in entries] == ["temp", "temp"] and {e["subfolder"] for e in entries} == {""}
    for i, entry in enumerate(entries):
        assert entry["filename"].startswith("xmgie_region_temp_") and entry["filename"].endswith("_.png")
        path = Path(folder_paths.get_temp_directory()) / entry["subfolder"] / entry["filename"]
        with Image.open(io.BytesIO(path.read_bytes())) as img:
            pixels = np.array(img)
        np.testing.assert_array_equal(pixels, np.clip(255.0 * preview[i].numpy(), 0, 255).astype(np.uint8))
    assert len({e["filename"] for e in entries + save(preview)}) == 4, "a second run overwrote the first's files"
