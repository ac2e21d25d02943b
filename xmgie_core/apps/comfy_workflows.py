"""API-format workflows for `python -m xmgie_core.apps.comfy_run`: the bundled ones, the overrides a run applies
(source image, instruction, seed, steps, checkpoint), and the local check against a server's node types
(GET /object_info) that lets a prompt ComfyUI would reject upload nothing."""

from __future__ import annotations

import copy
import glob
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .comfy_client import UsageError


REPO_ROOT = Path(__file__).resolve().parents[2]
API_DIR = REPO_ROOT / "workflows" / "api"
ASSETS_DIR = REPO_ROOT / "workflows" / "assets"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
INSTRUCTION_INPUTS = {"XMGIEInstruction": "instruction", "XMGIERegionPredictor": "instruction",
                      "XMGIEMGIEGuidance": "instruction"}
SEED_INPUTS = {"KSampler": "seed", "KSamplerAdvanced": "noise_seed", "XMGIEPFBSampler": "seed",
               "RandomNoise": "noise_seed"}
STEPS_INPUTS = {"KSampler": "steps", "KSamplerAdvanced": "steps", "XMGIEPFBSampler": "steps",
                "BasicScheduler": "steps"}
CHECKPOINT_INPUTS = {"CheckpointLoaderSimple": "ckpt_name"}

class OverrideError(UsageError):
    """An override (--image, --instruction, --seed, ...) found no node of the workflow to apply to."""



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


