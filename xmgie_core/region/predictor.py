"""The learned region predictor of [Regions] §3.1-3.2 (eqs 1-3), and its one-file safetensors form.

  F_img  [N, d]  CLIP ViT-L/14 patch features (CLS excluded), F_ins [M, d] FLAN-T5 encoder features
  eq 1   F_Editedimg  = F_img + softmax(Q K^T / sqrt(d_h)) V,   Q = F_img W_Q, K = F_ins W_K, V = F_ins W_V
  eq 2   F_imgRegion  = F_Editedimg + SelfAttention(F_Editedimg)          (its own W_Q, W_K, W_V in R^{d x d})
  eq 3   P_region     = sigmoid(MLP(F_imgRegion))  in (0, 1)^N,  M_region = [P_region >= threshold]

Inputs of each attention are layer-normalised and the attention outputs are added to their input (a transformer
block's pre-norm residual form); the attention itself is exactly softmax(Q K^T / sqrt(d_h)) V with d x d
projections split into `heads` heads and no output projection.

The config (dims, threshold, encoder names, scales) lives in the safetensors file's metadata, so one file is the
whole predictor; loading reads tensors only (no pickle, no code).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import XMGIEInputError
from ..weight_files import read_safetensors, safetensors_metadata

CONFIG_KEY = "xmgie.region.config"
FORMAT = "xmgie-region-predictor-1"
REPLACE = ("copy it again from where it was trained (compare its size and sha256 with the original's), or re-train it "
           "with `python -m xmgie_core.region.train`")


@dataclass(frozen=True)
class RegionConfig:
    dim: int = 768
    """d: the width of F_img (CLIP's projection dim) and F_ins (T5's d_model)."""
    heads: int = 8
    mlp_hidden: int = 768
    threshold: float = 0.5
    """M_region = [P_region >= threshold]."""
    image_encoder: str = "openai/clip-vit-large-patch14"
    instruction_encoder: str = "google/flan-t5-base"
    image_size: int = 224
    patch_size: int = 14
    scales: tuple[int, ...] = field(default=(1, 2))
    """Multi-scale inference: 1 = the whole image, k = a k x k grid of overlapping crops (see multiscale.py)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "scales", tuple(int(s) for s in self.scales))
        problems = []
        if self.dim < 1 or self.heads < 1 or self.dim % self.heads:
            problems.append(f"dim {self.dim} must be a positive multiple of heads {self.heads}")
        if self.mlp_hidden < 1:
            problems.append(f"mlp_hidden {self.mlp_hidden} must be positive")
        if not 0.0 < self.threshold < 1.0:
            problems.append(f"threshold {self.threshold} must be in (0, 1)")
        if self.image_size % self.patch_size:
            problems.append(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if not self.scales or min(self.scales) < 1:
            problems.append(f"scales {self.scales} must be positive integers")
        if problems:
            raise XMGIEInputError("Invalid region predictor config: " + "; ".join(problems) + ".")

    @property
    def grid(self) -> int:
        """Patches per side: N = grid^2 (16 for ViT-L/14 at 224)."""
        return self.image_size // self.patch_size

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "RegionConfig":
        data = json.loads(text)
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise XMGIEInputError(f"The region predictor config has unknown keys {sorted(unknown)}; "
                                  "it was written by a newer xMGIE: update the pack.")
        return cls(**data)


class Attention(nn.Module):
    """softmax(Q K^T / sqrt(d_h)) V with Q = X W_Q, K = C W_K, V = C W_V, W in R^{d x d} (eqs 1-2)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.w_q = nn.Linear(dim, dim, bias=False)
        self.w_k = nn.Linear(dim, dim, bias=False)
        self.w_v = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, N, d], context [B, M, d], context_mask [B, M] (True = a real token) -> [B, N, d]."""
        b, n, d = x.shape
        h = self.heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, t.shape[1], h, d // h).transpose(1, 2)

        mask = None if context_mask is None else context_mask[:, None, None, :].bool()
        out = F.scaled_dot_product_attention(split(self.w_q(x)), split(self.w_k(context)), split(self.w_v(context)),
                                             attn_mask=mask)
        return out.transpose(1, 2).reshape(b, n, d)


@dataclass
class RegionOutput:
    edited: torch.Tensor
    """F_Editedimg [B, N, d] (eq 1)."""
    region_features: torch.Tensor
    """F_imgRegion [B, N, d] (eq 2)."""
    probability: torch.Tensor
    """P_region [B, N] (eq 3)."""


class RegionPredictor(nn.Module):
    """Eqs 1-3: image patches attend to the instruction, then to each other; a token-wise MLP gives P_region."""

    def __init__(self, config: RegionConfig):
        super().__init__()
        self.config = config
        d = config.dim
        self.norm_img = nn.LayerNorm(d)
        self.norm_ins = nn.LayerNorm(d)
        self.cross_attention = Attention(d, config.heads)
        self.norm_edited = nn.LayerNorm(d)
        self.self_attention = Attention(d, config.heads)
        self.norm_region = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, config.mlp_hidden), nn.GELU(), nn.Linear(config.mlp_hidden, 1))

    def forward(self, f_img: torch.Tensor, f_ins: torch.Tensor, ins_mask: torch.Tensor | None = None) -> RegionOutput:
        """f_img [B, N, d], f_ins [B or 1, M, d], ins_mask [B or 1, M] -> RegionOutput."""
        check_features(f_img, f_ins, self.config.dim)
        if f_ins.shape[0] != f_img.shape[0]:
            f_ins = f_ins.expand(f_img.shape[0], -1, -1)
            ins_mask = None if ins_mask is None else ins_mask.expand(f_img.shape[0], -1)
        edited = f_img + self.cross_attention(self.norm_img(f_img), self.norm_ins(f_ins), ins_mask)  # eq 1
        e = self.norm_edited(edited)
        region = edited + self.self_attention(e, e)  # eq 2
        logits = self.mlp(self.norm_region(region))[..., 0]  # eq 3
        return RegionOutput(edited, region, torch.sigmoid(logits))

    def grid_probability(self, f_img: torch.Tensor, f_ins: torch.Tensor,
                         ins_mask: torch.Tensor | None = None) -> torch.Tensor:
        """P_region reshaped to the patch grid: [B, g, g]."""
        p = self.forward(f_img, f_ins, ins_mask).probability
        g = int(round(p.shape[1] ** 0.5))
        if g * g != p.shape[1]:
            raise XMGIEInputError(f"{p.shape[1]} image patches do not form a square grid; the image encoder must "
                                  "see square inputs (the predictor resizes each view to image_size x image_size).")
        return p.view(p.shape[0], g, g)


def check_features(f_img: torch.Tensor, f_ins: torch.Tensor, dim: int) -> None:
    """F_img and F_ins must be [B, N, d] / [B, M, d] with the predictor's d."""
    for name, t, encoder in (("F_img", f_img, "image encoder's projection dim"),
                             ("F_ins", f_ins, "instruction encoder's d_model")):
        if t.ndim != 3 or t.shape[-1] != dim:
            raise XMGIEInputError(
                f"{name} has shape {tuple(t.shape)} but the region predictor expects [batch, tokens, {dim}]: the "
                f"{encoder} does not match the predictor's weights. Use the encoders named in its config.")


def save_predictor(model: RegionPredictor, path: Path, metadata: dict[str, str] | None = None) -> Path:
    """One safetensors file: the weights, and the config (plus any `metadata`) in its header."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    header = {**(metadata or {}), "format": FORMAT, CONFIG_KEY: model.config.to_json()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=header)
    tmp.replace(path)
    return path


def read_config(path: Path) -> tuple[RegionConfig, dict[str, str]]:
    """The config and the whole metadata header of a predictor file (no tensors are read)."""
    path = Path(path)
    if not path.is_file():
        raise XMGIEInputError(f"Region predictor weights not found: {path}. Put the .safetensors file written by "
                              "`python -m xmgie_core.region.train` in ComfyUI/models/xmgie/.")
    meta = safetensors_metadata(path, "the region predictor weights", REPLACE)
    if CONFIG_KEY not in meta:
        raise XMGIEInputError(f"{path.name} is a safetensors file but not an xMGIE region predictor (its metadata "
                              f"has no {CONFIG_KEY!r}); choose the file written by `python -m xmgie_core.region.train`.")
    return RegionConfig.from_json(meta[CONFIG_KEY]), meta


def load_predictor(path: Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
                   ) -> RegionPredictor:
    """Build the predictor from its file; every tensor must be used and none may be missing."""
    config, _ = read_config(path)
    model = RegionPredictor(config)
    state = read_safetensors(path, "the region predictor weights", REPLACE)
    expected = model.state_dict()
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if state[k].shape != expected[k].shape)
    if missing or extra or wrong:
        raise XMGIEInputError(f"{Path(path).name} does not match its own config: missing {missing[:5]}, unexpected "
                              f"{extra[:5]}, wrong shapes {wrong[:5]}. The file is damaged; re-copy or re-train it.")
    model.load_state_dict(state)
    return model.to(device=device, dtype=dtype).eval()
