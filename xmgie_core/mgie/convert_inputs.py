"""The converter's inputs (ml-mgie's release): named tensors read lazily and safely (safetensors, or pickles with
weights_only=True), transformers folders (config, weight shards, tokenizer files), checksums, and the ledger that
accounts for every tensor of every input."""

from __future__ import annotations

import hashlib
import json
import pickle
import sys
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import XMGIEInputError
from ..weight_files import check_pickle, check_safetensors, corrupt, loading

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json")
DOWNLOADS = ("LLaMA-7B (transformers folder), LLaVA-Lightning-7B-delta-v1-1, ml-mgie's mgie_7b/mllm.pt and "
             "mgie_7b/unet.pt, and openai/clip-vit-large-patch14")
RETRY = ("point the option at the original downloaded file or folder (download it again if it is cut short: compare "
         "its size and sha256 with the source's) and run the converter again")


def is_derived(key: str) -> bool:
    """Buffers old transformers versions saved although they follow from the config (recomputed on load)."""
    return key.endswith(".rotary_emb.inv_freq") or key.endswith("position_ids")


def short_list(keys: Iterable[str], limit: int = 12) -> str:
    """The keys sorted, the first `limit` of them, then 'and N more' (for error messages)."""
    keys = sorted(keys)
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_pickled_tensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    """A pickled {name: tensor} file read with torch.load(weights_only=True) (memory-mapped when possible).

    weights_only refuses any pickle that would build objects other than tensors and plain containers, so no code
    from the file ever runs; such a file is an XMGIEInputError.
    """
    check_pickle(path, what, RETRY)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights only" in str(e).lower() or "weights_only" in str(e).lower():
            raise XMGIEInputError(
                f"{path} ({what}) is a pickle that would run code or build objects other than tensors, so it was "
                f"refused (torch.load with weights_only=True: {first}). xMGIE never executes code from model files; "
                f"{RETRY} (the released files hold plain tensors only).") from None
        raise XMGIEInputError(f"{path} ({what}) is not a PyTorch tensor file ({first}); {RETRY}.") from None
    except (RuntimeError, OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise corrupt(path, what, f"it could not be read as a PyTorch tensor file ({type(e).__name__}: {e})",
                      RETRY) from None
    if not isinstance(obj, dict) or not obj:
        raise XMGIEInputError(f"{path} ({what}) holds a {type(obj).__name__}, not a dict of named tensors; {RETRY}.")
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise XMGIEInputError(f"{path} ({what}) holds entries that are not tensors: {short_list(bad)}; {RETRY}.")
    return obj


class TensorSource:
    """The named tensors of one input (one file, or a transformers folder's shards), read lazily."""

    def __init__(self, label: str, files: list[Path]):
        from safetensors import safe_open

        self.label, self.files = label, list(files)
        self._where: dict[str, Any] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        for path in self.files:
            if path.suffix == ".safetensors":
                check_safetensors(path, label, RETRY)
                with loading(path, label, RETRY):
                    handle = safe_open(str(path), framework="pt")
                    names = list(handle.keys())
                    shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in names}
                getter: Any = handle.get_tensor
            else:
                tensors = load_pickled_tensors(path, label)
                names, shapes, getter = list(tensors), {k: tuple(v.shape) for k, v in tensors.items()}, tensors.get
            twice = sorted(set(names) & set(self._where))
            if twice:
                raise XMGIEInputError(f"{label}: the tensors {short_list(twice)} appear in more than one file of "
                                      f"{path.parent}; the folder mixes two downloads. {RETRY[0].upper() + RETRY[1:]}.")
            self._where.update({k: getter for k in names})
            self._shapes.update(shapes)

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def get(self, key: str) -> torch.Tensor:
        return self._where[key](key)


def model_weight_files(folder: Path, option: str) -> tuple[list[Path], Path | None]:
    """(weight files, index file or None) of a transformers folder: safetensors (sharded or not) if present,
    else pickled .bin (sharded or not)."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = folder / index_name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise XMGIEInputError(f"{index} ({option}) is unreadable ({e}); {RETRY}.") from None
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise XMGIEInputError(f"{option} {folder}: the weight shards {short_list(missing)} listed in "
                                      f"{index_name} are missing; the download is incomplete: download them into "
                                      f"{folder}.")
            return [folder / s for s in shards], index
        if (folder / single).is_file():
            return [folder / single], None
    found = sorted(p.name for p in folder.iterdir())
    raise XMGIEInputError(f"{option} {folder} has no model weights (model.safetensors[.index.json] or "
                          f"pytorch_model.bin[.index.json]); it holds {short_list(found) or 'nothing'}. Point {option} "
                          f"at the transformers folder that holds config.json and the weight files.")


def read_config(folder: Path, option: str) -> dict:
    """config.json of the transformers folder an option names, as a dict."""
    if not folder.is_dir():
        raise XMGIEInputError(f"{option} {folder} is not a folder; point {option} at the downloaded transformers "
                              f"folder (the one holding config.json and the weights).")
    path = folder / "config.json"
    if not path.is_file():
        raise XMGIEInputError(f"{option} {folder} has no config.json, so it is not a transformers model folder; "
                              f"point {option} at the folder that holds config.json and the weight files.")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise XMGIEInputError(f"{path} ({option}) is not valid JSON ({e}); {RETRY}.") from None
    if not isinstance(config, dict):
        raise XMGIEInputError(f"{path} ({option}) must hold a JSON object; {RETRY}.")
    return config


def check_file(path: Path, option: str, what: str) -> Path:
    """`path` if it is a file, else an error saying what the option must point at."""
    if not path.is_file():
        raise XMGIEInputError(f"{option} {path} does not exist or is not a file; point {option} at {what}.")
    return path


def tokenizer_files(folder: Path) -> list[Path]:
    """The tokenizer files (TOKENIZER_FILES) the folder holds."""
    return [folder / n for n in TOKENIZER_FILES if (folder / n).is_file()]


def has_tokenizer(folder: Path) -> bool:
    """Whether the folder holds a LLaMA tokenizer (tokenizer.model or tokenizer.json)."""
    return (folder / "tokenizer.model").is_file() or (folder / "tokenizer.json").is_file()


def progress_bar(progress: bool, **kwargs: Any) -> Any:
    """A tqdm bar on stderr (disabled when `progress` is False)."""
    from tqdm import tqdm

    return tqdm(disable=not progress, file=sys.stderr, **kwargs)


def sha256_files(files: dict[str, Path], progress: bool = True) -> dict[str, str]:
    """{name: sha256 hex} of every file, with one progress bar over all bytes."""
    out = {}
    with progress_bar(progress, total=sum(p.stat().st_size for p in files.values()), unit="B", unit_scale=True,
              unit_divisor=1024, desc="sha256 of the inputs") as bar:
        for name, path in files.items():
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(1 << 23):
                    digest.update(chunk)
                    bar.update(len(chunk))
            out[name] = digest.hexdigest()
    return out


class Ledger:
    """Which tensors of each input were used; anything left over is an error listing it."""

    def __init__(self) -> None:
        self.inputs: dict[str, tuple[set[str], set[str]]] = {}

    def add(self, label: str, keys: Iterable[str]) -> None:
        self.inputs[label] = (set(keys), set())

    def use(self, label: str, *keys: str) -> None:
        self.inputs[label][1].update(keys)

    def check(self) -> None:
        left = {label: sorted(all_ - used) for label, (all_, used) in self.inputs.items() if all_ - used}
        if left:
            detail = "; ".join(f"{label}: {short_list(keys)}" for label, keys in left.items())
            raise XMGIEInputError(f"These input tensors would be left unused: {detail}. The inputs are not the ones "
                                  f"MGIE was released with ({DOWNLOADS}); check that each option points at the "
                                  f"right download.")


@dataclass
class Inputs:
    """What the five inputs hold (tensors are read lazily)."""

    llama: Path
    delta: Path
    clip: Path
    files: dict[str, Path]
    """'<input>/<file>' -> path of every file the conversion reads (all are hashed)."""
    base_config: dict
    delta_config: dict
    clip_config: dict
    base: TensorSource
    delta_tensors: TensorSource
    clip_tensors: TensorSource
    mllm: dict[str, torch.Tensor]
    unet: TensorSource
