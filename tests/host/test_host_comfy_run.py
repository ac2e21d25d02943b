"""`python -m xmgie_core.apps.comfy_run` against a real ComfyUI server (`main.py --cpu` on 127.0.0.1): a bundled edit
workflow on two photos as a queue with the tiny checkpoint (each output has its input's size), a prompt ComfyUI
would reject (found before anything is uploaded), a run that fails while executing (the failing node and
traceback printed), files of the server's input folder kept, and Ctrl-C taking our prompt off the server."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from PIL import Image

import comfy_harness as harness

WORKFLOW = "xmgie_edit" if (harness.WORKFLOWS_DIR / "api" / "xmgie_edit.json").is_file() else "xmgie_region_edit"
SOURCE = harness.ASSETS_DIR / "xmgie_astronaut_source.png"


def run_cli(server: harness.ComfyServer, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    if "--workflow" not in args:
        args = ("--workflow", WORKFLOW, *args)
    cmd = [sys.executable, "-m", "xmgie_core.apps.comfy_run", "--url", server.url, *args]
    return subprocess.run(cmd, cwd=harness.REPO_ROOT, capture_output=True, text=True, timeout=timeout)


def stored_name(path: Path) -> str:
    """The content-hash name comfy_run uploads a file under."""
    return f"xmgie_{hashlib.sha256(path.read_bytes()).hexdigest()[:16]}{path.suffix.lower()}"


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


def test_a_prompt_comfyui_would_reject_uploads_nothing(comfy_server, tiny_checkpoint, tmp_path):
    photo = tmp_path / "never_uploaded.png"
    Image.new("RGB", (40, 30), (1, 2, 3)).save(photo)
    result = run_cli(comfy_server, "--image", str(photo), "--checkpoint", "no_such_model.safetensors",
                     "--steps", "2", "--out", str(tmp_path / "out"), timeout=120)
    assert result.returncode == 1, report(result, comfy_server)
    err = result.stderr
    assert "would reject this workflow (checked before uploading anything)" in err, err
    assert "(CheckpointLoaderSimple):" in err and "Value not in list" in err and "--checkpoint" in err, err
    assert "no_such_model.safetensors" in err and tiny_checkpoint.name in err, err
    assert not (comfy_server.base / "input" / stored_name(photo)).exists()
    assert not list((tmp_path / "out").iterdir())


def test_an_execution_error_prints_the_node_and_traceback(comfy_server, tiny_checkpoint, tmp_path):
    result = run_cli(comfy_server, "--image", str(SOURCE), "--checkpoint", tiny_checkpoint.name, "--steps", "2",
                     "--instruction", "   ", "--out", str(tmp_path / "out"), timeout=300)
    assert result.returncode == 1, report(result, comfy_server)
    err = result.stderr
    assert "ComfyUI failed at node" in err and "traceback (last" in err, err
    # the Instruction node reads the instruction first: the Region Predictor waits for its descriptions
    instruction_id, _ = harness.node_of(harness.load_workflow(f"api/{WORKFLOW}.json"), "XMGIEInstruction")
    assert f"node {instruction_id} (XMGIEInstruction)" in err and "XMGIERegionPredictor" not in err, err


def test_no_comfyui_at_the_url_is_a_usage_error():
    url = f"http://127.0.0.1:{harness.free_port()}"
    cmd = [sys.executable, "-m", "xmgie_core.apps.comfy_run", "--url", url, "--workflow", WORKFLOW, "--image", str(SOURCE)]
    result = subprocess.run(cmd, cwd=harness.REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and f"no ComfyUI is answering at {url}" in result.stderr, result.stderr


def test_a_workflow_with_a_mask_loader_keeps_the_servers_files(comfy_server, tmp_path):
    """GB compositing: --image goes to the source LoadImage, the mask LoadImage keeps the bundled sample; files
    of the same names already in the server's input folder are not replaced (issue 18.2). --url without http://."""
    mask = harness.ASSETS_DIR / "xmgie_astronaut_edit.png"
    theirs = {SOURCE.name: b"the server's own photo", mask.name: b"the server's own mask"}
    before = {name: (comfy_server.base / "input" / name) for name in theirs}
    kept = {name: path.read_bytes() for name, path in before.items() if path.is_file()}
    try:
        for name, data in theirs.items():
            before[name].write_bytes(data)
        out = tmp_path / "out"
        result = run_cli(comfy_server, "--workflow", "xmgie_gb_composite", "--image", str(SOURCE), "--out", str(out),
                         "--url", comfy_server.url.removeprefix("http://"), timeout=300)
        assert result.returncode == 0, report(result, comfy_server)
        (saved,) = out.iterdir()
        assert saved.name.startswith("xmgie_astronaut_source_xmgie_gb_")
        with Image.open(saved) as img:
            assert img.size == (512, 512)
        assert {name: path.read_bytes() for name, path in before.items()} == theirs
        for local in (SOURCE, mask):
            assert (comfy_server.base / "input" / stored_name(local)).read_bytes() == local.read_bytes()
    finally:  # the server is shared by the later host tests, which load the real samples by these names
        for name, path in before.items():
            path.write_bytes(kept[name]) if name in kept else path.unlink(missing_ok=True)


def start_cli(server: harness.ComfyServer, *args: str) -> tuple[subprocess.Popen, list[str]]:
    """The command as a subprocess; its stderr lines are collected as they come."""
    cmd = [sys.executable, "-m", "xmgie_core.apps.comfy_run", "--url", server.url, *args]
    proc = subprocess.Popen(cmd, cwd=harness.REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
    return proc, lines


def wait_for(condition, timeout: float, what: str, server: harness.ComfyServer) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}\n{server.log_tail()}"
        time.sleep(0.2)


def queue_ids(client: harness.ComfyClient) -> tuple[list[str], list[str]]:
    """(running, pending) prompt ids from GET /queue."""
    body = client.get("/queue").json()
    return [item[1] for item in body["queue_running"]], [item[1] for item in body["queue_pending"]]


def test_ctrl_c_interrupts_our_running_prompt(comfy_server, comfy_client, tiny_checkpoint, tmp_path):
    """Issue 18.12: Ctrl-C while the sampler runs -> one line, exit 130, the prompt interrupted on the server."""
    prompt = harness.load_workflow(f"api/{WORKFLOW}.json")
    harness.node_of(prompt, "XMGIERegionPredictor")[1]["inputs"]["draws"] = 2
    sampler_id = harness.node_of(prompt, "XMGIEPFBSampler")[0]
    own = tmp_path / "long.json"
    own.write_text(json.dumps(prompt))
    proc, lines = start_cli(comfy_server, "--workflow", str(own), "--image", str(SOURCE), "--checkpoint",
                            tiny_checkpoint.name, "--steps", "10000", "--out", str(tmp_path / "out"))
    try:
        wait_for(lambda: any(f"node {sampler_id} XMGIEPFBSampler" in line for line in lines), 600,
                 "the sampler to start", comfy_server)
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=60)
    finally:
        proc.kill()
    err = "".join(lines)
    assert rc == 130, err + comfy_server.log_tail()
    assert "Traceback" not in err and lines[-1].startswith("interrupted (Ctrl-C): prompt "), err
    assert "was running on ComfyUI and was interrupted; 0 of 1 image done" in lines[-1], err
    prompt_id = lines[-1].split()[3]
    wait_for(lambda: queue_ids(comfy_client) == ([], []), 120, "the queue to empty", comfy_server)
    status = comfy_client.get_history(prompt_id)["status"]
    assert status["status_str"] == "error" and any(m[0] == "execution_interrupted" for m in status["messages"]), status


def test_ctrl_c_removes_our_waiting_prompt_and_not_another_clients_run(comfy_server, comfy_client, tiny_checkpoint,
                                                                       tmp_path):
    """Issue 18.12: our prompt waits behind another client's; Ctrl-C deletes ours and leaves theirs running."""
    theirs = comfy_client.queue_prompt(harness.plain_sd15_prompt(tiny_checkpoint.name, seed=5, steps=10000))
    try:
        wait_for(lambda: queue_ids(comfy_client)[0] == [theirs], 120, "the other prompt to run", comfy_server)
        proc, lines = start_cli(comfy_server, "--workflow", "xmgie_gb_composite", "--image", str(SOURCE),
                                "--out", str(tmp_path / "out"))
        try:
            wait_for(lambda: len(queue_ids(comfy_client)[1]) == 1, 120, "our prompt to be queued", comfy_server)
            (ours,) = queue_ids(comfy_client)[1]
            proc.send_signal(signal.SIGINT)
            rc = proc.wait(timeout=60)
        finally:
            proc.kill()
        err = "".join(lines)
        assert rc == 130 and f"prompt {ours} was removed from ComfyUI's queue" in err, err
        assert queue_ids(comfy_client) == ([theirs], []), "the other client's prompt was interrupted"
    finally:
        comfy_client.http.post(comfy_client.url + "/interrupt", json={"prompt_id": theirs}, timeout=60)
        wait_for(lambda: queue_ids(comfy_client) == ([], []), 120, "the queue to empty", comfy_server)
