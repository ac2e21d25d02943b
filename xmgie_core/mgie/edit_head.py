"""MGIE's edit head (apple/ml-mgie, ICLR'24, mgie_llava.py `EditMapper`).

It maps the LLM's last-layer hidden states at the 8 [IMG] tokens (plus those tokens' input embeddings) to a
Stable-Diffusion text conditioning: llm2hid = Linear(4096, 512); a learned query [1, 77, 512]; mapper =
nn.Transformer(batch_first, norm_first, d_model 512, 4 heads, 4 encoder + 4 decoder layers, feed-forward 2048,
dropout 0); hid2feat = Linear(512, 768):

    hid = llm2hid(llm + emb); hid = mapper(hid, query.repeat(B, 1, 1)); return hid2feat(hid)

Parameter names equal the keys of ml-mgie's mllm.pt under 'edit_head.', so its tensors load unchanged. The
sizes are constructor arguments (defaults = ml-mgie's) so tests can build tiny heads.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ..errors import XMGIEInputError

NUM_IMG_TOKENS = 8
EDIT_HEAD_DEFAULTS = dict(llm_dim=4096, hidden=512, out_dim=768, queries=77, heads=4, layers=4, feedforward=2048)


class EditMapper(nn.Module):
    """ml-mgie's EditMapper with its sizes as arguments: [B, 8, llm_dim] -> [B, queries, out_dim]."""

    def __init__(self, llm_dim: int = 4096, hidden: int = 512, out_dim: int = 768, queries: int = 77,
                 heads: int = 4, layers: int = 4, feedforward: int = 2048):
        super().__init__()
        self.config = dict(llm_dim=llm_dim, hidden=hidden, out_dim=out_dim, queries=queries, heads=heads,
                           layers=layers, feedforward=feedforward)
        self.llm2hid = nn.Linear(llm_dim, hidden)
        self.query = nn.Parameter(torch.randn(1, queries, hidden))
        with warnings.catch_warnings():  # "enable_nested_tensor is True, but ... norm_first was True": harmless
            warnings.filterwarnings("ignore", message="enable_nested_tensor")
            self.mapper = nn.Transformer(batch_first=True, norm_first=True, d_model=hidden, nhead=heads,
                                         num_encoder_layers=layers, num_decoder_layers=layers,
                                         dim_feedforward=feedforward, dropout=0.0)
        self.hid2feat = nn.Linear(hidden, out_dim)

    @property
    def llm_dim(self) -> int:
        return self.llm2hid.in_features

    def forward(self, llm_hidden: torch.Tensor, img_embeds: torch.Tensor) -> torch.Tensor:
        """llm_hidden [B, 8, llm_dim]; img_embeds (the [IMG0]..[IMG7] input embeddings) [8, llm_dim] or
        [B, 8, llm_dim] -> [B, queries, out_dim]."""
        if llm_hidden.ndim != 3 or llm_hidden.shape[-1] != self.llm_dim:
            raise XMGIEInputError(f"The edit head takes LLM hidden states of shape [batch, 8, {self.llm_dim}], got "
                                  f"{tuple(llm_hidden.shape)}; the MGIE folder's LLM and edit head do not match.")
        if img_embeds.ndim == 2:
            img_embeds = img_embeds.unsqueeze(0)
        if img_embeds.shape[-2:] != llm_hidden.shape[-2:] or img_embeds.shape[0] not in (1, llm_hidden.shape[0]):
            raise XMGIEInputError(f"The [IMG] token embeddings have shape {tuple(img_embeds.shape)}, which does not "
                                  f"match the LLM hidden states {tuple(llm_hidden.shape)}.")
        hid = self.llm2hid(llm_hidden + img_embeds)
        hid = self.mapper(hid, self.query.repeat(llm_hidden.shape[0], 1, 1))
        return self.hid2feat(hid)


def mgie_conditioning(head: EditMapper, img_hidden: torch.Tensor,
                      img_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(positive, negative) conditioning [B, queries, out_dim] (SD1.5: [B, 77, 768]).

    positive = head(img_hidden, emb); negative = head(zeros(B, 8, D), emb), as ml-mgie's demo (NULL) and training
    (hid_null) compute it.
    """
    img_hidden = img_hidden.to(device=head.query.device, dtype=head.query.dtype)
    img_embeds = img_embeds.to(device=head.query.device, dtype=head.query.dtype)
    positive = head(img_hidden, img_embeds)
    negative = head(torch.zeros_like(img_hidden), img_embeds)
    return positive, negative
