"""`python -m xmgie_core.apps.comfy_run` without ComfyUI: the overrides on the bundled API workflows, image expansion,
the websocket message handling on recorded sequences, argument checks, and the whole client against a small fake
ComfyUI (the routes of ComfyUI 0.3.64's server.py it uses, and a minimal websocket endpoint) served in-process on
127.0.0.1, with Ctrl-C sent as a real SIGINT."""

from __future__ import annotations

import base64
import copy
import email.parser
import email.policy
import hashlib
import io
import json
import queue
import select
import signal
import socket
import struct
import threading
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from PIL import Image

from xmgie_core.apps import comfy_client as cc
from xmgie_core.apps import comfy_run as cr
from xmgie_core.apps import comfy_workflows as cw

API = Path(cw.API_DIR)
ASSETS = Path(cw.ASSETS_DIR)
SOURCE, MASK = "xmgie_astronaut_source.png", "xmgie_astronaut_edit.png"


def bundled(name: str) -> dict:
    return json.loads((API / f"{name}.json").read_text())


def literal_changes(before: dict, after: dict) -> dict[tuple[str, str], object]:
    """{(node id, input): new value} for every input that differs."""
    assert before.keys() == after.keys()
    return {(nid, key): after[nid]["inputs"][key] for nid in before for key in after[nid]["inputs"]
            if before[nid]["inputs"].get(key) != after[nid]["inputs"][key]}


# --------------------------------------------------------------------------------------------------
# Overrides on the real bundled workflows
# --------------------------------------------------------------------------------------------------

def test_every_bundled_workflow_has_one_source_loader_and_keeps_its_mask():
    names = cw.bundled_workflows()
    assert "xmgie_region_edit" in names and len(names) >= 5
    for name in names:
        prompt = bundled(name)
        source = cw.find_source_loader(prompt, name)
        assert prompt[source]["inputs"]["image"] == SOURCE, name
        out = cw.set_source_image(prompt, "mine.png", name)
        assert literal_changes(prompt, out) == {(source, "image"): "mine.png"}, name
        others = cw.other_loader_images(prompt, source)
        assert set(others.values()) <= {MASK}, name
        companions = cr.companion_images(prompt, name, API / f"{name}.json")
        assert companions == {n: ASSETS / n for n in others.values()}, name


def test_instruction_reaches_every_literal_instruction_of_the_region_workflow():
    prompt = bundled("xmgie_region_edit")
    out = cw.set_instruction(prompt, "make the sky purple", "xmgie_region_edit")
    targets = {(nid, "instruction") for nid, n in prompt.items()
               if n["class_type"] in ("XMGIEInstruction", "XMGIERegionPredictor", "XMGIEMGIEGuidance")
               and isinstance(n["inputs"].get("instruction"), str)}
    assert {prompt[nid]["class_type"] for nid, _ in targets} == {"XMGIEInstruction", "XMGIERegionPredictor"}
    assert literal_changes(prompt, out) == {t: "make the sky purple" for t in targets}
    assert prompt["3"]["inputs"]["instruction"] == "give the astronaut a red scarf", "the input was modified"


def test_instruction_reaches_mgie_guidance():
    out = cw.set_instruction(bundled("xmgie_mgie_edit"), "add snow", "xmgie_mgie_edit")
    assert [n["inputs"]["instruction"] for n in out.values() if n["class_type"] == "XMGIEMGIEGuidance"] == ["add snow"]


def test_seed_and_steps_go_to_the_samplers_only():
    prompt = bundled("xmgie_region_edit")
    out = cw.apply_overrides(prompt, "xmgie_region_edit", seed=7, steps=3, checkpoint="tiny.safetensors")
    pfb = next(nid for nid, n in prompt.items() if n["class_type"] == "XMGIEPFBSampler")
    loader = next(nid for nid, n in prompt.items() if n["class_type"] == "CheckpointLoaderSimple")
    # the Region Predictor's and the Instruction node's own seed / steps are not sampler settings
    assert literal_changes(prompt, out) == {(pfb, "seed"): 7, (pfb, "steps"): 3, (loader, "ckpt_name"): "tiny.safetensors"}


def test_seed_and_steps_of_the_custom_sampler_nodes():
    prompt = bundled("xmgie_mgie_edit")
    out = cw.apply_overrides(prompt, "xmgie_mgie_edit", seed=11, steps=4)
    changed = {(prompt[nid]["class_type"], key): value for (nid, key), value in literal_changes(prompt, out).items()}
    assert changed == {("RandomNoise", "noise_seed"): 11, ("BasicScheduler", "steps"): 4}
    ks = cw.apply_overrides(bundled("xmgie_cam_edit"), "xmgie_cam_edit", seed=5, steps=2)
    assert [(n["inputs"]["seed"], n["inputs"]["steps"]) for n in ks.values() if n["class_type"] == "KSampler"] == [(5, 2)]


@pytest.mark.parametrize("workflow, override, flag", [
    ("xmgie_gb_composite", {"seed": 1}, "--seed"),
    ("xmgie_gb_composite", {"steps": 2}, "--steps"),
    ("xmgie_gb_composite", {"checkpoint": "x.safetensors"}, "--checkpoint"),
    ("xmgie_pfb_edit", {"instruction": "add a hat"}, "--instruction"),
])
def test_an_override_without_a_target_is_an_error_naming_the_workflow(workflow, override, flag):
    with pytest.raises(cw.OverrideError) as e:
        cw.apply_overrides(bundled(workflow), workflow, **override)
    assert flag in str(e.value) and workflow in str(e.value)


def test_linked_inputs_are_not_overridden():
    prompt = {"1": {"class_type": "PrimitiveInt", "inputs": {"value": 3}},
              "2": {"class_type": "KSampler", "inputs": {"seed": ["1", 0], "steps": 20}}}
    with pytest.raises(cw.OverrideError, match="--seed: workflow w.json"):
        cw.set_seed(prompt, 9, "w.json")
    assert cw.set_steps(prompt, 2, "w.json")["2"]["inputs"] == {"seed": ["1", 0], "steps": 2}


def test_companion_images_of_an_own_workflow(tmp_path):
    prompt = bundled("xmgie_cam_edit")
    prompt["2"]["inputs"]["image"] = "own_mask.png"
    path = tmp_path / "own.json"
    assert cr.companion_images(prompt, "own", path) == {"own_mask.png": None}  # not found here: ComfyUI must have it
    write_png(tmp_path / "own_mask.png")
    assert cr.companion_images(prompt, "own", path) == {"own_mask.png": tmp_path / "own_mask.png"}


def test_source_loader_by_wiring_and_ambiguity():
    prompt = {"1": {"class_type": "LoadImage", "inputs": {"image": "a.png"}},
              "2": {"class_type": "LoadImage", "inputs": {"image": "b.png"}},
              "3": {"class_type": "XMGIEGBCompositor", "inputs": {"edited": ["2", 0], "mask": ["2", 1], "source": ["1", 0]}}}
    assert cw.find_source_loader(prompt, "w") == "1"
    del prompt["3"]
    with pytest.raises(cw.OverrideError, match="workflow w has 2 LoadImage nodes"):
        cw.find_source_loader(prompt, "w")
    with pytest.raises(cw.OverrideError, match="--image: workflow w has no LoadImage"):
        cw.find_source_loader({"1": {"class_type": "SaveImage", "inputs": {}}}, "w")


def test_resolve_and_load_workflows(tmp_path):
    assert cw.resolve_workflow("xmgie_region_edit") == API / "xmgie_region_edit.json"
    assert cw.resolve_workflow("xmgie_region_edit.json") == API / "xmgie_region_edit.json"
    own = tmp_path / "own.json"
    own.write_text(json.dumps(bundled("xmgie_gb_composite")))
    assert cw.load_workflow(cw.resolve_workflow(str(own))) == bundled("xmgie_gb_composite")
    with pytest.raises(cc.UsageError, match="xmgie_region_edit"):  # lists the bundled names
        cw.resolve_workflow("no_such_workflow")
    ui = tmp_path / "ui.json"
    ui.write_text((API.parent / "xmgie_region_edit.json").read_text())
    with pytest.raises(cc.UsageError, match="UI-format"):
        cw.load_workflow(ui)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(cc.UsageError, match="cannot read workflow"):
        cw.load_workflow(bad)


# --------------------------------------------------------------------------------------------------
# Images: files, folders, patterns
# --------------------------------------------------------------------------------------------------

def write_png(path: Path, size: tuple[int, int] = (16, 12)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (10, 20, 30)).save(path)
    return path


def test_expand_images(tmp_path, monkeypatch):
    a, b = write_png(tmp_path / "d" / "b.png"), write_png(tmp_path / "d" / "a.png")
    c = write_png(tmp_path / "d" / "sub" / "c.jpg")
    (tmp_path / "d" / "notes.txt").write_text("x")
    monkeypatch.chdir(tmp_path)
    assert cw.expand_images(["d"]) == [Path("d/a.png"), Path("d/b.png")]  # sorted, images only, not recursive
    assert cw.expand_images(["d/*.png", "d/a.png"]) == [Path("d/a.png"), Path("d/b.png")]  # no repeats
    assert cw.expand_images(["d/**/*.jpg"]) == [Path("d/sub/c.jpg")]
    assert cw.expand_images([str(c), str(a)]) == [c, a]  # explicit order kept
    assert cw.expand_images(["d/notes.txt"]) == [Path("d/notes.txt")]  # a named file is taken as given
    with pytest.raises(cc.UsageError, match="file not found: d/missing.png"):
        cw.expand_images(["d/missing.png"])
    with pytest.raises(cc.UsageError, match="no image file matches"):
        cw.expand_images(["d/*.webp"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(cc.UsageError, match="folder empty holds no images"):
        cw.expand_images(["empty"])
    assert b.exists()


# --------------------------------------------------------------------------------------------------
# Recorded websocket sequences and error texts
# --------------------------------------------------------------------------------------------------

def success_messages(prompt_id: str, prompt: dict, client_id: str = "c") -> list[dict]:
    """The sequence ComfyUI 0.3.64 sends for one run, around another prompt's noise."""
    ids = list(prompt)
    sampler = next((nid for nid, n in prompt.items() if "Sampler" in n["class_type"]), ids[-1])
    msgs = [{"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 1}}, "sid": client_id}},
            {"type": "execution_start", "data": {"prompt_id": prompt_id, "timestamp": 1}},
            {"type": "execution_cached", "data": {"nodes": ids[:1], "prompt_id": prompt_id, "timestamp": 2}},
            {"type": "progress", "data": {"value": 1, "max": 9, "node": "77", "prompt_id": "someone-else"}},
            {"type": "executing", "data": {"node": None, "prompt_id": "someone-else"}}]
    for nid in ids[1:]:
        msgs.append({"type": "progress_state", "data": {"prompt_id": prompt_id, "nodes": {nid: {"value": 0, "max": 1}}}})
        msgs.append({"type": "executing", "data": {"node": nid, "display_node": nid, "prompt_id": prompt_id}})
        if nid == sampler:
            msgs += [{"type": "progress", "data": {"value": v, "max": 2, "node": nid, "prompt_id": prompt_id}}
                     for v in (1, 2)]
        msgs.append({"type": "executed", "data": {"node": nid, "display_node": nid, "output": {}, "prompt_id": prompt_id}})
    return msgs + [{"type": "execution_success", "data": {"prompt_id": prompt_id, "timestamp": 3}},
                   {"type": "executing", "data": {"node": None, "prompt_id": prompt_id}}]


TRACEBACK = [f'  File "/comfy/frame{i}.py", line {i}, in f{i}\n    call{i}()\n    ^^^^^^^{"^" * len(str(i))}\n'
             for i in range(12)]


def error_message(prompt_id: str, node_id: str = "10", node_type: str = "XMGIEPFBSampler") -> dict:
    return {"type": "execution_error", "data": {
        "prompt_id": prompt_id, "node_id": node_id, "node_type": node_type, "executed": ["1", "2"],
        "exception_message": "mat1 and mat2 shapes cannot be multiplied (77x768 and 1024x320)\n",
        "exception_type": "RuntimeError", "traceback": TRACEBACK, "current_inputs": {}, "current_outputs": []}}


class RecordingView:
    def __init__(self) -> None:
        self.events: list[tuple] = []

    def node(self, node_id: str) -> None:
        self.events.append(("node", node_id))

    def step(self, value: int, maximum: int) -> None:
        self.events.append(("step", value, maximum))


def test_follow_a_successful_run():
    prompt = bundled("xmgie_region_edit")
    view = RecordingView()
    cc.follow(iter(success_messages("p1", prompt)), "p1", view, prompt)
    assert [e[1] for e in view.events if e[0] == "node"] == list(prompt)[1:]
    assert ("step", 1, 2) in view.events and ("step", 2, 2) in view.events
    assert all(e != ("step", 1, 9) for e in view.events), "another prompt's progress was shown"


def test_follow_stops_at_the_end_of_its_prompt_and_raises_on_errors():
    prompt = bundled("xmgie_region_edit")
    messages = iter(success_messages("p1", prompt) + [error_message("p1")])
    cc.follow(messages, "p1", None, prompt)
    assert next(messages)["type"] == "execution_error", "follow read past the prompt's end"
    with pytest.raises(cc.RunFailed) as e:
        cc.follow(iter(success_messages("p1", prompt)[:8] + [error_message("p1")]), "p1", None, prompt)
    text = str(e.value)
    assert "node 10 (XMGIEPFBSampler)" in text and "RuntimeError: mat1 and mat2 shapes cannot be multiplied" in text
    assert "frame11.py" in text and "call11()" in text and "frame0.py" not in text  # only the last lines
    assert "frame8.py" in text and "^^^" not in text  # 8 lines, without the caret lines
    custom = error_message("p1", "3", "XMGIEInstruction")
    custom["data"]["exception_type"] = "/comfy/custom_nodes/xmgie.xmgie_core.errors.XMGIEInputError"
    assert cc.format_execution_error(custom["data"]).startswith(
        "ComfyUI failed at node 3 (XMGIEInstruction): XMGIEInputError: mat1")
    with pytest.raises(cc.RunFailed, match="interrupted the run at node 4"):
        cc.follow(iter([{"type": "execution_interrupted", "data": {"prompt_id": "p1", "node_id": "4",
                                                                    "node_type": "XMGIERegionPredictor"}}]), "p1")
    with pytest.raises(cc.RunFailed, match="websocket closed before prompt p1 finished"):
        cc.follow(iter(success_messages("p1", prompt)[:-1]), "p1")


BAD_CHECKPOINT = {
    "error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation",
              "details": "", "extra_info": {}},
    "node_errors": {"2": {"errors": [{"type": "value_not_in_list", "message": "Value not in list",
                                      "details": "ckpt_name: 'bad.safetensors' not in ['tiny.safetensors']",
                                      "extra_info": {"input_name": "ckpt_name"}}],
                          "dependent_outputs": ["13", "5"], "class_type": "CheckpointLoaderSimple"},
                    "10": {"errors": [{"type": "value_smaller_than_min", "message": "Value 0 smaller than min of 1",
                                       "details": "steps", "extra_info": {}}],
                           "dependent_outputs": ["13"], "class_type": "XMGIEPFBSampler"}}}


def test_format_rejection():
    text = cc.format_rejection(BAD_CHECKPOINT)
    assert text.splitlines() == [
        "ComfyUI rejected the prompt: Prompt outputs failed validation",
        "  node 10 (XMGIEPFBSampler):",
        "    - Value 0 smaller than min of 1: steps",
        "  node 2 (CheckpointLoaderSimple):",
        "    - Value not in list: ckpt_name: 'bad.safetensors' not in ['tiny.safetensors']"]
    no_outputs = {"error": {"type": "prompt_no_outputs", "message": "Prompt has no outputs", "details": ""},
                  "node_errors": []}
    assert cc.format_rejection(no_outputs) == "ComfyUI rejected the prompt: Prompt has no outputs"


def test_progress_view_on_a_terminal_and_in_a_log():
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    prompt = bundled("xmgie_region_edit")
    tty = Tty()
    view = cc.ProgressView("photo.png", prompt, tty)
    view.node("10")
    view.step(1, 4)
    view.step(3, 4)
    assert view.bar.total == 4 and view.bar.n == 3
    view.node("11")
    assert view.bar.total is None and view.bar.n == 0  # the next node starts without the sampler's count
    view.close()
    assert "photo.png: node 10 XMGIEPFBSampler" in tty.getvalue() and "3/4" in tty.getvalue()
    log = io.StringIO()
    view = cc.ProgressView("photo.png", prompt, log)
    view.node("4")
    view.step(1, 4)
    view.close()
    assert log.getvalue() == "photo.png: node 4 XMGIERegionPredictor\n"


# --------------------------------------------------------------------------------------------------
# A fake ComfyUI on 127.0.0.1: the routes the command uses, and /ws
# --------------------------------------------------------------------------------------------------

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def ws_frame(payload: bytes, opcode: int) -> bytes:
    """One unmasked server-to-client websocket frame."""
    n = len(payload)
    head = bytes([0x80 | opcode]) + (bytes([n]) if n < 126 else
                                      bytes([126]) + struct.pack(">H", n) if n < 1 << 16 else
                                      bytes([127]) + struct.pack(">Q", n))
    return head + payload


def read_ws_frame(rfile) -> int:
    """Read one (masked) client frame; returns its opcode."""
    b1, b2 = rfile.read(2)
    n = b2 & 0x7F
    if n == 126:
        n = struct.unpack(">H", rfile.read(2))[0]
    elif n == 127:
        n = struct.unpack(">Q", rfile.read(8))[0]
    rfile.read((4 if b2 & 0x80 else 0) + n)
    return b1 & 0x0F


def object_info_of_bundled_workflows(input_files: Callable[[], list[str]]) -> dict[str, dict]:
    """GET /object_info entries for every node type of the bundled workflows, in ComfyUI 0.3.64's V1 format.

    Required inputs are those every bundled use of the type sets; the types and limits of the inputs this command
    overrides or checks are ComfyUI's (KSampler seed/steps, CheckpointLoaderSimple's list, LoadImage's upload).
    `input_files` lists the server's input folder, as LoadImage's list does.
    """
    uses: dict[str, list[set]] = {}
    for name in cw.bundled_workflows():
        for node in bundled(name).values():
            uses.setdefault(node["class_type"], []).append(set(node["inputs"]))
    specs = {"ckpt_name": [["tiny.safetensors", "v1-5-pruned-emaonly.safetensors"], {}],
             "steps": ["INT", {"default": 20, "min": 1, "max": 10000}],
             "seed": ["INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF}],
             "noise_seed": ["INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF}]}
    info = {}
    for cls, input_sets in uses.items():
        required, every = set.intersection(*input_sets), set.union(*input_sets)
        spec = {k: specs.get(k, ["*", {}]) for k in every}
        if cls == "LoadImage":
            spec["image"] = [sorted(input_files()), {"image_upload": True}]
        info[cls] = {"input": {"required": {k: spec[k] for k in sorted(required)},
                               "optional": {k: spec[k] for k in sorted(every - required)}},
                     "name": cls, "display_name": cls, "output_node": cls in ("SaveImage", "PreviewImage")}
    return info


class FakeComfy:
    """A ComfyUI 0.3.64 stand-in with the routes of server.py the command uses, and their behaviour: the input
    folder (`input`, uploads renamed "name (1).ext" unless overwrite or the same bytes), GET /object_info[/{class}],
    POST /prompt (a client's prompt_id kept; unknown node types and missing LoadImage files rejected as ComfyUI
    does), GET/POST /queue, POST /interrupt (targeted at a prompt only while it runs), /history, /view and /ws.

    `plan(prompt, prompt_id)` returns (status, body, messages, outputs, state): state "done" (history written),
    "running" or "pending" (the prompt stays in the queue until interrupted or deleted).
    """

    def __init__(self) -> None:
        self.input: dict[str, bytes] = {}
        self.upload_fields: list[dict] = []
        self.uploaded: list[str] = []
        self.prompts: list[dict] = []
        self.prompt_ids: list[str] = []
        self.history: dict[str, dict] = {}
        self.files: dict[str, bytes] = {}
        self.sockets: dict[str, queue.Queue] = {}
        self.running: list[list] = []
        self.pending: list[list] = []
        self.interrupts: list[str] = []
        self.deleted: list[str] = []
        self.routes: list[str] = []
        self.object_info = object_info_of_bundled_workflows(lambda: list(self.input))
        self.object_info_status = 200
        self.on_upload: Callable[[], None] | None = None
        self.stop = threading.Event()
        self.plan: Callable[[dict, str], tuple] = self.succeed
        self.counter = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def reply(self, status: int, body: object, ctype: str = "application/json") -> None:
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client hung up (Ctrl-C)

            def do_GET(self) -> None:
                url = urlsplit(self.path)
                fake.routes.append(f"GET {url.path}")
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                if url.path == "/system_stats":
                    self.reply(200, {"system": {"comfyui_version": "fake"}, "devices": []})
                elif url.path == "/ws":
                    fake.serve_websocket(self, query["clientId"])
                elif url.path.startswith("/object_info"):
                    wanted = url.path[len("/object_info/"):]
                    known = fake.object_info if not wanted else (
                        {wanted: fake.object_info[wanted]} if wanted in fake.object_info else {})
                    self.reply(fake.object_info_status, known if fake.object_info_status == 200 else b"")
                elif url.path == "/queue":
                    self.reply(200, {"queue_running": fake.running, "queue_pending": fake.pending})
                elif url.path.startswith("/history/"):
                    pid = url.path.rsplit("/", 1)[1]
                    self.reply(200, {pid: fake.history[pid]} if pid in fake.history else {})
                elif url.path == "/view" and query.get("filename") in fake.files:
                    self.reply(200, fake.files[query["filename"]], "image/png")
                else:
                    self.reply(404, {"error": "not found"})

            def do_POST(self) -> None:
                fake.routes.append(f"POST {self.path}")
                body = self.rfile.read(int(self.headers["Content-Length"] or 0))
                if self.path == "/upload/image":
                    self.reply(200, fake.receive_upload(self.headers["Content-Type"], body))
                elif self.path == "/prompt":
                    status, answer = fake.receive_prompt(json.loads(body))
                    self.reply(status, answer)
                elif self.path == "/queue":
                    for pid in json.loads(body).get("delete", []):
                        fake.deleted += [item[1] for item in fake.pending if item[1] == pid]
                        fake.pending = [item for item in fake.pending if item[1] != pid]
                    self.reply(200, b"", "text/plain")
                elif self.path == "/interrupt":
                    pid = json.loads(body or b"{}").get("prompt_id")
                    if pid is None or any(item[1] == pid for item in fake.running):  # as server.py: targeted
                        fake.interrupts.append(pid)
                        fake.running = []
                    self.reply(200, b"", "text/plain")
                else:
                    self.reply(404, {"error": "not found"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()

    # --- routes -----------------------------------------------------------------------------------

    def receive_upload(self, ctype: str, body: bytes) -> dict:
        """server.py image_upload: without overwrite, a different file of that name makes "name (i).ext"."""
        if self.on_upload is not None:
            self.on_upload()
        message = email.parser.BytesParser(policy=email.policy.default).parsebytes(
            b"Content-Type: " + ctype.encode() + b"\r\n\r\n" + body)
        fields, name, data = {}, None, b""
        for part in message.iter_parts():
            field = part.get_param("name", header="content-disposition")
            if part.get_filename():
                name, data = part.get_filename(), part.get_payload(decode=True)
            else:
                fields[field] = part.get_content().strip()
        self.upload_fields.append(fields)
        if fields.get("overwrite") not in ("true", "1"):
            stem, ext = Path(name).stem, Path(name).suffix
            i = 1
            while name in self.input and self.input[name] != data:
                name, i = f"{stem} ({i}){ext}", i + 1
        self.input[name] = data
        self.uploaded.append(name)
        return {"name": name, "subfolder": "", "type": fields.get("type", "input")}

    def receive_prompt(self, body: dict) -> tuple[int, dict]:
        prompt, client_id = body["prompt"], body["client_id"]
        prompt_id = str(body.get("prompt_id") or uuid.uuid4())
        for nid, node in prompt.items():
            if node["class_type"] not in self.object_info:
                return 400, {"error": {"type": "invalid_prompt", "details": f"Node ID '#{nid}'", "extra_info": {},
                                       "message": f"Cannot execute because node {node['class_type']} does not exist."},
                             "node_errors": {}}
            if node["class_type"] == "LoadImage" and node["inputs"]["image"] not in self.input:
                return 400, {"error": {"type": "prompt_outputs_failed_validation", "details": "", "extra_info": {},
                                       "message": "Prompt outputs failed validation"},
                             "node_errors": {nid: {"class_type": "LoadImage", "dependent_outputs": [], "errors": [
                                 {"type": "custom_validation_failed", "message": "Custom validation failed for node",
                                  "details": f"image - Invalid image file: {node['inputs']['image']}",
                                  "extra_info": {"input_name": "image"}}]}}}
        self.prompts.append(prompt)
        self.prompt_ids.append(prompt_id)
        status, answer, messages, outputs, state = self.plan(prompt, prompt_id)
        if status != 200:
            return status, answer
        item = [len(self.prompts), prompt_id, prompt, {"client_id": client_id}, []]
        if state == "done":
            self.history[prompt_id] = {"prompt": item, "outputs": outputs,
                                       "status": {"status_str": "success", "completed": True, "messages": []}}
        else:
            (self.running if state == "running" else self.pending).append(item)
        for msg in messages:
            self.sockets[client_id].put(msg)
        return 200, {"prompt_id": prompt_id, "number": len(self.prompts),
                     "node_errors": (answer or {}).get("node_errors", {})}

    def serve_websocket(self, handler: BaseHTTPRequestHandler, client_id: str) -> None:
        accept = base64.b64encode(hashlib.sha1((handler.headers["Sec-WebSocket-Key"] + WS_GUID).encode()).digest())
        outbox = self.sockets.setdefault(client_id, queue.Queue())  # before the handshake completes
        handler.send_response(101, "Switching Protocols")
        handler.send_header("Upgrade", "websocket")
        handler.send_header("Connection", "Upgrade")
        handler.send_header("Sec-WebSocket-Accept", accept.decode())
        handler.end_headers()
        handler.wfile.flush()
        outbox.put({"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 0}}, "sid": client_id}})
        sock = handler.connection
        while not self.stop.is_set():
            while not outbox.empty():
                msg = outbox.get()
                if msg == "close":  # the server ends the websocket (a proxy's idle timeout, a restart)
                    handler.wfile.write(ws_frame(b"", 8))
                    return
                handler.wfile.write(ws_frame(msg, 2) if isinstance(msg, bytes) else
                                    ws_frame(json.dumps(msg).encode(), 1))
            if select.select([sock], [], [], 0.02)[0] and read_ws_frame(handler.rfile) == 8:
                handler.wfile.write(ws_frame(b"", 8))  # answer the client's close and end
                return

    # --- plans ------------------------------------------------------------------------------------

    def source_size(self, prompt: dict) -> tuple[int, int]:
        name = prompt[cw.find_source_loader(prompt, "fake")]["inputs"]["image"]
        return Image.open(io.BytesIO(self.input[name])).size

    def succeed(self, prompt: dict, prompt_id: str) -> tuple:
        """Every SaveImage / PreviewImage node writes one PNG of the source's size."""
        outputs = {}
        for nid, node in prompt.items():
            if node["class_type"] in ("SaveImage", "PreviewImage"):
                self.counter += 1
                saved = node["class_type"] == "SaveImage"
                name = (f"{node['inputs']['filename_prefix']}_{self.counter:05d}_.png" if saved
                        else f"ComfyUI_temp_abcde_{self.counter:05d}_.png")
                buf = io.BytesIO()
                Image.new("RGB", self.source_size(prompt), (200, 0, 0)).save(buf, format="PNG")
                self.files[name] = buf.getvalue()
                outputs[nid] = {"images": [{"filename": name, "subfolder": "", "type": "output" if saved else "temp"}]}
        messages = success_messages(prompt_id, prompt)
        messages.insert(3, struct.pack(">I", 1) + b"preview-bytes")  # a binary preview frame is skipped
        return 200, None, messages, outputs, "done"

    def reject(self, prompt: dict, prompt_id: str) -> tuple:
        return 400, BAD_CHECKPOINT, [], {}, "done"

    def accept_part(self, prompt: dict, prompt_id: str) -> tuple:
        """ComfyUI's answer when some outputs validate and others do not: HTTP 200, the prompt queued, node_errors
        for the rest (which would be skipped)."""
        return 200, {"node_errors": BAD_CHECKPOINT["node_errors"]}, [], {}, "pending"

    def fail(self, prompt: dict, prompt_id: str) -> tuple:
        return 200, None, success_messages(prompt_id, prompt)[:6] + [error_message(prompt_id)], {}, "done"

    def hang(self, prompt: dict, prompt_id: str) -> tuple:
        """The prompt starts running and does not finish (a long sampler)."""
        return 200, None, success_messages(prompt_id, prompt)[:6], {}, "running"

    def drop_websocket(self, prompt: dict, prompt_id: str) -> tuple:
        """The prompt runs on, but the websocket closes."""
        return 200, None, success_messages(prompt_id, prompt)[:6] + ["close"], {}, "running"

    def wait_behind_another(self, prompt: dict, prompt_id: str) -> tuple:
        """Someone else's prompt runs; ours waits in the queue."""
        self.running = [[0, "someone-else", {}, {}, []]]
        return 200, None, [], {}, "pending"


def press_ctrl_c_after(seconds: float) -> threading.Timer:
    """SIGINT to the main thread (where the command runs) as a terminal's Ctrl-C sends it."""
    timer = threading.Timer(seconds, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT))
    timer.start()
    return timer


@pytest.fixture
def fake() -> Iterator[FakeComfy]:
    server = FakeComfy()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def photos(tmp_path) -> list[Path]:
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "astro.png").write_bytes((ASSETS / SOURCE).read_bytes())
    return [folder / "astro.png", write_png(folder / "small.png", (96, 64))]


def run_cli(fake: FakeComfy, *args: str) -> int:
    return cr.main(["--url", fake.url, *args])


def stored_name(path: Path) -> str:
    """The name an upload gets in ComfyUI's input folder: the content's hash, so it cannot replace another file."""
    return f"xmgie_{hashlib.sha256(path.read_bytes()).hexdigest()[:16]}{path.suffix.lower()}"


def test_two_images_run_as_a_queue(fake, photos, tmp_path, capsys):
    out = tmp_path / "out"
    rc = run_cli(fake, "--workflow", "xmgie_region_edit", "--image", str(photos[0].parent), "--out", str(out),
                 "--instruction", "make the helmet gold", "--seed", "3", "--steps", "2", "--checkpoint", "tiny.safetensors")
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert len(fake.prompts) == 2
    for prompt, photo in zip(fake.prompts, photos):
        assert prompt["1"]["inputs"]["image"] == stored_name(photo)
        assert fake.input[stored_name(photo)] == photo.read_bytes()
        assert prompt["2"]["inputs"]["ckpt_name"] == "tiny.safetensors"
        assert (prompt["3"]["inputs"]["instruction"], prompt["4"]["inputs"]["instruction"]) == ("make the helmet gold",) * 2
        assert (prompt["10"]["inputs"]["seed"], prompt["10"]["inputs"]["steps"]) == (3, 2)
    assert fake.upload_fields == [{"type": "input"}] * 2  # never overwrite=true
    written = sorted(p.name for p in out.iterdir())
    assert written == ["astro_ComfyUI_temp_abcde_00001_.png", "astro_xmgie_region_edit_00002_.png",
                       "small_ComfyUI_temp_abcde_00003_.png", "small_xmgie_region_edit_00004_.png"]
    for name in written:
        assert f"wrote {out / name}" in captured.out
        assert Image.open(out / name).size == Image.open(photos[0].parent / (name.split("_")[0] + ".png")).size
    assert "2 succeeded, 0 failed" in captured.out
    assert "astro.png: node 10 XMGIEPFBSampler" in captured.err  # the executing node, named


def test_the_mask_loader_is_left_alone_and_its_file_uploaded(fake, photos, tmp_path, capsys):
    rc = run_cli(fake, "--workflow", "xmgie_cam_edit", "--image", str(photos[1]), "--out", str(tmp_path / "o"))
    assert rc == 0, capsys.readouterr().err
    (prompt,) = fake.prompts
    assert prompt["1"]["inputs"]["image"] == stored_name(photos[1])
    assert prompt["2"]["inputs"]["image"] == stored_name(ASSETS / MASK)
    assert fake.input[stored_name(ASSETS / MASK)] == (ASSETS / MASK).read_bytes()
    out = capsys.readouterr().out
    assert "wrote" in out and "succeeded" not in out  # no summary line for a single image


def test_files_in_the_servers_input_folder_are_never_replaced(fake, photos, tmp_path, capsys):
    """Issue 18.2: `--image ~/other/photo.png` replaced the server's input/photo.png."""
    theirs = {"astro.png": b"someone's astro.png", MASK: b"someone's mask", stored_name(photos[1]): b"squatter"}
    fake.input.update(theirs)
    for _ in range(2):  # a second run finds its own uploads and stores nothing new
        rc = run_cli(fake, "--workflow", "xmgie_cam_edit", "--image", *map(str, photos), "--out", str(tmp_path / "o"))
        assert rc == 0, capsys.readouterr().err
    assert {name: fake.input[name] for name in theirs} == theirs
    squatted = stored_name(photos[1]).replace(".png", " (1).png")  # ComfyUI's rename: a different file had the name
    assert fake.input[squatted] == photos[1].read_bytes()
    assert [p["1"]["inputs"]["image"] for p in fake.prompts] == [stored_name(photos[0]), squatted] * 2
    assert len(fake.input) == len(theirs) + 3  # two photos and the mask, each stored once


def test_a_workflow_this_server_would_reject_uploads_nothing(fake, photos, tmp_path, capsys):
    """Issue 18.2: the prompt is checked against GET /object_info before any upload."""
    rc = run_cli(fake, "--workflow", "xmgie_region_edit", "--image", str(photos[0]), "--checkpoint", "bad.safetensors",
                 "--out", str(tmp_path / "o"))
    err = capsys.readouterr().err
    assert rc == 1
    assert "checked before uploading" in err and "node 2 (CheckpointLoaderSimple):" in err
    assert "Value not in list: ckpt_name: 'bad.safetensors' not in ['tiny.safetensors'" in err
    assert "--checkpoint" in err  # how to fix it
    assert not fake.uploaded and not fake.prompts and not list((tmp_path / "o").iterdir())


def test_a_node_type_the_server_lacks_is_named_before_uploading(fake, photos, tmp_path, capsys):
    del fake.object_info["XMGIERegionPredictor"]
    rc = run_cli(fake, "--workflow", "xmgie_region_edit", "--image", str(photos[0]), "--out", str(tmp_path / "o"))
    err = capsys.readouterr().err
    assert rc == 1
    assert "node 4 (XMGIERegionPredictor):" in err and "not installed" in err and "custom_nodes" in err
    assert not fake.uploaded and not fake.prompts


def test_missing_inputs_links_and_limits_are_found_before_uploading(fake, photos, tmp_path, capsys):
    prompt = bundled("xmgie_region_edit")
    del prompt["3"]["inputs"]["instruction"]
    prompt["5"]["inputs"]["images"] = ["99", 0]
    prompt["10"]["inputs"]["steps"] = 20000
    own = tmp_path / "own.json"
    own.write_text(json.dumps(prompt))
    rc = run_cli(fake, "--workflow", str(own), "--image", str(photos[0]), "--out", str(tmp_path / "o"))
    err = capsys.readouterr().err
    assert rc == 1
    assert "Required input is missing: instruction" in err
    assert "node 5 (PreviewImage):" in err and "images is linked to node 99, which is not in the workflow" in err
    assert "Value 20000 bigger than max of 10000: steps" in err
    assert not fake.uploaded and not fake.prompts


def test_without_object_info_the_server_checks_the_prompt(fake, photos, tmp_path, capsys):
    fake.object_info_status = 404
    fake.plan = fake.reject
    rc = run_cli(fake, "--workflow", "xmgie_region_edit", "--image", str(photos[0]), "--out", str(tmp_path / "o"))
    err = capsys.readouterr().err
    assert rc == 1
    assert "could not check the workflow before uploading" in err
    assert "ComfyUI rejected the prompt: Prompt outputs failed validation" in err
    assert "node 2 (CheckpointLoaderSimple):" in err
    assert "Value not in list: ckpt_name: 'bad.safetensors' not in ['tiny.safetensors']" in err
    assert fake.uploaded == [stored_name(photos[0])] and not list((tmp_path / "o").iterdir())


def test_an_earlier_result_in_out_is_kept(fake, photos, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    earlier = out / "small_xmgie_cam_edit_00001_.png"
    earlier.write_bytes(b"an earlier result")
    rc = run_cli(fake, "--workflow", "xmgie_cam_edit", "--image", str(photos[1]), "--out", str(out))
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert earlier.read_bytes() == b"an earlier result"
    (new,) = set(out.iterdir()) - {earlier}
    assert new.name == "small_xmgie_cam_edit_00001__2.png" and f"wrote {new}" in captured.out
    assert Image.open(new).size == (96, 64)


def test_an_execution_error_fails_that_image_and_the_queue_goes_on(fake, photos, tmp_path, capsys):
    plans = iter([fake.fail, fake.succeed])
    fake.plan = lambda prompt, pid: next(plans)(prompt, pid)
    rc = run_cli(fake, "--workflow", "xmgie_region_edit", "--image", *map(str, photos), "--out", str(tmp_path / "o"))
    captured = capsys.readouterr()
    assert rc == 1
    assert f"error: {photos[0]}: ComfyUI failed at node 10 (XMGIEPFBSampler): RuntimeError: mat1 and mat2" in captured.err
    assert "frame11.py" in captured.err
    assert "1 succeeded, 1 failed" in captured.out
    assert sorted(p.name.split("_")[0] for p in (tmp_path / "o").iterdir()) == ["small", "small"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_usage_errors_exit_2(photos, tmp_path, capsys):
    url = f"http://127.0.0.1:{free_port()}"
    assert cr.main(["--url", url, "--workflow", "xmgie_region_edit", "--image", str(photos[0])]) == 2
    err = capsys.readouterr().err
    assert f"no ComfyUI is answering at {url}" in err and "python main.py" in err and "--url" in err
    assert cr.main(["--url", url, "--workflow", "xmgie_region_edit", "--image", str(tmp_path / "nope.png")]) == 2
    assert "file not found" in capsys.readouterr().err
    assert cr.main(["--url", url, "--workflow", "xmgie_gb_composite", "--image", str(photos[0]), "--steps", "2"]) == 2
    assert "--steps: workflow xmgie_gb_composite has no literal input" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cr.main(["--workflow", "xmgie_region_edit"])  # argparse: --image is required
    assert e.value.code == 2


def test_an_output_folder_that_cannot_be_made_is_a_usage_error(fake, photos, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert run_cli(fake, "--workflow", "xmgie_region_edit", "--image", str(photos[0]), "--out",
                   str(tmp_path / "file" / "out")) == 2
    assert "cannot make the output folder" in capsys.readouterr().err and not fake.prompts


def test_websocket_url():
    assert cc.ComfyClient("http://127.0.0.1:8188/").websocket_url().startswith("ws://127.0.0.1:8188/ws?clientId=")
    assert cc.ComfyClient("https://127.0.0.1/comfy").websocket_url().startswith("wss://127.0.0.1/comfy/ws?clientId=")


def test_prompts_are_not_shared_between_images():
    prompt = bundled("xmgie_region_edit")
    before = copy.deepcopy(prompt)
    a, b = cw.set_source_image(prompt, "a.png", "w"), cw.set_source_image(prompt, "b.png", "w")
    assert prompt == before and a["1"]["inputs"]["image"] == "a.png" and b["1"]["inputs"]["image"] == "b.png"


# --------------------------------------------------------------------------------------------------
# Ctrl-C and timeouts: what we queued is cancelled on the server (issue 18.12)
# --------------------------------------------------------------------------------------------------

def test_ctrl_c_interrupts_our_running_prompt_and_exits_130(fake, photos, tmp_path, capsys):
    fake.plan = fake.hang
    timer = press_ctrl_c_after(0.5)
    rc = run_cli(fake, "--workflow", "xmgie_region_edit", "--image", *map(str, photos), "--out", str(tmp_path / "o"))
    timer.join()
    err = capsys.readouterr().err
    assert rc == 130, err
    (prompt_id,) = fake.prompt_ids  # the second image was never queued
    assert fake.interrupts == [prompt_id] and not fake.deleted and not fake.running
    (line,) = [line for line in err.splitlines() if "Ctrl-C" in line]
    assert f"prompt {prompt_id}" in line and "interrupted" in line and "0 of 2 images done" in line
    assert "Traceback" not in err


def test_ctrl_c_removes_our_waiting_prompt_and_leaves_the_running_one_alone(fake, photos, tmp_path, capsys):
    fake.plan = fake.wait_behind_another
    timer = press_ctrl_c_after(0.5)
    rc = run_cli(fake, "--workflow", "xmgie_region_edit", "--image", str(photos[0]), "--out", str(tmp_path / "o"))
    timer.join()
    err = capsys.readouterr().err
    assert rc == 130, err
    assert not fake.interrupts, "someone else's prompt was interrupted"
    assert len(fake.deleted) == 1 and not fake.pending
    assert f"prompt {fake.deleted[0]}" in err and "removed from ComfyUI's queue" in err


def test_ctrl_c_before_anything_is_queued(fake, photos, tmp_path, capsys):
    fake.on_upload = lambda: (press_ctrl_c_after(0.0), __import__("time").sleep(1.0))
    rc = run_cli(fake, "--workflow", "xmgie_region_edit", "--image", str(photos[0]), "--out", str(tmp_path / "o"))
    err = capsys.readouterr().err
    assert rc == 130, err
    assert "nothing was queued" in err and "Traceback" not in err
    assert not fake.prompts and "POST /interrupt" not in fake.routes


def test_a_timeout_cancels_the_prompt(fake, photos, tmp_path, capsys):
    fake.plan = fake.hang
    rc = run_cli(fake, "--workflow", "xmgie_region_edit", "--image", str(photos[0]), "--out", str(tmp_path / "o"),
                 "--timeout", "0.5")
    err = capsys.readouterr().err
    assert rc == 1
    assert fake.interrupts == fake.prompt_ids and "did not finish within --timeout 0.5 s" in err
    assert f"prompt {fake.interrupts[0]} was running on ComfyUI and was interrupted" in err


# --------------------------------------------------------------------------------------------------
# Numbers and the URL are checked by the argument parser (issue 18.12)
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flag, value, what", [
    ("--timeout", "nan", "a finite number of seconds above 0"),
    ("--timeout", "inf", "a finite number of seconds above 0"),
    ("--timeout", "-1", "a finite number of seconds above 0"),
    ("--timeout", "0", "a finite number of seconds above 0"),
    ("--timeout", "soon", "a finite number of seconds above 0"),
    ("--steps", "0", "an integer from 1 to 10000"),
    ("--steps", "-3", "an integer from 1 to 10000"),
    ("--steps", "10001", "an integer from 1 to 10000"),
    ("--steps", "2.5", "an integer from 1 to 10000"),
    ("--seed", "-1", "an integer from 0 to 18446744073709551615"),
    ("--seed", str(2 ** 64), "an integer from 0 to 18446744073709551615"),
])
def test_numbers_out_of_range_are_argument_errors(flag, value, what, photos, capsys):
    with pytest.raises(SystemExit) as e:
        cr.main(["--workflow", "xmgie_region_edit", "--image", str(photos[0]), f"{flag}={value}"])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert f"argument {flag}: must be {what}, got {value!r}" in err, err


def test_a_url_without_scheme_is_taken_as_http(fake, photos, tmp_path, capsys):
    host_port = fake.url.removeprefix("http://")
    rc = cr.main(["--url", host_port, "--workflow", "xmgie_cam_edit", "--image", str(photos[1]),
                  "--out", str(tmp_path / "o")])
    assert rc == 0, capsys.readouterr().err
    assert len(fake.prompts) == 1
    assert cr.comfy_url("localhost:8188/") == "http://localhost:8188"
    assert cr.comfy_url("https://comfy.example.org/sub/") == "https://comfy.example.org/sub"


@pytest.mark.parametrize("url, what", [
    ("ftp://127.0.0.1:8188", "scheme 'ftp' is not http or https"),
    ("ws://127.0.0.1:8188", "scheme 'ws' is not http or https"),
    ("http://", "no host"),
    ("127.0.0.1:99999", "port"),
    ("http://127.0.0.1:8188/?a=1", "query"),
])
def test_bad_urls_are_argument_errors(url, what, photos, capsys):
    with pytest.raises(SystemExit) as e:
        cr.main(["--url", url, "--workflow", "xmgie_region_edit", "--image", str(photos[0])])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert f"argument --url: {url!r}" in err and what in err and "http://127.0.0.1:8188" in err, err


def test_a_websocket_that_closes_mid_run_cancels_the_prompt(fake, photos, tmp_path, capsys):
    fake.plan = fake.drop_websocket
    rc = run_cli(fake, "--workflow", "xmgie_region_edit", "--image", str(photos[0]), "--out", str(tmp_path / "o"))
    err = capsys.readouterr().err
    assert rc == 1
    assert fake.interrupts == fake.prompt_ids and not fake.running
    assert "websocket closed before prompt" in err and "was running on ComfyUI and was interrupted" in err


def test_a_prompt_accepted_only_in_part_is_a_failure_and_taken_off_the_queue(fake, photos, tmp_path, capsys):
    """HTTP 200 with node_errors: ComfyUI would silently run only the outputs that validated."""
    fake.plan = fake.accept_part
    rc = run_cli(fake, "--workflow", "xmgie_region_edit", "--image", str(photos[0]), "--out", str(tmp_path / "o"))
    err = capsys.readouterr().err
    assert rc == 1 and "ComfyUI accepted only part of the workflow" in err
    assert "node 2 (CheckpointLoaderSimple):" in err and not fake.pending
