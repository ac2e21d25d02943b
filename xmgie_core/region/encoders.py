"""The frozen encoders around the region predictor ([Regions] §3.1), behind three small interfaces:

  ImageEncoder        pixels [B, 3, S, S] in 0..1 -> (I = E_v(X)[CLS] projected [B, P], F_img [B, N, d] patches)
  TextEncoder         texts -> T = E_t(t) [B, P]                (CLIP text, for T_o and T_e in the losses)
  InstructionEncoder  texts -> (F_ins [B, M, d], mask [B, M])    (FLAN-T5 encoder)

F_img is CLIP's patch tokens through the same post-layernorm and visual projection as the CLS token, so patches
and the global embedding share CLIP's joint space (768-d for ViT-L/14). Pixels are taken in 0..1 and normalised
inside, so a loss can feed a differentiable composite straight in.

Folders load offline with safetensors only (local_files_only, no remote code).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Protocol

import torch
import torch.nn.functional as F

from ..errors import XMGIEInputError
from ..weight_files import check_model_folder, loading

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageEncoder(Protocol):
    size: int

    def __call__(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class TextEncoder(Protocol):
    def __call__(self, texts: list[str]) -> torch.Tensor: ...


class InstructionEncoder(Protocol):
    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]: ...


def clip_normalize(pixels: torch.Tensor, mean: tuple[float, ...] = CLIP_MEAN, std: tuple[float, ...] = CLIP_STD
                   ) -> torch.Tensor:
    """(x - mean) / std, CLIP's statistics by default, on [B, 3, H, W] in 0..1."""
    mean = torch.tensor(mean, device=pixels.device, dtype=pixels.dtype).view(1, 3, 1, 1)
    std = torch.tensor(std, device=pixels.device, dtype=pixels.dtype).view(1, 3, 1, 1)
    return (pixels - mean) / std


def square_resize(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """[B, 3, H, W] -> [B, 3, size, size] (bilinear, antialiased; the whole view, no crop, so the patch grid
    covers exactly the view)."""
    if pixels.shape[-2:] == (size, size):
        return pixels
    return F.interpolate(pixels, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def patch_features(last_hidden: torch.Tensor, post_layernorm: Callable, projection: Callable
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(projected CLS, projected patches) from a CLIP vision tower's last hidden state [B, 1 + N, h]."""
    tokens = projection(post_layernorm(last_hidden))
    return tokens[:, 0], tokens[:, 1:]


class CLIPImageEncoder:
    """transformers CLIPVisionModelWithProjection as an ImageEncoder."""

    def __init__(self, model: Any):
        self.model = model
        self.size = int(model.config.image_size)

    def __call__(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = next(self.model.parameters())
        x = clip_normalize(square_resize(pixels, self.size)).to(device=p.device, dtype=p.dtype)
        hidden = self.model.vision_model(pixel_values=x).last_hidden_state
        return patch_features(hidden, self.model.vision_model.post_layernorm, self.model.visual_projection)


class CLIPTextEncoder:
    """transformers CLIPTextModelWithProjection + tokenizer as a TextEncoder."""

    def __init__(self, model: Any, tokenizer: Any):
        self.model, self.tokenizer = model, tokenizer

    def __call__(self, texts: list[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        batch = self.tokenizer(list(texts), padding="max_length", truncation=True,
                               max_length=self.model.config.max_position_embeddings, return_tensors="pt")
        return self.model(input_ids=batch["input_ids"].to(device)).text_embeds


class T5InstructionEncoder:
    """transformers T5EncoderModel + tokenizer as an InstructionEncoder (F_ins and its padding mask)."""

    def __init__(self, model: Any, tokenizer: Any, max_length: int = 64):
        self.model, self.tokenizer, self.max_length = model, tokenizer, max_length

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(self.model.parameters()).device
        batch = self.tokenizer(list(texts), padding="longest", truncation=True, max_length=self.max_length,
                               return_tensors="pt")
        mask = batch["attention_mask"].to(device)
        features = self.model(input_ids=batch["input_ids"].to(device), attention_mask=mask).last_hidden_state
        return features, mask.bool()


def check_folder(folder: Path, what: str, where: str) -> Path:
    """A transformers folder with config.json and safetensors weights; say what is missing and where it goes."""
    folder = Path(folder)
    if not folder.is_dir():
        raise XMGIEInputError(f"{what} folder not found: {folder}. Put it (config.json, *.safetensors, tokenizer "
                              f"files) in {where}.")
    names = {p.name for p in folder.iterdir()}
    if "config.json" not in names:
        raise XMGIEInputError(f"{folder} has no config.json: it is not a transformers {what} folder. Put the whole "
                              f"model folder in {where}.")
    if not any(n.endswith(".safetensors") for n in names):
        pickled = sorted(n for n in names if n.endswith((".bin", ".pt", ".pth", ".ckpt")))
        raise XMGIEInputError(f"{folder} has no *.safetensors weights" + (
            f" (only {', '.join(pickled)}, which xMGIE does not load because pickles can run code)" if pickled else "")
            + ": download the safetensors version of the model.")
    check_model_folder(folder, f"a file of the {what} folder")
    return folder


def load_t5_instruction_encoder(folder: Path, device: torch.device | str = "cpu",
                                dtype: torch.dtype = torch.float32) -> T5InstructionEncoder:
    """FLAN-T5's encoder and tokenizer from a local folder (e.g. models/text_encoders/flan-t5-base/)."""
    from transformers import AutoTokenizer, T5EncoderModel

    folder = check_folder(folder, "FLAN-T5", "ComfyUI/models/text_encoders/<name>/ (or models/LLM/<name>/)")
    with loading(folder, "the FLAN-T5 folder"):
        model = T5EncoderModel.from_pretrained(str(folder), local_files_only=True, use_safetensors=True, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return T5InstructionEncoder(model.to(device).eval().requires_grad_(False), tokenizer)


def load_clip_encoders(folder: Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
                       ) -> tuple[CLIPImageEncoder, CLIPTextEncoder]:
    """CLIP's vision and text towers (with projections) from one transformers CLIP folder (training needs both)."""
    from transformers import AutoTokenizer, CLIPTextModelWithProjection, CLIPVisionModelWithProjection

    folder = check_folder(folder, "CLIP", "a local folder (e.g. openai/clip-vit-large-patch14)")
    kw = dict(local_files_only=True, use_safetensors=True, dtype=dtype)
    with loading(folder, "the CLIP folder"):
        vision = CLIPVisionModelWithProjection.from_pretrained(str(folder), **kw)
        text = CLIPTextModelWithProjection.from_pretrained(str(folder), **kw)
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    vision, text = (m.to(device).eval().requires_grad_(False) for m in (vision, text))
    return CLIPImageEncoder(vision), CLIPTextEncoder(text, tokenizer)
