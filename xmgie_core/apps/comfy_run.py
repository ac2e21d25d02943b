"""`python -m xmgie_core.apps.comfy_run`: run an API-format workflow on a running ComfyUI over HTTP.

The workflow is first checked against the server's node types (GET /object_info/{class}) so that a prompt
ComfyUI would reject uploads nothing. Each input image is then uploaded (POST /upload/image) under a name made
from its content's hash, so no file of the server's input folder is ever replaced, put into the workflow's
source LoadImage, queued (POST /prompt) and followed over the websocket (/ws?clientId=...) with a progress bar;
every image in the prompt's history outputs is then downloaded (/view) into the output folder, next to (never
over) earlier results. Ctrl-C or --timeout takes our prompt off the server: POST /queue {"delete": [id]} while
it waits, POST /interrupt {"prompt_id": id} only while it is the one running.

Exit codes: 0 all runs succeeded, 1 a run failed (ComfyUI rejected or failed it), 2 usage error (bad
arguments, missing files, no ComfyUI answering at --url), 130 stopped by Ctrl-C.
"""

from __future__ import annotations

import argparse
import copy
import glob
import hashlib
import json
import math
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import quote, urlsplit

REPO_ROOT = Path(__file__).resolve().parents[2]
API_DIR = REPO_ROOT / "workflows" / "api"
ASSETS_DIR = REPO_ROOT / "workflows" / "assets"
DEFAULT_URL = "http://127.0.0.1:8188"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
TRACEBACK_LINES = 8
SEED_MAX = 0xFFFFFFFFFFFFFFFF  # ComfyUI's seed / noise_seed widget limit
STEPS_MAX = 10000  # the steps widget limit of KSampler, XMGIE PFB Sampler and BasicScheduler
CANCEL_TIMEOUT = 10.0  # seconds per request while cancelling after Ctrl-C

INSTRUCTION_INPUTS = {"XMGIEInstruction": "instruction", "XMGIERegionPredictor": "instruction",
                      "XMGIEMGIEGuidance": "instruction"}
SEED_INPUTS = {"KSampler": "seed", "KSamplerAdvanced": "noise_seed", "XMGIEPFBSampler": "seed",
               "RandomNoise": "noise_seed"}
STEPS_INPUTS = {"KSampler": "steps", "KSamplerAdvanced": "steps", "XMGIEPFBSampler": "steps",
                "BasicScheduler": "steps"}
CHECKPOINT_INPUTS = {"CheckpointLoaderSimple": "ckpt_name"}


class UsageError(Exception):
    """Bad arguments or files, or no ComfyUI at the URL (exit code 2)."""


class OverrideError(UsageError):
    """An override (--image, --instruction, --seed, ...) found no node of the workflow to apply to."""


class RunFailed(Exception):
    """ComfyUI rejected or failed one image's prompt (exit code 1); the message says why."""


class StoppedWaiting(RunFailed):
    """We stopped following a prompt that may still be in ComfyUI's queue (--timeout, the websocket closed)."""


# --------------------------------------------------------------------------------------------------
# Workflows and overrides (pure functions on API-format prompts)
# --------------------------------------------------------------------------------------------------

def bundled_workflows() -> list[str]:
    """Names of the API workflows in workflows/api/."""
    return sorted(p.stem for p in API_DIR.glob("*.json"))


def resolve_workflow(spec: str) -> Path:
    """A path to an API-format JSON file, or a bundled name such as `xmgie_edit` (workflows/api/<name>.json)."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    bundled = API_DIR / (spec if spec.endswith(".json") else spec + ".json")
    if Path(spec).name == spec and bundled.is_file():
        return bundled
    raise UsageError(f"workflow {spec!r} is neither a file nor a bundled API workflow "
                     f"(bundled: {', '.join(bundled_workflows())}).")


def load_workflow(path: Path) -> dict[str, dict]:
    """Read an API-format prompt {node_id: {"class_type", "inputs"}}; UI-format files are refused."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"cannot read workflow {path}: {e}") from e
    if isinstance(data, dict) and "nodes" in data and "links" in data:
        raise UsageError(f"{path} is a UI-format workflow; this command needs the API format "
                         "(in ComfyUI: Workflow -> Export (API)), e.g. workflows/api/*.json.")
    if not isinstance(data, dict) or not data or not all(
            isinstance(n, dict) and isinstance(n.get("class_type"), str) and isinstance(n.get("inputs"), dict)
            for n in data.values()):
        raise UsageError(f"{path} is not an API-format workflow ({{node_id: {{'class_type', 'inputs'}}}}).")
    return data


def _title(node: Mapping[str, Any]) -> str:
    return str((node.get("_meta") or {}).get("title", ""))


def find_source_loader(prompt: Mapping[str, dict], workflow: str) -> str:
    """Id of the LoadImage node that loads the photo to edit.

    With one LoadImage it is that one; with several, the one whose title or file name says "source", or
    else the one whose IMAGE feeds an input named `source`. Other LoadImage nodes (masks) are left alone.
    """
    loaders = [nid for nid, n in prompt.items() if n["class_type"] == "LoadImage"]
    if len(loaders) == 1:
        return loaders[0]
    if not loaders:
        raise OverrideError(f"--image: workflow {workflow} has no LoadImage node to load the image into.")
    named = [nid for nid in loaders if "source" in _title(prompt[nid]).lower()
             or "source" in str(prompt[nid]["inputs"].get("image", "")).lower()]
    if len(named) == 1:
        return named[0]
    feeding = {value[0] for n in prompt.values() for key, value in n["inputs"].items()
               if key == "source" and isinstance(value, list) and value[0] in loaders and value[1] == 0}
    if len(feeding) == 1:
        return feeding.pop()
    raise OverrideError(f"--image: workflow {workflow} has {len(loaders)} LoadImage nodes ({', '.join(loaders)}) "
                        "and none is marked as the source (title or file name containing 'source', or the one "
                        "wired to a 'source' input).")


def other_loader_images(prompt: Mapping[str, dict], source_id: str) -> dict[str, str]:
    """{node_id: file name} of the literal images of the LoadImage nodes other than the source."""
    return {nid: n["inputs"]["image"] for nid, n in prompt.items()
            if n["class_type"] == "LoadImage" and nid != source_id and isinstance(n["inputs"].get("image"), str)}


def set_source_image(prompt: Mapping[str, dict], image_name: str, workflow: str) -> dict[str, dict]:
    """A copy of `prompt` whose source LoadImage loads `image_name` (a name in ComfyUI's input folder)."""
    out = copy.deepcopy(dict(prompt))
    out[find_source_loader(out, workflow)]["inputs"]["image"] = image_name
    return out


def set_literal(prompt: Mapping[str, dict], targets: Mapping[str, str], value: Any, flag: str,
                workflow: str) -> dict[str, dict]:
    """A copy of `prompt` with `value` in every literal (unlinked) input named targets[class_type].

    Raises OverrideError naming the workflow when no node has such an input.
    """
    out = copy.deepcopy(dict(prompt))
    hit = False
    for node in out.values():
        name = targets.get(node["class_type"])
        if name is not None and name in node["inputs"] and not isinstance(node["inputs"][name], list):
            node["inputs"][name] = value
            hit = True
    if not hit:
        wanted = ", ".join(f"{cls}.{name}" for cls, name in targets.items())
        raise OverrideError(f"{flag}: workflow {workflow} has no literal input to set (looked for {wanted}).")
    return out


def set_instruction(prompt: Mapping[str, dict], text: str, workflow: str) -> dict[str, dict]:
    """Every literal `instruction` of XMGIEInstruction, XMGIERegionPredictor and XMGIEMGIEGuidance."""
    return set_literal(prompt, INSTRUCTION_INPUTS, text, "--instruction", workflow)


def set_seed(prompt: Mapping[str, dict], seed: int, workflow: str) -> dict[str, dict]:
    """The literal `seed` / `noise_seed` of the samplers (KSampler, XMGIEPFBSampler, RandomNoise, ...)."""
    return set_literal(prompt, SEED_INPUTS, seed, "--seed", workflow)


def set_steps(prompt: Mapping[str, dict], steps: int, workflow: str) -> dict[str, dict]:
    """The literal `steps` of KSampler, XMGIEPFBSampler and BasicScheduler."""
    return set_literal(prompt, STEPS_INPUTS, steps, "--steps", workflow)


def set_checkpoint(prompt: Mapping[str, dict], ckpt_name: str, workflow: str) -> dict[str, dict]:
    """CheckpointLoaderSimple's `ckpt_name`."""
    return set_literal(prompt, CHECKPOINT_INPUTS, ckpt_name, "--checkpoint", workflow)


def apply_overrides(prompt: Mapping[str, dict], workflow: str, *, instruction: str | None = None,
                    seed: int | None = None, steps: int | None = None,
                    checkpoint: str | None = None) -> dict[str, dict]:
    """A copy of `prompt` with each given override applied (None = keep the workflow's value)."""
    out = copy.deepcopy(dict(prompt))
    if instruction is not None:
        out = set_instruction(out, instruction, workflow)
    if seed is not None:
        out = set_seed(out, seed, workflow)
    if steps is not None:
        out = set_steps(out, steps, workflow)
    if checkpoint is not None:
        out = set_checkpoint(out, checkpoint, workflow)
    return out


def expand_images(specs: Iterable[str]) -> list[Path]:
    """Files, folders (their images, sorted) and glob patterns -> image paths, in order, without repeats."""
    found: list[Path] = []
    for spec in specs:
        path = Path(spec).expanduser()
        if path.is_file():
            matches = [path]
        elif path.is_dir():
            matches = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not matches:
                raise UsageError(f"--image: folder {spec} holds no images ({' '.join(IMAGE_SUFFIXES)}).")
        elif any(c in spec for c in "*?["):
            matches = [Path(p) for p in sorted(glob.glob(str(path), recursive=True))
                       if Path(p).is_file() and Path(p).suffix.lower() in IMAGE_SUFFIXES]
            if not matches:
                raise UsageError(f"--image: no image file matches {spec!r}.")
        else:
            raise UsageError(f"--image: file not found: {spec}")
        found += [p for p in matches if p.resolve() not in {q.resolve() for q in found}]
    return found


# --------------------------------------------------------------------------------------------------
# A prompt checked against the server's node types before anything is uploaded
# --------------------------------------------------------------------------------------------------

def _error(message: str, details: str) -> dict:
    return {"message": message, "details": details}


def _input_errors(name: str, value: Any, spec: Any, class_type: str, prompt: Mapping[str, dict]) -> list[dict]:
    """ComfyUI 0.3.64's checks of one input (execution.validate_inputs): links, min/max, V1 combo lists.

    Inputs flagged `*_upload` (LoadImage's image) are files the node checks itself and are skipped.
    """
    if isinstance(value, list):
        if len(value) == 2 and str(value[0]) not in prompt:
            return [_error(f"{name} is linked to node {value[0]}, which is not in the workflow",
                           "export the API workflow from ComfyUI again")]
        return []
    kind = spec[0] if isinstance(spec, (list, tuple)) and spec else None
    extra = spec[1] if isinstance(spec, (list, tuple)) and len(spec) > 1 and isinstance(spec[1], dict) else {}
    if any(key.endswith("_upload") and flag for key, flag in extra.items()):
        return []
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "min" in extra and value < extra["min"]:
            return [_error(f"Value {value} smaller than min of {extra['min']}", name)]
        if "max" in extra and value > extra["max"]:
            return [_error(f"Value {value} bigger than max of {extra['max']}", name)]
    if isinstance(kind, list) and value not in kind:
        listed = str(kind) if len(kind) <= 20 else f"(list of length {len(kind)})"
        hint = ("; pass --checkpoint with one of them (the files in ComfyUI/models/checkpoints)"
                if CHECKPOINT_INPUTS.get(class_type) == name else "")
        return [_error("Value not in list", f"{name}: '{value}' not in {listed}{hint}")]
    return []


def check_prompt(prompt: Mapping[str, dict], object_info: Mapping[str, dict]) -> dict[str, dict]:
    """node_errors, in ComfyUI's format, for what the server's validation would reject.

    `object_info` maps class_type -> the GET /object_info entry ({"input": {"required", "optional"}}); a class
    missing from it is not installed on the server. Checked: node types, required inputs, links to nodes that
    exist, min/max and combo lists of literal values.
    """
    node_errors: dict[str, dict] = {}
    for node_id, node in prompt.items():
        info = object_info.get(node["class_type"])
        if info is None:
            errors = [_error(f"node type {node['class_type']} is not installed on this ComfyUI",
                             "install the node pack that provides it into ComfyUI/custom_nodes (xMGIE's nodes: "
                             "this repository) and restart ComfyUI")]
        else:
            declared = info.get("input") or {}
            required, optional = declared.get("required") or {}, declared.get("optional") or {}
            errors = [_error("Required input is missing",
                             f"{name} (set or connect it in ComfyUI and export the API workflow again)")
                      for name in required if name not in node["inputs"]]
            for name, value in node["inputs"].items():
                spec = required.get(name, optional.get(name))
                if spec is not None:
                    errors += _input_errors(name, value, spec, node["class_type"], prompt)
        if errors:
            node_errors[node_id] = {"class_type": node["class_type"], "errors": errors}
    return node_errors


# --------------------------------------------------------------------------------------------------
# ComfyUI's answers -> messages
# --------------------------------------------------------------------------------------------------

def format_rejection(body: Any, lead: str = "ComfyUI rejected the prompt") -> str:
    """The text for a 400 from POST /prompt: error.message (+ details) and each node_errors entry."""
    if not isinstance(body, dict):
        return f"{lead}: {body}"
    error = body.get("error")
    if isinstance(error, dict):
        message = error.get("message") or error.get("type") or "invalid prompt"
        message += f": {error['details']}" if error.get("details") else ""
    else:
        message = str(error or "invalid prompt")
    lines = [f"{lead}: {message}"]
    for node_id, entry in sorted((body.get("node_errors") or {}).items(), key=lambda kv: str(kv[0])):
        lines.append(f"  node {node_id} ({entry.get('class_type', '?')}):")
        for err in entry.get("errors") or []:
            details = f": {err['details']}" if err.get("details") else ""
            lines.append(f"    - {err.get('message', err.get('type', '?'))}{details}")
    return "\n".join(lines)


def format_execution_error(data: Mapping[str, Any], prompt: Mapping[str, dict] | None = None) -> str:
    """The text for an execution_error message: node id, type, exception and the traceback's last lines."""
    node_id = data.get("node_id")
    node_type = data.get("node_type") or (prompt or {}).get(str(node_id), {}).get("class_type", "?")
    exception = str(data.get("exception_type") or "Exception").rsplit(".", 1)[-1]  # ComfyUI sends module.path.Name
    message = str(data.get("exception_message", "")).strip()
    lines = [f"ComfyUI failed at node {node_id} ({node_type}): {exception}: {message}"]
    tb = [line for line in "".join(data.get("traceback") or []).rstrip().splitlines()
          if line.strip(" ^~")][-TRACEBACK_LINES:]  # without Python's caret lines
    if tb:
        lines.append(f"  traceback (last {len(tb)} lines):")
        lines += [f"    {line}" for line in tb]
    return "\n".join(lines)


def format_interrupted(data: Mapping[str, Any]) -> str:
    """The text for an execution_interrupted message."""
    return f"ComfyUI interrupted the run at node {data.get('node_id')} ({data.get('node_type', '?')})."


class ProgressView:
    """Shows the executing node and a step bar (tqdm on a terminal, one line per node otherwise)."""

    def __init__(self, label: str, prompt: Mapping[str, dict], stream: TextIO | None = None) -> None:
        self.label, self.prompt, self.stream = label, prompt, stream or sys.stderr
        self.bar = None
        if self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(desc=label, file=self.stream, unit="step", dynamic_ncols=True)

    def node(self, node_id: str) -> None:
        """A node started executing."""
        node = self.prompt.get(node_id, {})
        text = f"{self.label}: node {node_id} {node.get('class_type', '')}".rstrip()
        if self.bar is None:
            print(text, file=self.stream, flush=True)
        else:
            self.bar.set_description_str(text, refresh=False)
            self.bar.total = None  # a step count only once the node reports progress
            self.bar.reset()

    def step(self, value: int, maximum: int) -> None:
        """A `progress` message of the executing node."""
        if self.bar is None:
            return
        if self.bar.total != maximum:
            self.bar.reset(total=maximum)
        self.bar.n = value
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def follow(messages: Iterable[Mapping[str, Any]], prompt_id: str, view: ProgressView | None = None,
           prompt: Mapping[str, dict] | None = None) -> None:
    """Consume websocket messages until `prompt_id` is done (`executing` with node None).

    Messages of other prompts are skipped. Raises RunFailed on execution_error / execution_interrupted, or
    when the messages end before the prompt is done.
    """
    for msg in messages:
        data = msg.get("data") or {}
        if data.get("prompt_id") != prompt_id:
            continue
        kind = msg.get("type")
        if kind == "executing":
            if data.get("node") is None:
                return
            if view is not None:
                view.node(str(data.get("display_node") or data["node"]))
        elif kind == "progress" and view is not None:
            view.step(int(data.get("value", 0)), int(data.get("max", 0)))
        elif kind == "execution_error":
            raise RunFailed(format_execution_error(data, prompt))
        elif kind == "execution_interrupted":
            raise RunFailed(format_interrupted(data))
    raise StoppedWaiting(f"the websocket closed before prompt {prompt_id} finished (did ComfyUI stop?)")


def history_images(entry: Mapping[str, Any]) -> list[dict]:
    """The {"filename","subfolder","type"} entries of every output node of one /history entry."""
    return [image for _, ui in sorted((entry.get("outputs") or {}).items(), key=lambda kv: str(kv[0]))
            for image in (ui.get("images") or []) if isinstance(image, dict) and "filename" in image]


def output_name(stem: str, image: Mapping[str, Any]) -> str:
    """The local file name of a downloaded image: <input stem>_<ComfyUI's file name>."""
    return f"{stem}_{Path(image['filename']).name}"


# --------------------------------------------------------------------------------------------------
# HTTP and websocket client
# --------------------------------------------------------------------------------------------------

class ComfyClient:
    """The few routes of ComfyUI's server.py (0.3.64) this command uses."""

    def __init__(self, url: str, request_timeout: float = 60.0) -> None:
        import requests

        self.url = url.rstrip("/")
        self.client_id = uuid.uuid4().hex
        self.http = requests.Session()
        self.request_timeout = request_timeout
        self.queued_id: str | None = None  # our prompt while it may be in ComfyUI's queue

    def _request(self, method: str, route: str, timeout: float | None = None, **kwargs: Any) -> Any:
        """One HTTP request; a connection failure becomes RunFailed."""
        import requests

        try:
            return self.http.request(method, self.url + route, timeout=timeout or self.request_timeout, **kwargs)
        except requests.RequestException as e:
            raise RunFailed(f"lost the connection to ComfyUI at {self.url} ({method} {route}): "
                            f"{type(e).__name__}: {e}") from e

    def check(self) -> None:
        """Raise UsageError, saying how to start ComfyUI, when nothing answers GET /system_stats."""
        try:
            r = self._request("GET", "/system_stats")
        except RunFailed as e:
            raise UsageError(
                f"no ComfyUI is answering at {self.url}. Start it first, e.g. `python main.py --listen 127.0.0.1 "
                "--port 8188` in your ComfyUI folder (add --cpu without a GPU), or pass its address with --url.") from e
        if r.status_code != 200:
            raise UsageError(f"{self.url} answered GET /system_stats with HTTP {r.status_code}: is it ComfyUI?")

    def object_info(self, class_types: Iterable[str]) -> dict[str, dict] | None:
        """{class_type: GET /object_info/{class_type}} for the installed ones; None if the server does not say."""
        found = {}
        for class_type in sorted(set(class_types)):
            r = self._request("GET", f"/object_info/{quote(class_type, safe='')}")
            try:
                answer = r.json() if r.status_code == 200 else None
            except ValueError:
                answer = None
            if not isinstance(answer, dict):
                return None
            found.update({k: v for k, v in answer.items() if k == class_type and isinstance(v, dict)})
        return found

    def upload(self, path: Path) -> str:
        """POST /upload/image into the input folder as xmgie_<sha256[:16]>.<ext>; returns the name LoadImage takes.

        Without overwrite, ComfyUI keeps a file of that name unless it holds the same bytes (then it is reused),
        and stores ours as "<name> (1).<ext>": nothing of the server's is replaced.
        """
        try:
            data = path.read_bytes()
        except OSError as e:
            raise RunFailed(f"cannot read {path}: {e}") from e
        name = f"xmgie_{hashlib.sha256(data).hexdigest()[:16]}{path.suffix.lower()}"
        r = self._request("POST", "/upload/image", files={"image": (name, data)}, data={"type": "input"})
        if r.status_code != 200:
            raise RunFailed(f"uploading {path} failed: HTTP {r.status_code} {r.text[:300]}")
        stored = r.json()
        return f"{stored['subfolder']}/{stored['name']}" if stored.get("subfolder") else stored["name"]

    def queue(self, prompt: Mapping[str, dict]) -> str:
        """POST /prompt with an id of ours (kept in `queued_id` from before the request, for Ctrl-C); returns the
        prompt id, or raises RunFailed with ComfyUI's node_errors."""
        self.queued_id = str(uuid.uuid4())
        r = self._request("POST", "/prompt", json={"prompt": prompt, "client_id": self.client_id,
                                                   "prompt_id": self.queued_id})
        if r.status_code != 200:
            self.queued_id = None
        if r.status_code == 400:
            try:
                body = r.json()
            except ValueError:
                body = r.text[:1000]
            raise RunFailed(format_rejection(body))
        if r.status_code != 200:
            raise RunFailed(f"POST /prompt answered HTTP {r.status_code}: {r.text[:1000]}")
        body = r.json()
        self.queued_id = body["prompt_id"]  # a server older than 0.3.64 may choose its own
        if body.get("node_errors"):  # queued, but ComfyUI would run only the outputs that validated
            done = self.cancel(self.queued_id)
            self.queued_id = None
            raise RunFailed(format_rejection(body, "ComfyUI accepted only part of the workflow (the outputs below "
                                                   f"failed validation and would have been skipped; {done})"))
        return self.queued_id

    def queue_state(self, prompt_id: str) -> str | None:
        """"running", "pending" or None (not in ComfyUI's queue), from GET /queue."""
        body = self._request("GET", "/queue", timeout=CANCEL_TIMEOUT).json()
        for state, key in (("running", "queue_running"), ("pending", "queue_pending")):
            if any(isinstance(item, list) and len(item) > 1 and item[1] == prompt_id for item in body.get(key) or []):
                return state
        return None

    def cancel(self, prompt_id: str) -> str:
        """Take our prompt off ComfyUI and say what was done: POST /queue {"delete": [id]} while it waits,
        POST /interrupt {"prompt_id": id} only while it is the one running (another client's run is left alone)."""
        try:
            state = self.queue_state(prompt_id)
            if state == "pending":
                self._request("POST", "/queue", json={"delete": [prompt_id]}, timeout=CANCEL_TIMEOUT)
                state = self.queue_state(prompt_id)  # it may have started in between
                if state is None:
                    return f"prompt {prompt_id} was removed from ComfyUI's queue"
            if state == "running":
                self._request("POST", "/interrupt", json={"prompt_id": prompt_id}, timeout=CANCEL_TIMEOUT)
                return f"prompt {prompt_id} was running on ComfyUI and was interrupted"
            if state == "pending":
                return f"prompt {prompt_id} is still in ComfyUI's queue: delete it in ComfyUI's queue panel"
            return f"prompt {prompt_id} is no longer in ComfyUI's queue (it had finished or was never queued)"
        except (RunFailed, ValueError, AttributeError) as e:
            return (f"could not cancel prompt {prompt_id} ({e}); it may still run: cancel it in ComfyUI's "
                    "queue panel")

    def history(self, prompt_id: str, timeout: float = 30.0) -> dict:
        """GET /history/{id}, polled until the prompt's entry is there."""
        deadline = time.monotonic() + timeout
        while True:
            r = self._request("GET", f"/history/{prompt_id}")
            entry = r.json().get(prompt_id) if r.status_code == 200 else None
            if entry:
                return entry
            if time.monotonic() > deadline:
                raise RunFailed(f"prompt {prompt_id} finished but /history has no entry for it.")
            time.sleep(0.2)

    def download(self, image: Mapping[str, Any]) -> bytes:
        """GET /view for one history image entry."""
        params = {"filename": image["filename"], "subfolder": image.get("subfolder", ""),
                  "type": image.get("type", "output")}
        r = self._request("GET", "/view", params=params)
        if r.status_code != 200:
            raise RunFailed(f"downloading {image['filename']} failed: HTTP {r.status_code}")
        return r.content

    def websocket_url(self) -> str:
        """ws(s)://host[/path]/ws?clientId=<this client's id>."""
        parts = urlsplit(self.url)
        scheme = "wss" if parts.scheme == "https" else "ws"
        return f"{scheme}://{parts.netloc}{parts.path}/ws?clientId={self.client_id}"


def websocket_messages(ws: Any, prompt_id: str, timeout: float) -> Iterator[dict]:
    """JSON text frames from `ws` (binary preview frames skipped) until it closes or `timeout` runs out."""
    import websocket

    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise StoppedWaiting(f"prompt {prompt_id} did not finish within --timeout {timeout:g} s (give it "
                                 "longer with a larger --timeout)")
        ws.settimeout(min(left, 5.0))
        try:
            frame = ws.recv()
        except websocket.WebSocketTimeoutException:
            continue
        except (websocket.WebSocketConnectionClosedException, OSError):
            return
        if isinstance(frame, str) and frame:
            yield json.loads(frame)


def run_one(client: ComfyClient, prompt: Mapping[str, dict], workflow: str, image: Path, out_dir: Path,
            timeout: float) -> list[Path]:
    """Upload `image`, run `prompt` on it and download every output image; returns the paths written."""
    import websocket

    job = set_source_image(prompt, client.upload(image), workflow)
    try:
        ws = websocket.create_connection(client.websocket_url(), timeout=30)
    except (websocket.WebSocketException, OSError) as e:
        raise RunFailed(f"cannot open ComfyUI's websocket {client.websocket_url()}: {type(e).__name__}: {e}") from e
    view = None
    try:
        prompt_id = client.queue(job)
        view = ProgressView(image.name, job)
        follow(websocket_messages(ws, prompt_id, timeout), prompt_id, view, job)
        client.queued_id = None
    except RunFailed as e:
        if isinstance(e, StoppedWaiting):  # not left running unwatched
            e = RunFailed(f"{e}; {client.cancel(prompt_id)}.")
        client.queued_id = None
        raise e
    finally:
        if view is not None:
            view.close()
        ws.close()
    entry = client.history(prompt_id)
    for event, data in (entry.get("status") or {}).get("messages") or []:
        if event == "execution_error":
            raise RunFailed(format_execution_error(data, job))
    images = history_images(entry)
    if not images:
        raise RunFailed(f"prompt {prompt_id} finished but its outputs hold no images.")
    return [write_new(out_dir / output_name(image.stem, item), client.download(item)) for item in images]


def write_new(path: Path, data: bytes) -> Path:
    """Write `data` to `path`, or to <stem>_2<suffix>, _3, ... if it exists: an earlier result is never replaced.

    A partly written file (Ctrl-C, a full disk) is removed. Returns the path written.
    """
    candidate, n = path, 1
    while True:
        try:
            handle = candidate.open("xb")
            break
        except FileExistsError:
            n += 1
            candidate = path.with_name(f"{path.stem}_{n}{path.suffix}")
        except OSError as e:
            raise RunFailed(f"cannot write {candidate}: {e}") from e
    try:
        with handle:
            handle.write(data)
    except BaseException as e:
        candidate.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise RunFailed(f"cannot write {candidate}: {e}") from e
        raise
    return candidate


def companion_images(prompt: Mapping[str, dict], workflow: str, workflow_path: Path) -> dict[str, Path | None]:
    """{file name: local file or None} for the LoadImage nodes other than the source (masks, second images).

    Files are looked for in workflows/assets/ and next to the workflow file; None = not found here.
    """
    found: dict[str, Path | None] = {}
    for name in other_loader_images(prompt, find_source_loader(prompt, workflow)).values():
        candidates = [folder / name for folder in (ASSETS_DIR, workflow_path.parent) if (folder / name).is_file()]
        found[name] = candidates[0] if candidates else None
    return found


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------

def comfy_url(text: str) -> str:
    """--url: http(s)://host[:port][/path]; a bare host:port is taken as http://host:port."""
    url = text.strip()
    url = url if "://" in url else "http://" + url
    parts = urlsplit(url)
    example = f"give it as {DEFAULT_URL} or host:port"
    if parts.scheme not in ("http", "https"):
        raise argparse.ArgumentTypeError(f"{text!r}: scheme {parts.scheme!r} is not http or https (ComfyUI's "
                                         f"HTTP API); {example}")
    if not parts.hostname:
        raise argparse.ArgumentTypeError(f"{text!r} names no host; {example}")
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0 or (port is None and parts.netloc.endswith(":")):
        raise argparse.ArgumentTypeError(f"{text!r}: the port must be a number from 1 to 65535; {example}")
    if parts.query or parts.fragment:
        raise argparse.ArgumentTypeError(f"{text!r}: a ?query or #fragment is not part of ComfyUI's address; "
                                         f"{example} (a path prefix behind a proxy is fine)")
    return url.rstrip("/")


def int_from(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high] (the ComfyUI widget's limits)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be an integer from {low} to {high}, got {text!r}")
        return value
    return parse


def seconds(text: str) -> float:
    """An argparse type: a finite number of seconds above 0 (NaN, inf, 0 and negative numbers refused)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds above 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m xmgie_core.apps.comfy_run",
        description="Run an API-format workflow (a bundled one such as xmgie_edit, or a file) on a running "
                    "ComfyUI, once per input image, and download the output images.")
    p.add_argument("--url", type=comfy_url, default=DEFAULT_URL,
                   help=f"the running ComfyUI, http(s)://host:port or host:port (default {DEFAULT_URL})")
    p.add_argument("--workflow", required=True,
                   help=f"bundled API workflow name ({', '.join(bundled_workflows())}) or path to an API-format JSON")
    p.add_argument("--image", nargs="+", action="extend", required=True, metavar="IMAGE",
                   help="image files, folders or glob patterns; several images run one after another")
    p.add_argument("--instruction", help="sets every literal `instruction` input")
    p.add_argument("--seed", type=int_from(0, SEED_MAX), help=f"sets the samplers' seed / noise_seed (0..{SEED_MAX})")
    p.add_argument("--steps", type=int_from(1, STEPS_MAX), help=f"sets the samplers' / scheduler's steps (1..{STEPS_MAX})")
    p.add_argument("--checkpoint", help="CheckpointLoaderSimple's ckpt_name (a file in ComfyUI/models/checkpoints)")
    p.add_argument("--out", type=Path, default=Path("out"), help="output folder (default out/)")
    p.add_argument("--timeout", type=seconds, default=3600.0,
                   help="seconds to wait for each image's run, then cancel it (default 3600)")
    return p


def prepare(client: ComfyClient, prompt: dict[str, dict], workflow: str,
            companions: Mapping[str, Path | None]) -> dict[str, dict]:
    """Check `prompt` against the server's node types, then upload the companion images (masks) found here.

    Returns the prompt with the companions' stored names. Raises RunFailed (nothing uploaded) when ComfyUI
    would reject the workflow.
    """
    object_info = client.object_info(n["class_type"] for n in prompt.values())
    if object_info is None:
        print(f"note: could not check the workflow before uploading (GET /object_info gave no node list at "
              f"{client.url}); ComfyUI checks it when it is queued.", file=sys.stderr)
    elif node_errors := check_prompt(prompt, object_info):
        raise RunFailed(format_rejection(
            {"error": "nothing was uploaded or queued", "node_errors": node_errors},
            lead=f"ComfyUI at {client.url} would reject this workflow (checked before uploading anything)"))
    stored = {}
    for name, local in companions.items():
        if local is None:
            print(f"note: {workflow} also loads {name!r}, found neither in {ASSETS_DIR} nor next to the "
                  "workflow; it must already be in ComfyUI's input folder.", file=sys.stderr)
        else:
            stored[name] = client.upload(local)
    out = copy.deepcopy(prompt)
    for node in out.values():
        if node["class_type"] == "LoadImage" and node["inputs"].get("image") in stored:
            node["inputs"]["image"] = stored[node["inputs"]["image"]]
    return out


def interrupted(client: ComfyClient, done: int, total: int, out: Path) -> str:
    """The one line printed on Ctrl-C: what was cancelled on the server and how far the queue got."""
    try:
        what = client.cancel(client.queued_id) if client.queued_id else "nothing was queued on ComfyUI"
    except KeyboardInterrupt:
        what = f"cancelling prompt {client.queued_id} was itself interrupted: it may still run in ComfyUI"
    line = f"interrupted (Ctrl-C): {what}"
    if total:
        line += f"; {done} of {total} image{'s' if total != 1 else ''} done"
        line += f", results in {out}" if done else ""
    return line + "."


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit code (0 ok, 1 a run failed, 2 usage error, 130 Ctrl-C)."""
    args = build_parser().parse_args(argv)
    client = ComfyClient(args.url)
    images: list[Path] = []
    done = failed = 0
    try:
        try:
            path = resolve_workflow(args.workflow)
            workflow = path.stem if path.parent == API_DIR else str(path)
            prompt = apply_overrides(load_workflow(path), workflow, instruction=args.instruction, seed=args.seed,
                                     steps=args.steps, checkpoint=args.checkpoint)
            companions = companion_images(prompt, workflow, path)
            images = expand_images(args.image)
            client.check()
            try:
                args.out.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise UsageError(f"--out {args.out}: cannot make the output folder: {e}") from e
        except UsageError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        try:
            prompt = prepare(client, prompt, workflow, companions)
        except RunFailed as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        for image in images:
            try:
                for written in run_one(client, prompt, workflow, image, args.out, args.timeout):
                    print(f"wrote {written}", flush=True)
            except RunFailed as e:
                failed += 1
                print(f"error: {image}: {e}", file=sys.stderr, flush=True)
            done += 1
    except KeyboardInterrupt:
        print(interrupted(client, done, len(images), args.out), file=sys.stderr, flush=True)
        return 130
    if len(images) > 1:
        print(f"{len(images) - failed} succeeded, {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
