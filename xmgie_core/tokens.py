"""Where words sit in a tokenized prompt (for cross-attention masking).

A prompt is a list of chunks of token ids (ComfyUI: 77-token chunks, each with start/end
tokens and padding; an embedding vector is None). Index in the encoded context =
chunk * chunk_length + position. Words are matched as whole BPE token sequences over the
prompt's non-special tokens, so punctuation, weighting syntax such as "(red scarf:1.2)" and
chunk boundaries do not get in the way.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from .errors import XMGIEInputError

Chunks = Sequence[Sequence[int | None]]


def parse_words(text: str) -> list[str]:
    """Comma-separated phrases: "red scarf, hat" -> ["red scarf", "hat"] (empty parts dropped)."""
    return [p.strip() for p in text.split(",") if p.strip()]


def find_positions(chunks: Chunks, phrase: Sequence[int], special: set[int]) -> list[int]:
    """Context indices of every occurrence of `phrase` (token ids) among the non-special tokens."""
    stream = [(c * len(chunk) + i, t) for c, chunk in enumerate(chunks) for i, t in enumerate(chunk)
              if t is not None and t not in special]
    ids = [t for _, t in stream]
    n = len(phrase)
    found = []
    for s in range(len(ids) - n + 1):
        if n and ids[s:s + n] == list(phrase):
            found.extend(stream[s + j][0] for j in range(n))
    return sorted(set(found))


def locate_phrases(chunks: Chunks, phrases: dict[str, Sequence[int]], special: set[int],
                   decode: Callable[[int], str], what: str = "edit words") -> list[int]:
    """Positions of all phrases; a phrase that is absent raises an error listing the prompt's tokens."""
    positions: set[int] = set()
    for text, ids in phrases.items():
        hits = find_positions(chunks, ids, special)
        if not hits:
            tokens = [decode(t) if t is not None else "<embedding>" for chunk in chunks for t in chunk
                      if t not in special]
            raise XMGIEInputError(
                f"The {what} {text!r} (tokens {[decode(t) for t in ids]}) are not in the prompt. "
                f"The prompt's tokens are: {' '.join(tokens)}. Use words exactly as they appear in the prompt "
                "(case does not matter; separate several phrases with commas)."
            )
        positions.update(hits)
    return sorted(positions)


def _decoder(vocab_inverse: dict[int, str]) -> Callable[[int], str]:
    return lambda t: vocab_inverse.get(t, str(t)).replace("</w>", "")


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
    return locate_phrases(chunks, phrases, special, _decoder(sd_tokenizer.inv_vocab), what), \
        sum(len(c) for c in chunks)


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
    return locate_phrases([ids], phrases, special, _decoder(inverse), what)
