"""Where words sit in a prompt as ComfyUI's CLIP tokenizes it (77-token chunks, weights, embeddings; SDXL's two
tokenizers), with the generic finder of xmgie_core.tokens."""

from __future__ import annotations

from typing import Any

from ...errors import XMGIEInputError
from ...tokens import locate_phrases, parse_words


def comfy_token_positions(clip: Any, prompt: str, words: str, what: str = "edit words") -> tuple[list[int], int]:
    """(context positions of `words` in `prompt`, the prompt's context length) for a ComfyUI CLIP.

    Uses clip.tokenize (77-token chunks, weights, embeddings) and the same tokenizer's ids for
    the words. SDXL's g and l tokenizers must place the words identically (checked).
    """
    tokens = clip.tokenize(prompt)
    found = {key: _comfy_positions(getattr(clip.tokenizer, f"clip_{key}"), chunks, words, what)
             for key, chunks in tokens.items()}
    (key, first), *others = found.items()
    for other, result in others:
        if result != first:
            raise XMGIEInputError(
                f"The {what} sit at different token positions for CLIP-{key} and CLIP-{other} "
                f"({first[0]} vs {result[0]}); rephrase the prompt so both tokenizers split it alike."
            )
    return first


def _comfy_positions(sd_tokenizer: Any, token_chunks: list, words: str, what: str) -> tuple[list[int], int]:
    chunks = [[t[0] if isinstance(t[0], int) else None for t in chunk] for chunk in token_chunks]
    special = {t for t in (sd_tokenizer.start_token, sd_tokenizer.end_token, sd_tokenizer.pad_token) if t is not None}
    hf = sd_tokenizer.tokenizer
    phrases = {p: [t for t in hf(p)["input_ids"] if t not in special] for p in parse_words(words)}
    if not phrases:
        raise XMGIEInputError(f"No {what} given: write the words to localize, e.g. 'red scarf'.")
    return locate_phrases(chunks, phrases, special, lambda t: sd_tokenizer.inv_vocab.get(t, ""), what), \
        sum(len(c) for c in chunks)
