"""The tokens MGIE adds to LLaMA's vocabulary and MGIEMeta (mgie.json, the MGIE folder's metadata), with the check
that a tokenizer gives those tokens the ids mgie.json records. Shared by the folder loader, the LLaVA wrapper, the
converter and the trainer (a module of its own, so folder.py and llava.py need not import each other for it)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..errors import XMGIEInputError
from .edit_head import EDIT_HEAD_DEFAULTS, NUM_IMG_TOKENS

FORMAT = "xmgie-mgie-1"
META_FILE = "mgie.json"
IM_PATCH, IM_START, IM_END = "<im_patch>", "<im_start>", "<im_end>"
IMG_TOKENS = tuple(f"[IMG{i}]" for i in range(NUM_IMG_TOKENS))
ADDED_TOKENS = (IM_PATCH, IM_START, IM_END) + IMG_TOKENS
"""The 11 tokens MGIE adds to LLaMA's vocabulary, in id order."""
CONVERT_HINT = "convert ml-mgie's checkpoints into such a folder with `python -m xmgie_core.mgie convert`"


@dataclass(frozen=True, kw_only=True)
class MGIEMeta:
    """mgie.json: what the loader needs beyond the transformers folders."""

    format: str = FORMAT
    image_token_len: int = 256
    """Number of <im_patch> tokens = CLIP patch tokens ((224 // 14) ** 2 for ViT-L/14)."""
    vision_select_layer: int = -2
    """Which CLIP hidden state feeds the projector (LLaVA v1: the penultimate, CLS dropped)."""
    im_patch_id: int
    im_start_id: int
    im_end_id: int
    img_token_ids: tuple[int, ...]
    """The ids of [IMG0]..[IMG7]."""
    edit_head: dict = field(default_factory=lambda: dict(EDIT_HEAD_DEFAULTS))
    """EditMapper's constructor arguments."""
    sources: dict[str, str] = field(default_factory=dict)
    """Input file -> sha256 (written by the converter)."""

    def __post_init__(self):
        object.__setattr__(self, "img_token_ids", tuple(self.img_token_ids))
        self.validate()

    def validate(self) -> None:
        problems = []
        if self.format != FORMAT:
            problems.append(f"format is {self.format!r}, expected {FORMAT!r}")
        for name in ("image_token_len", "vision_select_layer", "im_patch_id", "im_start_id", "im_end_id"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                problems.append(f"{name} must be an integer, got {value!r}")
        if isinstance(self.image_token_len, int) and self.image_token_len < 1:
            problems.append(f"image_token_len must be at least 1, got {self.image_token_len}")
        if len(self.img_token_ids) != NUM_IMG_TOKENS or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in self.img_token_ids):
            problems.append(f"img_token_ids must be {NUM_IMG_TOKENS} integers, got {list(self.img_token_ids)!r}")
        ids = [self.im_patch_id, self.im_start_id, self.im_end_id, *self.img_token_ids]
        if all(isinstance(i, int) for i in ids) and (len(set(ids)) != len(ids) or min(ids) < 0):
            problems.append(f"the added token ids must be distinct and non-negative, got {ids}")
        if not isinstance(self.edit_head, dict):
            problems.append(f"edit_head must be an object, got {self.edit_head!r}")
        else:
            unknown = sorted(set(self.edit_head) - set(EDIT_HEAD_DEFAULTS))
            if unknown:
                problems.append(f"edit_head has unknown keys {unknown} (known: {sorted(EDIT_HEAD_DEFAULTS)})")
            bad = [k for k, v in self.edit_head.items() if k in EDIT_HEAD_DEFAULTS
                   and (not isinstance(v, int) or isinstance(v, bool) or v < 1)]
            if bad:
                problems.append(f"edit_head values {bad} must be positive integers")
        if not isinstance(self.sources, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in self.sources.items()):
            problems.append("sources must map file names to sha256 strings")
        if problems:
            raise XMGIEInputError(f"Invalid MGIE metadata ({META_FILE}): {'; '.join(problems)}. Re-create the folder: "
                                  f"{CONVERT_HINT}.")

    def edit_head_args(self) -> dict[str, int]:
        """EditMapper's full constructor arguments (missing keys = ml-mgie's defaults)."""
        return {**EDIT_HEAD_DEFAULTS, **self.edit_head}

    def to_json(self) -> str:
        data = asdict(self)
        data["img_token_ids"] = list(self.img_token_ids)
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> MGIEMeta:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise XMGIEInputError(f"{META_FILE} is not valid JSON ({e}). Re-create the folder: {CONVERT_HINT}.") from None
        if not isinstance(data, dict):
            raise XMGIEInputError(f"{META_FILE} must hold a JSON object. Re-create the folder: {CONVERT_HINT}.")
        if data.get("format") != FORMAT:
            raise XMGIEInputError(f"{META_FILE} has format {data.get('format')!r}, but this version of xMGIE reads "
                                  f"{FORMAT!r}. Re-create the folder: {CONVERT_HINT}.")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        required = {"im_patch_id", "im_start_id", "im_end_id", "img_token_ids"}
        missing = sorted(required - set(data))
        if unknown or missing:
            raise XMGIEInputError(f"{META_FILE} " + "; ".join(
                ([f"has unknown keys {unknown}"] if unknown else []) + ([f"lacks {missing}"] if missing else []))
                + f". Re-create the folder: {CONVERT_HINT}.")
        if not isinstance(data["img_token_ids"], list):
            raise XMGIEInputError(f"{META_FILE}: img_token_ids must be a list of {NUM_IMG_TOKENS} integers. "
                                  f"Re-create the folder: {CONVERT_HINT}.")
        return cls(**data)

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, **kwargs: Any) -> MGIEMeta:
        """The added tokens' ids as `tokenizer` assigns them (it must hold all 11 tokens)."""
        ids = token_ids(tokenizer)
        return cls(im_patch_id=ids[IM_PATCH], im_start_id=ids[IM_START], im_end_id=ids[IM_END],
                   img_token_ids=tuple(ids[t] for t in IMG_TOKENS), **kwargs)


def token_ids(tokenizer: Any) -> dict[str, int]:
    """The ids of the 11 added tokens in `tokenizer`; an error names any it lacks."""
    unk = getattr(tokenizer, "unk_token_id", None)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ADDED_TOKENS}
    missing = [t for t, i in ids.items() if i is None or i == unk]
    if missing:
        raise XMGIEInputError(f"The MGIE tokenizer lacks the added tokens {missing}; it needs all of "
                              f"{list(ADDED_TOKENS)}. Re-create the folder: {CONVERT_HINT}.")
    return ids


def check_tokens(tokenizer: Any, meta: MGIEMeta) -> None:
    """The tokenizer's ids for the added tokens must equal those in mgie.json."""
    ids = token_ids(tokenizer)
    expected = {IM_PATCH: meta.im_patch_id, IM_START: meta.im_start_id, IM_END: meta.im_end_id,
                **dict(zip(IMG_TOKENS, meta.img_token_ids))}
    wrong = {t: (ids[t], expected[t]) for t in ADDED_TOKENS if ids[t] != expected[t]}
    if wrong:
        detail = ", ".join(f"{t} is {a} in the tokenizer but {b} in {META_FILE}" for t, (a, b) in wrong.items())
        raise XMGIEInputError(f"The MGIE tokenizer and {META_FILE} disagree: {detail}. Re-create the folder: "
                              f"{CONVERT_HINT}.")
