"""Tiny, seeded, random-weight SD1.5-shaped models (no download; a few seconds to build): the headless edit's
`--tiny` plumbing run and the test suite use them.

The CLIP tokenizer is the real CLIP BPE vocabulary (49408 tokens) rebuilt from the file that ships inside the
open_clip_torch package, so token ids equal those of SD1.5's tokenizer.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch

CROSS_DIM = 32


def _seeded(seed: int):
    torch.manual_seed(seed)


def tiny_unet():
    """UNet2DConditionModel, latent 16x16, cross-attention at 16x16, 8x8 and the 8x8 middle."""
    from diffusers import UNet2DConditionModel

    _seeded(0)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CROSS_DIM, attention_head_dim=8,
    ).eval()


def tiny_vae():
    """AutoencoderKL with 8x downsampling and 4 latent channels, as SD's VAE."""
    from diffusers import AutoencoderKL

    _seeded(1)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8, layers_per_block=1,
        block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    ).eval()


def clip_tokenizer_files(directory: Path) -> Path:
    """Write vocab.json / merges.txt of the CLIP BPE (from open_clip's bundled file) into `directory`."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    pairs = [tuple(m.split()) for m in merges]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(p) for p in pairs] + ["<|startoftext|>", "<|endoftext|>"]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(p) for p in pairs) + "\n")
    return directory


def clip_tokenizer(directory: Path):
    from transformers import CLIPTokenizer

    d = clip_tokenizer_files(directory)
    return CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"), pad_token="<|endoftext|>")


def tiny_clip_text():
    """CLIPTextModel with the real vocabulary size and 77 positions, hidden size CROSS_DIM."""
    from transformers import CLIPTextConfig, CLIPTextModel

    _seeded(2)
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=CROSS_DIM, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, projection_dim=CROSS_DIM)
    return CLIPTextModel(cfg).eval()
