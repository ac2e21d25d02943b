"""A client of ComfyUI's HTTP + websocket API (server.py 0.3.64; docs/comfyui-internals.md §7.1, §7.2): upload
under a content-hash name, queue with our own prompt id, follow the websocket, cancel our prompt only, read the
history and download outputs; ComfyUI's answers turned into messages. Used by comfy_run and the host test tier."""

from __future__ import annotations

import hashlib
import json
import sys
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import quote, urlsplit



TRACEBACK_LINES = 8
CANCEL_TIMEOUT = 10.0  # seconds per request while cancelling after Ctrl-C

class UsageError(Exception):
    """Bad arguments or files, or no ComfyUI at the URL (exit code 2)."""


class RunFailed(Exception):
    """ComfyUI rejected or failed one image's prompt (exit code 1); the message says why."""


class StoppedWaiting(RunFailed):
    """We stopped following a prompt that may still be in ComfyUI's queue (--timeout, the websocket closed)."""



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


