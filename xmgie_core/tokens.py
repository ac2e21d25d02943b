"""Where words sit in a tokenized prompt (for cross-attention masking).

A prompt is a list of chunks of token ids (ComfyUI: 77-token chunks, each with start/end
tokens and padding; an embedding vector is None). Index in the encoded context =
chunk * chunk_length + position. Words are matched as whole BPE token sequences over the
prompt's non-special tokens, so punctuation, weighting syntax such as "(red scarf:1.2)" and
chunk boundaries do not get in the way; where the sequences differ (scripts without spaces, whose byte-level BPE
pieces merge across word edges) the tokens that spell the words' text are taken instead.
"""

from __future__ import annotations

import unicodedata
from typing import Callable, Sequence

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
                   piece: Callable[[int], str], what: str = "edit words") -> list[int]:
    """Positions of all phrases: whole token sequences first, else the text the byte-level pieces spell
    (text_positions); a phrase found neither way raises an error showing the prompt as the tokenizer reads it.
    `piece` gives a token id's vocabulary entry."""
    positions: set[int] = set()
    for text, ids in phrases.items():
        hits = find_positions(chunks, ids, special) or text_positions(chunks, ids, special, piece)
        if not hits:
            reads = b"".join(piece_bytes(piece(t)) for chunk in chunks for t in chunk
                             if t is not None and t not in special).decode("utf-8", "replace").strip()
            raise XMGIEInputError(
                f"The {what} {text!r} cannot be located in the prompt. The prompt, as its tokenizer reads it: "
                f"{reads!r}; the {what} read as {_spelled(ids, piece)!r}. Use words exactly as they appear in the "
                "prompt (case does not matter; separate several phrases with commas)."
            )
        positions.update(hits)
    return sorted(positions)


def bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable character table of byte-level BPE vocabularies (GPT-2's, which CLIP uses): printable
    Latin-1 bytes stand for themselves, the rest are shifted past 255."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    table, shift = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shift)
            shift += 1
    return table


_BYTE_OF = {c: b for b, c in bytes_to_unicode().items()}


def piece_bytes(piece: str) -> bytes:
    """The text bytes a vocabulary entry stands for: byte-level characters mapped back to bytes, CLIP's word end
    '</w>' a space (an entry that is not byte-level is its own UTF-8)."""
    core, end = (piece[:-4], b" ") if piece.endswith("</w>") else (piece, b"")
    if all(c in _BYTE_OF for c in core):
        return bytes(_BYTE_OF[c] for c in core) + end
    return core.encode() + end


def _spelled(ids: Sequence[int], piece: Callable[[int], str]) -> str:
    return b"".join(piece_bytes(piece(t)) for t in ids).decode("utf-8", "replace").strip()


def _unspaced(char: str) -> bool:
    """A character of a script written without spaces between words (Chinese, Japanese)."""
    return unicodedata.name(char, "").startswith(("CJK", "HIRAGANA", "KATAKANA", "HALFWIDTH", "FULLWIDTH"))


def _splits_a_word(left: str, right: str) -> bool:
    """Whether a match boundary between these two characters would cut a space-separated word."""
    return bool(left and right) and left.isalnum() and right.isalnum() and not (_unspaced(left) or _unspaced(right))


def text_positions(chunks: Chunks, phrase: Sequence[int], special: set[int], piece: Callable[[int], str]) -> list[int]:
    """Context indices of the tokens that spell `phrase`'s text, where the token sequences differ: byte-level BPE
    merges a phrase differently inside a longer word (Chinese and Japanese run without spaces, so '红色围巾' alone
    and inside '戴着红色围巾的男人' become other pieces). Every token overlapping an occurrence counts (a piece
    that straddles the phrase's edge is included); a match may not cut a space-separated word."""
    target = b"".join(piece_bytes(piece(t)) for t in phrase).strip()
    if not target:
        return []
    stream = [(c * len(chunk) + i, piece_bytes(piece(t))) for c, chunk in enumerate(chunks) for i, t in enumerate(chunk)
              if t is not None and t not in special]
    text = b"".join(b for _, b in stream)
    starts, offset = [], 0
    for _, b in stream:
        starts.append(offset)
        offset += len(b)
    first, last = target.decode("utf-8", "replace")[:1], target.decode("utf-8", "replace")[-1:]
    found: set[int] = set()
    at = text.find(target)
    while at >= 0:
        end = at + len(target)
        before, after = text[:at].decode("utf-8", "ignore")[-1:], text[end:].decode("utf-8", "ignore")[:1]
        if not (_splits_a_word(before, first) or _splits_a_word(last, after)):
            found.update(index for (index, b), start in zip(stream, starts) if start < end and start + len(b) > at)
        at = text.find(target, at + 1)
    return sorted(found)
