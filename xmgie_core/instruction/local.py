"""The local model backend: a transformers image-text-to-text model (Qwen2.5-VL, LLaVA-family, ...) from a local
folder captions the source image (t_o, [Regions]) and then, from (t_o, instruction), writes the plan as strict
JSON. Malformed answers, and plans that fail the plan check (check.py), fall back to the rules backend with a
visible warning.

Loading never downloads and never runs code from the folder: local_files_only, trust_remote_code=False,
safetensors only.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .. import weight_files
from ..errors import XMGIEInputError
from ..image_io import to_rgb8
from ..model_cache import MODELS
from ..paths import real_path
from .check import check_plan
from .plan import EditPlan, clean_instruction
from .rules import rules_plan

LOG = logging.getLogger("xmgie")
CAPTION_PROMPT = "Describe this image in one sentence: the main subjects, their appearance and the setting."
PLAN_PROMPT = """You turn an image edit instruction into a plan for an image editor.
Image description: {caption}
Instruction: {instruction}
Answer with only a JSON object with exactly these keys:
"expressive_instruction": the instruction rewritten in detail (what to change, where, how it should look),
"source_description": a short description of the image before the edit,
"target_description": a short description of the image after the edit,
"edit_words": phrases copied from target_description that name what changes,
"background_words": phrases copied from target_description that name what must stay as it is,
"edit_type": one of "add", "remove", "replace", "attribute", "global"."""


@dataclass(frozen=True)
class GenerationSettings:
    seed: int = 0
    temperature: float = 0.0
    """0: greedy decoding."""
    max_new_tokens: int = 256


def check_model_folder(folder: Path) -> None:
    """The folder must hold a config, safetensors weights and a processor/tokenizer; say what is missing."""
    if not folder.is_dir():
        raise XMGIEInputError(f"Model folder not found: {folder}. Put a transformers image-text-to-text model "
                              "(e.g. Qwen2.5-VL) as a folder under ComfyUI/models/LLM/ and give its name.")
    files = {p.name for p in folder.iterdir()}
    missing = []
    if "config.json" not in files:
        missing.append("config.json")
    weights = weight_files.missing_safetensors(folder, files)
    if weights:
        missing.append(weights)
    if not files & {"tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json"}:
        missing.append("a tokenizer (tokenizer.json / tokenizer_config.json)")
    if not files & {"preprocessor_config.json", "processor_config.json"}:
        missing.append("an image processor (preprocessor_config.json)")
    if missing:
        raise XMGIEInputError(f"The model folder {folder} is incomplete: missing {'; '.join(missing)}. Download the "
                              "whole model folder (all of its files) into ComfyUI/models/LLM/.")


class LocalVLM:
    """A loaded processor + image-text-to-text model."""

    def __init__(self, folder: Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        check_model_folder(folder)
        weight_files.check_model_folder(folder, "a file of the local model folder")
        self.folder, self.device = folder, device
        options = dict(local_files_only=True, trust_remote_code=False)
        with weight_files.loading(folder, "the local model folder"):
            self.processor = AutoProcessor.from_pretrained(folder, **options)
            self.model = AutoModelForImageTextToText.from_pretrained(folder, use_safetensors=True, dtype=dtype,
                                                                     **options).to(device).eval()

    def generate(self, prompt: str, image: Any | None, settings: GenerationSettings) -> str:
        """One chat turn (the image first when given); the decoded new text."""
        content = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": prompt}]
        text = self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        inputs = self.processor(images=[image] if image is not None else None, text=text, return_tensors="pt")
        inputs = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        sample = settings.temperature > 0
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(settings.seed)
            out = self.model.generate(**inputs, max_new_tokens=settings.max_new_tokens, do_sample=sample,
                                      **({"temperature": settings.temperature} if sample else {}))
        return self.processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


_RESULTS: OrderedDict[str, EditPlan] = OrderedDict()
MAX_RESULTS = 64


def image_digest(image: torch.Tensor) -> str:
    return hashlib.sha1(image.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def to_pil(image: torch.Tensor):
    """The first item of an IMAGE [B,H,W,C] in 0..1 as an RGB PIL image."""
    from PIL import Image

    return Image.fromarray(to_rgb8(image[:1])[0])


def local_plan(image: torch.Tensor, instruction: str, folder: Path, settings: GenerationSettings,
               keep_loaded: bool = False, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32) -> EditPlan:
    """Caption the image, ask for the plan, parse it strictly; on a malformed answer use the rules backend and say
    so in the plan's `note` (and the log). Results are cached by (image, instruction, folder, settings)."""
    text = clean_instruction(instruction)
    key = "|".join([image_digest(image), text, str(real_path(folder, "The local model folder")), repr(settings)])
    if key in _RESULTS:
        _RESULTS.move_to_end(key)
        return _RESULTS[key]
    vlm = MODELS.get(("local-vlm", folder), lambda: LocalVLM(folder, device, dtype))
    try:
        caption = vlm.generate(CAPTION_PROMPT, to_pil(image), settings)
        answer = vlm.generate(PLAN_PROMPT.format(caption=caption, instruction=text), None, settings)
    finally:
        if not keep_loaded:
            unload(folder)
    backend = f"local:{folder.name}"
    try:
        plan = EditPlan.from_model_output(answer, text, backend)
        check_plan(plan, rules=False)
    except ValueError as e:
        note = (f"The model's answer could not be used ({e}); the rules backend's plan is given instead. "
                f"Answer: {answer[:200]!r}")
        LOG.warning("xMGIE Instruction: %s", note)
        try:
            fallback = rules_plan(text)
        except XMGIEInputError as rules_error:
            raise XMGIEInputError(f"The local model's answer could not be used ({e}), and the rules backend could "
                                  f"not read the instruction either: {rules_error}") from None
        plan = replace(fallback, backend=f"rules (fallback from {backend})", note=note)
    _RESULTS[key] = plan
    while len(_RESULTS) > MAX_RESULTS:
        _RESULTS.popitem(last=False)
    return plan


def unload(folder: Path | None = None) -> None:
    """Free one loaded model (or all): the node does this after each run unless 'keep loaded' is on."""
    MODELS.unload(lambda key: key[0] == "local-vlm" and folder in (None, key[1]))


def loaded_folders() -> list[Path]:
    return [key[1] for key in MODELS.keys("local-vlm")]

