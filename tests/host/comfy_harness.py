"""Real-ComfyUI test harness: import ComfyUI on CPU, load the pack through ComfyUI's own loader,
build a tiny random-weight SD1.5 checkpoint, and run API-format prompts serverless or over HTTP.

Nothing here imports ComfyUI at module import time, so CI can collect the host tier without it.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import types
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image
from scipy import ndimage

from fixtures.workflow_nodes import node_of  # noqa: F401  (the host tests use harness.node_of)
from xmgie_core.apps.comfy_client import ComfyClient as ApiClient
from xmgie_core.apps.comfy_client import StoppedWaiting, websocket_messages

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS_DIR = REPO_ROOT / "workflows"
ASSETS_DIR = WORKFLOWS_DIR / "assets"
PACK_FOLDER = "xmgie"
TINY_CHECKPOINT_NAME = "xmgie_tiny_sd15.safetensors"
SKIP_REASON = "COMFYUI_PATH is not set: the host tier needs a real ComfyUI checkout"


def comfyui_path() -> Path | None:
    """The ComfyUI checkout named by COMFYUI_PATH, or None when unset."""
    value = os.environ.get("COMFYUI_PATH", "").strip()
    return Path(value).resolve() if value else None


# --------------------------------------------------------------------------------------------------
# In-process ComfyUI
# --------------------------------------------------------------------------------------------------

def import_comfyui(comfy_root: Path) -> types.ModuleType:
    """Put `comfy_root` first on sys.path, switch ComfyUI to CPU mode, and return its `nodes` module."""
    root = str(comfy_root)
    if not (comfy_root / "nodes.py").is_file() or not (comfy_root / "comfy").is_dir():
        raise RuntimeError(f"COMFYUI_PATH={root} is not a ComfyUI checkout (no nodes.py / comfy/).")
    if root in sys.path:
        sys.path.remove(root)
    sys.path.insert(0, root)  # ComfyUI's top-level `nodes` must win over this repo's `nodes` package
    loaded = sys.modules.get("nodes")
    if loaded is not None and Path(getattr(loaded, "__file__", "")).resolve() != comfy_root / "nodes.py":
        raise RuntimeError(f"A different module named 'nodes' is already imported: {loaded!r}")
    from comfy.cli_args import args

    args.cpu = True  # must precede comfy.model_management (no CUDA here)
    import utils.extra_config  # noqa: F401  as main.py does: nodes.py later puts comfy/ (with utils.py) on sys.path
    import nodes

    return nodes


@contextmanager
def captured_logs() -> Iterator[list[str]]:
    """Collect root-logger records (ComfyUI reports import failures only as log warnings)."""
    records: list[str] = []

    class _Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(f"{record.levelname}: {record.getMessage()}")

    handler = _Handler(level=logging.DEBUG)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield records
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


def make_base_directory(base: Path, checkpoint: Path | None = None) -> Path:
    """Lay out a ComfyUI base directory: custom_nodes/xmgie -> this repo, models/checkpoints/<ckpt>."""
    for sub in ("custom_nodes", "models/checkpoints", "input", "output", "temp", "user"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / PACK_FOLDER
    if not link.exists():
        link.symlink_to(REPO_ROOT, target_is_directory=True)
    if checkpoint is not None:
        ckpt_link = base / "models" / "checkpoints" / checkpoint.name
        if not ckpt_link.exists():
            ckpt_link.symlink_to(checkpoint)
    return base


@dataclass
class ComfyHost:
    """ComfyUI imported in this process, with this pack loaded through its custom-node loader."""

    nodes: types.ModuleType
    base: Path
    loaded: bool
    load_log: list[str]
    registered: list[str]
    """Node ids the loader added to nodes.NODE_CLASS_MAPPINGS for this pack."""

    @property
    def pack_dir(self) -> Path:
        return self.base / "custom_nodes" / PACK_FOLDER

    @property
    def input_dir(self) -> Path:
        return self.base / "input"


def start_comfy_host(comfy_root: Path, base: Path) -> ComfyHost:
    """Import ComfyUI (CPU), point its folders at `base`, load core extras, then this pack via its loader."""
    nodes = import_comfyui(comfy_root)
    import folder_paths

    make_base_directory(base)
    folder_paths.set_input_directory(str(base / "input"))
    folder_paths.set_output_directory(str(base / "output"))
    folder_paths.set_temp_directory(str(base / "temp"))
    pack_path = str(base / "custom_nodes" / PACK_FOLDER)

    async def _load() -> tuple[bool, list[str]]:
        await nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False)
        before = set(nodes.NODE_CLASS_MAPPINGS)
        ok = await nodes.load_custom_node(pack_path)
        return ok, sorted(set(nodes.NODE_CLASS_MAPPINGS) - before)

    with captured_logs() as log:
        loaded, registered = asyncio.run(_load())
    return ComfyHost(nodes, base, loaded, log, registered)


# --------------------------------------------------------------------------------------------------
# Tiny SD1.5 checkpoint (docs/comfyui-internals.md §5.4)
# --------------------------------------------------------------------------------------------------

TINY_UNET_CONFIG: dict[str, Any] = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[1], channel_mult=[1],
    transformer_depth=[1], transformer_depth_output=[1, 1], transformer_depth_middle=1, context_dim=768,
    num_heads=8, num_head_channels=-1, use_spatial_transformer=True, use_linear_in_transformer=False,
    legacy=False,
)
"""Reduced UNet that model detection still classifies as SD15 (only 320/768/conv proj_in/no adm are checked)."""


def randomized(state_dict: dict, generator: Any, dtype: Any = None) -> dict:
    """Seeded random weights with sane scales: 1-D weights (norms) 1, biases 0, 0-d scalars kept,
    other tensors N(0, 1/fan_in), floats in `dtype` (float32 by default; each tensor is drawn in float32 first).
    Needed because ComfyUI's ops leave weights uninitialised."""
    import torch

    dtype = dtype or torch.float32
    out = {}
    for key, value in state_dict.items():
        if not value.is_floating_point() or value.ndim == 0:
            out[key] = value.clone()
        elif key.endswith("bias"):
            out[key] = torch.zeros(value.shape, dtype=dtype)
        elif value.ndim == 1:
            out[key] = torch.ones(value.shape, dtype=dtype)
        else:
            fan_in = int(np.prod(value.shape[1:]))
            out[key] = (torch.randn(value.shape, generator=generator) / fan_in ** 0.5).to(dtype)
    return out


def build_tiny_sd15_checkpoint(path: Path, seed: int = 0) -> Path:
    """Write a ~300 MB fp16 safetensors checkpoint ComfyUI detects as SD15: reduced UNet, full-size
    random CLIP-L, TAESD VAE. ComfyUI must already be imported (its classes name the keys)."""
    import torch
    from safetensors.torch import save_file

    import comfy.ops
    import comfy.sd1_clip
    import comfy.taesd.taesd
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    gen = torch.Generator().manual_seed(seed)
    parts = {
        "model.diffusion_model.": UNetModel(**TINY_UNET_CONFIG, operations=comfy.ops.disable_weight_init),
        "first_stage_model.": comfy.taesd.taesd.TAESD(),
    }
    sd: dict[str, torch.Tensor] = {}
    for prefix, module in parts.items():
        sd.update({prefix + k: v for k, v in randomized(module.state_dict(), gen).items()})
    clip = comfy.sd1_clip.SD1ClipModel(device="cpu", dtype=torch.float32).state_dict()
    clip_prefix = "clip_l.transformer.text_model."
    clip = randomized({k: v for k, v in clip.items() if k.startswith(clip_prefix)}, gen)
    sd.update({"cond_stage_model.transformer.text_model." + k[len(clip_prefix):]: v for k, v in clip.items()})
    sd = {k: (v.to(torch.float16) if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    return path


# --------------------------------------------------------------------------------------------------
# Tiny SDXL-family checkpoint
# --------------------------------------------------------------------------------------------------

TINY_SDXL_CHECKPOINT_NAME = "xmgie_tiny_sdxl.safetensors"

TINY_SDXL_UNET_CONFIG: dict[str, Any] = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2], channel_mult=[1, 1, 1],
    transformer_depth=[0, 0, 1, 1, 2, 2], transformer_depth_output=[0, 0, 0, 1, 1, 1, 1, 1, 1],
    transformer_depth_middle=1, context_dim=2048, num_heads=-1, num_head_channels=64, use_spatial_transformer=True,
    use_linear_in_transformer=True, legacy=False, num_classes="sequential", adm_in_channels=2816,
)
"""Segmind Vega's U-Net layout (supported_models.Segmind_Vega: 320 channels, linear proj_in, 2048-d context, adm 2816,
input transformer depths 0,0,1,1,2,2 — SDXL 1.0's block numbering with fewer transformer blocks) at the narrowest
width detection accepts (channel_mult 1,1,1; channel_mult, the output and middle depths are not checked). ComfyUI
loads it as model_base.SDXL."""


def build_tiny_sdxl_checkpoint(path: Path, seed: int = 0) -> Path:
    """Write a ~1.8 GB fp16 safetensors checkpoint ComfyUI detects as an SDXL (Segmind Vega's layout): the reduced
    U-Net above, full-size random CLIP-L and CLIP-G, TAESD VAE, with the keys of a real SDXL checkpoint (ComfyUI's own
    process_clip_state_dict_for_saving). CLIP-G cannot be smaller: SDXLClipG always builds comfy/clip_config_bigg.json
    (32 layers, width 1280) and CheckpointLoaderSimple passes no config override, so a smaller one would load with
    missing, uninitialised weights. ComfyUI must already be imported (its classes name the keys)."""
    import torch
    from safetensors.torch import save_file

    import comfy.ops
    import comfy.sdxl_clip
    import comfy.supported_models
    import comfy.taesd.taesd
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    gen = torch.Generator().manual_seed(seed)
    half = torch.float16
    unet = UNetModel(**TINY_SDXL_UNET_CONFIG, operations=comfy.ops.disable_weight_init).state_dict()
    sd = {"model.diffusion_model." + k: v for k, v in randomized(unet, gen, half).items()}
    sd.update({"first_stage_model." + k: v for k, v in randomized(comfy.taesd.taesd.TAESD().state_dict(), gen, half).items()})
    clip = comfy.sdxl_clip.SDXLClipModel(device="cpu", dtype=half).state_dict()  # uninitialised: only shapes are read
    clip = randomized({k: v for k, v in clip.items() if not k.endswith("logit_scale")}, gen, half)
    sd.update(comfy.supported_models.Segmind_Vega(TINY_SDXL_UNET_CONFIG).process_clip_state_dict_for_saving(clip))
    sd = {k: (v.to(half) if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    return path


# --------------------------------------------------------------------------------------------------
# Prompts and their results
# --------------------------------------------------------------------------------------------------

class PromptFailed(AssertionError):
    """A prompt failed validation or execution; the message carries ComfyUI's own error details."""


@dataclass
class PromptRun:
    """Outcome of one executed prompt: ui outputs per node id and the status messages."""

    prompt_id: str
    outputs: dict[str, dict]
    messages: list = field(default_factory=list)

    def images(self, node_id: str) -> list[dict]:
        """The {"filename","subfolder","type"} entries a Save/Preview node reported."""
        if node_id not in self.outputs or not self.outputs[node_id].get("images"):
            raise AssertionError(f"node {node_id} produced no images; outputs: {self.outputs}")
        return self.outputs[node_id]["images"]


def describe_failure(messages: list, node_errors: dict | None = None) -> str:
    """Human-readable summary of execution_error messages and validation node_errors."""
    parts = []
    for event, data in messages:
        if event in ("execution_error", "execution_interrupted"):
            tb = "".join(data.get("traceback") or [])[-2000:]
            parts.append(f"{event} in node {data.get('node_id')} ({data.get('node_type')}): "
                         f"{data.get('exception_type')}: {data.get('exception_message')}\n{tb}")
    if node_errors:
        parts.append("node_errors: " + json.dumps(node_errors, indent=1, default=str)[:4000])
    return "\n".join(parts) or f"no error message; messages: {messages}"


class _StubServer:
    """The attributes PromptExecutor touches on PromptServer (docs/comfyui-internals.md §7.3)."""

    def __init__(self) -> None:
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.sockets_metadata: dict = {}
        self.sent: list = []

    def send_sync(self, event: str, data: dict, sid: str | None = None) -> None:
        self.sent.append((event, data))

    def queue_updated(self) -> None:
        pass


class PromptRunner(Protocol):
    """What the workflow tests need from a transport: in-process ("serverless") or over HTTP ("http")."""

    name: str

    def provide_input(self, path: Path) -> str:
        """Make an image available to LoadImage; returns the name to put in the prompt."""

    def run(self, prompt: dict) -> PromptRun:
        """Execute an API-format prompt to completion or raise PromptFailed."""

    def read_image(self, image: dict) -> np.ndarray:
        """Pixels of one saved-image entry of PromptRun.outputs."""


class InProcessRunner:
    """Serverless execution: ComfyUI's validate_prompt + PromptExecutor in this process (docs/comfyui-internals.md §7.3)."""

    name = "serverless"

    def __init__(self, host: ComfyHost) -> None:
        self.host = host

    def provide_input(self, path: Path) -> str:
        shutil.copy(path, self.host.input_dir / path.name)
        return path.name

    def run(self, prompt: dict) -> PromptRun:
        """Validate and execute with a fresh executor (so nothing is cached between runs)."""
        import execution

        prompt_id = str(uuid.uuid4())

        async def _run():
            valid, error, outputs, node_errors = await execution.validate_prompt(prompt_id, prompt, None)
            if not valid or node_errors:
                raise PromptFailed(f"prompt failed validation: {error}\n{describe_failure([], node_errors)}")
            executor = execution.PromptExecutor(_StubServer(), cache_type=execution.CacheType.CLASSIC)
            await executor.execute_async(prompt, prompt_id, {}, outputs)
            return executor

        executor = asyncio.run(_run())
        if not executor.success or not any(e == "execution_success" for e, _ in executor.status_messages):
            raise PromptFailed("prompt failed: " + describe_failure(executor.status_messages))
        return PromptRun(prompt_id, executor.history_result["outputs"], executor.status_messages)

    def read_image(self, image: dict) -> np.ndarray:
        import folder_paths

        directory = Path(folder_paths.get_directory_by_type(image.get("type", "output")))
        return decode_png((directory / image.get("subfolder", "") / image["filename"]).read_bytes())


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes -> uint8 array [H,W,C] as stored (no conversion)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return np.array(img)


def load_workflow(name: str) -> dict:
    """A bundled workflow JSON from workflows/."""
    return json.loads((WORKFLOWS_DIR / name).read_text())


def plain_sd15_prompt(ckpt_name: str, seed: int, steps: int = 2, size: int = 64,
                      filename_prefix: str = "xmgie_plain") -> dict:
    """Checkpoint -> 2x CLIPTextEncode -> EmptyLatentImage -> KSampler -> VAEDecode -> SaveImage (API format)."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a man wearing a red scarf", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "seed": seed, "steps": steps, "cfg": 7.0, "sampler_name": "euler",
            "scheduler": "normal", "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": filename_prefix}},
    }


# --------------------------------------------------------------------------------------------------
# ComfyUI over HTTP
# --------------------------------------------------------------------------------------------------

def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """`main.py --cpu` as a subprocess on 127.0.0.1 with its own base directory; logs go to a file."""

    def __init__(self, comfy_root: Path, base: Path, python: str = sys.executable) -> None:
        self.comfy_root, self.base, self.python = comfy_root, base, python
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = base / "server.log"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 300.0) -> None:
        """Launch and block until GET /system_stats answers (or raise with the log tail)."""
        import requests

        cmd = [self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.base), "--disable-auto-launch", "--dont-print-server",
               "--disable-api-nodes", "--database-url", "sqlite:///:memory:"]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(cmd, cwd=self.comfy_root, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode}.\n{self.log_tail()}")
            try:
                if requests.get(self.url + "/system_stats", timeout=5).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer within {timeout:.0f}s.\n{self.log_tail()}")

    def log_tail(self, lines: int = 60) -> str:
        """The last lines of the server log, for assertion messages."""
        try:
            text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return "(no server log)"
        return "--- ComfyUI server log (tail) ---\n" + "\n".join(text)

    def stop(self) -> None:
        """Terminate the server process (kill if it does not exit)."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=20)


class ComfyClient(ApiClient):
    """The host tier's HTTP client: the runner's own (xmgie_core.apps.comfy_client) for transport, the websocket and
    the history, plus what tests need: name-keeping uploads, assertions carrying the server's log tail."""

    name = "http"

    def __init__(self, server: ComfyServer) -> None:
        super().__init__(server.url)
        self.server = server

    def get(self, path: str, **params: Any) -> Any:
        """GET `path` (a requests.Response), asserting status 200 (message carries the server log tail)."""
        r = self._request("GET", path, params=params or None)
        assert r.status_code == 200, f"GET {path} -> {r.status_code}: {r.text[:500]}\n{self.server.log_tail()}"
        return r

    def node_info(self, node_class: str | None = None) -> dict:
        """GET /object_info (all nodes) or /object_info/{class}."""
        return self.get("/object_info" + (f"/{node_class}" if node_class else "")).json()

    def upload_image(self, path: Path, name: str | None = None, overwrite: bool = True) -> dict:
        """POST /upload/image into the input folder under the file's own name; returns {"name","subfolder","type"}."""
        with open(path, "rb") as f:
            r = self._request("POST", "/upload/image", files={"image": (name or path.name, f, "image/png")},
                              data={"type": "input", "overwrite": "true" if overwrite else "false"})
        assert r.status_code == 200, f"upload of {path} -> {r.status_code}: {r.text[:500]}\n{self.server.log_tail()}"
        return r.json()

    def provide_input(self, path: Path) -> str:
        """Upload (the headless path); returns the stored name."""
        stored = self.upload_image(path)
        assert stored.get("subfolder", "") == "" and stored.get("type") == "input", f"unexpected upload: {stored}"
        return stored["name"]

    def queue_prompt(self, prompt: dict, extra_data: dict | None = None) -> str:
        """POST /prompt; returns the prompt id or raises PromptFailed with ComfyUI's node_errors."""
        body = {"prompt": prompt, "client_id": self.client_id, "extra_data": extra_data or {}}
        r = self._request("POST", "/prompt", json=body)
        if r.status_code != 200:
            raise PromptFailed(f"POST /prompt -> {r.status_code}: {r.text[:4000]}\n{self.server.log_tail()}")
        return r.json()["prompt_id"]

    def get_history(self, prompt_id: str) -> dict:
        return self.history(prompt_id)

    def get_image(self, image: dict) -> bytes:
        return self.download(image)

    def read_image(self, image: dict) -> np.ndarray:
        return decode_png(self.download(image))

    def wait(self, ws: Any, prompt_id: str, timeout: float) -> None:
        """Read websocket messages until this prompt is done (executing node=None); raise on error."""
        errors: list = []
        try:
            for msg in websocket_messages(ws, prompt_id, timeout):
                data = msg.get("data") or {}
                if data.get("prompt_id") != prompt_id:
                    continue
                if msg["type"] in ("execution_error", "execution_interrupted"):
                    errors.append((msg["type"], data))
                elif msg["type"] == "executing" and data.get("node") is None:
                    break
        except StoppedWaiting as e:
            raise PromptFailed(f"{e}\n{self.server.log_tail()}") from None
        if errors:
            raise PromptFailed("prompt failed: " + describe_failure(errors) + "\n" + self.server.log_tail())

    def run(self, prompt: dict, timeout: float = 1800.0, extra_data: dict | None = None) -> PromptRun:
        """Queue a prompt, wait for it over the websocket, and return its history outputs. `timeout` only stops
        waiting on a hung server: an SDXL workflow on a busy shared CPU takes many minutes."""
        import websocket

        ws = websocket.create_connection(self.websocket_url(), timeout=30)
        try:
            prompt_id = self.queue_prompt(prompt, extra_data)
            self.wait(ws, prompt_id, timeout)
        finally:
            ws.close()
        entry = self.get_history(prompt_id)
        status = entry.get("status", {})
        if not status.get("completed"):
            raise PromptFailed(f"history status {status}\n" + describe_failure(status.get("messages", []))
                               + "\n" + self.server.log_tail())
        return PromptRun(prompt_id, entry["outputs"], status.get("messages", []))


# --------------------------------------------------------------------------------------------------
# Bundled workflows: shared helpers for their host tests
# --------------------------------------------------------------------------------------------------

def provide_images_and_prefix(runner: "PromptRunner", prompt: dict, prefix: str) -> str:
    """Give the runner every LoadImage file from workflows/assets, set SaveImage's prefix; returns its id."""
    for node in prompt.values():
        if node["class_type"] == "LoadImage":
            name = node["inputs"]["image"]
            assert runner.provide_input(ASSETS_DIR / name) == name
    save_id, save = node_of(prompt, "SaveImage")
    save["inputs"]["filename_prefix"] = prefix
    return save_id


@dataclass(frozen=True)
class CompositeExpectation:
    """What the GB compositor of a bundled workflow must produce, from its inputs and the sample files."""

    source: np.ndarray
    """uint8 [H,W,3]: the image the compositor's `source` input loads."""
    mask_rgb: np.ndarray
    """uint8 [H,W,3]: RGB of the file whose alpha is the mask (the edit, in the GB workflow)."""
    region: np.ndarray
    """bool [H,W]: LoadImage's mask (1 - alpha) >= 0.5."""
    far_outside: np.ndarray
    """bool [H,W]: farther than edge_width + 1 px outside the region (must be the source exactly)."""
    deep_inside: np.ndarray
    """bool [H,W]: farther than edge_width + 1 px inside the region."""


def composite_expectation(prompt: dict) -> CompositeExpectation:
    _, gb = node_of(prompt, "XMGIEGBCompositor")
    assert gb["inputs"]["mode"] == "composite"
    mask_loader, mask_slot = gb["inputs"]["mask"]
    source_loader, source_slot = gb["inputs"]["source"]
    assert (mask_slot, source_slot) == (1, 0), "mask must be a LoadImage MASK, source its IMAGE"
    source = np.array(Image.open(ASSETS_DIR / prompt[source_loader]["inputs"]["image"]).convert("RGB"))
    rgba = np.array(Image.open(ASSETS_DIR / prompt[mask_loader]["inputs"]["image"]).convert("RGBA"))
    region = (1.0 - rgba[..., 3] / 255.0) >= 0.5
    margin = float(gb["inputs"]["edge_width"]) + 1.0
    far_outside = ndimage.distance_transform_edt(~region) > margin
    deep_inside = ndimage.distance_transform_edt(region) > margin
    assert far_outside.any() and deep_inside.any(), "sample mask is empty, full, or too thin"
    return CompositeExpectation(source, rgba[..., :3], region, far_outside, deep_inside)


def pixel_mismatch(actual: np.ndarray, want: np.ndarray, where: np.ndarray) -> str:
    """'' if actual == want at every `where` pixel, else a count and the first offending pixel."""
    bad = np.argwhere(where & (actual != want).any(axis=-1))
    if len(bad) == 0:
        return ""
    y, x = bad[0]
    return (f"{len(bad)} of {int(where.sum())} pixels differ, e.g. at (y={y}, x={x}): "
            f"got {actual[y, x].tolist()}, want {want[y, x].tolist()}")


def check_edit_inside_only(runner: "PromptRunner", prompt: dict, save_id: str) -> np.ndarray:
    """Run a bundled edit workflow; its saved image must be the source bit for bit far outside the mask and differ
    from it somewhere inside. Returns the image."""
    expected = composite_expectation(prompt)
    (image,) = runner.run(prompt).images(save_id)
    out = runner.read_image(image)
    assert out.shape == expected.source.shape
    problem = pixel_mismatch(out, expected.source, expected.far_outside)
    assert not problem, f"far outside the mask the result is not the source: {problem}"
    assert (expected.region & (out != expected.source).any(axis=-1)).any(), "the edit did not arrive"
    return out


def interrupt_on_call(n: int):
    """A U-Net function wrapper (ModelPatcher.set_model_unet_function_wrapper) that asks ComfyUI to interrupt on the
    n-th model call, as a user's POST /interrupt would; `.calls` counts the calls."""
    import comfy.model_management as mm

    def wrapper(apply_model, args):
        wrapper.calls.append(1)
        if len(wrapper.calls) == n:
            mm.interrupt_current_processing(True)
        return apply_model(args["input"], args["timestep"], **args["c"])

    wrapper.calls = []
    return wrapper


def bundled_edit_prompt(name: str, checkpoint: str, seed: int, image: str | None = None) -> dict:
    """A bundled workflow with a Region Predictor and a PFB Sampler (API format) on `checkpoint`: 2 sampling steps,
    2 noise draws, `seed` for both, optionally another input image."""
    prompt = load_workflow(name)
    node_of(prompt, "CheckpointLoaderSimple")[1]["inputs"]["ckpt_name"] = checkpoint
    node_of(prompt, "XMGIEPFBSampler")[1]["inputs"].update(steps=2, seed=seed)
    node_of(prompt, "XMGIERegionPredictor")[1]["inputs"].update(draws=2, seed=seed)
    if image:
        node_of(prompt, "LoadImage")[1]["inputs"]["image"] = image
    return prompt


def check_edit_inside_predicted_region(runner: "PromptRunner", prompt: dict, prefix: str,
                                       source: np.ndarray) -> tuple[PromptRun, np.ndarray]:
    """Run a bundled workflow with its Region Predictor's mask saved too: the region is neither empty nor full, every
    saved photo has the source's size and is the source bit for bit farther than the GB edge width + 1 px outside
    the region, and some photo differs from the source inside it. Returns the run and the first photo."""
    save_id, save = node_of(prompt, "SaveImage")
    save["inputs"]["filename_prefix"] = prefix
    region_id, _ = node_of(prompt, "XMGIERegionPredictor")
    margin = float(node_of(prompt, "XMGIEGBCompositor")[1]["inputs"]["edge_width"]) + 1.0
    prompt["90"] = {"class_type": "MaskToImage", "inputs": {"mask": [region_id, 0]}}
    prompt["91"] = {"class_type": "SaveImage", "inputs": {"images": ["90", 0], "filename_prefix": prefix + "_mask"}}
    run = runner.run(prompt)
    outs = [runner.read_image(image) for image in run.images(save_id)]
    region = runner.read_image(run.images("91")[0])[..., 0] >= 128
    assert region.any() and not region.all(), "the predicted region is empty or full"
    far = ndimage.distance_transform_edt(~region) > margin
    for out in outs:
        assert out.shape == source.shape
        problem = pixel_mismatch(out, source, far)
        assert not problem, f"far outside the predicted region the result is not the source: {problem}"
    assert any((region & (out != source).any(axis=-1)).any() for out in outs), "the edit did not arrive"
    return run, outs[0]
