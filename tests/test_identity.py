"""Identity ([xMGIE] §3.5, §4.2) on real faces with dlib's weights from PyPI: IPS of the astronaut against
itself, crops, flips, blur and JPEG of it, and against another real person; no face; batches, greyscale and RGBA;
face indices and masks; face matching; and the insightface loader's diagnostics on ONNX models built here."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from skimage import data

from xmgie_core.errors import XMGIEInputError
from xmgie_core.identity.backends import Dlib, InsightFace, insightface_folder, onnx_role
from xmgie_core.identity.faces import (Face, embed_images, face_mask, ips_report, match_faces, normalise,
                                       same_person_threshold)


@pytest.fixture(scope="module")
def dlib_backend():
    return Dlib()


def tensor(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(rgb).astype(np.float32) / 255.0)[None]


def pil(t: torch.Tensor) -> Image.Image:
    return Image.fromarray((t[0].numpy() * 255).round().astype(np.uint8))


def jpeg(t: torch.Tensor, quality: int) -> torch.Tensor:
    buffer = io.BytesIO()
    pil(t).save(buffer, "JPEG", quality=quality)
    return tensor(Image.open(buffer))


ASTRONAUT = tensor(data.astronaut())


def grace_hopper() -> torch.Tensor:
    import matplotlib

    return tensor(Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg").convert("RGB"))


@pytest.fixture(scope="module")
def source(dlib_backend):
    return embed_images(dlib_backend, ASTRONAUT)


VARIANTS = {
    "JPEG q40": lambda t: jpeg(t, 40),
    "mirrored": lambda t: t.flip(2),
    "blur 1.5 px": lambda t: tensor(pil(t).filter(ImageFilter.GaussianBlur(1.5))),
    "crop around the face": lambda t: t[:, 20:300, 100:380],
    "half size": lambda t: tensor(pil(t).resize((256, 256), Image.LANCZOS)),
}


def test_ips_of_the_same_image_is_one(dlib_backend, source):
    (value,), report = ips_report(source, embed_images(dlib_backend, ASTRONAUT))
    assert value == pytest.approx(1.0, abs=1e-6) and "same person" in report


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_mild_changes_keep_the_identity(dlib_backend, source, variant):
    (value,), _ = ips_report(source, embed_images(dlib_backend, VARIANTS[variant](ASTRONAUT)))
    print(f"IPS astronaut vs {variant}: {value:.4f}")
    assert value >= 0.9 and value >= same_person_threshold("dlib")


def test_another_person_scores_low(dlib_backend, source):
    (other,), report = ips_report(source, embed_images(dlib_backend, grace_hopper()))
    worst_variant = min(ips_report(source, embed_images(dlib_backend, f(ASTRONAUT)))[0][0] for f in VARIANTS.values())
    print(f"IPS astronaut vs Grace Hopper: {other:.4f} (lowest same-person variant {worst_variant:.4f})")
    assert other < same_person_threshold("dlib") < worst_variant and "another person" in report


def test_no_face(dlib_backend):
    cat = tensor(data.chelsea())
    with pytest.raises(XMGIEInputError, match=r"No face found in image 0 .*turn on pass_through"):
        embed_images(dlib_backend, cat)
    empty = embed_images(dlib_backend, cat, pass_through=True)
    assert empty.empty and empty.notes == ["image 0: no face found"]
    with pytest.raises(XMGIEInputError, match="source ID_EMBED has no faces"):
        ips_report(empty, empty)
    tiny = tensor(pil(ASTRONAUT).resize((48, 48)))  # a face of about 8 px: too small to find
    with pytest.raises(XMGIEInputError, match="at least ~40 px wide"):
        embed_images(dlib_backend, tiny)


def test_batches_greyscale_rgba_and_a_lost_face(dlib_backend, source):
    grey = ASTRONAUT.mean(dim=-1, keepdim=True)
    rgba = torch.cat([ASTRONAUT, torch.ones_like(ASTRONAUT[..., :1])], dim=-1)
    batch = torch.cat([ASTRONAUT, grey.expand_as(ASTRONAUT)])
    embed = embed_images(dlib_backend, batch)
    assert len(embed.faces) == 2 and all(len(f) == 1 for f in embed.faces)
    assert len(embed_images(dlib_backend, grey).faces[0]) == 1 and len(embed_images(dlib_backend, rgba).faces[0]) == 1
    edited = torch.cat([ASTRONAUT, torch.zeros_like(ASTRONAUT)])  # the second edit lost the face
    values, report = ips_report(source, embed_images(dlib_backend, edited, pass_through=True))
    assert values[0] == pytest.approx(1.0, abs=1e-6) and values[1] == 0.0 and "not found in the edit" in report


def _face(x, y, size=40, seed=0):
    v = normalise(np.random.default_rng(seed).normal(size=8))
    return Face((x, y, x + size, y + size), np.array([[x + 10, y + 15], [x + 30, y + 15], [x + 20, y + 25]],
                                                     np.float32), 1.0, v)


def test_matching_by_place_then_by_look():
    a, b = _face(0, 0, seed=1), _face(100, 0, seed=2)
    moved_b = Face((300, 300, 340, 340), b.landmarks, 1.0, b.embedding)
    scores = match_faces([a, b], [moved_b, a])
    assert [(s.source, s.edited) for s in scores] == [(0, 1), (1, 0)]  # a by place, b by look
    assert [round(s.ips, 6) for s in scores] == [1.0, 1.0]
    lost = match_faces([a, b], [a])
    assert lost[1].edited is None and lost[1].ips == 0.0


def test_face_index_orders_by_size():
    small, large = _face(0, 0, 20), _face(50, 50, 60)
    from xmgie_core.identity.faces import by_size, pick

    assert pick(by_size([small, large]), 0) == [large] and pick(by_size([small, large]), 1) == [small]
    with pytest.raises(XMGIEInputError, match="face_index 2 .* 2 face\\(s\\) were found"):
        pick([small, large], 2)


def test_face_mask_geometry():
    face = _face(40, 40, 40)
    hard = face_mask([face], 128, 128, feather=0)
    assert hard[60, 60] == 1 and hard[5, 5] == 0 and hard[60, 120] == 0
    assert set(hard.unique().tolist()) == {0.0, 1.0}
    soft = face_mask([face], 128, 128, feather=4)
    assert 0 < float(soft[60, 36]) < 1 and float(soft[60, 60]) == pytest.approx(1.0, abs=1e-3)
    tilted = Face(face.box, np.array([[45, 45], [75, 75]], np.float32), 1.0, face.embedding)
    assert not torch.equal(face_mask([tilted], 128, 128, 0), face_mask([Face(face.box, np.array(
        [[45, 60], [75, 60]], np.float32), 1.0, face.embedding)], 128, 128, 0))  # turned with the eye line
    assert not face_mask([], 64, 64).any()


# ---------------------------------------------------------------------------- insightface without its weights

def _det_onnx(path: Path) -> None:
    """A model with SCRFD's signature as insightface's router reads it: image input, 9 outputs."""
    import onnx
    from onnx import TensorProto, helper

    inp = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, None, None])
    nodes = [helper.make_node("ReduceMean", ["input.1"], [f"o{i}"], keepdims=1) for i in range(9)]
    outs = [helper.make_tensor_value_info(f"o{i}", TensorProto.FLOAT, None) for i in range(9)]
    onnx.save(helper.make_model(helper.make_graph(nodes, "det", [inp], outs),
                                opset_imports=[helper.make_opsetid("", 17)]), str(path))


def _rec_onnx(path: Path) -> None:
    """A model with ArcFace's signature: 112x112 input, 512-d output."""
    import onnx
    from onnx import TensorProto, helper

    inp = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, 112, 112])
    out = helper.make_tensor_value_info("683", TensorProto.FLOAT, [1, 512])
    w = helper.make_tensor("w", TensorProto.FLOAT, [3, 512], [0.01] * 1536)
    nodes = [helper.make_node("GlobalAveragePool", ["input.1"], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("MatMul", ["f", "w"], ["683"])]
    onnx.save(helper.make_model(helper.make_graph(nodes, "rec", [inp], [out], initializer=[w]),
                                opset_imports=[helper.make_opsetid("", 17)]), str(path))


def _pack(folder: Path, det: bool = True, rec: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if det:
        _det_onnx(folder / "scrfd_10g_bnkps.onnx")
    if rec:
        _rec_onnx(folder / "glintr100.onnx")


def test_insightface_loads_a_well_placed_pack(tmp_path):
    _pack(tmp_path / "models" / "antelopev2")
    assert {onnx_role(p) for p in (tmp_path / "models" / "antelopev2").glob("*.onnx")} == {"detection", "recognition"}
    backend = InsightFace(tmp_path, "antelopev2")
    assert set(backend.app.models) == {"detection", "recognition"} and backend.name == "insightface:antelopev2"


@pytest.mark.parametrize("layout, message", [
    ("missing", "pack 'antelopev2' was not found: no folder .*models/antelopev2. Download it"),
    ("zip", "is still a zip: .*antelopev2.zip. Extract it; the .onnx files belong directly in"),
    ("nested", "nested one level too deep .*antelopev2/antelopev2\\): move its .onnx files up"),
    ("too high", "one level too high: move that folder into"),
    ("no detection", "has no face detection model among glintr100.onnx; the pack is incomplete"),
    ("no recognition", "has no face recognition model among scrfd_10g_bnkps.onnx"),
    ("empty", "holds no .onnx model files"),
])
def test_insightface_diagnostics(tmp_path, layout, message):
    folder = tmp_path / "models" / "antelopev2"
    if layout == "zip":
        (tmp_path / "models").mkdir()
        (tmp_path / "models" / "antelopev2.zip").write_bytes(b"PK")
    elif layout == "nested":
        _pack(folder / "antelopev2")
    elif layout == "too high":
        _pack(tmp_path / "antelopev2")
    elif layout == "no detection":
        _pack(folder, det=False)
    elif layout == "no recognition":
        _pack(folder, rec=False)
    elif layout == "empty":
        folder.mkdir(parents=True)
    with pytest.raises(XMGIEInputError, match=message):
        insightface_folder(tmp_path, "antelopev2")


def test_identity_nodes(pack):
    embedder = pack.NODE_CLASS_MAPPINGS["XMGIEIDEmbedder"]()
    embed, mask = embedder.embed(ASTRONAUT, "dlib", 0, 8.0, False)
    assert mask.shape == (1, 512, 512) and float(mask.max()) == pytest.approx(1.0, abs=1e-3)
    x1, y1, x2, y2 = (int(v) for v in embed.faces[0][0].box)
    assert float(mask[0, (y1 + y2) // 2, (x1 + x2) // 2]) > 0.99 and float(mask[0, 500, 10]) == 0.0
    scorer = pack.NODE_CLASS_MAPPINGS["XMGIEIdentityScore"]()
    shown = scorer.score(embed, torch.cat([ASTRONAUT, jpeg(ASTRONAUT, 40)]))
    values, report = shown["result"]
    assert shown["ui"] == {"text": [report]}
    assert len(values) == 2 and values[0] == pytest.approx(1.0, abs=1e-6) and values[1] > 0.9
    assert "image 1: IPS" in report
    with pytest.raises(ValueError, match="dlib backend"):  # outside ComfyUI, or no pack in its models folder
        embedder.embed(ASTRONAUT, "insightface: antelopev2", -1, 8.0, False)
    with pytest.raises(ValueError, match="Unknown backend"):
        embedder.embed(ASTRONAUT, "facenet", -1, 8.0, False)


# ---------------------------------------------------------------------------- protection inside PFB

def test_protected_mask_takes_overlapped_faces_out_of_the_edit():
    from xmgie_core.identity.faces import IdEmbed
    from xmgie_core.identity.protect import protected_mask, rank_by_ips

    face = _face(24, 24, 80)
    embed = IdEmbed([[face]], (128, 128), "dlib")
    scarf = torch.zeros(1, 128, 128)
    scarf[:, 60:128, 0:128] = 1  # overlaps the face's lower part (less than half of it)
    out, notes = protected_mask(scarf, embed, 1.0)
    core = (face_mask([face], 128, 128) > 1 - 1e-5) & scarf[0].bool()  # the face inside its feathered edge
    assert core.any() and not out[0][core].any() and "protected" in notes[0]
    far = scarf[0].bool() & (face_mask([face], 128, 128, feather=12) == 0)
    assert torch.equal(out[0][far], scarf[0][far])  # away from the face the edit region is unchanged
    half, _ = protected_mask(scarf, embed, 0.5)
    assert torch.allclose(half[0][core], torch.full_like(half[0][core], 0.5))
    assert torch.equal(protected_mask(scarf, embed, 0.0)[0], scarf)
    whole_face = torch.zeros(1, 128, 128)
    whole_face[:, 0:128, 10:118] = 1  # the edit targets the face: it is edited
    out, notes = protected_mask(whole_face, embed, 1.0)
    assert torch.equal(out, whole_face) and "edited, not protected" in notes[0]
    with pytest.raises(XMGIEInputError, match="made from a 128x128 image but the mask is 64x128"):
        protected_mask(torch.ones(1, 64, 128), embed, 1.0)
    with pytest.raises(XMGIEInputError, match="face_protection must be between 0 and 1"):
        protected_mask(scarf, embed, 1.5)
    assert rank_by_ips([0.2, 0.9, 0.5, 0.9]) == [1, 3, 2, 0]


def test_protection_strength_one_keeps_the_face_the_source_in_pfb(tiny_unet):
    """On the tiny diffusers pipeline (latent 16x16 for a 128x128 image): with the latent blended to the end, the
    latent cells of a protected face inside the edit region are the source exactly; unprotected, they change."""
    from xmgie_core.hosts.diffusers_pfb import pfb_edit
    from xmgie_core.identity.faces import IdEmbed
    from xmgie_core.identity.protect import protected_mask
    from xmgie_core.pfb import PFBSettings

    face = _face(16, 16, 96)
    edit = torch.zeros(1, 128, 128)
    edit[:, 64:128, :] = 1  # 37% of the face
    protected, _ = protected_mask(edit, IdEmbed([[face]], (128, 128), "dlib"), 1.0)
    g = torch.Generator().manual_seed(3)
    z, cond, uncond, src = torch.randn(1, 4, 16, 16, generator=g), *(torch.randn(1, 8, 32, generator=g) for _ in range(3))
    cells = (torch.nn.functional.adaptive_avg_pool2d((face_mask([face], 128, 128) > 1 - 1e-5).float()[None], 16)[0]
             == 1) & \
        (torch.nn.functional.adaptive_avg_pool2d(edit, 16)[0] == 1)
    assert cells.any()
    from diffusers import DDIMScheduler

    runs = {name: pfb_edit(tiny_unet, DDIMScheduler(clip_sample=False), z, cond, uncond, src,
                           PFBSettings(mask, latent_end=1.0), steps=4, generator=torch.Generator().manual_seed(1))
            for name, mask in (("protected", protected), ("plain", edit))}
    assert torch.equal(runs["protected"][..., cells], z[..., cells])
    assert not torch.equal(runs["plain"][..., cells], z[..., cells])
