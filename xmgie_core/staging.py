"""Outputs written beside their final place and swapped in at the end, so that a failure or Ctrl-C half way leaves
the previous files exactly as they were and no partial files behind."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import XMGIEInputError


def overlap(a: Path, b: Path) -> bool:
    """Whether two paths are the same or one lies inside the other (resolved: links and `..` followed)."""
    a, b = Path(a).expanduser().resolve(), Path(b).expanduser().resolve()
    return a == b or a in b.parents or b in a.parents


def _missing_parents(path: Path) -> list[Path]:
    """The ancestors of `path` that do not exist yet."""
    return [p for p in Path(path).parents if not p.exists()]


@contextmanager
def staged(targets: list[Path]) -> Iterator[list[Path]]:
    """Yield a staging path for each target (in a new hidden folder beside it); write the outputs there.

    On a normal exit every target is swapped in: an existing target is moved aside, the new one renamed into its
    place, and the old ones deleted only once all are in place (a target the body did not write is removed: it is
    replaced by nothing). On any exception, Ctrl-C included, the staging folders go and the targets stay untouched.
    Creating the staging folders is the write check: an unwritable place is an XMGIEInputError before any work.
    """
    targets = [Path(t).expanduser().absolute() for t in targets]
    created = sorted({p for t in targets for p in _missing_parents(t)}, key=lambda p: len(p.parts))
    stages: list[Path] = []
    try:
        for target in targets:
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                stages.append(Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial",
                                                    dir=target.parent)))
            except OSError as e:
                raise XMGIEInputError(f"The output {target} cannot be written ({e.strerror or e}). Choose a place "
                                      "you can write to.") from None
        yield [stage / target.name for stage, target in zip(stages, targets)]
        _swap(targets, stages)
    except BaseException:
        for stage in stages:
            shutil.rmtree(stage, ignore_errors=True)
        for folder in reversed(created):
            try:
                folder.rmdir()
            except OSError:
                break
        raise
    for stage in stages:
        shutil.rmtree(stage, ignore_errors=True)


def _swap(targets: list[Path], stages: list[Path]) -> None:
    """Move each target aside into its stage and the staged output into its place; undo it all if a move fails."""
    done: list[tuple[Path, Path, bool]] = []
    try:
        for target, stage in zip(targets, stages):
            old, new = stage / (target.name + ".old"), stage / target.name
            had_old = os.path.lexists(target)
            if had_old:
                os.replace(target, old)
            done.append((target, old, had_old))
            if os.path.lexists(new):
                os.replace(new, target)
    except BaseException:
        for target, old, had_old in reversed(done):
            if os.path.lexists(target) and os.path.lexists(old) or not had_old and os.path.lexists(target):
                os.replace(target, old.with_name(target.name + ".new"))
            if had_old:
                os.replace(old, target)
        raise
