"""Token positions of edit words: chunked ComfyUI-style prompts and a transformers tokenizer."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from xmgie_core.errors import XMGIEInputError
from xmgie_core.hosts.comfy.tokens import comfy_token_positions
from xmgie_core.hosts.diffusers.tokens import hf_token_positions
from xmgie_core.tokens import find_positions, parse_words

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
    with pytest.raises(XMGIEInputError, match=r"'blue hat' cannot be located in the prompt. The prompt, as its tokenizer reads it: 'a red cat'"):
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


CHINESE = "一个戴着红色围巾的男人"  # "a man wearing a red scarf": one run of characters, no spaces


def _spelled_by(tokenizer, ids, positions):
    from xmgie_core.tokens import piece_bytes

    inverse = {v: k for k, v in tokenizer.get_vocab().items()}
    return b"".join(piece_bytes(inverse[ids[p]]) for p in positions).decode("utf-8", "replace").strip()


@pytest.mark.parametrize("words", ["红色围巾", "男人", "围巾"])
def test_words_inside_an_unspaced_script_are_located_by_their_text(clip_tokenizer, words):
    """Byte-level BPE merges '红色围巾' differently alone and inside the sentence: the token sequences differ, the
    text they spell does not."""
    alone = [t for t in clip_tokenizer(words)["input_ids"] if t not in clip_tokenizer.all_special_ids]
    ids = clip_tokenizer(CHINESE, padding="max_length", max_length=77)["input_ids"]
    if words == "红色围巾":  # the reported case: its pieces alone are not the sentence's pieces
        assert not find_positions([ids], alone, set(clip_tokenizer.all_special_ids)), "the sequences now agree"
    positions = hf_token_positions(clip_tokenizer, CHINESE, words)
    spelled = _spelled_by(clip_tokenizer, ids, positions)
    assert words in spelled and len(spelled) <= len(words) + 2, spelled  # at most a straddling piece each side
    assert positions == list(range(positions[0], positions[-1] + 1))


def test_the_text_fallback_never_cuts_a_spaced_word(clip_tokenizer):
    with pytest.raises(XMGIEInputError, match="'red scarf' cannot be located"):
        hf_token_positions(clip_tokenizer, "a bored scarf on a chair", "red scarf")
    with pytest.raises(XMGIEInputError, match="'car' cannot be located"):
        hf_token_positions(clip_tokenizer, "a man in a carpet shop", "car")


def test_words_that_are_not_there_are_shown_readably(clip_tokenizer):
    """The error shows the prompt and the words as text, not byte-level pieces ('ç', 'º', ...)."""
    with pytest.raises(XMGIEInputError) as err:
        hf_token_positions(clip_tokenizer, CHINESE, "蓝色帽子")
    assert f"as its tokenizer reads it: '{CHINESE}'" in str(err.value)
    assert "read as '蓝色帽子'" in str(err.value) and "ç" not in str(err.value)


def test_comfy_positions_find_unspaced_words_too(clip_tokenizer):
    body = clip_tokenizer(CHINESE)["input_ids"][1:-1]
    clip = _fake_clip(clip_tokenizer, [_chunk(body)])
    positions, _ = comfy_token_positions(clip, CHINESE, "红色围巾")
    assert "红色围巾" in _spelled_by(clip_tokenizer, _chunk(body), positions)
