"""CLIP and DINO metrics, each after its reference implementation (IMAGE tensors [1,H,W,3] in 0..1).

MagicBrush (evaluation/image_eval.py; CLIP ViT-B/32 via clip.load, DINO ViT-S/16 via torch.hub dino_vits16):
  CLIP-I = cos(E_I(edit), E_I(target))        eval_clip_i: 1 - scipy cosine distance of encode_image features
  CLIP-T = cos(E_I(edit), E_T(caption))       eval_clip_t: the target's (local) caption, encode_text
  DINO   = cos(D(edit), D(target))            eval_clip_i(metric='dino'): the CLS output of the last layer
  preprocessing: clip.load's transform, Resize(S, bicubic) + CenterCrop(S) + Normalize(CLIP mean/std) (S = the
  model's input size); DINO: Resize(256, bicubic) + CenterCrop(224) + Normalize(ImageNet mean/std) (256/224 x S
  and S for another input size S).

Emu Edit (paper §5; computed as InstructPix2Pix's metrics/clip_similarity.py ClipSimilarity, CLIP ViT-L/14):
  e_X = E_I(X) / |E_I(X)|,  t_c = E_T(c) / |E_T(c)|
  CLIPdir = cos(e_edit - e_source, t_output - t_input)     (directional similarity)
  CLIPimg = cos(e_source, e_edit)
  CLIPout = cos(e_edit, t_output)
  preprocessing: the whole image resized to S x S (F.interpolate bicubic, align_corners False; no crop) and
  normalised with the model's mean/std; cosines as torch's F.cosine_similarity (a zero vector gives 0).
Texts are truncated to the model's context (77 tokens for CLIP).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image

from ..image_io import to_rgb8
from .models import IMAGENET_MEAN, IMAGENET_STD, ClipEncoder, DinoEncoder

DINO_RESIZE = 256 / 224
"""MagicBrush's DINO transform resizes to 256 and crops 224."""


def center_crop_pixels(image: torch.Tensor, resize: int, size: int, mean, std) -> torch.Tensor:
    """torchvision Resize(resize, bicubic) + CenterCrop(size) + ToTensor + Normalize on the 8-bit RGB image, as the
    references' transforms do on PIL images -> [1,3,size,size]."""
    from torchvision import transforms as T

    t = T.Compose([T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size), T.ToTensor(),
                   T.Normalize(mean, std)])
    return t(Image.fromarray(to_rgb8(image)[0]))[None]


def squashed_pixels(image: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    """InstructPix2Pix's ClipSimilarity.encode_image input: bicubic resize of the [0,1] image to size x size,
    then (x - mean) / std -> [1,3,size,size]."""
    x = F.interpolate(image[..., :3].movedim(-1, 1).float(), size=size, mode="bicubic", align_corners=False)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.double(), b.double(), dim=-1).reshape(-1)[0])


def _run(encode, x) -> torch.Tensor:
    with torch.no_grad():
        return encode(x).float().cpu()


def magicbrush_clip_features(clip: ClipEncoder, image: torch.Tensor) -> torch.Tensor:
    """E_I(image) with clip.load's preprocessing (not normalised)."""
    x = center_crop_pixels(image, clip.image_size, clip.image_size, clip.mean, clip.std)
    return _run(clip.encode_images, x)


def text_features(clip: ClipEncoder, text: str) -> torch.Tensor:
    return _run(clip.encode_texts, [text])


def dino_features(dino: DinoEncoder, image: torch.Tensor) -> torch.Tensor:
    """The CLS feature with MagicBrush's DINO preprocessing."""
    x = center_crop_pixels(image, round(dino.image_size * DINO_RESIZE), dino.image_size, IMAGENET_MEAN, IMAGENET_STD)
    return _run(dino.encode_images, x)


def clip_i(clip: ClipEncoder, edit: torch.Tensor, target: torch.Tensor) -> float:
    """MagicBrush CLIP-I = cos(E_I(edit), E_I(target))."""
    return _cos(magicbrush_clip_features(clip, edit), magicbrush_clip_features(clip, target))


def clip_t(clip: ClipEncoder, edit: torch.Tensor, caption: str) -> float:
    """MagicBrush CLIP-T = cos(E_I(edit), E_T(target caption))."""
    return _cos(magicbrush_clip_features(clip, edit), text_features(clip, caption))


def dino(model: DinoEncoder, edit: torch.Tensor, reference: torch.Tensor) -> float:
    """MagicBrush DINO = cos(D(edit), D(reference)) of the CLS features."""
    return _cos(dino_features(model, edit), dino_features(model, reference))


def unit_image_features(clip: ClipEncoder, image: torch.Tensor) -> torch.Tensor:
    """e_X = E_I(X) / |E_I(X)| with InstructPix2Pix's preprocessing."""
    f = _run(clip.encode_images, squashed_pixels(image, clip.image_size, clip.mean, clip.std))
    return f / f.norm(dim=-1, keepdim=True)


def unit_text_features(clip: ClipEncoder, text: str) -> torch.Tensor:
    f = text_features(clip, text)
    return f / f.norm(dim=-1, keepdim=True)


def emu_clip(clip: ClipEncoder, source: torch.Tensor, edit: torch.Tensor, input_caption: str | None,
             output_caption: str | None) -> dict[str, float]:
    """Emu Edit's CLIPimg, and with the captions CLIPout and CLIPdir (module docstring); the values whose inputs
    exist."""
    e_src, e_edit = unit_image_features(clip, source), unit_image_features(clip, edit)
    out = {"clip_img": _cos(e_src, e_edit)}
    if output_caption:
        t_out = unit_text_features(clip, output_caption)
        out["clip_out"] = _cos(e_edit, t_out)
        if input_caption:
            out["clip_dir"] = _cos(e_edit - e_src, t_out - unit_text_features(clip, input_caption))
    return out
