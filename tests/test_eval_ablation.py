"""The ablation switches of the evaluated xMGIE edit (evaluation.editors.XmgieEditor -> apps/edit.py) on tiny
random-weight SD1.5 models: each switches off what it names and changes nothing else (the same region, crop and
settings but the one switched; the same pixels where the technique does not act)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from xmgie_core.apps import edit as de
from xmgie_core.apps.edit import EditSettings
from xmgie_core.evaluation.datasets import ImageRef, Sample
from xmgie_core.apps.evaluate import XmgieEditor
from xmgie_core.hosts.diffusers.models import tiny_sd15

SAMPLE = Sample("astronaut", "give the astronaut a red scarf", ImageRef("astronaut"))
SETTINGS = EditSettings("", steps=2, region_draws=2, working_size=64)


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    return tiny_sd15(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def photo():
    from skimage import data

    rgb = np.asarray(Image.fromarray(data.astronaut()).resize((64, 64), Image.BICUBIC), dtype=np.float32) / 255
    return torch.from_numpy(rgb)[None]


@pytest.fixture(scope="module")
def region():
    m = torch.zeros(1, 64, 64)
    m[:, 28:52, 16:48] = 1
    return m


def run(sd15, photo, region, off=(), **settings):
    from dataclasses import replace

    editor = XmgieEditor(sd15, replace(SETTINGS, **settings), None, off, given_masks="region" not in off)
    return editor.edit(SAMPLE, photo, region)


def differing_settings(a, b) -> set[str]:
    return {k for k in a.report["settings"] if a.report["settings"][k] != b.report["settings"][k]}


@pytest.fixture(scope="module")
def baseline(sd15, photo, region):
    return run(sd15, photo, region)


def test_no_cam_skips_cross_attention_masking_only(sd15, photo, region, baseline, monkeypatch):
    calls = []
    real = de.cross_attention_masking
    monkeypatch.setattr(de, "cross_attention_masking", lambda *a, **k: calls.append(1) or real(*a, **k))
    off = run(sd15, photo, region, ("cam",))
    assert calls == []
    run(sd15, photo, region)
    assert calls, "with CAM on the masking is applied"
    assert differing_settings(off, baseline) == {"cam"}
    assert torch.equal(off.mask, baseline.mask) and off.report["crop"] == baseline.report["crop"]
    assert not torch.equal(off.image, baseline.image), "masking the attention changes the edit"


def test_no_pfb_makes_the_source_branch_irrelevant(sd15, photo, region, baseline, monkeypatch):
    """Another source trajectory (PFB's fixed source noise) changes the edit with PFB, and nothing without it."""
    from xmgie_core.pfb import run as pfb_run

    off = run(sd15, photo, region, ("pfb",))
    monkeypatch.setattr(pfb_run, "SOURCE_NOISE_SEED", 1234)
    off_other_source = run(sd15, photo, region, ("pfb",))
    on_other_source = run(sd15, photo, region)
    assert torch.equal(off.image, off_other_source.image), "without PFB the source branch must not reach the edit"
    assert not torch.equal(baseline.image, on_other_source.image), "with PFB the source branch shapes the edit"
    assert not torch.equal(off.image, baseline.image)
    assert differing_settings(off, baseline) == {"pfb"} and off.report["crop"] == baseline.report["crop"]


def test_no_gb_pastes_the_region_with_a_hard_edge(sd15, photo, region, baseline, monkeypatch):
    stitched = []
    real = de.gb.gb_composite
    monkeypatch.setattr(de.gb, "gb_composite", lambda edited, *a, **k: stitched.append(edited) or real(edited, *a, **k))
    off = run(sd15, photo, region, ("gb",))
    hard = torch.where(region[..., None] >= 0.5, stitched[0], photo)
    assert torch.equal(off.image, hard)
    assert not torch.equal(baseline.image, hard), "GB blends the border"
    assert differing_settings(off, baseline) == {"edge_width"}
    outside = region[0] < 0.5
    assert torch.equal(off.image[0][outside], photo[0][outside])


def test_no_region_edits_the_whole_photo(sd15, photo, region, baseline):
    off = run(sd15, photo, region, ("region",))
    assert bool((off.mask == 1).all())
    assert tuple(off.report["crop"]["box"]) == (0, 0, 64, 64)
    corner = (slice(0, 8), slice(0, 8))
    assert torch.equal(baseline.image[0][corner], photo[0][corner])
    assert not torch.equal(off.image[0][corner], photo[0][corner]), "without a region the far corner is edited too"
    assert differing_settings(off, baseline) == set()
