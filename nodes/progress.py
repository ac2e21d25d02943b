"""ComfyUI progress bar + interrupt check as a plain callback for xmgie_core loops."""

from __future__ import annotations

from typing import Callable


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
