"""The web extension in ComfyUI's real frontend (headless Chromium): it loads without errors, colours
xMGIE nodes, flags a composite-mode GB node without a source and a Cross-Attention Mask whose 'positive'
output feeds nothing, shows a node's run warning (the Region Predictor's empty region), and every bundled UI
workflow opens.

Needs node, npm (playwright-core is installed into a temporary folder) and a Chromium binary
(CHROMIUM or /usr/bin/chromium, e.g. Debian's `chromium` package); skipped, with the reason, without them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

import comfy_harness as harness

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")


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


def test_extension_and_workflows_in_the_frontend(frontend_runner, comfy_server):
    files = sorted(harness.WORKFLOWS_DIR.glob("*.json"))
    run = subprocess.run(["node", str(frontend_runner), comfy_server.url, *map(str, files)], capture_output=True,
                         text=True, timeout=300, env={**os.environ, "CHROMIUM": CHROMIUM})
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    ours = [e for e in report["errors"] if "xmgie" in e.lower()]
    assert not ours, "\n".join(ours)
    for f in files:
        result = report["workflows"][f.stem]
        assert len(result["types"]) == len(json.loads(f.read_text())["nodes"]), f"{f.name}: nodes missing"
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
