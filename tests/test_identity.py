"""Identity ([xMGIE] §3.5, §4.2) on real faces with dlib's weights from PyPI (tests/fixtures/portraits.py):
IPS of the astronaut against itself and changed copies, against other real people; faces still there after a
perturbation are found; a false detection, a replaced or swapped face, a small face in a large photo; masks that
cover the chin; batches, greyscale and RGBA; face indices and wording; matching by place, then look; and the
insightface loader's diagnostics and pack list on ONNX models built here."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from skimage import data

from fixtures.portraits import (PERTURBATIONS, grace_hopper, group, in_large_photo, paste, side_by_side,
                                tom_hanks)
from xmgie_core.errors import XMGIEInputError
from xmgie_core.identity.backends import (NON_COMMERCIAL, Dlib, InsightFace, insightface_choices, insightface_folder,
                                          insightface_pack, onnx_role)
from xmgie_core.identity.faces import Face, IdEmbed, embed_images, find_faces, normalise
from xmgie_core.identity.masks import face_mask
from xmgie_core.identity.scoring import match_faces, same_person_threshold, score_images


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
DLIB = same_person_threshold("dlib")


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
    (value,), report = score_images(dlib_backend, source, ASTRONAUT)
    assert value == pytest.approx(1.0, abs=1e-6)
    assert report == f"image 0: IPS 1.000; face 0: same person: 1.000, threshold {DLIB:.2f} [dlib]"


def test_the_embedding_is_dlibs_own(dlib_backend, source):
    """dlib's face_recognition_model_v1 on its 5-point shape of the face's box: the ID Embedder adds nothing."""
    import dlib

    rgb = data.astronaut()
    rect = dlib.rectangle(*(int(round(v)) for v in source.faces[0][0].box))
    own = np.array(dlib_backend.embedder.compute_face_descriptor(rgb, dlib_backend.shape5(rgb, rect)))
    assert np.allclose(source.faces[0][0].embedding, own / np.linalg.norm(own), atol=1e-6)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_mild_changes_keep_the_identity(dlib_backend, source, variant):
    (value,), _ = score_images(dlib_backend, source, VARIANTS[variant](ASTRONAUT))
    print(f"IPS astronaut vs {variant}: {value:.4f}")
    assert value >= DLIB


def test_another_person_scores_low(dlib_backend, source):
    (other,), report = score_images(dlib_backend, source, tensor(grace_hopper()))
    print(f"IPS astronaut vs Grace Hopper: {other:.4f}")
    assert other < DLIB and "another person" in report


@pytest.mark.parametrize("photo, change", [
    ("astronaut", "lower face covered"), ("tom_hanks", "rotated +25"), ("tom_hanks", "1/4 size and back"),
    ("tom_hanks", "noise 20"), ("tom_hanks", "moved")])
def test_faces_still_there_are_found(dlib_backend, photo, change):
    """Each of these was 'not found in the edit' (IPS 0) with a detector cut of 0.5 on the edit."""
    rgb = data.astronaut() if photo == "astronaut" else tom_hanks()
    src = embed_images(dlib_backend, tensor(rgb))
    edited = PERTURBATIONS[change](rgb, [f.box for f in src.faces[0]])
    (value,), report = score_images(dlib_backend, src, tensor(edited))
    print(f"{photo} {change}: {report}")
    assert "not found" not in report and value >= DLIB


def test_a_name_tag_is_not_a_face(dlib_backend, source):
    """The astronaut turned +10 degrees: her name tag (HOG score 0.62) must not count as a face, or take a mask."""
    turned = PERTURBATIONS["rotated +10"](data.astronaut(), [])
    embed = embed_images(dlib_backend, tensor(turned))
    assert len(embed.faces[0]) == 1
    mask = face_mask(embed.faces[0], 512, 512)
    assert float(mask[322:385, 287:350].max()) == 0.0  # the tag
    (value,), _ = score_images(dlib_backend, embed, ASTRONAUT)
    assert value >= DLIB


@pytest.fixture(scope="module")
def pair(dlib_backend):
    """The astronaut and Grace Hopper side by side, and their faces."""
    rgb = side_by_side(data.astronaut(), grace_hopper())
    return rgb, embed_images(dlib_backend, tensor(rgb))


def test_one_replaced_face_is_not_averaged_away(dlib_backend, pair):
    rgb, embed = pair
    assert len(embed.faces[0]) == 2
    hanks = tom_hanks()
    hanks_box = find_faces(dlib_backend, hanks)[0].box
    replaced_at = 1 if embed.faces[0][1].box[0] > embed.faces[0][0].box[0] else 0  # Grace Hopper's (the right one)
    grace = embed.faces[0][replaced_at]
    edited = paste(rgb, grace.box, hanks, hanks_box)
    (value,), report = score_images(dlib_backend, embed, tensor(edited))
    print(report)
    face_scores = dict(part.split(": ", 1) for part in report.split("; ")[1:])
    assert value < DLIB and f"worst of 2 faces: face {replaced_at}" in report
    assert face_scores[f"face {replaced_at}"].startswith("another person")
    assert face_scores[f"face {1 - replaced_at}"].startswith("same person")


def test_swapped_faces_are_noticed(dlib_backend, pair):
    _, embed = pair
    swapped = side_by_side(grace_hopper(), data.astronaut())
    (value,), report = score_images(dlib_backend, embed, tensor(swapped))
    print(report)
    assert value < DLIB and report.count("another person") == 2


def test_different_people_stay_below_the_threshold(dlib_backend):
    """The nine real people of the fixtures, each pair (36): none is judged the same person. (The threshold was
    fitted on these and on perturbed copies; benchmarks/bench_identity.py reports the rates.)"""
    faces = [f.embedding for rgb in (data.astronaut(), grace_hopper(), tom_hanks(), group())
             for f in find_faces(dlib_backend, rgb)]
    assert len(faces) == 9
    highest = max(float(a @ b) for i, a in enumerate(faces) for b in faces[i + 1:])
    print(f"highest impostor cosine {highest:.3f}, threshold {DLIB}")
    assert highest < DLIB


def test_a_small_face_in_a_large_photo(dlib_backend, source):
    """A 108 px face in a 4000 x 3000 photo is found (coarse copy, confirmed at full resolution); a 56 px one only
    inside a region searched at full resolution (the edit CLI's crop)."""
    large, _ = in_large_photo(data.astronaut(), source.faces[0][0].box)
    found = embed_images(dlib_backend, tensor(large))
    assert len(found.faces[0]) == 1
    assert float(found.faces[0][0].embedding @ source.faces[0][0].embedding) >= DLIB
    smaller, (x0, y0, s) = in_large_photo(data.astronaut(), source.faces[0][0].box, face_px=56)
    assert not find_faces(dlib_backend, smaller)
    region = (x0, y0, x0 + 512 / s, y0 + 512 / s)
    (face,) = find_faces(dlib_backend, smaller, regions=(region,))
    assert float(face.embedding @ source.faces[0][0].embedding) >= DLIB


def test_the_face_mask_covers_the_chin(source):
    """All 68 landmarks of the astronaut (the jaw down to the chin at y 178) are inside the hard mask."""
    face = source.faces[0][0]
    hard = face_mask([face], 512, 512, feather=0)
    points = np.round(face.landmarks).astype(int)
    assert len(points) == 68 and all(hard[y, x] == 1 for x, y in points)
    chin = int(points[8, 1])
    assert chin >= 175 and hard[chin + 3, points[8, 0]] == 1


def _iou(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.bool() & b.bool()).sum() / (a.bool() | b.bool()).sum())


def test_five_point_masks_turn_with_the_eye_line_only():
    """A mouth corner pulled far off leaves the mask symmetric about the eye line's perpendicular (the old ellipse
    turned towards it); turning the eye points turns the mask with them."""
    face = _face(60, 60, 80)  # eye centre at x = 100
    pulled = face.landmarks.copy()
    pulled[4] += (30, 25)  # now the rightmost, lowest point
    crooked = face_mask([Face(face.box, pulled, 1.0, face.embedding)], 200, 201, feather=0)
    assert _iou(crooked, crooked.flip(1)) > 0.97  # mirrored about x = 100
    centre = np.array([100.0, 92.0])  # the eye centre
    turn = math.radians(14)
    rot = np.array([[math.cos(turn), -math.sin(turn)], [math.sin(turn), math.cos(turn)]], np.float32)
    turned = Face(face.box, (face.landmarks - centre) @ rot.T + centre, 1.0, face.embedding)
    straight = face_mask([face], 200, 201, feather=0)
    expected = torch.from_numpy(np.asarray(Image.fromarray((straight.numpy() * 255).astype(np.uint8)).rotate(
        -14, resample=Image.Resampling.NEAREST, center=tuple(centre))) > 127)
    got = face_mask([turned], 200, 201, feather=0)
    assert _iou(got, expected) > 0.97 and _iou(got, expected) > _iou(got, straight) + 0.03


def test_no_face(dlib_backend):
    cat = tensor(data.chelsea())
    with pytest.raises(XMGIEInputError, match=r"No face found in image 0 .*turn on pass_through"):
        embed_images(dlib_backend, cat)
    empty = embed_images(dlib_backend, cat, pass_through=True)
    assert empty.empty and empty.notes == ["image 0: no face found"]
    with pytest.raises(XMGIEInputError, match="source ID_EMBED has no faces"):
        score_images(dlib_backend, empty, cat)
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
    values, report = score_images(dlib_backend, source, edited)
    assert values[0] == pytest.approx(1.0, abs=1e-6) and values[1] == 0.0 and "not found in the edit" in report
    values, _ = score_images(dlib_backend, embed, torch.cat([ASTRONAUT, ASTRONAUT]))  # equal batches pair up
    assert values[0] == pytest.approx(1.0, abs=1e-6) and values[1] >= DLIB


def _face(x, y, size=40, seed=0):
    """A face box with insightface's 5 points (eyes, nose, mouth corners) where a frontal face has them."""
    v = normalise(np.random.default_rng(seed).normal(size=8))
    points = np.array([[0.3, 0.4], [0.7, 0.4], [0.5, 0.55], [0.35, 0.72], [0.65, 0.72]], np.float32) * size
    return Face((x, y, x + size, y + size), points + np.array([x, y], np.float32), 1.0, v)


def _at(face: Face, x: float, y: float) -> Face:
    """The same person's face moved to (x, y)."""
    return Face((x, y, x + face.box[2] - face.box[0], y + face.box[3] - face.box[1]), face.landmarks, 1.0,
                face.embedding)


def test_matching_by_place_then_by_look():
    a, b = _face(0, 0, seed=1), _face(100, 0, seed=2)
    moved_b = _at(b, 300, 300)
    scores = match_faces([a, b], [moved_b, a])
    assert [(s.edited, s.how) for s in scores] == [(a, "in place"), (moved_b, "moved")]
    assert [round(s.ips, 6) for s in scores] == [1.0, 1.0]
    lost = match_faces([a, b], [a])
    assert lost[1].edited is None and lost[1].ips == 0.0 and lost[1].how == "lost"
    swapped = match_faces([a, b], [_at(b, 0, 0), _at(a, 100, 0)])  # each place now holds the other person
    assert [s.how for s in swapped] == ["in place", "in place"] and all(s.ips < 0.9 for s in swapped)
    c = _face(8, 4, seed=3)  # another person where a was, a itself elsewhere: a is scored as c, never a
    assert match_faces([a], [c, _at(a, 300, 300)])[0].edited == c


def test_face_index_orders_by_size_and_reports_keep_it(dlib_backend):
    small, large = _face(0, 0, 20), _face(50, 50, 60)
    from xmgie_core.identity.faces import by_size, pick

    assert pick(by_size([small, large]), 0) == [large] and pick(by_size([small, large]), 1) == [small]
    with pytest.raises(XMGIEInputError, match=r"face_index 2 asks for the 3rd largest face, but 2 face\(s\)"):
        pick([small, large], 2)
    with pytest.raises(XMGIEInputError, match=r"the 12th largest"):
        pick([small, large], 11)
    rgb = side_by_side(data.astronaut(), grace_hopper())
    second = embed_images(dlib_backend, tensor(rgb), face_index=1)
    _, report = score_images(dlib_backend, second, tensor(rgb))
    assert "face 1: same person" in report and "face 0" not in report


def test_face_mask_geometry():
    face = _face(40, 40, 40)
    hard = face_mask([face], 128, 128, feather=0)
    assert hard[60, 60] == 1 and hard[5, 5] == 0 and hard[60, 120] == 0
    assert set(hard.unique().tolist()) == {0.0, 1.0}
    soft = face_mask([face], 128, 128, feather=4)
    assert 0 < float(soft[60, 36]) < 1 and float(soft[60, 60]) == pytest.approx(1.0, abs=1e-3)
    assert not face_mask([], 64, 64).any()
    corner = face_mask([_face(-20, -20, 40)], 64, 64, feather=0)  # partly outside the image
    assert corner[0, 0] == 1 and corner[40, 40] == 0


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


def test_insightface_packs_are_listed_with_their_licence(tmp_path):
    assert insightface_choices(None) == [f"insightface: antelopev2 {NON_COMMERCIAL}",
                                         f"insightface: buffalo_l {NON_COMMERCIAL}"]
    _pack(tmp_path / "models" / "auraface")  # any pack of the layout, e.g. an Apache-licensed AuraFace
    (tmp_path / "models" / "notes").mkdir()  # a folder without models is not a pack
    choices = insightface_choices(tmp_path)
    assert choices[-1] == "insightface: auraface" and len(choices) == 3
    assert [insightface_pack(c) for c in choices] == ["antelopev2", "buffalo_l", "auraface"]
    backend = InsightFace(tmp_path, insightface_pack(choices[-1]))
    assert set(backend.app.models) == {"detection", "recognition"} and backend.name == "insightface:auraface"


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
    backend = embedder.INPUT_TYPES()["required"]["backend"]
    assert backend[0][0] == "dlib" and backend[1]["default"] == "dlib"
    assert f"insightface: antelopev2 {NON_COMMERCIAL}" in backend[0]
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
        embedder.embed(ASTRONAUT, f"insightface: antelopev2 {NON_COMMERCIAL}", -1, 8.0, False)
    with pytest.raises(ValueError, match="Unknown backend"):
        embedder.embed(ASTRONAUT, "facenet", -1, 8.0, False)


# ---------------------------------------------------------------------------- protection inside PFB

def test_protected_mask_takes_overlapped_faces_out_of_the_edit():
    from xmgie_core.identity.protect import protected_mask, rank_by_ips

    face = _face(24, 24, 80)
    embed = IdEmbed([[face]], (128, 128), "dlib")
    scarf = torch.zeros(1, 128, 128)
    scarf[:, 72:128, 0:128] = 1  # overlaps the face's lower part (less than half of it)
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
    from xmgie_core.hosts.diffusers.pfb import pfb_edit
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
