"""Paths users give for model folders and files: symlinks resolved once, a symlink loop named as such."""

from __future__ import annotations

from pathlib import Path

from .errors import XMGIEInputError


def real_path(path: Path | str, what: str = "Model folder") -> Path:
    """`path` with `~` expanded and every symlink resolved (what model caches key on). A missing path is returned
    as it is (the caller's check says what belongs there); a symlink loop is an error naming the path."""
    path = Path(path).expanduser()
    try:
        return path.resolve()
    except (RuntimeError, OSError) as e:  # Python < 3.13: RuntimeError("Symlink loop ..."); later: OSError ELOOP
        raise XMGIEInputError(f"{what} {path} is a symlink loop (a link that leads back to itself, directly or "
                              f"through other links: {e}). Point the link at the real model folder, or give that "
                              "folder's path instead.") from None
