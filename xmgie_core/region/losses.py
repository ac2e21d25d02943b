"""The training objective of the region predictor ([Regions] §3.3, eqs 4-11), as short functions over tensors.

  generator step  M~ = bilinear upsample of P_region's patch grid to the image size,
                  X_res = (1 - M~) X + M~ X_gen       (X_gen: a frozen generator's render of t_e, cached per record)
  eq 4   L_semEdited   = 1 - cos(f_sem(F^_edit), T_e),   F^_edit = mean_i [P_i F_Editedimg,i + (1 - P_i) F_img,i]
  eq 5   L_semOriginal = 1 - cos(f_sem(mean_i F_img,i), T_o)
  eq 6   L_semAlign    = L_semEdited + L_semOriginal
  eq 7   L_CLIPg = 1 - cos(E_v(X_res), T_e)
  eq 8   L_CLIPd = 1 - cos(E_v(X_res) - E_v(X), T_e - T_o)
  eq 9   L_CLIPs = mean_ij |S(X_res)_ij - S(X)_ij|,   S(X)_ij = cos(F_i, F_j) over CLIP's patch tokens
  eq 10  L_CLIP  = λg L_CLIPg + λd L_CLIPd + λs L_CLIPs
  eq 11  L       = α L_semAlign + β L_CLIP

Every loss returns one value per batch item ([B]); the training step averages them. E_v(.) is CLIP's projected CLS
embedding, T_o / T_e CLIP's text embeddings of the source and target descriptions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import XMGIEInputError


@dataclass(frozen=True)
class LossWeights:
    """α, β (eq 11) and λg, λd, λs (eq 10)."""

    alpha: float = 1.0
    beta: float = 1.0
    lambda_g: float = 1.0
    lambda_d: float = 1.0
    lambda_s: float = 1.0

    def __post_init__(self) -> None:
        values = {"alpha": self.alpha, "beta": self.beta, "lambda-g": self.lambda_g, "lambda-d": self.lambda_d,
                  "lambda-s": self.lambda_s}
        negative = [f"--{k} {v}" for k, v in values.items() if not 0 <= v < math.inf]
        if negative:
            raise XMGIEInputError(f"Loss weights must be finite and >= 0, got {', '.join(negative)}.")
        if self.beta == 0 or self.lambda_g + self.lambda_d + self.lambda_s == 0:
            raise XMGIEInputError("With --beta 0 (or all of --lambda-g/-d/-s 0) no loss looks at the generator's "
                                  "render, so nothing tells the predictor where to edit: give L_CLIP a weight > 0.")


class SemanticProjection(nn.Module):
    """f_sem: predictor features [..., d] -> CLIP's joint space [..., P] (Linear, GELU, Linear)."""

    def __init__(self, dim: int, joint_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, joint_dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """1 - cos(a, b) along the last dim."""
    return 1.0 - F.cosine_similarity(a, b, dim=-1)


def soft_region(probability: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """M~: P_region [B, N] on its square patch grid, bilinearly upsampled to `size` -> [B, 1, H, W] in 0..1."""
    b, n = probability.shape
    g = int(round(n ** 0.5))
    if g * g != n:
        raise XMGIEInputError(f"P_region has {n} values, which is not a square patch grid; the image encoder must "
                              "return the patches of a square view.")
    grid = probability.view(b, 1, g, g)
    return F.interpolate(grid, size=size, mode="bilinear", align_corners=False)


def composite(image: torch.Tensor, render: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """X_res = (1 - M~) X + M~ X_gen: the render inside the soft region, the original outside."""
    return (1.0 - region) * image + region * render


def edited_features(probability: torch.Tensor, edited: torch.Tensor, f_img: torch.Tensor) -> torch.Tensor:
    """F^_edit = mean_i [P_i F_Editedimg,i + (1 - P_i) F_img,i] -> [B, d] (eq 4)."""
    p = probability.unsqueeze(-1)
    return (p * edited + (1.0 - p) * f_img).mean(dim=1)


def sem_edited_loss(f_sem: nn.Module, probability: torch.Tensor, edited: torch.Tensor, f_img: torch.Tensor,
                    t_e: torch.Tensor) -> torch.Tensor:
    """Eq 4: the edited features inside the region, the original outside, should read as the target description."""
    return cosine_distance(f_sem(edited_features(probability, edited, f_img)), t_e)


def sem_original_loss(f_sem: nn.Module, f_img: torch.Tensor, t_o: torch.Tensor) -> torch.Tensor:
    """Eq 5: f_sem of the unedited image's mean patch feature should read as the source description."""
    return cosine_distance(f_sem(f_img.mean(dim=1)), t_o)


def clip_global_loss(e_res: torch.Tensor, t_e: torch.Tensor) -> torch.Tensor:
    """Eq 7: the composite should match the target description."""
    return cosine_distance(e_res, t_e)


def clip_directional_loss(e_res: torch.Tensor, e_src: torch.Tensor, t_e: torch.Tensor, t_o: torch.Tensor
                          ) -> torch.Tensor:
    """Eq 8: the image should move in CLIP space the way the text moves from t_o to t_e."""
    return cosine_distance(e_res - e_src, t_e - t_o)


def self_similarity(patches: torch.Tensor) -> torch.Tensor:
    """S_ij = cos(F_i, F_j) over patch tokens [B, N, d] -> [B, N, N]."""
    unit = F.normalize(patches, dim=-1)
    return unit @ unit.transpose(1, 2)


def clip_structure_loss(patches_res: torch.Tensor, patches_src: torch.Tensor) -> torch.Tensor:
    """Eq 9: mean |S(X_res) - S(X)|, the composite should keep the original's patch structure."""
    return (self_similarity(patches_res) - self_similarity(patches_src)).abs().mean(dim=(1, 2))


def clip_loss(global_: torch.Tensor, directional: torch.Tensor, structure: torch.Tensor, w: LossWeights
              ) -> torch.Tensor:
    """Eq 10: λg L_CLIPg + λd L_CLIPd + λs L_CLIPs."""
    return w.lambda_g * global_ + w.lambda_d * directional + w.lambda_s * structure


def total_loss(sem_align: torch.Tensor, clip: torch.Tensor, w: LossWeights) -> torch.Tensor:
    """Eq 11: α L_semAlign + β L_CLIP (L_semAlign = L_semEdited + L_semOriginal, eq 6)."""
    return w.alpha * sem_align + w.beta * clip
