"""MGIE training data: the JSONL edit records, the teacher-forced sequence (MGIE's prompt + the expressive
instruction + [IMG0]..[IMG7] + EOS), the images for CLIP and the VAE, the dataset and its padded batches."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..errors import XMGIEInputError
from ..image_io import load_image
from ..training import field_error, read_jsonl, resolve
from .llava import MGIE, img_position, mgie_prompt
from .meta import ADDED_TOKENS, CONVERT_HINT

LOGGER = logging.getLogger("xmgie")
IGNORE = -100
FIELDS = ("image", "instruction", "expressive", "target")


@dataclass(frozen=True)
class MGIERecord:
    image: Path
    instruction: str
    expressive: str
    target: Path
    line: int


def parse_record(data: Any, source: Path, line: int) -> MGIERecord:
    """One validated record; relative paths resolve against the JSONL's folder; the files must exist."""
    if not isinstance(data, dict):
        raise XMGIEInputError(f"{source}, line {line}: a record must be a JSON object with the fields "
                              f"{', '.join(FIELDS)}, e.g. {{\"image\": \"in/1.png\", \"instruction\": \"make it "
                              "dusk\", \"expressive\": \"The sky turns orange.\", \"target\": \"out/1.png\"}.")
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise XMGIEInputError(f"{source}, line {line}: unknown fields {unknown}; a record has exactly "
                              f"{', '.join(FIELDS)} (check the spelling).")
    texts = {}
    for name in ("instruction", "expressive"):
        value = data.get(name)
        if not isinstance(value, str) or not value.strip():
            raise field_error(source, line, name, "missing or empty; give a non-empty string")
        found = [t for t in ADDED_TOKENS if t in value]
        if found:
            raise field_error(source, line, name, f"contains MGIE's reserved tokens {found}; remove them (the "
                               "trainer adds [IMG0]..[IMG7] after the expressive instruction itself)")
        texts[name] = value.strip()
    paths = {}
    for name in ("image", "target"):
        value = data.get(name)
        if not isinstance(value, str) or not value.strip():
            raise field_error(source, line, name, "missing or not a path string; give the image file's path "
                               "(relative to the JSONL's folder, or absolute)")
        path = resolve(value, source.parent)
        if not path.is_file():
            raise field_error(source, line, name, f"file not found: {path}")
        paths[name] = path
    return MGIERecord(paths["image"], texts["instruction"], texts["expressive"], paths["target"], line)


def read_mgie_records(path: Path) -> list[MGIERecord]:
    """All records of a JSONL file (blank lines skipped)."""
    return read_jsonl(path, parse_record, "Give a JSONL file with one record per line: {\"image\": ..., "
                      "\"instruction\": ..., \"expressive\": ..., \"target\": ...}.")


def data_digest(records: list[MGIERecord]) -> str:
    """Identifies the training records (texts and file names), so a resume on other data is refused."""
    h = hashlib.sha1()
    for r in records:
        h.update(json.dumps([r.image.name, r.instruction, r.expressive, r.target.name]).encode())
    return f"{len(records)}:{h.hexdigest()}"


@dataclass(frozen=True)
class Sequence:
    ids: list[int]
    """Prompt (with BOS and the <im_patch> run) + response (expressive tokens, [IMG0]..[IMG7], EOS)."""
    labels: list[int]
    """IGNORE on the prompt, the token itself on the response."""
    img_start: int
    """p: the hidden states p..p+7 predict [IMG0]..[IMG7]."""


def _strip_eos(ids: list[int], eos: int | None) -> list[int]:
    return ids[:-1] if ids and eos is not None and ids[-1] == eos else ids


def training_sequence(mgie: MGIE, instruction: str, expressive: str) -> Sequence:
    """The teacher-forced sequence: MGIE's prompt (exactly MGIE.prompt_ids) + the expressive instruction's tokens as
    they follow the prompt's 'ASSISTANT:' (vicuna_v1_1 writes 'ASSISTANT: ' + response) + [IMG0]..[IMG7] + EOS."""
    tok, meta = mgie.tokenizer, mgie.meta
    if tok.eos_token_id is None:
        raise XMGIEInputError(f"The MGIE tokenizer has no EOS token; the response must end in one. Re-create the "
                              f"folder: {CONVERT_HINT}.")
    special = [t for t in tok.all_special_tokens if t and t in expressive]
    if special:
        raise XMGIEInputError(f"the expressive instruction contains the tokenizer's special tokens {special}; "
                              "remove them")
    prompt = _strip_eos(mgie.prompt_ids(instruction)[0].tolist(), tok.eos_token_id)
    text = mgie_prompt(instruction.strip(), meta.image_token_len)
    full = _strip_eos(tok(text + " " + expressive.strip()).input_ids, tok.eos_token_id)
    if full[:len(prompt)] == prompt and len(full) > len(prompt):
        response = full[len(prompt):]
    else:  # the tokenizer merged the prompt's end with the response: tokenize the response on its own
        LOGGER.warning("xMGIE: the MGIE tokenizer does not split 'ASSISTANT:' from the response; tokenizing the "
                     "expressive instruction on its own")
        response = tok(" " + expressive.strip(), add_special_tokens=False).input_ids
    if not response:
        raise XMGIEInputError("the expressive instruction tokenizes to nothing; write a sentence")
    response = list(response) + list(meta.img_token_ids) + [tok.eos_token_id]
    ids = prompt + response
    return Sequence(ids, [IGNORE] * len(prompt) + response, img_position(ids, len(ids), meta.img_token_ids[0]))


def centre_square(image: torch.Tensor) -> torch.Tensor:
    """IMAGE [1,H,W,C] -> its centred square crop (ml-mgie crops to the short side before resizing)."""
    h, w = image.shape[1:3]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return image[:, top:top + side, left:left + side]


def vae_pixels(image: torch.Tensor, resolution: int) -> torch.Tensor:
    """IMAGE [1,H,W,C] in 0..1 -> [3, resolution, resolution] in -1..1 (centre square, antialiased bicubic)."""
    square = centre_square(image)[..., :3].permute(0, 3, 1, 2).float()
    if square.shape[-1] != resolution:
        square = F.interpolate(square, size=(resolution, resolution), mode="bicubic", antialias=True,
                               align_corners=False)
    return (square.clamp(0, 1) * 2 - 1)[0]


class MGIEDataset(Dataset):
    """Records -> {ids, labels, img_start, pixels (CLIP), source and target (VAE, -1..1)}; the sequences are built
    (and checked) up front, the images read per item."""

    def __init__(self, records: list[MGIERecord], mgie: MGIE, resolution: int, source: Path | None = None):
        self.records, self.mgie, self.resolution = list(records), mgie, resolution
        self.sequences = []
        limit = getattr(mgie.llm.config, "max_position_embeddings", None)
        for r in self.records:
            where = f"{source}, line {r.line}" if source else f"record on line {r.line}"
            try:
                seq = training_sequence(mgie, r.instruction, r.expressive)
            except XMGIEInputError as e:
                raise XMGIEInputError(f"{where}, fields 'instruction'/'expressive': {e}") from None
            if limit and len(seq.ids) > limit:
                raise XMGIEInputError(f"{where}, field 'expressive': the prompt and response are {len(seq.ids)} "
                                      f"tokens, more than the LLM's {limit} positions; shorten the expressive "
                                      "instruction.")
            self.sequences.append(seq)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        r, seq = self.records[index], self.sequences[index]
        image, target = (load_image(p)[0] for p in (r.image, r.target))
        square = centre_square(image)
        return {"ids": seq.ids, "labels": seq.labels, "img_start": seq.img_start,
                "pixels": self.mgie.preprocess(square)[0], "source": vae_pixels(image, self.resolution),
                "target": vae_pixels(target, self.resolution)}


def collate(items: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ids (pad_id), labels (IGNORE) and attention mask; stacked images."""
    length = max(len(i["ids"]) for i in items)
    ids = torch.full((len(items), length), pad_id, dtype=torch.long)
    labels = torch.full((len(items), length), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(items), length), dtype=torch.long)
    for b, item in enumerate(items):
        n = len(item["ids"])
        ids[b, :n], labels[b, :n], mask[b, :n] = torch.tensor(item["ids"]), torch.tensor(item["labels"]), 1
    return {"ids": ids, "labels": labels, "attention_mask": mask,
            "img_start": torch.tensor([i["img_start"] for i in items], dtype=torch.long),
            **{k: torch.stack([i[k] for i in items]) for k in ("pixels", "source", "target")}}
