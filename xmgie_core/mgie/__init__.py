"""MGIE (apple/ml-mgie, ICLR'24): LLaVA-7B v1 writes an expressive instruction and 8 [IMG] hidden states; the edit
head maps those to a [1, 77, 768] Stable-Diffusion conditioning. See llava.py, edit_head.py, folder.py, meta.py."""

from .edit_head import EDIT_HEAD_DEFAULTS, NUM_IMG_TOKENS, EditMapper, mgie_conditioning
from .folder import cached_mgie, check_mgie_folder, load_mgie_folder, save_mgie_folder, unload_mgie
from .llava import (
    MGIE, PROMPT_TEMPLATE, VICUNA_SYSTEM, MGIEResult, clean_expressive, img_position, mgie_prompt,
)
from .meta import ADDED_TOKENS, IMG_TOKENS, MGIEMeta

__all__ = [
    "ADDED_TOKENS", "EDIT_HEAD_DEFAULTS", "IMG_TOKENS", "MGIE", "MGIEMeta", "MGIEResult", "NUM_IMG_TOKENS",
    "PROMPT_TEMPLATE", "VICUNA_SYSTEM", "EditMapper", "cached_mgie", "check_mgie_folder", "clean_expressive",
    "img_position", "load_mgie_folder", "mgie_conditioning", "mgie_prompt", "save_mgie_folder", "unload_mgie",
]
