"""XMGIE Cross-Attention Mask node: restrict edit words to the mask region ([xMGIE] eqs 10-12), on SD U-Nets' cross
attention and on the joint attention of DiT editors (Flux / FLUX.1 Kontext, Qwen-Image(-Edit))."""

from __future__ import annotations

import logging

import torch

from ..xmgie_core import cam
from ..xmgie_core.masks import RegionPyramid, is_empty
from ..xmgie_core.errors import XMGIEInputError
from ..xmgie_core.hosts.comfy import cam_dit, dit
from ..xmgie_core.hosts.comfy.cam import CAMSpec, CrossAttentionMaskPatch, install
from ..xmgie_core.hosts.comfy.cam_prompt import PromptEncoding, running_workflows, workflow_texts
from ..xmgie_core.hosts.comfy.tokens import comfy_token_positions, dit_token_positions, length_mismatch
from ..xmgie_core.validation import check_percent_window, check_range

LOG = logging.getLogger("xmgie")


class XMGIECrossAttentionMask:
    """Patch a MODEL so chosen prompt words act only inside a mask (and background words only outside)."""

    CATEGORY = "xMGIE/attention"
    FUNCTION = "patch"
    RETURN_TYPES = ("MODEL", "CONDITIONING")
    RETURN_NAMES = ("model", "positive")
    OUTPUT_TOOLTIPS = (
        "A patched clone of the model; the input model is unchanged.",
        "The prompt encoded with the CLIP (or the 'positive' input, when given): connect it to the sampler's "
        "positive input. Only this conditioning is masked; a sampler that never receives it stops with an error.",
    )
    DESCRIPTION = (
        "Cross-attention masking (PFB-Diff CAM): the edit words' cross-attention is masked so they influence the "
        "image only inside the mask; optional background words are kept out of it. The node encodes the prompt "
        "itself: feed its 'positive' output to the sampler. Works on SD1.x/SD2/SDXL U-Nets and on the joint "
        "attention of Flux / FLUX.1 Kontext and Qwen-Image(-Edit) (image queries -> the words' text keys). For "
        "Qwen-Image-Edit with an input image, encode with TextEncodeQwenImageEdit(Plus) and connect it to the "
        "optional 'positive' input, with the same prompt text here."
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model to patch (it is cloned, never changed): an SD1.x/SD2/SDXL "
                          "U-Net, Flux / FLUX.1 Kontext or Qwen-Image(-Edit)."}),
                "clip": ("CLIP", {"tooltip": "The model's text encoder, whose tokenizer gives the words' positions "
                         "and which encodes the prompt: CLIP for SD, clip_l + t5xxl for Flux / Kontext, "
                         "Qwen2.5-VL for Qwen-Image(-Edit)."}),
                "prompt": ("STRING", {"multiline": True, "default": "", "tooltip": "The positive prompt. The node "
                                      "encodes it (the 'positive' output) and masks the edit words in it."}),
                "edit_words": ("STRING", {"default": "", "tooltip": "Words of the prompt that may act only inside "
                                          "the mask, e.g. 'red scarf'. Separate several phrases with commas."}),
                "mask": ("MASK", {"tooltip": "Edit region (1 = edit), any resolution with the image's aspect ratio; "
                                  "one mask, or one per latent in the batch."}),
                "mode": (list(cam.MODES), {"default": "renormalized", "tooltip": "renormalized: masked words get "
                         "-inf scores outside the region, rows still sum to 1. paper: A*M without renormalisation "
                         "(eqs 10-12 as written)."}),
                "threshold": ("FLOAT", {"default": 0.5, "min": 0.01, "max": 1.0, "step": 0.01, "tooltip":
                              "A cell of a coarse attention grid is inside the region when at least this fraction "
                              "of it is masked (a region never vanishes: its best-covered cell stays)."}),
                "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.05, "tooltip":
                             "1 = the words have no effect outside the region; 0 = no masking."}),
                "input_blocks": ("BOOLEAN", {"default": True, "tooltip": "Mask the U-Net's input (encoder) blocks; "
                                 "on a DiT, the first third of its transformer blocks (in depth order)."}),
                "middle_block": ("BOOLEAN", {"default": True, "tooltip": "Mask the U-Net's middle block; on a DiT, "
                                 "the middle third of its transformer blocks."}),
                "output_blocks": ("BOOLEAN", {"default": True, "tooltip": "Mask the U-Net's output (decoder) blocks; "
                                  "on a DiT, the last third of its transformer blocks (Flux: single-stream)."}),
                "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                            "tooltip": "Start masking at this fraction of the sampling schedule."}),
                "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                          "tooltip": "Stop masking after this fraction of the sampling schedule."}),
            },
            "optional": {
                "background_words": ("STRING", {"default": "", "tooltip": "Words of the prompt kept out of the "
                                                "region (act only outside it), e.g. 'snowy park'. May be empty."}),
                "positive": ("CONDITIONING", {"tooltip": "Optional: mask this conditioning instead of the node's "
                             "own encoding of the prompt, e.g. TextEncodeQwenImageEdit(Plus)'s (it encodes the input "
                             "image with the text). It must be encoded from the same prompt text, typed above, "
                             "which gives the words' positions; it is passed on as the 'positive' output."}),
            },
            "hidden": {"graph": "PROMPT"},
        }

    def patch(self, model, clip, prompt: str, edit_words: str, mask: torch.Tensor, mode: str, threshold: float,
              strength: float, input_blocks: bool, middle_block: bool, output_blocks: bool, start_percent: float,
              end_percent: float, background_words: str = "", positive: list | None = None,
              graph: dict | None = None) -> tuple:
        check_percent_window(start_percent, end_percent)
        check_range(strength, "strength", 0.0, 1.0)
        region = RegionPyramid(mask, threshold, allow_empty=True)
        if is_empty(region.mask):
            LOG.warning("xMGIE Cross-Attention Mask: the mask is empty, so the edit words act nowhere (with the PFB "
                        "sampler the image is left unchanged). Paint the region to edit, or check the node that "
                        "predicted it.")
        if not prompt.strip():
            raise XMGIEInputError("The prompt is empty: type the positive prompt that contains the edit words, "
                                  "e.g. 'a man wearing a red scarf'.")
        levels = frozenset(n for n, on in (("input", input_blocks), ("middle", middle_block),
                                           ("output", output_blocks)) if on)
        if not levels:
            raise XMGIEInputError("No U-Net level selected: enable input_blocks, middle_block or output_blocks "
                                  "(on a DiT they select thirds of its blocks).")
        diffusion_model = model.model.diffusion_model
        dit.check_supported(diffusion_model, "The Cross-Attention Mask node")
        editor = dit.find(diffusion_model)
        positive = positive if positive is not None else clip.encode_from_tokens_scheduled(clip.tokenize(prompt))
        tokens = _conditioning_tokens(positive)
        if editor is None:
            edit, length = comfy_token_positions(clip, prompt, edit_words, "edit words")
            background = comfy_token_positions(clip, prompt, background_words, "background words")[0] \
                if background_words.strip() else []
            if tokens != length:
                raise length_mismatch(prompt, tokens, f"{length} CLIP tokens")
        else:
            edit = dit_token_positions(clip, editor.family, prompt, edit_words, tokens, "edit words")
            background = dit_token_positions(clip, editor.family, prompt, background_words, tokens,
                                             "background words") if background_words.strip() else []
            length = tokens
        sampling = model.get_model_object("model_sampling")
        spec = CAMSpec(tuple(edit), tuple(background), length, region, mode, strength, levels,
                       float(sampling.percent_to_sigma(start_percent)), float(sampling.percent_to_sigma(end_percent)))
        encoding = PromptEncoding(prompt, tuple(c[0] for c in positive),
                                  lambda: workflow_texts(*running_workflows(), graph, exclude=prompt),
                                  lambda text: clip.encode_from_tokens_scheduled(clip.tokenize(text))[0][0])
        m = model.clone()
        previous = m.model_options.get("transformer_options", {}).get("optimized_attention_override")
        if editor is None:
            install(m.model_options, CrossAttentionMaskPatch(spec, encoding, m.model.diffusion_model, previous))
        else:
            m.model_options = cam_dit.install(m.model_options,
                                              cam_dit.JointCrossAttentionMask(spec, encoding, editor, previous))
        return m, positive


def _conditioning_tokens(positive: list) -> int:
    """The token count every entry of a CONDITIONING shares (the words' positions must hold in each)."""
    lengths = {int(c[0].shape[1]) for c in positive}
    if len(lengths) != 1:
        raise XMGIEInputError(f"The positive conditioning has entries of {sorted(lengths)} tokens; connect one "
                              "encoding of the prompt (not a combination of different prompts).")
    return lengths.pop()
