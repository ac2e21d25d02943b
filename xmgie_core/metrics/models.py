"""The encoders the semantic metrics use, loaded from local folders only (never downloaded), through the pack's weight
guard (weight_files): a damaged or pickled-only folder is an XMGIEInputError naming the file, which the evaluation turns
into a skipped metric with that note.

Layouts read:
  CLIP, open_clip:     open_clip_config.json ({"model_cfg": ..., "preprocess_cfg": ...}) + open_clip_model.safetensors
                       (or open_clip_pytorch_model.safetensors / model.safetensors),
                       e.g. timm/vit_base_patch32_clip_224.openai
  CLIP, transformers:  config.json (model_type "clip") + model.safetensors + tokenizer files
                       (+ preprocessor_config.json), e.g. openai/clip-vit-base-patch32, openai/clip-vit-large-patch14
  DINO, transformers:  config.json (model_type "vit": ViTModel, e.g. facebook/dino-vits16; or "dinov2": Dinov2Model)
                       + model.safetensors
Weights must be safetensors: the pack never unpickles weights (.bin / .pth can run code when loaded).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import XMGIEInputError
from ..paths import real_path
from ..weight_files import check_json, check_model_folder, check_safetensors, loading, missing_safetensors

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "model.safetensors")


@dataclass(frozen=True)
class Architecture:
    """A ViT's shape: width, depth, patch size, input size (how a folder is compared with the reference model)."""

    width: int
    layers: int
    patch: int
    image_size: int

    def __str__(self) -> str:
        return f"ViT width {self.width}, {self.layers} layers, patch {self.patch}, {self.image_size} px"


REFERENCE = {
    "ViT-B/32": Architecture(768, 12, 32, 224),
    "ViT-L/14": Architecture(1024, 24, 14, 224),
    "ViT-S/16": Architecture(384, 12, 16, 224),
}
"""The vision towers the published numbers were measured with (MagicBrush: CLIP ViT-B/32, DINO ViT-S/16; Emu Edit:
CLIP ViT-L/14)."""


@dataclass
class ClipEncoder:
    """A CLIP model: image and text towers (projected features, not normalised) and its preprocessing constants."""

    encode_images: Callable[[torch.Tensor], torch.Tensor]
    """Normalised pixels [N,3,S,S] (any device) -> features [N,D] on the model's device."""
    encode_texts: Callable[[list[str]], torch.Tensor]
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    architecture: Architecture
    source: str


@dataclass
class DinoEncoder:
    """A DINO ViT: normalised pixels [N,3,S,S] -> the CLS token of the last layer (after its final LayerNorm)."""

    encode_images: Callable[[torch.Tensor], torch.Tensor]
    image_size: int
    architecture: Architecture
    source: str


def _folder(path: Path, what: str) -> Path:
    folder = real_path(path, what)
    if not folder.is_dir():
        raise XMGIEInputError(f"{what} {folder} is not a folder. Give the local model folder (it is never "
                              "downloaded).")
    return folder


def _json(path: Path, what: str) -> dict:
    check_json(path, what)
    return json.loads(path.read_text(encoding="utf-8"))


def _features(output: Any) -> torch.Tensor:
    """transformers' get_*_features: a tensor (4.x) or an output whose pooler_output is the projection (5.x)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _open_clip(folder: Path, what: str, device: torch.device) -> ClipEncoder:
    import open_clip

    config = _json(folder / "open_clip_config.json", what)
    weights = next((folder / n for n in OPEN_CLIP_WEIGHTS if (folder / n).is_file()), None)
    if weights is None:
        names = {p.name for p in folder.iterdir()}
        raise XMGIEInputError(f"{what} {folder} has open_clip_config.json but no {' / '.join(OPEN_CLIP_WEIGHTS)}: "
                              f"{missing_safetensors(folder, names)}.")
    check_safetensors(weights, what)
    try:
        vision = config["model_cfg"]["vision_cfg"]
        arch = Architecture(int(vision.get("width", 768)), int(vision.get("layers", 12)),
                            int(vision.get("patch_size", 16)), int(vision.get("image_size", 224)))
    except (KeyError, TypeError, ValueError) as e:
        raise XMGIEInputError(f"{what} {folder}/open_clip_config.json has no usable model_cfg.vision_cfg ({e}); "
                              "copy the config that came with the weights.") from None
    with loading(weights, what):
        model = open_clip.create_model(f"local-dir:{folder}", load_weights=False)
        open_clip.load_checkpoint(model, str(weights))
        tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    model = model.eval().to(device)
    pre = config.get("preprocess_cfg", {})
    return ClipEncoder(lambda x: model.encode_image(x.to(device)),
                       lambda texts: model.encode_text(tokenizer(texts).to(device)), arch.image_size,
                       tuple(pre.get("mean", OPENAI_MEAN)), tuple(pre.get("std", OPENAI_STD)), arch,
                       f"open_clip folder {folder}")


def _hf_weights(folder: Path, what: str) -> None:
    missing = missing_safetensors(folder, {p.name for p in folder.iterdir()})
    if missing:
        raise XMGIEInputError(f"{what} {folder} lacks {missing}.")
    check_model_folder(folder, what)


def _hf_clip(folder: Path, config: dict, what: str, device: torch.device) -> ClipEncoder:
    from transformers import AutoTokenizer, CLIPModel

    _hf_weights(folder, what)
    vision, text = config.get("vision_config", {}), config.get("text_config", {})
    arch = Architecture(int(vision.get("hidden_size", 768)), int(vision.get("num_hidden_layers", 12)),
                        int(vision.get("patch_size", 32)), int(vision.get("image_size", 224)))
    with loading(folder, what):
        model = CLIPModel.from_pretrained(str(folder), local_files_only=True, use_safetensors=True).eval().to(device)
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    pre = _json(folder / "preprocessor_config.json", what) if (folder / "preprocessor_config.json").is_file() else {}
    length = int(text.get("max_position_embeddings", 77))

    def encode_texts(texts: list[str]) -> torch.Tensor:
        t = tokenizer(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        return _features(model.get_text_features(input_ids=t.input_ids.to(device),
                                                 attention_mask=t.attention_mask.to(device)))

    return ClipEncoder(lambda x: _features(model.get_image_features(pixel_values=x.to(device))), encode_texts,
                       arch.image_size,
                       tuple(pre.get("image_mean", OPENAI_MEAN)), tuple(pre.get("image_std", OPENAI_STD)), arch,
                       f"transformers CLIPModel folder {folder}")


def load_clip(path: Path, what: str = "The CLIP model folder", device: str | torch.device = "cpu") -> ClipEncoder:
    """A CLIP folder in the open_clip or transformers layout (module docstring)."""
    folder, device = _folder(path, what), torch.device(device)
    if (folder / "open_clip_config.json").is_file():
        return _open_clip(folder, what, device)
    if (folder / "config.json").is_file():
        config = _json(folder / "config.json", what)
        if config.get("model_type") == "clip":
            return _hf_clip(folder, config, what, device)
        raise XMGIEInputError(f"{what} {folder} holds a {config.get('model_type')!r} model, not CLIP. Give a CLIP "
                              "folder (open_clip_config.json + weights, or a transformers CLIPModel).")
    raise XMGIEInputError(f"{what} {folder} has neither open_clip_config.json (open_clip layout) nor config.json "
                          "(transformers layout). Give the folder that holds the model's config and safetensors "
                          "weights.")


def load_dino(path: Path, what: str = "The DINO model folder", device: str | torch.device = "cpu") -> DinoEncoder:
    """A DINO ViT folder in the transformers layout: ViTModel (facebook/dino-vits16) or Dinov2Model."""
    from transformers import Dinov2Model, ViTModel

    folder, device = _folder(path, what), torch.device(device)
    if not (folder / "config.json").is_file():
        raise XMGIEInputError(f"{what} {folder} has no config.json: give a transformers DINO folder (e.g. "
                              "facebook/dino-vits16: config.json + model.safetensors).")
    config = _json(folder / "config.json", what)
    kinds = {"vit": ViTModel, "dinov2": Dinov2Model}
    kind = kinds.get(config.get("model_type"))
    if kind is None:
        raise XMGIEInputError(f"{what} {folder} holds a {config.get('model_type')!r} model; DINO is read as a "
                              "transformers ViTModel ('vit', facebook/dino-vits16) or Dinov2Model ('dinov2').")
    _hf_weights(folder, what)
    extra = {"add_pooling_layer": False} if kind is ViTModel else {}
    with loading(folder, what):
        model = kind.from_pretrained(str(folder), local_files_only=True, use_safetensors=True, **extra)
    model = model.eval().to(device)
    arch = Architecture(int(config.get("hidden_size", 384)), int(config.get("num_hidden_layers", 12)),
                        int(config.get("patch_size", 16)), int(config.get("image_size", 224)))
    return DinoEncoder(lambda x: model(pixel_values=x.to(device)).last_hidden_state[:, 0], arch.image_size, arch,
                       f"transformers {kind.__name__} folder {folder}")


def reference_note(metric: str, architecture: Architecture, reference: str) -> str | None:
    """A note when a metric runs on another architecture than the published numbers used."""
    if architecture == REFERENCE[reference]:
        return None
    return (f"{metric} ran on a {architecture}, not the reference {reference} ({REFERENCE[reference]}): its values do "
            "not compare with published ones")
