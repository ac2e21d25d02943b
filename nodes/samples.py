"""Put the bundled sample images into ComfyUI's input folder so the bundled workflows run as loaded."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "workflows" / "assets"


def install_samples() -> list[Path]:
    """Copy workflows/assets/xmgie_*.png into ComfyUI's input directory where absent (never overwrites).

    Does nothing outside ComfyUI. Returns the files copied.
    """
    try:
        import folder_paths
    except ImportError:
        return []
    target = Path(folder_paths.get_input_directory())
    copied = []
    for src in sorted(ASSETS.glob("xmgie_*.png")):
        dst = target / src.name
        if not dst.exists():
            target.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
            copied.append(dst)
    if copied:
        logging.info("xMGIE: copied sample images for the bundled workflows into %s: %s", target,
                     ", ".join(p.name for p in copied))
    return copied
