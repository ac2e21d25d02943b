"""The converted MGIE model folder (what ComfyUI users keep as ComfyUI/models/LLM/<name>/).

    <name>/config.json, model*.safetensors, generation_config.json, tokenizer files
        a standard transformers LlamaForCausalLM folder; the vocabulary includes the 11 added tokens
        <im_patch> <im_start> <im_end> (32000-32002 on LLaMA's 32000) then [IMG0]..[IMG7] (32003-32010)
    <name>/vision/config.json, model.safetensors, preprocessor_config.json
        a transformers CLIPVisionModel (ViT-L/14, 224 px) and its CLIPImageProcessor
    <name>/mgie.safetensors
        mm_projector.weight / mm_projector.bias (LLaVA v1's single Linear 1024 -> 4096) and edit_head.* (EditMapper)
    <name>/mgie.json
        MGIEMeta as JSON

The folder is written by `python -m xmgie_core.mgie convert` from ml-mgie's checkpoints. Loading never downloads and
never runs code from the folder: local_files_only, trust_remote_code=False, safetensors only (no pickle).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import XMGIEInputError
from ..model_cache import MODELS
from ..paths import real_path
from ..weight_files import check_model_folder, loading, missing_safetensors, read_safetensors
from .edit_head import EditMapper
from .llava import MGIE, check_parts
from .meta import CONVERT_HINT, FORMAT, META_FILE, MGIEMeta, check_tokens

LOG = logging.getLogger("xmgie")

TENSORS_FILE = "mgie.safetensors"
VISION_DIR = "vision"


def check_mgie_folder(folder: Path) -> None:
    """Raise XMGIEInputError naming every missing piece of an MGIE folder and where it goes."""
    folder = Path(folder)
    where = f"ComfyUI/models/LLM/{folder.name}"
    if not folder.is_dir():
        raise XMGIEInputError(f"MGIE model folder not found: {folder}. Put the converted MGIE folder under "
                              f"ComfyUI/models/LLM/ and give its name; {CONVERT_HINT}.")
    names = {p.name for p in folder.iterdir()}
    if META_FILE not in names and TENSORS_FILE not in names:
        found = "mllm.pt (ml-mgie's original checkpoint, which is not loaded directly)" if "mllm.pt" in names else (
            "a transformers model folder" if "config.json" in names else "no model files")
        raise XMGIEInputError(f"{folder} is not an MGIE folder: it has no {META_FILE} and no {TENSORS_FILE} (found "
                              f"{found}). {CONVERT_HINT[0].upper() + CONVERT_HINT[1:]} and point to the result.")
    missing = []
    if META_FILE not in names:
        missing.append(f"{META_FILE} (the MGIE metadata) in {where}/")
    else:
        try:
            MGIEMeta.from_json((folder / META_FILE).read_text(encoding="utf-8"))
        except XMGIEInputError as e:
            missing.append(f"a valid {META_FILE} in {where}/ ({e})")
        except (OSError, UnicodeDecodeError) as e:
            missing.append(f"a readable {META_FILE} in {where}/ ({e})")
    if TENSORS_FILE not in names:
        missing.append(f"{TENSORS_FILE} (mm_projector + edit_head tensors) in {where}/")
    if "config.json" not in names:
        missing.append(f"config.json (the LLaMA config) in {where}/")
    problem = missing_safetensors(folder, names)
    if problem:
        missing.append(f"the LLaMA weights in {where}/: {problem}")
    if not names & {"tokenizer.json", "tokenizer.model"}:
        missing.append(f"the tokenizer (tokenizer.json or tokenizer.model, with tokenizer_config.json) in {where}/")
    vision = folder / VISION_DIR
    if not vision.is_dir():
        missing.append(f"the CLIP vision tower folder {where}/{VISION_DIR}/ (config.json, model.safetensors, "
                       "preprocessor_config.json)")
    else:
        vnames = {p.name for p in vision.iterdir()}
        if "config.json" not in vnames:
            missing.append(f"config.json (the CLIP vision config) in {where}/{VISION_DIR}/")
        problem = missing_safetensors(vision, vnames)
        if problem:
            missing.append(f"the CLIP vision weights in {where}/{VISION_DIR}/: {problem}")
        if "preprocessor_config.json" not in vnames:
            missing.append(f"preprocessor_config.json (the CLIP image processor) in {where}/{VISION_DIR}/")
    if missing:
        raise XMGIEInputError(f"The MGIE folder {folder} is incomplete: missing {'; '.join(missing)}. "
                              f"{CONVERT_HINT[0].upper() + CONVERT_HINT[1:]} (it writes all of these).")


def mgie_tensors(projector: nn.Linear, edit_head: EditMapper) -> dict[str, torch.Tensor]:
    """The contents of mgie.safetensors: mm_projector.weight/bias + edit_head.* (ml-mgie's key names)."""
    out = {f"mm_projector.{k}": v for k, v in projector.state_dict().items()}
    out.update({f"edit_head.{k}": v for k, v in edit_head.state_dict().items()})
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


def save_mgie_folder(folder: Path, llm: Any, tokenizer: Any, vision: Any, image_processor: Any,
                     projector: nn.Linear, edit_head: EditMapper, meta: MGIEMeta) -> Path:
    """Write an MGIE folder (layout in the module docstring); checks the pieces fit together first."""
    from safetensors.torch import save_file

    check_parts(llm, tokenizer, vision, projector, edit_head, meta)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    llm.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    vision.save_pretrained(folder / VISION_DIR, safe_serialization=True)
    image_processor.save_pretrained(folder / VISION_DIR)
    save_file(mgie_tensors(projector, edit_head), str(folder / TENSORS_FILE), metadata={"format": FORMAT})
    (folder / META_FILE).write_text(meta.to_json(), encoding="utf-8")
    return folder


def _from_pretrained(cls: Any, directory: Path, dtype: torch.dtype, what: str) -> Any:
    with loading(directory, f"the MGIE folder's {what} model"):
        model, info = cls.from_pretrained(directory, local_files_only=True, trust_remote_code=False,
                                          use_safetensors=True, dtype=dtype, output_loading_info=True)
    bad = {k: list(v) for k, v in info.items() if k in ("missing_keys", "mismatched_keys") and v}
    if bad:
        raise XMGIEInputError(f"The {what} weights in {directory} do not fit its config.json ({bad}); the folder is "
                              f"damaged or mixed from different models. Re-create it: {CONVERT_HINT}.")
    if info.get("unexpected_keys"):
        LOG.warning("xMGIE: unused tensors in %s: %s", directory, sorted(info["unexpected_keys"])[:10])
    return model


def load_mgie_folder(folder: Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> MGIE:
    """Load an MGIE folder offline (local_files_only, safetensors only, no remote code) onto `device` in `dtype`.

    Every tensor of mgie.safetensors must be used and none may be missing.
    """
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPVisionModel, LlamaForCausalLM

    folder = Path(folder)
    check_mgie_folder(folder)
    check_model_folder(folder, "a file of the MGIE folder")
    meta = MGIEMeta.from_json((folder / META_FILE).read_text(encoding="utf-8"))
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if config.get("model_type") != "llama":
        raise XMGIEInputError(f"{folder / 'config.json'} is a {config.get('model_type')!r} model; MGIE's language "
                              f"model is LLaMA (model_type 'llama'). Re-create the folder: {CONVERT_HINT}.")
    options = dict(local_files_only=True, trust_remote_code=False)
    with loading(folder, "the MGIE folder's tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(folder, **options)
    check_tokens(tokenizer, meta)
    tensors = read_safetensors(folder / TENSORS_FILE, "the MGIE projector and edit head")
    for name in ("mm_projector.weight", "mm_projector.bias"):
        if name not in tensors:
            raise XMGIEInputError(f"{folder / TENSORS_FILE} lacks {name}. Re-create the folder: {CONVERT_HINT}.")
    weight = tensors["mm_projector.weight"]
    if weight.ndim != 2:
        raise XMGIEInputError(f"mm_projector.weight in {folder / TENSORS_FILE} must be a matrix, got shape "
                              f"{tuple(weight.shape)}. Re-create the folder: {CONVERT_HINT}.")
    projector = nn.Linear(weight.shape[1], weight.shape[0])
    edit_head = EditMapper(**meta.edit_head_args())
    expected = set(mgie_tensors(projector, edit_head))
    missing, unused = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unused:
        raise XMGIEInputError(
            f"{folder / TENSORS_FILE} does not match the edit head described in {META_FILE}: "
            + "; ".join(([f"missing {missing}"] if missing else []) + ([f"unused {unused}"] if unused else []))
            + f". Re-create the folder: {CONVERT_HINT}.")
    shapes = {k: v.shape for k, v in mgie_tensors(projector, edit_head).items()}
    wrong = {k: (tuple(tensors[k].shape), tuple(s)) for k, s in shapes.items() if tensors[k].shape != s}
    if wrong:
        raise XMGIEInputError(f"{folder / TENSORS_FILE} has tensors of the wrong shape (found, expected): {wrong}. "
                              f"Re-create the folder: {CONVERT_HINT}.")
    projector.load_state_dict({k.removeprefix("mm_projector."): v for k, v in tensors.items()
                               if k.startswith("mm_projector.")})
    edit_head.load_state_dict({k.removeprefix("edit_head."): v for k, v in tensors.items()
                               if k.startswith("edit_head.")})
    llm = _from_pretrained(LlamaForCausalLM, folder, dtype, "LLaMA")
    vision = _from_pretrained(CLIPVisionModel, folder / VISION_DIR, dtype, "CLIP vision")
    with loading(folder / VISION_DIR, "the MGIE folder's CLIP image processor"):
        image_processor = CLIPImageProcessor.from_pretrained(folder / VISION_DIR, **options)
    parts = [m.to(device=device, dtype=dtype).eval() for m in (llm, vision, projector, edit_head)]
    return MGIE(parts[0], tokenizer, parts[1], image_processor, parts[2], parts[3], meta)


def cached_mgie(folder: Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> MGIE:
    """load_mgie_folder, kept for the next call with the same (folder, device, dtype) until `unload_mgie`."""
    key = ("mgie", real_path(folder, "The MGIE model folder"), str(device), dtype)
    return MODELS.get(key, lambda: load_mgie_folder(folder, device, dtype))


def unload_mgie(folder: Path | None = None) -> None:
    """Forget one cached MGIE folder (every device/dtype), or all of them, and free their memory."""
    target = real_path(folder, "The MGIE model folder") if folder is not None else None
    MODELS.unload(lambda key: key[0] == "mgie" and target in (None, key[1]))
