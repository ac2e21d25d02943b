"""Training of the region predictor ([Regions] eqs 4-11): each loss term on known tensors, gradients through the
composite X_res, the records reader and builder, the training CLI on tiny models (resume is bit-identical), and a
toy task (tests/fixtures/region_task.py) learned from the losses alone."""

from __future__ import annotations

import csv
import json
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from fixtures.region_task import SIZE, ToyCLIP, ToyText, save_tiny_clip, toy_instruction_encoder, write_task
from fixtures.tiny_region import save_tiny_t5
from xmgie_core.errors import XMGIEInputError
from xmgie_core.apps import region_data
from xmgie_core.region import train as region_train
from xmgie_core.apps.region_data import coloured_object, rules_edit
from xmgie_core.region.data import RegionDataset, collate, read_records
from xmgie_core.region.losses import (LossWeights, clip_directional_loss, clip_global_loss, clip_loss,
                                      clip_structure_loss, composite, edited_features, self_similarity,
                                      sem_edited_loss, sem_original_loss, soft_region, total_loss)
from xmgie_core.region.predictor import load_predictor, read_config
from xmgie_core.region.train import (CHECKPOINT, PREDICTOR, TERMS, Encoders, RegionTrainable, TrainSettings,
                                     region_config, step_terms, train)
from xmgie_core.training import LOG

STEPS = 600
"""Learning-test steps: about 13 s on 2 idle CPU cores."""


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


# --- the loss terms on known tensors ------------------------------------------------------------------------------

def test_generator_step_copies_the_render_exactly_where_the_region_is():
    x, x_gen = rand(2, 3, 32, 32, seed=1), rand(2, 3, 32, 32, seed=2)
    zeros, ones = soft_region(torch.zeros(2, 16), (32, 32)), soft_region(torch.ones(2, 16), (32, 32))
    assert zeros.shape == (2, 1, 32, 32)
    assert torch.equal(composite(x, x_gen, zeros), x)
    assert torch.equal(composite(x, x_gen, ones), x_gen)
    p = torch.zeros(1, 16)
    p[0, 5] = 1.0  # row 1, column 1 of the 4 x 4 grid: pixels 8..15
    m = soft_region(p, (32, 32))[0, 0]
    assert m[11:13, 11:13].min() == m.max() > 0.85  # peaks at the patch centre (pixels 11.5, 12.5)
    assert m[:4].max() == 0.0 and m[:, 24:].max() == 0.0
    assert 0.0 < m[8, 8] < m[10, 10] < m.max()  # bilinear, not nearest
    with pytest.raises(XMGIEInputError, match="square patch grid"):
        soft_region(torch.zeros(1, 15), (32, 32))


def test_structure_loss_is_zero_for_the_same_patches_and_sees_a_moved_patch():
    f = rand(2, 16, 8)
    s = self_similarity(f)
    assert torch.allclose(s.diagonal(dim1=1, dim2=2), torch.ones(2, 16))
    assert torch.equal(clip_structure_loss(f, f), torch.zeros(2))
    assert torch.allclose(clip_structure_loss(3.0 * f, f), torch.zeros(2), atol=1e-6)  # cosines ignore scale
    moved = f.clone()
    moved[:, 0] = -f[:, 0]
    assert (clip_structure_loss(moved, f) > 0.01).all()


def test_global_and_directional_losses_on_constructed_vectors():
    e = torch.tensor([[1.0, 2.0, 0.0]])
    assert torch.allclose(clip_global_loss(e, 2 * e), torch.zeros(1), atol=1e-6)
    assert torch.allclose(clip_global_loss(e, -e), torch.full((1,), 2.0))
    src, t_o, t_e = torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.0, 1.0, 1.0]])
    along = torch.tensor([[1.0, 5.0, 0.0]])  # moved by +5 y: the text moved by +1 y
    against = torch.tensor([[1.0, -1.0, 0.0]])
    aside = torch.tensor([[3.0, 0.0, 0.0]])
    assert torch.allclose(clip_directional_loss(along, src, t_e, t_o), torch.zeros(1), atol=1e-6)
    assert torch.allclose(clip_directional_loss(against, src, t_e, t_o), torch.full((1,), 2.0))
    assert torch.allclose(clip_directional_loss(aside, src, t_e, t_o), torch.ones(1))


def test_semantic_losses_mix_edited_and_original_features_by_the_region():
    f_img, edited = rand(2, 4, 6, seed=3), rand(2, 4, 6, seed=4)
    assert torch.allclose(edited_features(torch.ones(2, 4), edited, f_img), edited.mean(1))
    assert torch.allclose(edited_features(torch.zeros(2, 4), edited, f_img), f_img.mean(1))
    half = edited_features(torch.full((2, 4), 0.5), edited, f_img)
    assert torch.allclose(half, (edited.mean(1) + f_img.mean(1)) / 2)
    identity = nn.Identity()
    assert torch.allclose(sem_edited_loss(identity, torch.ones(2, 4), edited, f_img, edited.mean(1)), torch.zeros(2),
                          atol=1e-6)
    assert (sem_edited_loss(identity, torch.zeros(2, 4), edited, f_img, edited.mean(1)) > 1e-3).all()
    assert torch.allclose(sem_original_loss(identity, f_img, -f_img.mean(1)), torch.full((2,), 2.0))


def test_weighted_sums_and_weight_checks():
    w = LossWeights(alpha=2.0, beta=3.0, lambda_g=0.5, lambda_d=0.25, lambda_s=4.0)
    one = torch.ones(1)
    assert clip_loss(one, 2 * one, 3 * one, w).item() == 0.5 + 0.5 + 12.0
    assert total_loss(one, 2 * one, w).item() == 2.0 + 6.0
    with pytest.raises(XMGIEInputError, match="--lambda-d -1"):
        LossWeights(lambda_d=-1)
    with pytest.raises(XMGIEInputError, match="nothing tells the predictor where"):
        LossWeights(beta=0)


# --- gradients through X_res --------------------------------------------------------------------------------------

def toy_batch(records_path):
    dataset = RegionDataset(read_records(records_path), SIZE)
    return dataset, collate([dataset[i] for i in range(4)])


@pytest.fixture(scope="module")
def toy_records(tmp_path_factory):
    return write_task(tmp_path_factory.mktemp("toy"), 8, seed=3)[0]


def test_clip_losses_reach_the_predictor_only_through_the_composite(toy_records):
    encoders = Encoders(ToyCLIP(), ToyText(), toy_instruction_encoder())
    dataset, batch = toy_batch(toy_records)
    config, joint = region_config(dataset, encoders, TrainSettings(heads=4), torch.device("cpu"))
    w = LossWeights(alpha=0.0)

    def predictor_grads(batch):
        torch.manual_seed(0)
        model = RegionTrainable(config, joint)
        step_terms(model, encoders, batch, w, torch.device("cpu"))["loss"].backward()
        return [p.grad for p in model.predictor.parameters()]

    grads = predictor_grads(batch)
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    same = {**batch, "render": batch["image"]}  # X_gen == X: the region changes nothing, so L_CLIP cannot see it
    assert all(torch.count_nonzero(g) == 0 for g in predictor_grads(same))


def test_gradients_flow_through_a_frozen_transformers_clip(tiny_folders, toy_records):
    from xmgie_core.region.encoders import load_clip_encoders, load_t5_instruction_encoder

    image, text = load_clip_encoders(tiny_folders[0])
    encoders = Encoders(image, text, load_t5_instruction_encoder(tiny_folders[1]))
    dataset, batch = toy_batch(toy_records)
    config, joint = region_config(dataset, encoders, TrainSettings(heads=4), torch.device("cpu"))
    model = RegionTrainable(config, joint)
    terms = step_terms(model, encoders, batch, LossWeights(alpha=0.0, lambda_g=0.0, lambda_s=0.0),
                       torch.device("cpu"))
    terms["loss"].backward()
    assert model.predictor.mlp[2].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in image.model.parameters())  # CLIP stays frozen


# --- records ------------------------------------------------------------------------------------------------------

def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_records_resolve_relative_paths_and_name_the_bad_line_and_field(toy_records, tmp_path):
    records = read_records(toy_records)
    assert len(records) == 8 and records[0].image.is_file() and records[0].render.is_file()
    good = json.loads(toy_records.read_text().splitlines()[0])
    good = {**good, **{k: str(toy_records.parent / good[k]) for k in ("image", "render")}}
    cases = [("{not json", "line 2: not valid JSON"),
             ({**good, "t_e": ""}, "line 2, field 't_e': missing or empty"),
             ({k: v for k, v in good.items() if k != "t_ins"}, "line 2, field 't_ins'"),
             ({**good, "image": "nowhere.png"}, "line 2, field 'image': file not found"),
             ({**good, "render": 3}, "line 2, field 'render'"),
             ([1, 2], "line 2: a record must be a JSON object")]
    for row, message in cases:
        with pytest.raises(XMGIEInputError, match=message):
            read_records(write_jsonl(tmp_path / "bad.jsonl", [good, row]))
    no_render = write_jsonl(tmp_path / "plain.jsonl", [good, {k: v for k, v in good.items() if k != "render"}])
    assert len(read_records(no_render, need_renders=False)) == 2
    with pytest.raises(XMGIEInputError, match="1 of 2 records have no 'render'.*line 2.*--generator"):
        read_records(no_render)
    with pytest.raises(XMGIEInputError, match="Training data not found"):
        read_records(tmp_path / "missing.jsonl")


def test_rules_instructions_from_captions():
    assert coloured_object("a red car on a street") == ("red car", "red", "car")
    assert coloured_object("a red and blue kite") == ("blue kite", "blue", "kite")
    assert coloured_object("a dog on a beach") is None
    t_ins, t_e = rules_edit("a red car on a street")
    new = t_ins.split()[-1]
    assert t_ins == f"make the red car {new}" and new in region_data.NEW_COLOURS and new != "red"
    assert t_e == f"a {new} car on a street"
    assert rules_edit("a red car on a street") == (t_ins, t_e)  # deterministic
    assert {rules_edit("a red car on a street", seed)[0] for seed in range(20)} != {t_ins}  # the seed varies it
    t_ins, t_e = rules_edit("A grey cat next to a green sofa", seed=1)
    assert t_ins.startswith("make the grey cat ") and t_e.startswith("A ") and t_e.endswith(" cat next to a green sofa")
    assert "green" not in t_ins and "grey" not in t_e
    assert rules_edit("a dog on a beach") is None


@pytest.fixture(scope="module")
def captioned(tmp_path_factory):
    """Three 32 x 32 images, two with captions naming a coloured object, in a CSV."""
    from xmgie_core.image_io import save_image

    folder = tmp_path_factory.mktemp("captioned")
    captions = ["a red circle, a green square and a blue triangle", "a yellow ball on a table", "a dog on a beach"]
    with (folder / "captions.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption"])
        for i, caption in enumerate(captions):
            save_image(rand(1, 32, 32, 3, seed=i), folder / "images" / f"{i}.png")
            writer.writerow([f"images/{i}.png", caption])
    return folder / "captions.csv"


def test_build_without_a_generator_writes_records_that_training_refuses(captioned, tmp_path, capsys):
    out = tmp_path / "data" / "records.jsonl"
    assert region_data.main(["build", "--captions", str(captioned), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "2 records" in printed and "1 captions skipped" in printed and "no renders" in printed
    records = read_records(out, need_renders=False)
    assert [r.t_o for r in records] == ["a red circle, a green square and a blue triangle", "a yellow ball on a table"]
    assert records[0].t_ins.startswith("make the red circle ") and records[0].render is None
    assert records[1].image == captioned.parent / "images" / "1.png"
    assert not json.loads(out.read_text().splitlines()[0])["image"].startswith("/")  # portable: relative paths
    assert region_train.main(["--data", str(out), "--clip", "x", "--t5", "y", "--out", str(tmp_path / "run")]) == 2
    assert "have no 'render'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_generator(tmp_path_factory, tiny_unet, tiny_vae, tiny_clip_text):
    """A StableDiffusionImg2ImgPipeline of the tiny test models, saved as a diffusers folder."""
    from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline
    from transformers import CLIPTokenizer

    from fixtures.tiny_models import clip_tokenizer_files

    files = clip_tokenizer_files(tmp_path_factory.mktemp("sd_tokenizer"))
    tokenizer = CLIPTokenizer(str(files / "vocab.json"), str(files / "merges.txt"), pad_token="<|endoftext|>",
                              model_max_length=77)
    pipe = StableDiffusionImg2ImgPipeline(vae=tiny_vae, text_encoder=tiny_clip_text, tokenizer=tokenizer,
                                          unet=tiny_unet, scheduler=DDIMScheduler(clip_sample=False, steps_offset=1),
                                          safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    folder = tmp_path_factory.mktemp("tiny_sd")
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def test_build_errors(captioned, tiny_generator, tmp_path, capsys):
    def fails(args, message):
        assert region_data.main(["build", "--out", str(tmp_path / "r.jsonl"), *args]) == 2
        assert message in capsys.readouterr().err

    fails(["--captions", str(tmp_path / "nope.csv")], "Captions file not found")
    bad = tmp_path / "bad.csv"
    bad.write_text("path,text\na.png,a red car\n")
    fails(["--captions", str(bad)], "columns image,caption")
    missing = tmp_path / "missing.jsonl"
    write_jsonl(missing, [{"image": "gone.png", "caption": "a red car"}])
    fails(["--captions", str(missing)], "line 1, field 'image': file not found")
    fails(["--captions", str(captioned), "--backend", "local"], "needs --model-folder")
    single = tmp_path / "sd15.safetensors"
    single.write_bytes(b"x")
    fails(["--captions", str(captioned), "--generator", str(single)], "pass --generator-config")
    fails(["--captions", str(captioned), "--generator", str(tmp_path)], "has no model_index.json")
    fails(["--captions", str(captioned), "--generator", str(tiny_generator), "--size", "60"], "multiple of 8")
    no_colours = tmp_path / "plain.jsonl"
    write_jsonl(no_colours, [{"image": str(captioned.parent / "images" / "2.png"), "caption": "a dog"}])
    fails(["--captions", str(no_colours)], "names a coloured object")
    assert not (tmp_path / "r.jsonl").exists()


def test_a_generator_cut_short_is_named_and_nothing_is_written(captioned, tiny_generator, tmp_path, capsys):
    import shutil

    bad = tmp_path / "sd15"
    shutil.copytree(tiny_generator, bad)
    weights = bad / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    out = tmp_path / "data" / "records.jsonl"
    assert region_data.main(["build", "--captions", str(captioned), "--out", str(out), "--generator", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{weights} (the SD1.5 model of --generator) looks truncated or corrupt" in err and "sha256" in err
    assert not (tmp_path / "data").exists()


def test_build_renders_with_a_diffusers_img2img_generator(captioned, tiny_generator, tmp_path):
    from PIL import Image

    args = ["build", "--captions", str(captioned), "--generator", str(tiny_generator), "--steps", "2",
            "--strength", "0.5", "--size", "64", "--seed", "7"]
    assert region_data.main([*args, "--out", str(tmp_path / "a" / "records.jsonl")]) == 0
    assert region_data.main([*args, "--out", str(tmp_path / "b" / "records.jsonl")]) == 0
    a, b = read_records(tmp_path / "a" / "records.jsonl"), read_records(tmp_path / "b" / "records.jsonl")
    assert len(a) == 2 and all(r.render.parent.name == "records_renders" for r in a)
    for ra, rb in zip(a, b):
        pixels = np.asarray(Image.open(ra.render))
        assert pixels.shape == (64, 64, 3) and pixels.std() > 0
        assert np.array_equal(pixels, np.asarray(Image.open(rb.render)))  # seeded


def test_build_with_the_local_vlm_takes_its_target_description(captioned, tmp_path):
    from fixtures.tiny_vlm import json_emitting, save_tiny_vlm

    plan = {"expressive_instruction": "Recolour it.", "source_description": "a red circle",
            "target_description": "a photo of a purple circle, a green square and a blue triangle",
            "edit_words": ["purple circle"], "background_words": [], "edit_type": "attribute"}
    folder = save_tiny_vlm(tmp_path / "vlm")
    json_emitting(folder, json.dumps(plan))
    out = tmp_path / "records.jsonl"
    assert region_data.main(["build", "--captions", str(captioned), "--out", str(out), "--backend", "local",
                             "--model-folder", str(folder)]) == 0
    records = read_records(out, need_renders=False)
    assert [r.t_e for r in records] == [plan["target_description"]] * 2
    assert records[1].t_ins == rules_edit("a yellow ball on a table")[0]


def snapshot(folder):
    """{relative path: bytes} of every file under `folder` (hidden staging folders included)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_rebuilding_refuses_to_replace_a_data_set_unless_told_to(captioned, tiny_generator, tmp_path, capsys):
    out = tmp_path / "data" / "records.jsonl"
    args = ["build", "--captions", str(captioned), "--out", str(out), "--generator", str(tiny_generator), "--steps",
            "2", "--size", "64"]
    assert region_data.main([*args, "--seed", "1"]) == 0
    before = snapshot(out.parent)
    assert len(before) == 3  # records.jsonl + 2 renders
    assert region_data.main([*args, "--seed", "2"]) == 2
    err = capsys.readouterr().err
    assert "already holds a data set" in err and "--overwrite" in err
    assert snapshot(out.parent) == before
    assert region_data.main([*args, "--seed", "2", "--overwrite"]) == 0
    after = snapshot(out.parent)
    assert set(after) == set(before) and after != before  # replaced in place, nothing left beside it
    assert len(read_records(out)) == 2


def test_an_interrupted_build_leaves_the_old_data_set_intact(captioned, tiny_generator, tmp_path, monkeypatch):
    out = tmp_path / "records.jsonl"
    args = ["build", "--captions", str(captioned), "--out", str(out), "--generator", str(tiny_generator), "--steps",
            "2", "--size", "64"]
    assert region_data.main([*args, "--seed", "1"]) == 0
    before = snapshot(tmp_path)
    real, calls = region_data.render, []

    def render_then_ctrl_c(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(region_data, "render", render_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        region_data.main([*args, "--seed", "2", "--overwrite"])
    assert len(calls) == 2 and snapshot(tmp_path) == before  # no .tmp, no partial folder, old records and renders


def test_outputs_and_images_are_checked_before_any_work(captioned, tiny_generator, tmp_path, capsys, monkeypatch):
    def no_generator(*a, **k):
        raise AssertionError("the generator was loaded before the outputs were checked")

    monkeypatch.setattr(region_data, "load_sd15_pipeline", no_generator)
    (tmp_path / "folder").mkdir()
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    not_images = tmp_path / "captions.jsonl"
    write_jsonl(not_images, [{"image": str(text), "caption": "a red car"}])
    cases = [
        (["--captions", str(captioned), "--out", str(tmp_path / "folder")], "is a folder; give the records file"),
        (["--captions", str(captioned), "--out", "/proc/xmgie/records.jsonl"], "cannot be written"),
        (["--captions", str(captioned), "--out", str(captioned), "--overwrite"], "would replace the input"),
        (["--captions", str(not_images), "--out", str(tmp_path / "r.jsonl")], "notes.png is not a readable image"),
    ]
    before = snapshot(tmp_path)
    for argv, message in cases:
        assert region_data.main(["build", *argv, "--generator", str(tiny_generator)]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    assert region_data.main(["build", "--captions", str(not_images), "--out", str(tmp_path / "r.jsonl")]) == 2
    assert "is not a readable image" in capsys.readouterr().err
    notes = tmp_path / "notes.jsonl"
    notes.write_text("my notes\n")
    assert region_data.main(["build", "--captions", str(captioned), "--out", str(notes), "--overwrite"]) == 2
    assert "is not a region data set" in capsys.readouterr().err
    assert snapshot(tmp_path) == {**before, "notes.jsonl": b"my notes\n"}


# --- the training CLI on tiny transformers models -----------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory, clip_tokenizer):
    """(CLIP folder, T5 folder): tiny random transformers models with tokenizers, as the CLI loads them."""
    root = tmp_path_factory.mktemp("encoders")
    return save_tiny_clip(root / "tiny-clip", clip_tokenizer), save_tiny_t5(root / "tiny-t5")


def cli(records, folders, out, *extra: str) -> int:
    return region_train.main(["--data", str(records), "--clip", str(folders[0]), "--t5", str(folders[1]),
                              "--out", str(out), "--batch-size", "2", "--heads", "4", "--lr", "1e-3",
                              "--save-every", "2", *extra])


def without_time(log_path):
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in log_path.read_text().splitlines()]


def test_cli_trains_and_resumes_bit_identically(tiny_folders, tmp_path, capsys):
    records = write_task(tmp_path / "data", 6, seed=5)[0]  # 3 batches per epoch: 4 steps cross an epoch boundary
    assert cli(records, tiny_folders, tmp_path / "straight", "--steps", "4", "--threshold", "0.4") == 0
    out = tmp_path / "straight"
    assert f"wrote {out / PREDICTOR}" in capsys.readouterr().out
    log = [json.loads(line) for line in (out / LOG).read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and [r["epoch"] for r in log] == [0, 0, 1, 1]
    assert all(set(TERMS) <= set(r) and all(torch.isfinite(torch.tensor(r[k])) for k in TERMS) for r in log)
    config, meta = read_config(out / PREDICTOR)
    assert (config.dim, config.image_size, config.patch_size, config.grid, config.threshold) == (32, 32, 8, 4, 0.4)
    assert (config.image_encoder, config.instruction_encoder, meta["steps"]) == ("tiny-clip", "tiny-t5", "4")
    load_predictor(out / PREDICTOR)

    half = tmp_path / "resumed"
    assert cli(records, tiny_folders, half, "--steps", "2", "--threshold", "0.4") == 0
    with (half / LOG).open("a") as f:  # a step logged after the checkpoint by a run that then died mid-line
        f.write(json.dumps({"step": 3, "loss": 0.0}) + '\n{"step": 4, "lo')
    assert cli(records, tiny_folders, half, "--steps", "4", "--threshold", "0.4", "--resume") == 0
    for name in (PREDICTOR, CHECKPOINT):
        a, b = load_file(str(out / name)), load_file(str(half / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert without_time(out / LOG) == without_time(half / LOG)


def test_cli_refuses_to_overwrite_or_to_resume_another_run(tiny_folders, tmp_path, capsys):
    records = write_task(tmp_path / "data", 4, seed=6)[0]
    assert cli(records, tiny_folders, tmp_path / "run", "--steps", "2") == 0
    capsys.readouterr()
    assert cli(records, tiny_folders, tmp_path / "run", "--steps", "4") == 2
    assert "already holds a training run" in capsys.readouterr().err
    assert cli(records, tiny_folders, tmp_path / "run", "--steps", "4", "--resume", "--lr", "0.5") == 2
    assert "lr" in capsys.readouterr().err
    assert cli(records, tiny_folders, tmp_path / "other", "--steps", "4", "--resume") == 2
    assert "No checkpoint to resume from" in capsys.readouterr().err
    assert cli(records, tiny_folders, tmp_path / "big", "--steps", "1", "--batch-size", "5") == 2
    assert "too few for --batch-size 5" in capsys.readouterr().err


@pytest.mark.parametrize("which, damage, message", [
    ("clip", "missing", "CLIP folder not found"),
    ("clip", "pickle", "which xMGIE does not load because pickles can run code"),
    ("t5", "missing", "FLAN-T5 folder not found"),
])
def test_cli_names_a_bad_model_folder(tiny_folders, toy_records, tmp_path, capsys, which, damage, message):
    folder = tmp_path / which
    if damage == "pickle":
        folder.mkdir()
        (folder / "config.json").write_text("{}")
        (folder / "pytorch_model.bin").write_bytes(b"")
    clip, t5 = (folder, tiny_folders[1]) if which == "clip" else (tiny_folders[0], folder)
    assert cli(toy_records, (clip, t5), tmp_path / "run", "--steps", "1") == 2
    assert message in capsys.readouterr().err


NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")


@NO_GPU
@pytest.mark.parametrize("device, message", [
    ("cuda", "--device cuda: no CUDA GPU is usable here"), ("cuda:1", "--device cuda:1: no CUDA GPU is usable here"),
    ("gpu", "--device 'gpu' is not a device"), ("mps", "--device mps: no mps device is usable here"),
])
def test_a_device_this_machine_lacks_is_refused_before_any_work(tiny_folders, toy_records, tmp_path, capsys,
                                                                 device, message):
    assert cli(toy_records, tiny_folders, tmp_path / "run", "--steps", "1", "--device", device) == 2
    err = capsys.readouterr().err
    assert message in err and "cpu" in err.split(message)[1] and "Traceback" not in err
    assert not (tmp_path / "run").exists()
    assert region_data.main(["build", "--captions", str(toy_records), "--out", str(tmp_path / "r.jsonl"),
                             "--device", device]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "r.jsonl").exists()


def test_encoders_of_different_widths_are_refused(toy_records, tmp_path):
    encoders = Encoders(ToyCLIP(dim=16), ToyText(), toy_instruction_encoder())
    with pytest.raises(XMGIEInputError, match="16-d but the instruction encoder's are 32-d"):
        train(RegionDataset(read_records(toy_records), SIZE), encoders, tmp_path, TrainSettings(steps=1, heads=4))


# --- the learning test --------------------------------------------------------------------------------------------

def iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a & b).flatten(1).sum(1) / (a | b).flatten(1).sum(1).clamp(min=1)


def test_the_losses_alone_teach_the_predictor_where_the_named_shape_is(tmp_path):
    """Toy task: recolour ONE of three shapes; X_gen redraws the whole picture. No mask enters the loss, yet the
    thresholded region lands on the named shape of held-out images."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is as fast, and immune to busy CPUs
    try:
        began = time.perf_counter()
        train_records = write_task(tmp_path / "train", 256, seed=0)[0]
        test_records, named, others = write_task(tmp_path / "test", 64, seed=1)
        encoders = Encoders(ToyCLIP(), ToyText(), toy_instruction_encoder(), "toy-clip", "toy-t5")
        settings = TrainSettings(steps=STEPS, batch_size=16, lr=1e-3, heads=4, save_every=STEPS)
        path = train(RegionDataset(read_records(train_records), SIZE), encoders, tmp_path / "run", settings)
        seconds = time.perf_counter() - began
    finally:
        torch.set_num_threads(threads)
    predictor = load_predictor(path)
    dataset = RegionDataset(read_records(test_records), SIZE)
    batch = collate([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        f_img = encoders.image(batch["image"])[1]
        grid = predictor.grid_probability(f_img, *encoders.instruction(batch["t_ins"]))
    region = F.interpolate(grid[:, None], size=(SIZE, SIZE), mode="bilinear")[:, 0] >= predictor.config.threshold
    learned = iou(region, named).mean().item()
    everything = iou(torch.ones_like(region), named).mean().item()
    coin = iou(torch.rand(region.shape, generator=torch.Generator().manual_seed(0)) < 0.5, named).mean().item()
    print(f"held-out IoU {learned:.3f} (all-ones {everything:.3f}, random {coin:.3f}), {STEPS} steps, {seconds:.1f} s")
    assert learned >= 0.5
    assert learned >= 4 * max(everything, coin)
    assert iou(region, others).mean().item() < 0.1  # the named shape, not just any shape


@pytest.mark.parametrize("change, flag", [({"lr": float("inf")}, "--lr inf"), ({"weight_decay": float("nan")},
                                          "--weight-decay nan"), ({"seed": -1}, "--seed -1"),
                                          ({"seed": 2**64}, "--seed 18446744073709551616")])
def test_training_settings_no_run_can_use_are_refused(change, flag):
    with pytest.raises(XMGIEInputError, match=rf"Invalid training settings: {flag}.* every number finite"):
        TrainSettings(**change)
    with pytest.raises(XMGIEInputError, match="must be finite and >= 0, got --alpha inf"):
        LossWeights(alpha=float("inf"))


def test_mgie_training_settings_no_run_can_use_are_refused():
    from xmgie_core.mgie.train_settings import MGIETrainSettings

    for change, flag in (({"lr": float("inf")}, "--lr inf"), ({"alpha": float("inf")}, "--alpha inf"),
                         ({"grad_clip": float("nan")}, "--grad-clip nan"), ({"seed": -5}, "--seed -5")):
        with pytest.raises(XMGIEInputError, match=rf"Invalid training settings: {flag}"):
            MGIETrainSettings(**change)


@pytest.mark.parametrize("args, message", [
    (["--guidance-scale", "nan"], "--guidance-scale nan"), (["--guidance-scale", "-1"], "--guidance-scale -1.0"),
    (["--strength", "inf"], "--strength inf"), (["--seed", "-1"], "--seed -1")])
def test_build_refuses_numbers_no_build_can_use(captioned, tmp_path, capsys, args, message):
    out = tmp_path / "r.jsonl"
    assert region_data.main(["build", "--captions", str(captioned), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert f"Invalid settings: {message}" in err and "Every number must be finite" in err and not out.exists()
