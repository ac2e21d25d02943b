"""`python -m xmgie_core.comfy_run` against a real ComfyUI server (`main.py --cpu` on 127.0.0.1): a bundled edit
workflow on two photos as a queue with the tiny checkpoint (each output has its input's size), a prompt ComfyUI
rejects (its node_errors printed), and a run that fails while executing (the failing node and traceback printed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

import comfy_harness as harness

WORKFLOW = "xmgie_edit" if (harness.WORKFLOWS_DIR / "api" / "xmgie_edit.json").is_file() else "xmgie_region_edit"
SOURCE = harness.ASSETS_DIR / "xmgie_astronaut_source.png"


def run_cli(server: harness.ComfyServer, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    if "--workflow" not in args:
        args = ("--workflow", WORKFLOW, *args)
    cmd = [sys.executable, "-m", "xmgie_core.comfy_run", "--url", server.url, *args]
    return subprocess.run(cmd, cwd=harness.REPO_ROOT, capture_output=True, text=True, timeout=timeout)


def report(result: subprocess.CompletedProcess, server: harness.ComfyServer) -> str:
    return f"rc={result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr[-4000:]}\n{server.log_tail()}"


def test_two_photos_as_a_queue(comfy_server, tiny_checkpoint, tmp_path):
    """The bundled workflow, saved as an own file with 2 noise draws in the Region Predictor (2 CPU cores)."""
    prompt = harness.load_workflow(f"api/{WORKFLOW}.json")
    harness.node_of(prompt, "XMGIERegionPredictor")[1]["inputs"]["draws"] = 2
    save_prefix = harness.node_of(prompt, "SaveImage")[1]["inputs"]["filename_prefix"]
    own = tmp_path / f"{WORKFLOW}_quick.json"
    own.write_text(json.dumps(prompt))
    second = tmp_path / "second_photo.png"
    Image.open(SOURCE).convert("RGB").resize((320, 240), Image.LANCZOS).save(second)
    out = tmp_path / "out"
    result = run_cli(comfy_server, "--workflow", str(own), "--image", str(SOURCE), str(second), "--checkpoint",
                     tiny_checkpoint.name, "--steps", "2", "--seed", "31", "--out", str(out), "--timeout", "600")
    assert result.returncode == 0, report(result, comfy_server)
    assert "2 succeeded, 0 failed" in result.stdout
    written = [Path(line[len("wrote "):]) for line in result.stdout.splitlines() if line.startswith("wrote ")]
    assert written and all(p.is_file() for p in written), report(result, comfy_server)
    assert set(out.iterdir()) == set(written)
    for photo in (SOURCE, second):
        saved = [p for p in written if p.name.startswith(f"{photo.stem}_{save_prefix}_")]
        assert len(saved) == 1, f"{photo.name}: {[p.name for p in written]}"
        with Image.open(saved[0]) as img, Image.open(photo) as src:
            assert img.format == "PNG" and img.size == src.size


def test_a_rejected_prompt_prints_the_node_errors(comfy_server, tiny_checkpoint, tmp_path):
    result = run_cli(comfy_server, "--image", str(SOURCE), "--checkpoint", "no_such_model.safetensors",
                     "--steps", "2", "--out", str(tmp_path / "out"), timeout=120)
    assert result.returncode == 1, report(result, comfy_server)
    err = result.stderr
    assert "ComfyUI rejected the prompt: Prompt outputs failed validation" in err, err
    assert "(CheckpointLoaderSimple):" in err and "Value not in list" in err, err
    assert "no_such_model.safetensors" in err and tiny_checkpoint.name in err, err
    assert not list((tmp_path / "out").iterdir())


def test_an_execution_error_prints_the_node_and_traceback(comfy_server, tiny_checkpoint, tmp_path):
    result = run_cli(comfy_server, "--image", str(SOURCE), "--checkpoint", tiny_checkpoint.name, "--steps", "2",
                     "--instruction", "   ", "--out", str(tmp_path / "out"), timeout=300)
    assert result.returncode == 1, report(result, comfy_server)
    err = result.stderr
    assert "ComfyUI failed at node" in err and "traceback (last" in err, err
    assert "(XMGIEInstruction)" in err or "(XMGIERegionPredictor)" in err, err


def test_no_comfyui_at_the_url_is_a_usage_error():
    url = f"http://127.0.0.1:{harness.free_port()}"
    cmd = [sys.executable, "-m", "xmgie_core.comfy_run", "--url", url, "--workflow", WORKFLOW, "--image", str(SOURCE)]
    result = subprocess.run(cmd, cwd=harness.REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and f"no ComfyUI is answering at {url}" in result.stderr, result.stderr


def test_a_workflow_with_a_mask_loader(comfy_server, tmp_path):
    """GB compositing: --image goes to the source LoadImage, the mask LoadImage keeps the bundled sample."""
    out = tmp_path / "out"
    result = run_cli(comfy_server, "--workflow", "xmgie_gb_composite", "--image", str(SOURCE), "--out", str(out),
                     timeout=300)
    assert result.returncode == 0, report(result, comfy_server)
    (saved,) = out.iterdir()
    assert saved.name.startswith("xmgie_astronaut_source_xmgie_gb_")
    with Image.open(saved) as img:
        assert img.size == (512, 512)
