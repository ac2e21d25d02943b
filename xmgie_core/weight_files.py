"""Model files checked before they are loaded, the one guard every loader of the pack uses.

A partly downloaded, truncated or corrupt weight file (or a text / HTML page / git-lfs pointer saved under a weight
file's name) is an XMGIEInputError that names the file, says it looks truncated or corrupt and what to do, never a raw
SafetensorError, KeyError or chained UnicodeDecodeError -> OSError from the libraries.

The checks are cheap (headers and sizes, not the tensors):
  * safetensors: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets: [b, e]},
    "__metadata__": {...}}, then the data buffer, whose length must equal the largest end offset e; so
    size = 8 + N + max(e) exactly (a cut file is shorter).
  * PyTorch pickles (.pt, .bin, .pth, .ckpt): a zip archive (torch.save's format) or a pickle stream (first byte 0x80).
  * JSON files of a model folder (configs, tokenizer) must parse.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from .errors import XMGIEInputError

FIX = ("download or copy it again, and compare its size and sha256 (`sha256sum FILE`) with those the source lists")
MAX_HEADER = 100 * 1024 * 1024
"""safetensors' own limit on the JSON header."""


def corrupt(path: Path, what: str, problem: str, fix: str = FIX) -> XMGIEInputError:
    """The error for a damaged model file: which file, what is wrong, what to do."""
    return XMGIEInputError(f"{path} ({what}) looks truncated or corrupt: {problem}. Replace the file: {fix}.")


def _content(start: bytes) -> str | None:
    """What a file that is not a weight file holds, judged from its first bytes; None if it looks binary."""
    text = start.lstrip()
    if text.startswith(b"version https://git-lfs"):
        return "a git-lfs pointer, not the weights (fetch them with `git lfs pull`)"
    if text[:15].lower().startswith((b"<!doctype html", b"<html")):
        return "an HTML page (a download that saved an error or login page)"
    try:
        decoded = start.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if decoded and all(c.isprintable() or c in "\r\n\t" for c in decoded):
        return f"text ({decoded[:40].strip()!r} ...), not model weights"
    return None


def _size_and_head(path: Path, what: str, fix: str = FIX) -> tuple[int, bytes]:
    """The file's size and first 64 bytes; an unreadable file (a broken link, no permission) is an error."""
    try:
        with open(path, "rb") as f:
            return path.stat().st_size, f.read(64)
    except OSError as e:
        raise XMGIEInputError(f"{path} ({what}) cannot be read ({e.strerror or e}); {fix}.") from None


def check_safetensors(path: Path, what: str, fix: str = FIX) -> None:
    """A whole safetensors file: a JSON header whose tensors exactly cover the rest of the file (module docstring)."""
    path = Path(path)
    size, start = _size_and_head(path, what, fix)
    if size < 8:
        raise corrupt(path, what, f"it is {size} bytes long, shorter than a safetensors header", fix)
    length = int.from_bytes(start[:8], "little")
    if length > min(size - 8, MAX_HEADER):
        content = _content(start)
        raise corrupt(path, what, f"it holds {content}" if content else
                      f"its header claims {length} bytes but the file has {size}; it is cut short or not a "
                      f"safetensors file", fix)
    with open(path, "rb") as f:
        f.seek(8)
        raw = f.read(length)
    try:
        header = json.loads(raw)
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        raise corrupt(path, what, "its header is not a safetensors header", fix) from None
    expected = 8 + length + max(ends, default=0)
    if size < expected:
        raise corrupt(path, what, f"it has {size} bytes but its header describes {expected} ({expected - size} "
                                  f"missing: the download or copy stopped early)", fix)
    if size > expected:
        raise corrupt(path, what, f"it has {size - expected} bytes more than its header describes ({expected})", fix)


def check_pickle(path: Path, what: str, fix: str = FIX) -> None:
    """A PyTorch pickle: a complete zip archive (torch.save) or a legacy pickle stream."""
    path = Path(path)
    size, start = _size_and_head(path, what, fix)
    if not start:
        raise corrupt(path, what, "it is empty (0 bytes)", fix)
    if start.startswith(b"PK\x03\x04"):
        if not zipfile.is_zipfile(path):
            raise corrupt(path, what, f"it is a zip archive (torch.save's format) without its end; {size} bytes were"
                                      " written before it stopped", fix)
        return
    if start[:1] != b"\x80":
        content = _content(start)
        raise corrupt(path, what, f"it holds {content}" if content else
                      "it is neither a zip archive (torch.save) nor a pickle, so it is not a PyTorch checkpoint", fix)


def check_json(path: Path, what: str) -> None:
    try:
        json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise corrupt(path, what, f"it is not valid JSON ({e})") from None


def check_model_folder(folder: Path, what: str) -> None:
    """Every *.safetensors and *.json file of a model folder and of its direct subfolders (a diffusers pipeline's
    unet/, vae/, ...; an MGIE folder's vision/); pickled weights are not loaded by the pack, so not checked."""
    folder = Path(folder)
    for pattern in ("*.safetensors", "*/*.safetensors"):
        for path in sorted(folder.glob(pattern)):
            check_safetensors(path, what)
    for pattern in ("*.json", "*/*.json"):
        for path in sorted(folder.glob(pattern)):
            check_json(path, what)


PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def missing_safetensors(directory: Path, names: set[str]) -> str | None:
    """None when `directory` (whose file names are `names`) holds a transformers model's safetensors weights:
    model.safetensors, or an index with all its shards; else what is missing, naming pickled weights found instead
    (the pack never unpickles weights: that can run code)."""
    if "model.safetensors.index.json" in names:
        try:
            shards = set(json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            return f"a readable model.safetensors.index.json ({e})"
        absent = sorted(shards - names)
        return f"the weight shards {absent} listed in model.safetensors.index.json" if absent else None
    if "model.safetensors" in names:
        return None
    pickled = sorted(name for name in names if name.endswith(PICKLED))
    return "model.safetensors" + (f" (found only {', '.join(pickled)}: pickled weights, which xMGIE never loads "
                                  "because unpickling can run code; download the safetensors version of the model, or "
                                  "convert the file to safetensors)" if pickled else "")


LOAD_ERRORS = (OSError, EOFError, UnicodeDecodeError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile)


@contextmanager
def loading(path: Path, what: str, fix: str = FIX) -> Iterator[None]:
    """Turn what a library raises while loading `path` into an XMGIEInputError naming it (the checks above catch
    the usual damage first; this is the net for the rest). XMGIEInputError passes through unchanged."""
    from safetensors import SafetensorError

    try:
        yield
    except XMGIEInputError:
        raise
    except (SafetensorError, *LOAD_ERRORS) as e:
        detail = " ".join(str(e).split())[:300] or type(e).__name__
        raise XMGIEInputError(f"{path} ({what}) could not be loaded ({type(e).__name__}: {detail}). If it was "
                              f"downloaded or copied it may be incomplete or corrupt: {fix}.") from None


def read_safetensors(path: Path, what: str, fix: str = FIX) -> dict[str, torch.Tensor]:
    """All tensors of a checked safetensors file (on the CPU)."""
    from safetensors.torch import load_file

    check_safetensors(path, what, fix)
    with loading(path, what, fix):
        return load_file(str(path))


def safetensors_metadata(path: Path, what: str, fix: str = FIX) -> dict[str, str]:
    """The header metadata of a checked safetensors file (no tensors read)."""
    from safetensors import safe_open

    check_safetensors(path, what, fix)
    with loading(path, what, fix), safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}
