"""The edit metrics (xmgie_core.metrics) against hand-computed values and against their reference implementations
written out here on fixed tensors: MagicBrush's eval_distance / eval_clip_i / eval_clip_t (torchvision transforms on
PIL images, scipy's cosine), InstructPix2Pix's ClipSimilarity (Emu Edit's CLIPdir / CLIPimg / CLIPout), skimage's PSNR
and SSIM; the encoders are tiny random-weight models saved in the exact folder layouts (fixtures/tiny_eval_models)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.spatial import distance
from torchvision import transforms as T

from fixtures import tiny_eval_models
from xmgie_core.errors import XMGIEInputError
from xmgie_core.metrics import models, pixels, semantic

OPENAI = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))


def picture(seed: int, h: int = 40, w: int = 48) -> torch.Tensor:
    """An 8-bit picture as the evaluation reads it: IMAGE [1,H,W,3] of k/255 values."""
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (h, w, 3)).astype(np.float32) / 255)[None]


def pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray((image[0].numpy() * 255).round().astype(np.uint8))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return tiny_eval_models.all_folders(tmp_path_factory.mktemp("encoders"))


# ---------------------------------------------------------------------------------------------------- pixels


def test_l1_l2_psnr_by_hand():
    a = torch.zeros(1, 16, 16, 3)
    b = a.clone()
    b[:, :8, :8] = 0.5  # a quarter of the pixels differ by 0.5
    assert pixels.l1(b, a) == pytest.approx(0.125)
    assert pixels.l2(b, a) == pytest.approx(0.0625)
    assert pixels.psnr(b, a) == pytest.approx(10 * math.log10(1 / 0.0625))
    assert pixels.psnr(a, a) == math.inf


def test_l1_l2_follow_magicbrush_eval_distance_with_a_resize():
    """eval_distance: gen_img.resize(gt_img.size) (PIL's bicubic default), ToTensor, nn.L1Loss / nn.MSELoss."""
    edit, target = picture(1, 40, 48), picture(2, 32, 36)
    gen = T.ToTensor()(pil(edit).resize(pil(target).size))
    gt = T.ToTensor()(pil(target))
    assert pixels.l1(edit, target) == pytest.approx(torch.nn.L1Loss()(gen, gt).item(), abs=1e-7)
    assert pixels.l2(edit, target) == pytest.approx(torch.nn.MSELoss()(gen, gt).item(), abs=1e-7)


def test_psnr_and_ssim_match_skimage():
    metrics = pytest.importorskip("skimage.metrics")
    a = picture(3)
    b = (a * 0.5 + picture(4) * 0.5).clamp(0, 1)  # correlated, so SSIM is far from 0 and 1
    x, y = a[0].double().numpy(), b[0].double().numpy()
    assert pixels.psnr(b, a) == pytest.approx(metrics.peak_signal_noise_ratio(x, y, data_range=1.0), rel=1e-9)
    reference = metrics.structural_similarity(x, y, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                              data_range=1.0, channel_axis=-1)
    assert 0.2 < reference < 0.95
    assert pixels.ssim(b, a) == pytest.approx(reference, abs=1e-9)
    assert pixels.ssim(a, a) == pytest.approx(1.0)


def test_ssim_is_per_channel_not_luminance():
    """Swapping two channels keeps the luminance-free per-channel scores apart: SSIM drops below 1."""
    a = picture(5)
    swapped = a[..., [1, 0, 2]]
    assert pixels.ssim(swapped, a) < 0.5


def test_ssim_refuses_images_smaller_than_its_window():
    with pytest.raises(XMGIEInputError, match="at least 11x11"):
        pixels.ssim(picture(1, 8, 8), picture(2, 8, 8))


def test_region_iou_by_hand():
    p, g = torch.zeros(1, 10, 10), torch.zeros(1, 10, 10)
    p[:, :4, :4] = 1  # 16 pixels
    g[:, 2:6, :4] = 1  # 16 pixels, 8 shared
    assert pixels.region_iou(p, g) == pytest.approx(8 / 24)
    assert pixels.region_iou(torch.zeros(1, 10, 10), torch.zeros(1, 10, 10)) is None
    with pytest.raises(XMGIEInputError, match="same photo size"):
        pixels.region_iou(p, torch.zeros(1, 12, 10))


# ---------------------------------------------------------------------------------------------------- CLIP / DINO


def magicbrush_clip_reference(model, size, image):
    """clip.load's transform (Resize, CenterCrop, RGB, ToTensor, Normalize) then encode_image."""
    t = T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size), T.ToTensor(),
                   T.Normalize(*OPENAI)])
    with torch.no_grad():
        return model.encode_image(t(pil(image))[None]).float()


def test_clip_i_and_clip_t_follow_magicbrush_on_an_open_clip_folder(folders):
    import open_clip

    clip = models.load_clip(folders["open_clip"])
    raw = open_clip.create_model(f"local-dir:{folders['open_clip']}", load_weights=False)
    open_clip.load_checkpoint(raw, str(folders["open_clip"] / "open_clip_model.safetensors"))
    raw.eval()
    edit, target = picture(6), picture(7, 44, 30)
    f_edit, f_target = magicbrush_clip_reference(raw, 32, edit), magicbrush_clip_reference(raw, 32, target)
    expected = 1 - distance.cosine(f_edit.view(-1).numpy(), f_target.view(-1).numpy())
    assert semantic.clip_i(clip, edit, target) == pytest.approx(expected, abs=1e-6)
    with torch.no_grad():
        text = raw.encode_text(open_clip.tokenize(["a red scarf"])).float()
    assert semantic.clip_t(clip, edit, "a red scarf") == pytest.approx(
        1 - distance.cosine(f_edit.view(-1).numpy(), text.view(-1).numpy()), abs=1e-6)
    assert semantic.clip_i(clip, edit, edit) == pytest.approx(1.0)
    assert semantic.clip_t(clip, edit, "a red scarf") != pytest.approx(semantic.clip_t(clip, edit, "a blue car"))


def test_emu_clip_metrics_follow_instructpix2pix_on_a_transformers_folder(folders):
    from transformers import AutoTokenizer, CLIPModel

    clip = models.load_clip(folders["hf_clip"])
    raw = CLIPModel.from_pretrained(folders["hf_clip"]).eval()
    tok = AutoTokenizer.from_pretrained(folders["hf_clip"])
    source, edit = picture(8), picture(9)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in OPENAI)

    def e_img(x):  # ClipSimilarity.encode_image: bicubic to 32 x 32, normalise, encode, unit length
        x = (F.interpolate(x.movedim(-1, 1), size=32, mode="bicubic", align_corners=False) - mean) / std
        with torch.no_grad():
            f = raw.get_image_features(pixel_values=x)
        f = f if isinstance(f, torch.Tensor) else f.pooler_output
        return f / f.norm(dim=1, keepdim=True)

    def e_txt(text):
        t = tok([text], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        with torch.no_grad():
            f = raw.get_text_features(input_ids=t.input_ids, attention_mask=t.attention_mask)
        f = f if isinstance(f, torch.Tensor) else f.pooler_output
        return f / f.norm(dim=1, keepdim=True)

    i0, i1, t0, t1 = e_img(source), e_img(edit), e_txt("a cat on a sofa"), e_txt("a dog on a sofa")
    got = semantic.emu_clip(clip, source, edit, "a cat on a sofa", "a dog on a sofa")
    assert got["clip_dir"] == pytest.approx(F.cosine_similarity(i1 - i0, t1 - t0).item(), abs=1e-5)
    assert got["clip_img"] == pytest.approx(F.cosine_similarity(i0, i1).item(), abs=1e-5)
    assert got["clip_out"] == pytest.approx(F.cosine_similarity(i1, t1).item(), abs=1e-5)
    assert set(semantic.emu_clip(clip, source, edit, None, "a dog")) == {"clip_img", "clip_out"}
    assert semantic.emu_clip(clip, source, source, "a", "b")["clip_dir"] == 0.0  # no image change: cos of 0 is 0


def test_dino_follows_magicbrush_on_a_vit_folder(folders):
    from transformers import ViTModel

    dino = models.load_dino(folders["dino"])
    raw = ViTModel.from_pretrained(folders["dino"], add_pooling_layer=False).eval()
    t = T.Compose([T.Resize(round(32 * 256 / 224), interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(32),
                   T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    edit, target = picture(10), picture(11)
    with torch.no_grad():
        a, b = (raw(pixel_values=t(pil(x))[None]).last_hidden_state[0, 0] for x in (edit, target))
    assert semantic.dino(dino, edit, target) == pytest.approx(1 - distance.cosine(a.numpy(), b.numpy()), abs=1e-6)


def test_architecture_note_names_the_reference(folders):
    clip = models.load_clip(folders["open_clip"])
    note = models.reference_note("clip-b32", clip.architecture, "ViT-B/32")
    assert "not the reference ViT-B/32" in note and "patch 8" in note
    assert models.reference_note("x", models.REFERENCE["ViT-B/32"], "ViT-B/32") is None


def test_damaged_and_pickled_model_folders_are_refused_with_the_file_named(folders, tmp_path):
    import shutil

    cut = shutil.copytree(folders["open_clip"], tmp_path / "cut")
    weights = cut / "open_clip_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(XMGIEInputError, match="open_clip_model.safetensors.*truncated"):
        models.load_clip(cut)
    pickled = shutil.copytree(folders["dino"], tmp_path / "pickled")
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    with pytest.raises(XMGIEInputError, match="pickled weights"):
        models.load_dino(pickled)
    with pytest.raises(XMGIEInputError, match="neither open_clip_config.json"):
        models.load_clip(tmp_path)
    with pytest.raises(XMGIEInputError, match="not CLIP"):
        models.load_clip(folders["dino"])


def test_ips_per_face_reuses_the_identity_scoring():
    pytest.importorskip("dlib")
    from skimage import data

    from xmgie_core.identity.backends import Dlib
    from xmgie_core.metrics.identity import ips_per_face

    face = torch.from_numpy(data.astronaut().astype(np.float32) / 255)[None]
    backend = Dlib()
    assert ips_per_face(backend, face, face) == [pytest.approx(1.0, abs=1e-6)]
    assert ips_per_face(backend, face, torch.full_like(face, 0.5)) == [0.0]  # the face is lost
    assert ips_per_face(backend, torch.full_like(face, 0.5), face) is None  # no source face: nothing to score
