"""Where words sit in a prompt as a transformers tokenizer pads it (the diffusers pipeline's single 77-token chunk),
with the generic finder of xmgie_core.tokens."""

from __future__ import annotations

from typing import Any

from ...errors import XMGIEInputError
from ...tokens import locate_phrases, parse_words


def hf_token_positions(tokenizer: Any, prompt: str, words: str, max_length: int = 77,
                       what: str = "edit words") -> list[int]:
    """Context positions of `words` in `prompt` for a transformers tokenizer padded to max_length
    (the diffusers pipeline's single 77-token chunk)."""
    ids = tokenizer(prompt, padding="max_length", max_length=max_length, truncation=True)["input_ids"]
    special = set(tokenizer.all_special_ids)
    phrases = {p: [t for t in tokenizer(p)["input_ids"] if t not in special] for p in parse_words(words)}
    if not phrases:
        raise XMGIEInputError(f"No {what} given: write the words to localize, e.g. 'red scarf'.")
    inverse = {v: k for k, v in tokenizer.get_vocab().items()}
    return locate_phrases([ids], phrases, special, lambda t: inverse.get(t, ""), what)
