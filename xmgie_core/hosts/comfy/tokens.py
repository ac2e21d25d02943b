"""Where words sit in a prompt as ComfyUI's CLIP tokenizes it (77-token chunks, weights, embeddings; SDXL's two
tokenizers), with the generic finder of xmgie_core.tokens; and where they sit in a DiT editor's text conditioning
(Flux / Kontext: T5-XXL's tokens; Qwen-Image(-Edit): Qwen2.5-VL's tokens after the chat template's head)."""

from __future__ import annotations

from typing import Any, Sequence

from ...errors import XMGIEInputError
from ...tokens import locate_phrases, parse_words
from .dit import FLUX, QWEN_IMAGE

SENTENCEPIECE_SPACE = "\u2581"
"""T5's word-start mark in its vocabulary (a space in the text)."""
QWEN_IM_START, QWEN_USER, QWEN_NEWLINE = 151644, 872, 198
"""Qwen2.5 token ids comfy/text_encoders/qwen_image.py uses to find where the encoded sequence starts."""
TEXT_ENCODER = {FLUX: ("t5xxl", "t5xxl", "T5-XXL"), QWEN_IMAGE: ("qwen25_7b", "qwen25_7b", "Qwen2.5-VL")}
"""family -> (clip.tokenize key, clip.tokenizer attribute, name) of the tokenizer whose tokens the DiT reads."""
LOADERS = ("Load Flux / FLUX.1 Kontext's text encoders with DualCLIPLoader (clip_l + t5xxl, type flux), "
           "Qwen-Image(-Edit)'s with CLIPLoader (qwen_2.5_vl_7b, type qwen_image)")


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

    def piece(token: int) -> str:
        return sd_tokenizer.inv_vocab.get(token, "").replace(SENTENCEPIECE_SPACE, " ")

    return locate_phrases(chunks, phrases, special, piece, what), sum(len(c) for c in chunks)


def dit_token_positions(clip: Any, family: str, prompt: str, words: str, conditioning_tokens: int,
                        what: str = "edit words") -> list[int]:
    """Positions of `words` in a DiT editor's text conditioning of `conditioning_tokens` tokens encoded from `prompt`.

    Flux / Kontext: the conditioning is T5-XXL's encoding, one position per T5 token (comfy/text_encoders/flux.py),
    so its length must equal the token count. Qwen-Image(-Edit): the prompt is wrapped in the chat template, the
    encoder drops the template's head up to "<|im_start|>user\\n" (qwen_image.py QwenImageTEModel), and
    TextEncodeQwenImageEdit(Plus) put the images' vision tokens (a count the text alone does not give) before the
    prompt: positions are counted from the end, which the template's tail fixes, and the conditioning must be at
    least as long as the text's encoding. Only the prompt's own tokens are searched.
    """
    key, attribute, name = TEXT_ENCODER[family]
    sd_tokenizer = getattr(getattr(clip, "tokenizer", None), attribute, None)
    if sd_tokenizer is None:
        raise XMGIEInputError(f"The CLIP given is not the model's text encoder ({name}): {LOADERS}, and connect "
                              "the one that encodes this model's prompts.")
    if prompt.lstrip().startswith(("<|im_start|>", "<|start_header_id|>")):
        raise XMGIEInputError("The prompt carries its own chat template; type the instruction alone (ComfyUI adds "
                              "the template) so the edit words' positions can be found.")
    chunk = [t[0] if isinstance(t[0], int) else None for c in clip.tokenize(prompt)[key] for t in c]
    start, tail = (0, 0) if family == FLUX else _qwen_prompt_span(clip.tokenizer, sd_tokenizer, chunk)
    searched = [(t if start <= i < len(chunk) - tail else None,) for i, t in enumerate(chunk)]
    positions, _ = _comfy_positions(sd_tokenizer, [searched], words, what)
    own = len(chunk) - start
    if conditioning_tokens == own or (family == QWEN_IMAGE and conditioning_tokens > own):
        return [conditioning_tokens - (len(chunk) - p) for p in positions]
    raise length_mismatch(prompt, conditioning_tokens, f"{own} {name} tokens" + (
        "" if family == FLUX else " (or more, with images)"))


def length_mismatch(prompt: str, conditioning_tokens: int, encodes_to: str) -> XMGIEInputError:
    """The error for a conditioning that cannot be the prompt's encoding (its token count differs)."""
    return XMGIEInputError(
        f"The conditioning has {conditioning_tokens} tokens, but the prompt {prompt!r} encodes to {encodes_to}: it "
        "was not encoded from this prompt by this model's text encoder. Give the Cross-Attention Mask node the same "
        f"prompt text as the conditioning's text-encode node. {LOADERS}."
    )


def _qwen_prompt_span(tokenizer: Any, sd_tokenizer: Any, chunk: Sequence[int | None]) -> tuple[int, int]:
    """(first token of the prompt, tokens after it) in a Qwen chat-templated token list: ComfyUI's encoder starts at
    the second <|im_start|>, past "user\\n"; the template's tail follows the prompt."""
    starts = [i for i, t in enumerate(chunk) if t == QWEN_IM_START][:2]
    start = starts[-1]
    if chunk[start + 1:start + 3] == [QWEN_USER, QWEN_NEWLINE]:
        start += 3
    tail = tokenizer.llama_template.split("{}", 1)[1]
    return start, len(sd_tokenizer.tokenizer(tail)["input_ids"])
