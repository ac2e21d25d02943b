"""The ComfyUI runtime the nodes use: where the pack's own models (local VLM, MGIE, region predictor, CLIPSeg) run,
handing memory back after them, and a progress bar with interrupt checks for xmgie_core's long loops."""

from __future__ import annotations

from typing import Callable

import torch


def device_and_dtype(bf16: bool = False) -> tuple[torch.device, torch.dtype]:
    """ComfyUI's text-encoder device and a half dtype where it supports one (bf16 first with `bf16`, e.g. for a 7B
    LLM that fp32 would not fit); CPU float32 outside ComfyUI."""
    try:
        import comfy.model_management as mm
    except ImportError:
        return torch.device("cpu"), torch.float32
    device = mm.text_encoder_device()
    if bf16 and mm.should_use_bf16(device):
        return device, torch.bfloat16
    return device, (torch.float16 if mm.should_use_fp16(device) else torch.float32)


def free_device_cache() -> None:
    """Hand the freed model's memory back to the device (ComfyUI's soft_empty_cache) when inside ComfyUI."""
    try:
        import comfy.model_management as mm
    except ImportError:
        return
    mm.soft_empty_cache()


def comfy_progress() -> Callable[[int, int], None] | None:
    """progress(done, total): advances a comfy.utils.ProgressBar and raises if the user interrupted.

    None outside ComfyUI (the core then runs without reporting).
    """
    try:
        import comfy.model_management
        import comfy.utils
    except ImportError:
        return None
    bar: list = []

    def progress(done: int, total: int) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        if not bar:
            bar.append(comfy.utils.ProgressBar(total))
        bar[0].update_absolute(done, total)

    return progress
