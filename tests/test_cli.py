"""The headless CLI on the bundled sample (the README's main job)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from xmgie_core.apps.cli import main

ASSETS = Path(__file__).resolve().parent.parent / "workflows" / "assets"


def test_gb_cli_composites_the_sample(tmp_path):
    src_path, edit_path = ASSETS / "xmgie_astronaut_source.png", ASSETS / "xmgie_astronaut_edit.png"
    assert main(["gb", "--source", str(src_path), "--edited", str(edit_path), "--out", str(tmp_path)]) == 0
    out = np.asarray(Image.open(tmp_path / "xmgie_gb.png").convert("RGB"))
    src = np.asarray(Image.open(src_path).convert("RGB"))
    edit = Image.open(edit_path)
    region = np.asarray(edit.getchannel("A")) < 128
    from scipy import ndimage

    far = ndimage.distance_transform_edt(~region) > 16
    assert np.array_equal(out[far], src[far])
    deep = ndimage.distance_transform_edt(region) > 16
    assert np.array_equal(out[deep], np.asarray(edit.convert("RGB"))[deep])
    assert (tmp_path / "xmgie_gb_blend_mask.png").is_file()


def test_gb_cli_reports_user_errors(tmp_path, capsys):
    assert main(["gb", "--edited", str(ASSETS / "xmgie_astronaut_source.png"), "--out", str(tmp_path)]) == 2
    assert "no alpha channel" in capsys.readouterr().err
    assert main(["gb", "--edited", str(tmp_path / "missing.png"), "--out", str(tmp_path)]) == 2
    assert "not found" in capsys.readouterr().err
