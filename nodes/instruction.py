"""XMGIE Instruction node: an edit instruction -> expressive instruction, source/target descriptions, edit and
background words, edit type (MGIE's expressive instruction; the learnable-regions paper's t_o and t_e)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..xmgie_core.errors import XMGIEInputError
from ..xmgie_core.instruction.local import GenerationSettings, local_plan
from ..xmgie_core.instruction.rules import rules_plan
from ..xmgie_core.validation import rgb_image
from .model_folders import find_model_folder
from .runtime import device_and_dtype, free_device_cache

BACKENDS = ("rules", "local model")
LLM_FOLDER = "LLM"


def llm_folder(name: str) -> Path:
    """A model folder: an absolute path, or a folder name under ComfyUI's models/LLM."""
    return find_model_folder(name, (LLM_FOLDER,), "The local model backend", "Qwen2.5-VL-3B-Instruct")


class XMGIEInstruction:
    """Rewrite an edit instruction into what the other xMGIE nodes need."""

    CATEGORY = "xMGIE/instruction"
    FUNCTION = "plan"
    RETURN_TYPES = ("STRING",) * 7
    RETURN_NAMES = ("expressive_instruction", "source_description", "target_description", "edit_words",
                    "background_words", "edit_type", "json")
    OUTPUT_TOOLTIPS = (
        "The instruction rewritten in detail (MGIE's expressive instruction).",
        "What the source image shows: the PFB source branch's prompt.",
        "What the edited image shows: the edit prompt (the Cross-Attention Mask node's prompt).",
        "Comma-separated phrases of the target description that change (the Cross-Attention Mask's edit_words).",
        "Comma-separated phrases of the target description that must stay (its background_words); may be empty.",
        "add, remove, replace, attribute or global.",
        "All of it as one JSON object (with the backend used and any note, e.g. a model answer that was not used).",
    )
    DESCRIPTION = ("Turns an edit instruction into an expressive instruction, source and target descriptions, the edit "
                   "words to localize and the background words to protect. 'rules' reads common English forms "
                   "without any model; 'local model' captions the image and writes the plan with a transformers "
                   "image-text-to-text model from models/LLM.")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "The source image (captioned by the local model; unused by rules)."}),
                "instruction": ("STRING", {"multiline": True, "default": "give the man a red scarf",
                                           "tooltip": "One edit, e.g. 'add a blue hat to the man', 'remove the fork', "
                                                      "'replace the cookies with candles', 'make it winter'."}),
                "backend": (list(BACKENDS), {"default": "rules", "tooltip": "rules: deterministic, no weights. local "
                            "model: a vision-language model folder from models/LLM (falls back to rules, with a "
                            "note, when its answer is malformed)."}),
                "model_folder": ("STRING", {"default": "", "tooltip": "local model: a folder under ComfyUI/models/LLM "
                                 "(e.g. Qwen2.5-VL-3B-Instruct) or an absolute path; safetensors only."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                                 "tooltip": "local model: seed of sampling (with temperature > 0)."}),
                "temperature": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 2.0, "step": 0.05,
                                          "tooltip": "local model: 0 = greedy (deterministic)."}),
                "max_new_tokens": ("INT", {"default": 256, "min": 16, "max": 2048,
                                           "tooltip": "local model: the longest answer, in tokens."}),
                "keep_loaded": ("BOOLEAN", {"default": False, "tooltip": "local model: keep it in memory for the "
                                "next run; off frees it after each run."}),
            },
        }

    def plan(self, image: torch.Tensor, instruction: str, backend: str, model_folder: str, seed: int,
             temperature: float, max_new_tokens: int, keep_loaded: bool) -> tuple:
        image = rgb_image(image, "image")
        if backend == "rules":
            plan = rules_plan(instruction)
        elif backend == "local model":
            device, dtype = device_and_dtype()
            plan = local_plan(image, instruction, llm_folder(model_folder),
                              GenerationSettings(seed, temperature, max_new_tokens), keep_loaded, device, dtype)
            if not keep_loaded:
                free_device_cache()
        else:
            raise XMGIEInputError(f"Unknown backend {backend!r}; use one of {', '.join(BACKENDS)}.")
        return (plan.expressive_instruction, plan.source_description, plan.target_description,
                ", ".join(plan.edit_words), ", ".join(plan.background_words), plan.edit_type, plan.to_json())
