"""Token positions with ComfyUI's own tokenizers: SDXL's g and l, and textual-inversion embeddings."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch


def as_clip(tokenizer):
    """What comfy_token_positions uses of a CLIP: tokenize() and .tokenizer (no text model needed)."""
    return SimpleNamespace(tokenize=tokenizer.tokenize_with_weights, tokenizer=tokenizer)


def ids_at(tokens: dict, key: str, positions: list[int]) -> list:
    chunks = tokens[key]
    return [chunks[p // 77][p % 77][0] for p in positions]


@pytest.mark.parametrize("prompt", [
    "a man wearing a (red scarf:1.3), snow",
    "photo, " * 45 + "a man in a red scarf, (red scarf)",
])
def test_sdxl_g_and_l_tokenizers_agree(comfy_host, prompt):
    from comfy.sdxl_clip import SDXLTokenizer
    from xmgie_core.hosts.comfy.tokens import comfy_token_positions

    clip = as_clip(SDXLTokenizer())
    positions, length = comfy_token_positions(clip, prompt, "red scarf")
    tokens = clip.tokenize(prompt)
    red, scarf = clip.tokenizer.clip_l.tokenizer("red scarf")["input_ids"][1:3]
    assert length == 77 * len(tokens["g"]) == 77 * len(tokens["l"])
    for key in ("g", "l"):
        assert set(ids_at(tokens, key, positions)) == {red, scarf}
    assert len(positions) == 2 * prompt.count("red scarf")


def test_textual_inversion_embedding_shifts_positions(comfy_host, tmp_path):
    from safetensors.torch import save_file

    from comfy.sd1_clip import SD1Tokenizer
    from xmgie_core.hosts.comfy.tokens import comfy_token_positions

    save_file({"emb": torch.randn(3, 768)}, str(tmp_path / "xmgie_test_emb.safetensors"))
    clip = as_clip(SD1Tokenizer(embedding_directory=str(tmp_path)))
    prompt = "a photo of embedding:xmgie_test_emb wearing a red scarf"
    tokens = clip.tokenize(prompt)
    assert sum(not isinstance(t[0], int) for t in tokens["l"][0]) == 3  # the embedding's three vectors
    positions, _ = comfy_token_positions(clip, prompt, "red scarf, photo")
    red, scarf = clip.tokenizer.clip_l.tokenizer("red scarf")["input_ids"][1:3]
    photo = clip.tokenizer.clip_l.tokenizer("photo")["input_ids"][1]
    assert ids_at(tokens, "l", positions) == [photo, red, scarf]
    assert positions[1] == 1 + 3 + 3 + 2  # start token, "a photo of", 3 vectors, "wearing a", then "red"
