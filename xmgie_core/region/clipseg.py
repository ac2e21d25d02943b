"""CLIPSeg (Lüddecke & Ecker 2022, "Image Segmentation Using Text and Image Prompts") from a local folder: where in
the image the edit words are, as a probability map, without the diffusion model.

Loading never downloads and never runs code from the folder: transformers' CLIPSegForImageSegmentation and
CLIPSegProcessor classes (no auto class, no remote code), local_files_only, safetensors weights only. A folder is an
path; the node finds it under ComfyUI's models/clipseg (nodes/model_folders.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import XMGIEInputError
from ..image_io import to_rgb8
from ..model_cache import MODELS
from ..paths import real_path
from ..validation import rgb_image
from ..weight_files import check_model_folder, loading, missing_safetensors

CLIPSEG_FOLDER = "clipseg"
EXAMPLE_REPO = "CIDAS/clipseg-rd64-refined"
EXAMPLE_NAME = "clipseg-rd64-refined"
WHERE = (f"put {EXAMPLE_REPO} (config.json, model.safetensors, preprocessor_config.json and the tokenizer files) in "
         f"ComfyUI/models/{CLIPSEG_FOLDER}/{EXAMPLE_NAME}/")


def check_clipseg_folder(folder: Path) -> None:
    """The folder must hold a CLIPSeg config, safetensors weights, an image processor and a tokenizer."""
    if not folder.is_dir():
        raise XMGIEInputError(f"CLIPSeg model folder not found: {folder}. To fix it, {WHERE}.")
    check_model_folder(folder, "a file of the CLIPSeg model folder")
    files = {p.name for p in folder.iterdir()}
    missing = []
    if "config.json" not in files:
        missing.append("config.json")
    else:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
        if model_type != "clipseg":
            raise XMGIEInputError(f"{folder / 'config.json'} describes a {model_type!r} model, not CLIPSeg: give the "
                                  f"folder of a CLIPSeg model ({EXAMPLE_REPO}).")
    weights = missing_safetensors(folder, files)
    if weights:
        missing.append(weights)
    if not files & {"preprocessor_config.json", "processor_config.json"}:
        missing.append("preprocessor_config.json")
    if "tokenizer.json" not in files and not {"vocab.json", "merges.txt"} <= files:
        missing.append("the tokenizer (tokenizer.json, or vocab.json and merges.txt)")
    if missing:
        raise XMGIEInputError(f"The CLIPSeg model folder {folder} is incomplete: missing {'; '.join(missing)}. To fix "
                              f"it, {WHERE}.")


class CLIPSeg:
    """A loaded CLIPSeg processor + model."""

    def __init__(self, folder: Path):
        from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

        check_clipseg_folder(folder)
        with loading(folder, "the CLIPSeg model folder"):
            self.processor = CLIPSegProcessor.from_pretrained(folder, local_files_only=True)
            self.model = CLIPSegForImageSegmentation.from_pretrained(folder, local_files_only=True,
                                                                     use_safetensors=True).eval()

    @torch.no_grad()
    def probabilities(self, image: torch.Tensor, phrases: list[str], device: torch.device | str) -> torch.Tensor:
        """[B, H, W] in [0, 1]: sigmoid(logits) resized (bilinear) to the image, the highest over the phrases."""
        b, h, w = image.shape[:3]
        n = len(phrases)
        inputs = self.processor(text=phrases * b, images=[a for a in to_rgb8(image) for _ in phrases],
                                padding="max_length", truncation=True, return_tensors="pt",
                                max_length=self.model.config.text_config.max_position_embeddings)
        self.model.to(device)
        logits = self.model(**{k: v.to(device) for k, v in inputs.items()}).logits
        probs = logits.float().sigmoid().reshape(b, n, *logits.shape[-2:])
        return F.interpolate(probs, size=(h, w), mode="bilinear", align_corners=False).amax(dim=1).clamp(0, 1)


def load_clipseg(folder: Path) -> CLIPSeg:
    """The CLIPSeg model of `folder`, loaded once and kept until `unload_clipseg`."""
    path = real_path(folder, "The CLIPSeg model folder")
    return MODELS.get(("clipseg", path), lambda: CLIPSeg(path))


def clipseg_probabilities(image: torch.Tensor, phrases: list[str], folder: Path,
                          device: torch.device | str = "cpu") -> torch.Tensor:
    """Where the phrases are in an IMAGE [B, H, W, C] (0..1): [B, H, W] probabilities in [0, 1] (float32, CPU), the
    maximum over the phrases of sigmoid(CLIPSeg's logits) resized (bilinear) to H x W."""
    image = rgb_image(image)
    phrases = [p.strip() for p in phrases if p.strip()]
    if not phrases:
        raise XMGIEInputError("The CLIPSeg mode needs at least one phrase naming what to find, e.g. 'red scarf'.")
    return load_clipseg(folder).probabilities(image, phrases, device).cpu()


def unload_clipseg(folder: Path | None = None) -> None:
    """Free one loaded CLIPSeg model (or all)."""
    path = real_path(folder, "The CLIPSeg model folder") if folder is not None else None
    MODELS.unload(lambda key: key[0] == "clipseg" and path in (None, key[1]))
