"""Model folders under ComfyUI/models/ that the pack reads (registered with folder_paths), and name resolution."""

from __future__ import annotations

import os
from pathlib import Path

from ..xmgie_core.errors import XMGIEInputError
from ..xmgie_core.paths import real_path

PACK_FOLDERS = ("LLM", "insightface", "xmgie", "clipseg", "clip_metrics")
"""Folders ComfyUI does not define itself; text_encoders and clip_vision are ComfyUI's own."""


def register_model_folders() -> None:
    """Add ComfyUI/models/<name> for each of PACK_FOLDERS, when inside ComfyUI."""
    try:
        import folder_paths
    except ImportError:
        return
    for name in PACK_FOLDERS:
        folder_paths.add_model_folder_path(name, os.path.join(folder_paths.models_dir, name))


def roots(kinds: tuple[str, ...]) -> list[Path]:
    """The registered directories of each folder kind (none outside ComfyUI)."""
    try:
        import folder_paths
    except ImportError:
        return []
    found = []
    for kind in kinds:
        try:
            found.extend(Path(p) for p in folder_paths.get_folder_paths(kind))
        except KeyError:
            continue
    return found


def model_folder_names(kind: str) -> list[str]:
    """The sub-folders of ComfyUI's models/<kind> folders, sorted (a model per folder; empty outside ComfyUI)."""
    return sorted({p.name for root in roots((kind,)) if root.is_dir() for p in root.iterdir() if p.is_dir()})


def find_model_folder(name: str, kinds: tuple[str, ...], what: str, example: str) -> Path:
    """A model folder: an absolute path, or a folder name under one of ComfyUI's models/<kind> folders. A name never
    leaves those folders ('..' is refused), so an API client of a shared server cannot probe other folders by name;
    a symlink loop is an error naming it."""
    places = " or ".join(f"ComfyUI/models/{k}/" for k in kinds)
    if not name.strip():
        raise XMGIEInputError(f"{what} needs a model folder: the name of a folder under {places} (e.g. {example}) "
                              "or an absolute path.")
    path = Path(name.strip()).expanduser()
    if path.is_absolute():
        return real_path(path, what + ": the model folder")
    if ".." in path.parts:
        raise XMGIEInputError(f"Model folder {name!r} climbs out of the model folders ('..'): names are looked up "
                              f"inside {places} only. Give the folder's name there (e.g. {example}), or an absolute "
                              "path.")
    searched = roots(kinds)
    for root in searched:
        if (root / path).is_dir():
            return real_path(root / path, what + ": the model folder")
        real_path(root / path, what + ": the model folder")  # a symlink loop is named, not "not found"
    looked = ", ".join(str(r) for r in searched) or f"no {places} (not running inside ComfyUI)"
    raise XMGIEInputError(f"Model folder {name!r} not found; looked in: {looked}. Put the model's folder there "
                          f"(e.g. {places}{example}/).")


def model_file_names(kind: str) -> list[str]:
    """Files ComfyUI lists in models/<kind> (empty outside ComfyUI)."""
    try:
        import folder_paths
    except ImportError:
        return []
    return folder_paths.get_filename_list(kind)


def find_model_file(name: str, kind: str, what: str) -> Path:
    """A file of models/<kind> by its listed name; the error says where to put it."""
    try:
        import folder_paths
    except ImportError:
        path = Path(name).expanduser()
        if path.is_file():
            return path
        raise XMGIEInputError(f"{what} {name!r} not found (outside ComfyUI give an absolute path).") from None
    path = folder_paths.get_full_path(kind, name) if name else None
    if not path:
        raise XMGIEInputError(f"{what} {name!r} not found in ComfyUI/models/{kind}/. Put the .safetensors file there "
                              "and refresh the node (press R), then choose it.")
    return Path(path)
