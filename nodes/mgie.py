"""XMGIE MGIE Guidance node: MGIE ([xMGIE] and [MGIE], apple/ml-mgie) — LLaVA reads the image and the instruction, writes
the expressive instruction and 8 visual tokens [IMG0..7]; the edit head maps their hidden states to the 77 x 768
conditioning of an InstructPix2Pix U-Net."""

from __future__ import annotations

import torch

from ..xmgie_core.errors import XMGIEInputError
from ..xmgie_core.mgie.folder import cached_mgie, unload_mgie
from ..xmgie_core.validation import rgb_image
from .model_folders import find_model_folder
from .runtime import comfy_progress, device_and_dtype, free_device_cache


class XMGIEMGIEGuidance:
    """Image + instruction -> MGIE's positive and negative conditioning and its expressive instruction."""

    CATEGORY = "xMGIE/instruction"
    FUNCTION = "guide"
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING", "STRING")
    RETURN_NAMES = ("positive", "negative", "expressive_instruction")
    OUTPUT_TOOLTIPS = (
        "The edit head's conditioning from the [IMG] tokens' hidden states (1 x 77 x 768 per image): the positive of "
        "InstructPixToPixConditioning, with an InstructPix2Pix U-Net (e.g. the converted MGIE U-Net).",
        "The edit head applied to zeros (MGIE's null conditioning): the negative of InstructPixToPixConditioning and "
        "of the guider.",
        "The expressive instruction LLaVA wrote, cleaned as ml-mgie's demo does (one line per image).",
    )
    DESCRIPTION = (
        "MGIE: the multimodal LLM reads the image and the instruction, writes an expressive instruction and 8 visual "
        "tokens; the edit head turns their hidden states into InstructPix2Pix conditioning. Use it with "
        "InstructPixToPixConditioning and text + image guidance 7.5 / 1.5 (DualCFGGuider, or the XMGIE PFB Guider's "
        "image_cond to keep the source outside a mask). Needs a folder converted by `python -m xmgie_core.mgie "
        "convert` in models/LLM."
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "The photo to edit (resized and centre-cropped to 224 px for LLaVA's "
                                               "CLIP; the edit itself runs at the photo's size)."}),
                "instruction": ("STRING", {"multiline": True, "default": "give the man a red scarf",
                                           "tooltip": "The edit, in plain words."}),
                "model_folder": ("STRING", {"default": "mgie-7b", "tooltip": "The converted MGIE folder under "
                                 "ComfyUI/models/LLM (or an absolute path)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                                 "tooltip": "Seed of generation "
                                 "(ml-mgie decodes greedily, so it only matters for reproducibility of ties)."}),
                "max_new_tokens": ("INT", {"default": 96, "min": 9, "max": 512, "tooltip": "The longest answer "
                                   "(ml-mgie: 96); it must leave room for the 8 [IMG] tokens."}),
                "keep_loaded": ("BOOLEAN", {"default": False, "tooltip": "Keep the MLLM in memory for the next run; "
                                "off frees it after each run."}),
            },
        }

    def guide(self, image: torch.Tensor, instruction: str, model_folder: str, seed: int, max_new_tokens: int,
              keep_loaded: bool) -> tuple:
        image = rgb_image(image, "image")
        if not instruction.strip():
            raise XMGIEInputError("The instruction is empty: write the edit, e.g. 'give the man a red scarf'.")
        folder = find_model_folder(model_folder, ("LLM",), "The MGIE Guidance node", "mgie-7b")
        device, dtype = device_and_dtype(bf16=True)  # a 7B LLaMA in fp32 needs 28 GB
        progress = comfy_progress()
        try:
            mgie = cached_mgie(folder, device, dtype)
            results = []
            for i in range(image.shape[0]):
                results.append(mgie.generate(image[i:i + 1], instruction.strip(), max_new_tokens, seed))
                if progress is not None:
                    progress(i + 1, image.shape[0])
        finally:
            if not keep_loaded:
                unload_mgie(folder)
                free_device_cache()
        positive = torch.cat([r.positive for r in results]).float().cpu()
        negative = torch.cat([r.negative for r in results]).float().cpu()
        expressive = "\n".join(r.expressive_instruction for r in results)
        return [[positive, {}]], [[negative, {}]], expressive
