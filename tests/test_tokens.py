"""Token positions of edit words: chunked ComfyUI-style prompts and a transformers tokenizer."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from xmgie_core.errors import XMGIEInputError
from xmgie_core.tokens import comfy_token_positions, find_positions, hf_token_positions, parse_words

START, END = 49406, 49407


def test_parse_words():
    assert parse_words(" red scarf, hat ,, ") == ["red scarf", "hat"]


def test_find_positions_all_occurrences_and_across_chunks():
    chunks = [[START, 10, 11, 12, 10, 11, END], [START, 12, 10, END, END, END, END]]
    assert find_positions(chunks, [10, 11], {START, END}) == [1, 2, 4, 5]
    assert find_positions(chunks, [12, 10], {START, END}) == [3, 4, 8, 9]
    assert find_positions(chunks, [11, 12], {START, END}) == [2, 3, 5, 8]  # continues into chunk 2
    assert find_positions([[START, None, 10, END]], [10], {START, END}) == [2]  # embedding vectors are skipped


def _fake_clip(tokenizer, chunks_of_ids):
    """A stand-in for ComfyUI's CLIP: tokenize() returns {"l": chunks of (id, weight)}."""
    inv = {v: k for k, v in tokenizer.get_vocab().items()}
    sd_tok = SimpleNamespace(tokenizer=tokenizer, start_token=START, end_token=END, pad_token=END, inv_vocab=inv)
    return SimpleNamespace(tokenize=lambda text: {"l": [[(t, 1.0) for t in c] for c in chunks_of_ids]},
                           tokenizer=SimpleNamespace(clip_l=sd_tok))


def _chunk(ids):
    return [START] + ids + [END] * (76 - len(ids))


def test_comfy_positions_with_chunks_and_repeats(clip_tokenizer):
    body = clip_tokenizer("a man with a red scarf, and a red scarf again")["input_ids"][1:-1]
    filler = clip_tokenizer("photo " * 70)["input_ids"][1:-1][:70]
    clip = _fake_clip(clip_tokenizer, [_chunk(filler), _chunk(body)])
    pos, length = comfy_token_positions(clip, "ignored", "red scarf")
    red, scarf = clip_tokenizer("red scarf")["input_ids"][1:3]
    assert length == 154
    assert [clip.tokenize("")["l"][p // 77][p % 77][0] for p in pos] == [red, scarf, red, scarf]
    assert all(p >= 77 for p in pos)


def test_comfy_positions_missing_word_lists_prompt_tokens(clip_tokenizer):
    clip = _fake_clip(clip_tokenizer, [_chunk(clip_tokenizer("a red cat")["input_ids"][1:-1])])
    with pytest.raises(XMGIEInputError, match=r"'blue hat'.*a red cat"):
        comfy_token_positions(clip, "a red cat", "blue hat")
    with pytest.raises(XMGIEInputError, match="No edit words"):
        comfy_token_positions(clip, "a red cat", " , ")


def test_hf_positions_handle_punctuation_and_case(clip_tokenizer):
    prompt = "A photo of a man, wearing a RED scarf; red-scarf."
    pos = hf_token_positions(clip_tokenizer, prompt, "red scarf")
    ids = clip_tokenizer(prompt, padding="max_length", max_length=77)["input_ids"]
    red, scarf = clip_tokenizer("red scarf")["input_ids"][1:3]
    assert [ids[p] for p in pos] == [red, scarf]  # "red-scarf" tokenizes with a "-" between: not a match
    assert hf_token_positions(clip_tokenizer, prompt, "man, photo") == [2, 5]
