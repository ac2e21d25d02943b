"""The learned region predictor ([Regions] eqs 1-3), its safetensors file, multi-scale fusion, post-processing and
the preview — on tiny random models built here."""

from __future__ import annotations

import math
import zlib

import pytest
import torch
from safetensors.torch import save_file

from fixtures import tiny_models
from xmgie_core.errors import XMGIEInputError
from xmgie_core.region.encoders import CLIPImageEncoder, T5InstructionEncoder
from xmgie_core.region.learned import predict_learned
from xmgie_core.region.multiscale import crop_boxes, multiscale_probability
from xmgie_core.masks import empty_items
from xmgie_core.region.postprocess import Finish, finish_region, grow_shrink, normalise, region_preview
from xmgie_core.region.predictor import RegionConfig, RegionPredictor, load_predictor, read_config, save_predictor

TINY = RegionConfig(dim=32, heads=4, mlp_hidden=48, image_size=32, patch_size=8, scales=(1, 2),
                    image_encoder="tiny-clip", instruction_encoder="tiny-t5")


def tiny_predictor(seed: int = 0) -> RegionPredictor:
    torch.manual_seed(seed)
    return RegionPredictor(TINY).eval()


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.bool(), b.bool()
    return float((a & b).sum()) / max(1, float((a | b).sum()))


# ------------------------------------------------------------------------------------------------ eqs 1-3

def test_cross_attention_is_eq1_on_known_values():
    """One head: F_Editedimg = F_img + softmax(Q K^T / sqrt(d)) V on the layer-normalised inputs."""
    cfg = RegionConfig(dim=8, heads=1, mlp_hidden=8, image_size=32, patch_size=8)
    torch.manual_seed(1)
    net = RegionPredictor(cfg)
    f_img, f_ins = torch.randn(2, 16, 8), torch.randn(2, 5, 8)
    x, c = net.norm_img(f_img), net.norm_ins(f_ins)
    a = torch.softmax(net.cross_attention.w_q(x) @ net.cross_attention.w_k(c).transpose(1, 2) / math.sqrt(8), -1)
    expected = f_img + a @ net.cross_attention.w_v(c)
    torch.testing.assert_close(net(f_img, f_ins).edited, expected)


def test_zero_value_projection_leaves_the_patches_unedited():
    net = tiny_predictor()
    torch.nn.init.zeros_(net.cross_attention.w_v.weight)
    f_img = torch.randn(1, 16, 32)
    assert torch.equal(net(f_img, torch.randn(1, 3, 32)).edited, f_img)


def test_padding_tokens_of_the_instruction_are_ignored():
    net = tiny_predictor()
    f_img, f_ins = torch.randn(1, 16, 32), torch.randn(1, 4, 32)
    padded = torch.cat([f_ins, 100 * torch.randn(1, 3, 32)], dim=1)
    mask = torch.tensor([[True] * 4 + [False] * 3])
    torch.testing.assert_close(net(f_img, padded, mask).probability, net(f_img, f_ins).probability)
    assert not torch.allclose(net(f_img, padded).probability, net(f_img, f_ins).probability)


def test_batch_items_are_independent_and_probabilities_are_in_0_1():
    net = tiny_predictor()
    f_img, f_ins = torch.randn(3, 16, 32), torch.randn(1, 6, 32)
    p = net(f_img, f_ins).probability
    assert p.shape == (3, 16) and bool(((p > 0) & (p < 1)).all())
    torch.testing.assert_close(p[1:2], net(f_img[1:2], f_ins).probability)
    assert net.grid_probability(f_img, f_ins).shape == (3, 4, 4)


def test_feature_width_mismatch_names_the_encoder():
    with pytest.raises(XMGIEInputError, match="image encoder's projection dim does not match"):
        tiny_predictor()(torch.randn(1, 16, 24), torch.randn(1, 3, 32))


@pytest.mark.parametrize("change, message", [
    ({"dim": 30, "heads": 4}, "multiple of heads"),
    ({"threshold": 1.0}, r"threshold 1.0 must be in \(0, 1\)"),
    ({"image_size": 30}, "not a multiple of patch_size"),
    ({"scales": (0,)}, "scales"),
])
def test_config_is_validated(change, message):
    with pytest.raises(XMGIEInputError, match=message):
        RegionConfig(**{**TINY.__dict__, **change})


# ------------------------------------------------------------------------------------------------ the file

def test_one_file_round_trip_keeps_weights_and_config(tmp_path):
    net = tiny_predictor(3)
    path = save_predictor(net, tmp_path / "region.safetensors", {"trained_steps": "12"})
    config, meta = read_config(path)
    assert config == TINY and meta["trained_steps"] == "12"
    loaded = load_predictor(path)
    f_img, f_ins = torch.randn(2, 16, 32), torch.randn(1, 5, 32)
    assert torch.equal(loaded(f_img, f_ins).probability, net(f_img, f_ins).probability)


def test_file_errors_say_what_and_where(tmp_path):
    with pytest.raises(XMGIEInputError, match="not found: .*models/xmgie"):
        read_config(tmp_path / "missing.safetensors")
    other = tmp_path / "lora.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    with pytest.raises(XMGIEInputError, match="not an xMGIE region predictor"):
        read_config(other)
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(XMGIEInputError, match=r"junk.safetensors \(the region predictor weights\) looks truncated or corrupt.*re-train"):
        read_config(tmp_path / "junk.safetensors")
    state = {k: v for k, v in tiny_predictor().state_dict().items() if not k.startswith("mlp.2")}
    save_file(state, str(tmp_path / "cut.safetensors"), metadata={"xmgie.region.config": TINY.to_json()})
    with pytest.raises(XMGIEInputError, match=r"missing \['mlp.2.bias', 'mlp.2.weight'\]"):
        load_predictor(tmp_path / "cut.safetensors")


# ------------------------------------------------------------------------------------------------ multi-scale

def red_coverage_predictor(grid: int):
    """A stand-in for a trained predictor: P = how much of each patch is red, sharpened around 1/2."""
    def predict(views: torch.Tensor) -> torch.Tensor:
        red = ((views[:, 0] > 0.8) & (views[:, 1] < 0.2)).float()
        cover = torch.nn.functional.adaptive_avg_pool2d(red[:, None], grid)[:, 0]
        return torch.sigmoid(12 * (cover - 0.5))
    return predict


def scene(small: bool, size: int = 448) -> tuple[torch.Tensor, torch.Tensor]:
    """A grey image [1,3,size,size] with a red target: a 20 px disc (a cup) or the top half (the sky)."""
    img = torch.full((1, 3, size, size), 0.5)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    target = ((yy - 150) ** 2 + (xx - 290) ** 2 <= 10 ** 2) if small else (yy < size // 2)
    img[0, :, target] = torch.tensor([1.0, 0.0, 0.0])[:, None]
    return img, target[None]


@pytest.mark.parametrize("small", [True, False], ids=["cup", "sky"])
def test_multiscale_finds_small_and_large_targets(small):
    img, target = scene(small)
    predict = red_coverage_predictor(16)
    fused = multiscale_probability(predict, img, 224, (1, 4)) >= 0.5
    assert iou(fused, target) >= 0.5
    single = multiscale_probability(predict, img, 224, (1,)) >= 0.5
    if small:  # a 20 px disc fills at most 40 % of one 28 px patch at scale 1: lost without the finer scale
        assert iou(single, target) < 0.1
    else:
        assert iou(single, target) >= 0.9


def test_crop_boxes_cover_the_image_with_overlap():
    for h, w, k in [(448, 448, 1), (448, 300, 2), (97, 131, 3), (5, 7, 4)]:
        boxes = crop_boxes(h, w, k)
        assert len(boxes) == k * k
        covered = torch.zeros(h, w, dtype=torch.int)
        for t, l, b, r in boxes:
            assert 0 <= t < b <= h and 0 <= l < r <= w
            covered[t:b, l:r] += 1
        assert bool((covered >= 1).all())
        if k > 1 and h > 8:
            assert bool((covered >= 2).any())


def test_one_scale_of_a_constant_predictor_is_that_constant():
    out = multiscale_probability(lambda v: torch.full((v.shape[0], 4, 4), 0.3), torch.rand(2, 3, 40, 56), 32, (1, 3))
    torch.testing.assert_close(out, torch.full((2, 40, 56), 0.3))


# ------------------------------------------------------------------------------------------------ learned inference

class WordTokenizer:
    """Whitespace tokenizer over a fixed vocabulary (ids < 512, as the tiny T5)."""

    def __call__(self, texts, padding, truncation, max_length, return_tensors):
        ids = [[zlib.crc32(w.encode()) % 500 + 2 for w in t.split()][:max_length] + [1] for t in texts]
        n = max(len(i) for i in ids)
        return {"input_ids": torch.tensor([i + [0] * (n - len(i)) for i in ids]),
                "attention_mask": torch.tensor([[1] * len(i) + [0] * (n - len(i)) for i in ids])}


@pytest.fixture(scope="module")
def encoders():
    return CLIPImageEncoder(tiny_models.tiny_clip_vision()), T5InstructionEncoder(tiny_models.tiny_t5_encoder(),
                                                                                  WordTokenizer())


def test_learned_prediction_is_batch_aware_and_at_image_size(encoders):
    image_enc, ins_enc = encoders
    net = tiny_predictor()
    images = torch.rand(2, 50, 70, 3)
    calls = []
    p = predict_learned(net, image_enc, ins_enc, images, "make the cup red", progress=lambda d, t: calls.append((d, t)))
    assert p.shape == (2, 50, 70) and bool(((p >= 0) & (p <= 1)).all())
    torch.testing.assert_close(p[1:], predict_learned(net, image_enc, ins_enc, images[1:], "make the cup red"))
    assert calls[-1] == (5, 5)  # 1 + 4 views
    other = predict_learned(net, image_enc, ins_enc, images, "remove the sky")
    assert not torch.allclose(p, other)


def test_learned_prediction_input_errors(encoders):
    image_enc, ins_enc = encoders
    with pytest.raises(XMGIEInputError, match="needs the edit instruction"):
        predict_learned(tiny_predictor(), image_enc, ins_enc, torch.rand(1, 32, 32, 3), "  ")
    big = RegionPredictor(RegionConfig(dim=32, heads=4, image_size=64, patch_size=8))
    with pytest.raises(XMGIEInputError, match="takes 32 px images but the region predictor was trained on 64 px"):
        predict_learned(big, image_enc, ins_enc, torch.rand(1, 32, 32, 3), "make it red")


# ------------------------------------------------------------------------------------------------ post-processing

def test_normalise_and_constant_maps():
    score = torch.stack([torch.arange(6.0).view(2, 3), torch.full((2, 3), 7.0)])
    out = normalise(score)
    torch.testing.assert_close(out[0], torch.arange(6.0).view(2, 3) / 5)
    assert torch.equal(out[1], torch.zeros(2, 3))


def test_grow_and_shrink_are_euclidean_discs():
    mask = torch.zeros(1, 41, 41)
    mask[0, 20, 20] = 1
    grown = grow_shrink(mask, 10)
    yy, xx = torch.meshgrid(torch.arange(41), torch.arange(41), indexing="ij")
    disc = ((yy - 20) ** 2 + (xx - 20) ** 2 <= 100).float()
    assert torch.equal(grown[0], disc)
    assert torch.equal(grow_shrink(grown, -10)[0], mask[0])
    assert torch.equal(grow_shrink(mask, 0), mask)


def test_finish_region_thresholds_at_image_size_and_reports_empty_items():
    score = torch.zeros(2, 4, 4)
    score[0, 1:3, 1:3] = 0.9
    mask, soft = finish_region(score, 8, 8, Finish(threshold=0.5))
    assert mask.shape == soft.shape == (2, 8, 8)
    assert bool(mask[0].any()) and not bool(mask[1].any())
    assert empty_items(mask) == [1]
    mask_n, _ = finish_region(score, 8, 8, Finish(threshold=0.5, normalise=True))
    assert not bool(mask_n[1].any())  # a constant map normalises to 0, never to a full mask


@pytest.mark.parametrize("kw, message", [({"threshold": 1.5}, "threshold must be between 0 and 1"),
                                         ({"grow": 1000}, "grow/shrink pixels must be between"),
                                         ({"smooth": -1.0}, "smoothing must be between")])
def test_finish_settings_are_checked(kw, message):
    with pytest.raises(XMGIEInputError, match=message):
        Finish(**kw)


def test_nan_scores_are_refused():
    with pytest.raises(XMGIEInputError, match="NaN"):
        finish_region(torch.full((1, 4, 4), float("nan")), 8, 8, Finish())


def test_preview_tints_only_the_region():
    image = torch.full((1, 6, 6, 3), 0.5)
    mask = torch.zeros(1, 6, 6)
    mask[0, :3] = 1
    out = region_preview(image, mask, mask)
    torch.testing.assert_close(out[0, 3:], torch.full((3, 6, 3), 0.3))
    assert bool((out[0, :3, :, 0] > out[0, :3, :, 1]).all())


# ------------------------------------------------------------------------------------------------ model folders

def test_t5_folder_loads_offline_and_encodes_with_a_padding_mask(tmp_path):
    from fixtures.tiny_region import save_tiny_t5
    from xmgie_core.region.encoders import load_t5_instruction_encoder

    encoder = load_t5_instruction_encoder(save_tiny_t5(tmp_path / "flan-t5-tiny"))
    features, mask = encoder(["make the cup red", "remove the sky"])
    assert features.shape == (2, 5, 32) and mask.tolist() == [[True] * 5, [True] * 4 + [False]]
    assert not features.requires_grad


def test_model_folder_errors_say_what_is_missing(tmp_path):
    from xmgie_core.region.encoders import load_t5_instruction_encoder

    with pytest.raises(XMGIEInputError, match="FLAN-T5 folder not found: .*models/text_encoders"):
        load_t5_instruction_encoder(tmp_path / "nothing")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text("{}")
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(XMGIEInputError, match="only pytorch_model.bin, which xMGIE does not load"):
        load_t5_instruction_encoder(tmp_path / "bin")
