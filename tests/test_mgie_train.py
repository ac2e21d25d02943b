"""MGIE training (xmgie_core/mgie/train.py, ml-mgie's L_all = L_ins + 0.5 L_edit): each loss on known tensors, the
teacher-forced [IMG] states against generation, the conditioning dropout, what receives gradient, the CLI on tiny
models (resume is bit-identical; the written MGIE folder and U-Net load with the trained values), clear errors for
bad records and model folders, and that training lowers both losses (tests/fixtures/mgie_train_data.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from fixtures.mgie_train_data import RESOLUTION, save_training_models, tiny_ip2p_unet, write_records
from fixtures.tiny_mgie import INSTRUCTION, build_tiny_mgie
from xmgie_core.errors import XMGIEInputError
from xmgie_core.mgie import MGIE, img_position, load_mgie_folder, mgie_conditioning
from xmgie_core.mgie import train as mgie_train
from xmgie_core.mgie.convert import unet_source, write_unet
from xmgie_core.mgie.data import IGNORE, MGIEDataset, collate, read_mgie_records, training_sequence
from xmgie_core.mgie.objective import (
    MGIEObjective, dropout_masks, edit_loss, img_states, instruction_loss, noise_scheduler, prepare,
    sequence_embeddings, step_generator,
)
from xmgie_core.mgie.train import MGIE_DIR, UNET_FILE, main
from xmgie_core.mgie.train_models import SD15_IP2P_UNET, load_models, load_unet
from xmgie_core.mgie.train_settings import MGIETrainSettings
from xmgie_core.mgie.trainables import attach_lora, build_trainables, write_back
from xmgie_core.mgie.unet_layout import diffusers_unet_to_ldm
from xmgie_core.training import CHECKPOINT, LOG

ROOT = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    return save_training_models(tmp_path_factory.mktemp("mgie_train_models"))


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> Path:
    return write_records(tmp_path_factory.mktemp("mgie_train_data"), 8, seed=3)


def models(folders, **kwargs):
    return load_models(folders["mgie"], folders["unet"], folders["vae"], resolution=RESOLUTION, **kwargs)


def cli(folders, records, out, *extra: str) -> int:
    return main(["--data", str(records), "--mgie", str(folders["mgie"]), "--unet", str(folders["unet"]),
                 "--vae", str(folders["vae"]), "--out", str(out), "--resolution", str(RESOLUTION), "--batch-size", "2",
                 "--save-every", "2", "--lr", "1e-3", *extra])


def batch_of(m, data: Path, n: int | None = None, settings: MGIETrainSettings | None = None, seed: int = 7):
    """A prepared batch (fixed draws) of the first n records."""
    settings = settings or MGIETrainSettings(resolution=RESOLUTION)
    dataset = MGIEDataset(read_mgie_records(data), m.mgie, RESOLUTION)
    items = [dataset[i] for i in range(n or len(dataset))]
    batch = collate(items, m.mgie.tokenizer.eos_token_id)
    return prepare(batch, m, noise_scheduler(), settings, step_generator(seed, 0, 0, CPU), CPU)


def square_image(seed: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (1, 32, 32, 3), generator=g).float() / 255


# --- records and the teacher-forced sequence ----------------------------------------------------------------------

def test_records_resolve_relative_paths(records):
    rs = read_mgie_records(records)
    assert len(rs) == 8 and [r.line for r in rs] == list(range(1, 9))
    assert rs[0].image == records.parent / "img" / "0_in.png" and rs[0].target == records.parent / "img" / "0_out.png"
    assert rs[0].instruction.startswith("make it ") and rs[0].expressive.endswith(".")


@pytest.mark.parametrize("line, message", [
    ("not json", r"line 2: not valid JSON"),
    ("[1, 2]", r"line 2: a record must be a JSON object"),
    ('{"image": "img/0_in.png", "instruction": "x", "expressive": "y", "target": "img/0_out.png", "mask": 1}',
     r"line 2: unknown fields \['mask'\]"),
    ('{"image": "img/0_in.png", "expressive": "y", "target": "img/0_out.png"}',
     r"line 2, field 'instruction': missing or empty"),
    ('{"image": "img/0_in.png", "instruction": "x", "expressive": "  ", "target": "img/0_out.png"}',
     r"line 2, field 'expressive': missing or empty"),
    ('{"image": "img/0_in.png", "instruction": "x", "expressive": "y [IMG0]", "target": "img/0_out.png"}',
     r"line 2, field 'expressive': contains MGIE's reserved tokens \['\[IMG0\]'\]"),
    ('{"image": "img/nope.png", "instruction": "x", "expressive": "y", "target": "img/0_out.png"}',
     r"line 2, field 'image': file not found: .*nope.png"),
    ('{"image": "img/0_in.png", "instruction": "x", "expressive": "y", "target": 3}',
     r"line 2, field 'target': missing or not a path string"),
])
def test_bad_records_name_the_line_and_field(records, tmp_path, line, message):
    shutil.copytree(records.parent / "img", tmp_path / "img")
    path = tmp_path / "r.jsonl"
    first = records.read_text().splitlines()[0]
    path.write_text(first + "\n" + line + "\n\n")
    with pytest.raises(XMGIEInputError, match=message):
        read_mgie_records(path)


def test_missing_or_empty_data(tmp_path):
    with pytest.raises(XMGIEInputError, match="Training data not found"):
        read_mgie_records(tmp_path / "none.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(XMGIEInputError, match="holds no records"):
        read_mgie_records(tmp_path / "empty.jsonl")


def test_training_sequence_is_prompt_then_expressive_img_tokens_eos():
    model = MGIE(*build_tiny_mgie(rig=False))
    tok, meta = model.tokenizer, model.meta
    seq = training_sequence(model, INSTRUCTION, "The sky turns orange.")
    prompt = model.prompt_ids(INSTRUCTION)[0].tolist()
    n = len(prompt)
    assert seq.ids[:n] == prompt
    assert seq.labels[:n] == [IGNORE] * n and seq.labels[n:] == seq.ids[n:]
    assert seq.ids[-9:] == list(meta.img_token_ids) + [tok.eos_token_id]
    assert tok.decode(seq.ids[n:-9]) == " The sky turns orange."  # vicuna: 'ASSISTANT: ' + response
    assert seq.img_start == seq.ids.index(meta.img_token_ids[0]) - 1
    with pytest.raises(XMGIEInputError, match="special tokens"):
        training_sequence(model, INSTRUCTION, "done</s>")
    with pytest.raises(XMGIEInputError, match="instruction is empty"):
        training_sequence(model, " ", "x")


def test_prompt_embeddings_equal_mgie_input_embeddings():
    model = MGIE(*build_tiny_mgie(rig=False))
    image = square_image()
    seq = training_sequence(model, INSTRUCTION, "Red sky.")
    ids = torch.tensor([seq.ids])
    img_ids = torch.tensor(model.meta.img_token_ids)
    embed = model.llm.get_input_embeddings()
    rows = torch.randn(8, embed.weight.shape[1])
    with torch.no_grad():
        feats = model.image_features(model.preprocess(image))
        embeds = sequence_embeddings(embed, ids, feats, model.meta.im_patch_id, img_ids, rows)
        reference, _ = model.input_embeddings(INSTRUCTION, image)
    n = reference.shape[1]
    torch.testing.assert_close(embeds[:, :n], reference, rtol=0, atol=0)
    is_img = torch.isin(ids[0], img_ids)
    assert int(is_img.sum()) == 8
    torch.testing.assert_close(embeds[0, is_img], rows)  # the trained rows, not embed_tokens'
    rest = ~is_img & (torch.arange(len(seq.ids)) >= n)
    torch.testing.assert_close(embeds[0, rest], embed(ids)[0, rest])


def test_teacher_forced_img_states_equal_generation():
    """The rigged tiny MGIE writes TEXT [IMG0]..[IMG7] EOS; one teacher-forced forward over that sequence gives the
    [IMG] states and conditioning generate() computed."""
    model = MGIE(*build_tiny_mgie(rig=True))
    image = square_image()
    result = model.generate(image, INSTRUCTION, max_new_tokens=40)
    assert result.img_generated
    seq = model.prompt_ids(INSTRUCTION)[0].tolist() + result.new_tokens
    img_ids = torch.tensor(model.meta.img_token_ids)
    embed = model.llm.get_input_embeddings()
    with torch.no_grad():
        feats = model.image_features(model.preprocess(image))
        embeds = sequence_embeddings(embed, torch.tensor([seq]), feats, model.meta.im_patch_id, img_ids,
                                     embed.weight[img_ids])
        hidden = model.llm.model(inputs_embeds=embeds).last_hidden_state
        p = img_position(seq, len(seq), model.meta.img_token_ids[0])
        assert p == seq.index(model.meta.img_token_ids[0]) - 1
        states = img_states(hidden, torch.tensor([p]))
        positive, negative = mgie_conditioning(model.edit_head, states, embed.weight[img_ids])
    torch.testing.assert_close(states, result.img_hidden, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(positive, result.positive, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(negative, result.negative, rtol=1e-4, atol=1e-5)


# --- the losses on known tensors -----------------------------------------------------------------------------------

def test_instruction_loss_is_cross_entropy_on_response_positions_only():
    torch.manual_seed(0)
    vocab, dim = 20, 16
    lm_head = nn.Linear(dim, vocab, bias=False)
    img_ids, eos = torch.arange(12, 20), 2
    img_head = torch.randn(8, dim)
    hidden = torch.randn(2, 7, dim)
    labels = torch.full((2, 7), IGNORE)
    labels[0, 3:] = torch.tensor([5, 12, 13, eos])  # response at positions 3..6 (predicted by states 2..5)
    labels[1, 5:] = torch.tensor([7, 19])
    terms = instruction_loss(hidden, labels, lm_head, img_ids, img_head, eos)
    weight = lm_head.weight.detach().clone()
    weight[img_ids] = img_head  # the [IMG] logits come from the trained rows
    logits = hidden @ weight.T
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1), ignore_index=IGNORE)
    torch.testing.assert_close(terms["l_ins"], expected)
    per = {(0, 2): 5, (0, 3): 12, (0, 4): 13, (0, 5): eos, (1, 4): 7, (1, 5): 19}
    ce = {k: F.cross_entropy(logits[k[0], k[1]][None], torch.tensor([v])) for k, v in per.items()}
    torch.testing.assert_close(terms["l_ins_text"], (ce[(0, 2)] + ce[(1, 4)]) / 2)
    torch.testing.assert_close(terms["l_ins_img"], (ce[(0, 3)] + ce[(0, 4)] + ce[(0, 5)] + ce[(1, 5)]) / 4)
    # states that predict prompt tokens (or nothing) do not count
    other = hidden.clone()
    other[0, :2], other[0, 6], other[1, :4], other[1, 6] = 9.0, -3.0, 5.0, 1.0
    torch.testing.assert_close(instruction_loss(other, labels, lm_head, img_ids, img_head, eos)["l_ins"],
                               terms["l_ins"], rtol=0, atol=0)
    other = hidden.clone()
    other[0, 2] += 1.0
    assert not torch.allclose(instruction_loss(other, labels, lm_head, img_ids, img_head, eos)["l_ins"],
                              terms["l_ins"])


def test_img_states_pick_the_eight_states_from_each_start():
    hidden = torch.arange(2 * 12 * 3, dtype=torch.float32).reshape(2, 12, 3)
    states = img_states(hidden, torch.tensor([1, 3]))
    assert torch.equal(states[0], hidden[0, 1:9]) and torch.equal(states[1], hidden[1, 3:11])


def test_edit_loss_equals_manual_mse():
    unet = tiny_ip2p_unet()
    g = torch.Generator().manual_seed(0)
    noisy, source, noise = (torch.randn(2, 4, 4, 4, generator=g) for _ in range(3))
    cond = torch.randn(2, 5, 24, generator=g)
    t = torch.tensor([10, 700])
    with torch.no_grad():
        loss = edit_loss(unet, cond, noisy, source, t, noise)
        pred = unet(torch.cat([noisy, source], 1), t, encoder_hidden_states=cond).sample
    torch.testing.assert_close(loss, ((pred - noise) ** 2).mean())
    assert loss.item() > 0


def test_dropout_masks_at_seeded_rates():
    u = torch.rand(400_000, generator=torch.Generator().manual_seed(1))
    text, image = dropout_masks(u, 0.05, 0.05, 0.05)
    # ml-mgie: mask = prob < 2 * DROP (text); lat_inp *= 1 - (prob >= DROP) * (prob < 3 * DROP)
    assert torch.equal(text, u < 0.1) and torch.equal(image, (u >= 0.05) & (u < 0.15))
    for (t, i, b) in ((0.05, 0.05, 0.05), (0.1, 0.2, 0.3), (0.0, 0.0, 0.0)):
        text, image = dropout_masks(u, t, i, b)
        rates = [(text & ~image).float().mean(), (image & ~text).float().mean(), (text & image).float().mean()]
        for got, want in zip(rates, (t, i, b)):
            assert abs(got.item() - want) < 0.003, (t, i, b, rates)
    # one step's draws are a function of (seed, step, rank)
    a, b = (torch.rand(4, generator=step_generator(0, 5, 0, CPU)) for _ in range(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, torch.rand(4, generator=step_generator(0, 6, 0, CPU)))
    assert not torch.equal(a, torch.rand(4, generator=step_generator(0, 5, 1, CPU)))


def test_objective_wires_the_dropout_and_alpha(folders, records):
    m = models(folders)
    settings = MGIETrainSettings(resolution=RESOLUTION)
    trainables = build_trainables(m.mgie, m.unet, settings)
    objective = MGIEObjective(m.mgie, m.unet, trainables, alpha=0.5)
    inputs = batch_of(m, records, 2)
    none = torch.zeros(2, dtype=torch.bool)
    all_ = torch.ones(2, dtype=torch.bool)
    with torch.no_grad():
        plain = objective(**{**inputs, "drop_text": none, "drop_image": none})
        text = objective(**{**inputs, "drop_text": all_, "drop_image": none})
        image = objective(**{**inputs, "drop_text": none, "drop_image": all_})
        llm = m.mgie.llm
        embeds = sequence_embeddings(llm.get_input_embeddings(), inputs["ids"], inputs["features"],
                                     m.mgie.meta.im_patch_id, objective.img_ids, trainables.img_embed)
        hidden = llm.model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"]).last_hidden_state
        positive, negative = mgie_conditioning(trainables.edit_head, img_states(hidden, inputs["img_start"]),
                                               trainables.img_embed)
        args = (inputs["noisy"], inputs["source_latent"], inputs["timesteps"], inputs["noise"])
        zeroed = (inputs["noisy"], torch.zeros_like(inputs["source_latent"]), *args[2:])
        torch.testing.assert_close(plain["l_edit"], edit_loss(m.unet, positive, *args))
        torch.testing.assert_close(text["l_edit"], edit_loss(m.unet, negative, *args))
        torch.testing.assert_close(image["l_edit"], edit_loss(m.unet, positive, *zeroed))
    torch.testing.assert_close(plain["loss"], plain["l_ins"] + 0.5 * plain["l_edit"])
    torch.testing.assert_close(text["l_ins"], plain["l_ins"])
    assert len({round(x["l_edit"].item(), 6) for x in (plain, text, image)}) == 3


def test_latents_follow_ml_mgie(folders, records):
    """Target latent = sample * scaling_factor; input-image latent = mode, unscaled (InstructPix2Pix)."""
    m = models(folders)
    dataset = MGIEDataset(read_mgie_records(records), m.mgie, RESOLUTION)
    batch = collate([dataset[0]], 0)
    settings = MGIETrainSettings(resolution=RESOLUTION)
    inputs = prepare(batch, m, noise_scheduler(), settings, step_generator(0, 0, 0, CPU), CPU)
    g = step_generator(0, 0, 0, CPU)
    with torch.no_grad():
        target = m.vae.encode(batch["target"]).latent_dist.sample(generator=g) * m.vae.config.scaling_factor
        source = m.vae.encode(batch["source"]).latent_dist.mode()
    noise = torch.randn(target.shape, generator=g)
    t = torch.randint(0, 1000, (1,), generator=g)
    torch.testing.assert_close(inputs["source_latent"], source)
    torch.testing.assert_close(inputs["noise"], noise)
    assert torch.equal(inputs["timesteps"], t)
    torch.testing.assert_close(inputs["noisy"], noise_scheduler().add_noise(target, noise, t))
    assert inputs["noisy"].shape == (1, 4, RESOLUTION // 8, RESOLUTION // 8)
    assert batch["source"].min() >= -1 and batch["source"].max() <= 1


# --- what trains --------------------------------------------------------------------------------------------------

def test_gradient_reaches_only_the_trainables(folders, records):
    m = models(folders)
    settings = MGIETrainSettings(resolution=RESOLUTION, lora_rank=2)
    trainables = build_trainables(m.mgie, m.unet, settings)
    attach_lora(m.mgie.llm, trainables)
    with torch.no_grad():  # LoRA's up starts at zero: make the adapters matter for the gradient of down
        for adapter in trainables.lora.values():
            adapter.up.normal_()
    objective = MGIEObjective(m.mgie, m.unet, trainables, alpha=0.5)
    objective(**batch_of(m, records, 2))["loss"].backward()
    frozen = [m.mgie.llm, m.mgie.vision, m.mgie.projector, m.unet, m.vae]
    assert all(p.grad is None and not p.requires_grad for module in frozen for p in module.parameters())
    named = dict(trainables.named_parameters())
    assert {"img_embed", "img_head"} <= set(named) and any(k.startswith("edit_head.") for k in named)
    assert sum(k.startswith("lora.") for k in named) == 2 * 2 * 2  # 2 layers x (q, v) x (down, up)
    for name, p in named.items():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()), name
    for name in ("img_embed", "img_head", "edit_head.query", "edit_head.llm2hid.weight"):
        assert named[name].grad.abs().sum() > 0, name
    assert trainables.img_embed.shape == (8, 64)


def test_one_step_changes_only_the_img_rows_and_the_edit_head(folders, records, tmp_path):
    assert cli(folders, records, tmp_path / "run", "--steps", "1", "--lr", "1e-2") == 0
    before, after = (load_file(str(f / "model.safetensors")) for f in (folders["mgie"], tmp_path / "run" / MGIE_DIR))
    img = list(load_mgie_folder(folders["mgie"]).meta.img_token_ids)
    others = [i for i in range(before["model.embed_tokens.weight"].shape[0]) if i not in img]
    assert before.keys() == after.keys()
    for key in before:
        if key in ("model.embed_tokens.weight", "lm_head.weight"):
            assert torch.equal(before[key][others], after[key][others]), key
            assert not torch.equal(before[key][img], after[key][img]), key
        else:
            assert torch.equal(before[key], after[key]), key
    a, b = (load_file(str(f / "vision" / "model.safetensors")) for f in (folders["mgie"], tmp_path / "run" / MGIE_DIR))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a, b = (load_file(str(f / "mgie.safetensors")) for f in (folders["mgie"], tmp_path / "run" / MGIE_DIR))
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("mm_projector."))
    assert not all(torch.equal(a[k], b[k].to(a[k].dtype)) for k in a if k.startswith("edit_head."))
    assert not (tmp_path / "run" / UNET_FILE).exists()


def test_merged_lora_computes_what_the_adapters_did(folders, records):
    m = models(folders)
    trainables = build_trainables(m.mgie, m.unet, MGIETrainSettings(resolution=RESOLUTION, lora_rank=3))
    handles = attach_lora(m.mgie.llm, trainables)
    with torch.no_grad():
        for adapter in trainables.lora.values():
            adapter.up.normal_(std=0.2)
        trainables.img_embed.add_(torch.randn_like(trainables.img_embed))
        trainables.img_head.add_(torch.randn_like(trainables.img_head))
    inputs = batch_of(m, records, 2)
    llm = m.mgie.llm
    before = {k: v.clone() for k, v in llm.state_dict().items()}
    objective = MGIEObjective(m.mgie, m.unet, trainables, alpha=0.5)

    def hidden(rows):
        embeds = sequence_embeddings(llm.get_input_embeddings(), inputs["ids"], inputs["features"],
                                     m.mgie.meta.im_patch_id, objective.img_ids, rows)
        return llm.model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"]).last_hidden_state

    with torch.no_grad():
        adapted = hidden(trainables.img_embed)
        write_back(m.mgie, trainables, handles)
        merged = hidden(llm.get_input_embeddings().weight[objective.img_ids])
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-5)
    changed = {k for k, v in llm.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {f"model.layers.{i}.self_attn.{p}.weight" for i in range(2) for p in ("q_proj", "v_proj")} | {
        "model.embed_tokens.weight", "lm_head.weight"}


# --- the CLI: resume, outputs, errors --------------------------------------------------------------------------------

def without_time(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in path.read_text().splitlines()]


def test_cli_resumes_bit_identically_and_writes_loadable_outputs(folders, records, tmp_path, capsys):
    extra = ("--lora-rank", "2", "--train-unet")  # everything that can train
    straight = tmp_path / "straight"
    assert cli(folders, records, straight, "--steps", "5", *extra) == 0  # 4 batches per epoch: crosses an epoch
    out = capsys.readouterr().out
    assert f"wrote {straight / MGIE_DIR}" in out and f"wrote {straight / UNET_FILE}" in out
    log = [json.loads(line) for line in (straight / LOG).read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5] and [r["epoch"] for r in log] == [0, 0, 0, 1, 1]
    for r in log:
        assert set(mgie_train.TERMS) <= set(r)
        assert all(torch.isfinite(torch.tensor(r[k])) for k in mgie_train.TERMS)
        assert abs(r["loss"] - (r["l_ins"] + 0.5 * r["l_edit"])) < 1e-5

    half = tmp_path / "resumed"
    assert cli(folders, records, half, "--steps", "2", *extra) == 0
    with (half / LOG).open("a") as f:  # a step logged after the checkpoint by a run that then died mid-line
        f.write(json.dumps({"step": 3, "loss": 0.0}) + '\n{"step": 4, "lo')
    assert cli(folders, records, half, "--steps", "5", "--resume", *extra) == 0
    for name in (CHECKPOINT, UNET_FILE, f"{MGIE_DIR}/mgie.safetensors", f"{MGIE_DIR}/model.safetensors"):
        a, b = load_file(str(straight / name)), load_file(str(half / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert without_time(straight / LOG) == without_time(half / LOG)

    # the written MGIE folder loads and holds the trained tensors (+ the merged LoRA)
    ckpt = load_file(str(straight / CHECKPOINT))
    trained = load_mgie_folder(straight / MGIE_DIR)
    original = load_mgie_folder(folders["mgie"])
    img = list(trained.meta.img_token_ids)
    for k, v in trained.edit_head.state_dict().items():
        assert torch.equal(v, ckpt[f"model.edit_head.{k}"]), k
    assert torch.equal(trained.llm.get_input_embeddings().weight[img], ckpt["model.img_embed"])
    assert torch.equal(trained.llm.get_output_embeddings().weight[img], ckpt["model.img_head"])
    q = "model.layers.1.self_attn.q_proj"
    delta = ckpt[f"model.lora.{q.replace('.', '-')}.up"] @ ckpt[f"model.lora.{q.replace('.', '-')}.down"]
    torch.testing.assert_close(trained.llm.get_submodule(q).weight, original.llm.get_submodule(q).weight + delta)
    assert not torch.equal(trained.llm.get_submodule(q).weight, original.llm.get_submodule(q).weight)
    # the U-Net file is in the converter's (ComfyUI) layout, and loads back with the trained tensors
    unet_keys = set(load_file(str(straight / UNET_FILE)))
    assert "input_blocks.0.0.weight" in unet_keys and not any(k.startswith("down_blocks.") for k in unet_keys)
    unet = load_unet(straight / UNET_FILE)
    for k, v in unet.state_dict().items():
        assert torch.equal(v, ckpt[f"model.unet.{k}"]), k


def test_cli_refuses_to_overwrite_or_to_resume_another_run(folders, records, tmp_path, capsys):
    assert cli(folders, records, tmp_path / "run", "--steps", "1") == 0
    capsys.readouterr()
    assert cli(folders, records, tmp_path / "run", "--steps", "2") == 2
    assert "already holds a training run" in capsys.readouterr().err
    assert cli(folders, records, tmp_path / "run", "--steps", "2", "--resume", "--alpha", "1.0") == 2
    assert "alpha" in capsys.readouterr().err
    assert cli(folders, records, tmp_path / "other", "--steps", "2", "--resume") == 2
    assert "No checkpoint to resume from" in capsys.readouterr().err
    assert cli(folders, records, tmp_path / "big", "--steps", "1", "--batch-size", "9") == 2
    assert "too few for --batch-size 9" in capsys.readouterr().err
    assert cli(folders, records, tmp_path / "bad", "--steps", "1", "--text-drop", "0.6", "--image-drop", "0.6") == 2
    assert "sum of at most 1" in capsys.readouterr().err


def _bad_unet_folder(tmp_path: Path, **changes) -> Path:
    from diffusers import UNet2DConditionModel

    config = dict(sample_size=4, in_channels=8, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
                  norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=24, attention_head_dim=8)
    folder = tmp_path / "bad_unet"
    UNet2DConditionModel(**{**config, **changes}).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.mark.parametrize("which, damage, message", [
    ("mgie", "missing", "MGIE model folder not found"),
    ("mgie", "incomplete", "is incomplete: missing mgie.safetensors"),
    ("unet", "missing", "--unet .* does not exist"),
    ("unet", "pickle", "pickle files are never loaded"),
    ("unet", "bin-file", "is not a .safetensors file"),
    ("unet", "four-channels", "takes 4 input channels, but InstructPix2Pix needs 8"),
    ("unet", "cross-attention", "writes 24-d conditioning but the U-Net's cross-attention takes 32-d"),
    ("vae", "missing", "--vae .* does not exist"),
    ("vae", "not-a-model", "has no config.json"),
    ("vae", "unet", "holds a UNet2DConditionModel, not an AutoencoderKL"),
])
def test_cli_names_a_bad_model(folders, records, tmp_path, capsys, which, damage, message):
    paths = dict(folders)
    bad = tmp_path / which
    if damage == "incomplete":
        shutil.copytree(folders["mgie"], bad)
        (bad / "mgie.safetensors").unlink()
    elif damage == "pickle":
        bad.mkdir()
        (bad / "config.json").write_text("{}")
        (bad / "diffusion_pytorch_model.bin").write_bytes(b"")
    elif damage == "bin-file":
        bad = tmp_path / "unet.bin"
        bad.write_bytes(b"")
    elif damage == "four-channels":
        bad = _bad_unet_folder(tmp_path, in_channels=4)
    elif damage == "cross-attention":
        bad = _bad_unet_folder(tmp_path, cross_attention_dim=32)
    elif damage == "not-a-model":
        bad.mkdir()
    elif damage == "unet":
        bad = folders["unet"]
    paths[which] = bad
    assert cli(paths, records, tmp_path / "run", "--steps", "1") == 2
    assert re_search(message, capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_cuda_without_a_gpu_is_refused_before_any_work(folders, records, tmp_path, capsys):
    assert cli(folders, records, tmp_path / "run", "--steps", "1", "--device", "cuda") == 2
    err = capsys.readouterr().err
    assert "--device cuda: no CUDA GPU is usable here" in err and "Pass --device cpu" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("file", ["mgie.safetensors", "model.safetensors"])
def test_a_truncated_mgie_folder_is_named(folders, records, tmp_path, capsys, file):
    bad = tmp_path / "mgie"
    shutil.copytree(folders["mgie"], bad)
    (bad / file).write_bytes((bad / file).read_bytes()[:1000])
    assert cli({**folders, "mgie": bad}, records, tmp_path / "run", "--steps", "1") == 2
    err = capsys.readouterr().err
    assert f"{bad / file} (" in err and "looks truncated or corrupt" in err and "sha256" in err
    assert not (tmp_path / "run").exists()


def re_search(pattern: str, text: str) -> bool:
    import re

    return re.search(pattern, text) is not None


def test_unet_file_as_the_converter_writes_it(folders, tmp_path):
    """The converter's --out-unet (ComfyUI/LDM keys, no config) loads with --unet-config; without it the SD1.5
    InstructPix2Pix config is assumed and a tiny U-Net is refused with the fix."""
    unet = tiny_ip2p_unet()
    diffusers_file = tmp_path / "unet_diffusers.safetensors"
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(diffusers_file))
    comfy_file = write_unet(unet_source(diffusers_file), tmp_path / "mgie_unet.safetensors", torch.float32, {},
                            progress=False)
    with pytest.raises(XMGIEInputError, match="SD1.5 InstructPix2Pix's .*--unet-config"):
        load_unet(comfy_file)
    for path in (comfy_file, diffusers_file):
        loaded = load_unet(path, config_file=folders["unet"] / "config.json")
        expected = unet.state_dict()
        assert all(torch.equal(v, expected[k]) for k, v in loaded.state_dict().items())
    # SD1.5 InstructPix2Pix's layout (the default config) maps one to one onto ComfyUI's keys
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        sd15 = UNet2DConditionModel.from_config(SD15_IP2P_UNET)
    mapping = diffusers_unet_to_ldm(sd15.state_dict())
    assert mapping["conv_in.weight"] == "input_blocks.0.0.weight"
    assert sd15.state_dict()["conv_in.weight"].shape == (320, 8, 3, 3) and len(mapping) == len(sd15.state_dict())


# --- learning -------------------------------------------------------------------------------------------------------

def window_means(log_path: Path, k: int) -> dict[str, tuple[float, float]]:
    log = [json.loads(line) for line in log_path.read_text().splitlines()]
    return {t: (sum(r[t] for r in log[:k]) / k, sum(r[t] for r in log[-k:]) / k)
            for t in ("l_ins", "l_edit", "l_ins_img", "l_ins_text")}


def fixed_l_edit(m, data: Path) -> float:
    """L_edit of all records under fixed draws, no dropout (the same for every model)."""
    settings = MGIETrainSettings(resolution=RESOLUTION, text_drop=0, image_drop=0, both_drop=0)
    objective = MGIEObjective(m.mgie, m.unet, build_trainables(m.mgie, m.unet, settings), 0.5)
    with torch.no_grad():
        return sum(objective(**batch_of(m, data, settings=settings, seed=s))["l_edit"].item() for s in range(4)) / 4


def test_training_lowers_both_losses(folders, tmp_path):
    """The full objective (edit head, [IMG] rows, LoRA and the U-Net): the mean L_ins and L_edit of the last steps
    are well below those of the first steps."""
    data = write_records(tmp_path / "data", 16, seed=0)
    began = time.perf_counter()
    assert cli(folders, data, tmp_path / "run", "--steps", "120", "--batch-size", "4", "--lr", "3e-3",
               "--save-every", "1000", "--train-unet", "--lora-rank", "2") == 0
    means = window_means(tmp_path / "run" / LOG, 24)
    print({k: (round(a, 4), round(b, 4), f"{b / a:.2f}") for k, (a, b) in means.items()},
          f"{time.perf_counter() - began:.1f} s")
    (ins0, ins1), (edit0, edit1), (img0, img1) = means["l_ins"], means["l_edit"], means["l_ins_img"]
    assert ins1 < 0.93 * ins0 and img1 < 0.5 * img0
    assert edit1 < 0.6 * edit0


def test_default_training_lowers_both_losses(folders, tmp_path):
    """Default trainables (edit head + [IMG] rows, frozen random U-Net): L_ins falls in the log; L_edit falls on
    fixed draws (the random timesteps make the per-step log too noisy for the head's smaller gain)."""
    data = write_records(tmp_path / "data", 16, seed=0)
    began = time.perf_counter()
    assert cli(folders, data, tmp_path / "run", "--steps", "150", "--batch-size", "4", "--lr", "3e-3",
               "--save-every", "1000") == 0
    means = window_means(tmp_path / "run" / LOG, 30)
    before = fixed_l_edit(models(folders), data)
    after = fixed_l_edit(load_models(tmp_path / "run" / MGIE_DIR, folders["unet"], folders["vae"],
                                     resolution=RESOLUTION), data)
    print({k: (round(a, 4), round(b, 4), f"{b / a:.2f}") for k, (a, b) in means.items()},
          f"fixed-draw L_edit {before:.4f} -> {after:.4f} ({after / before:.3f}), {time.perf_counter() - began:.1f} s")
    (ins0, ins1), (img0, img1) = means["l_ins"], means["l_ins_img"]
    assert ins1 < 0.93 * ins0 and img1 < 0.5 * img0
    assert after < 0.97 * before


def test_dispatcher_runs_train(capsys):
    from xmgie_core.mgie.__main__ import main as mgie_main

    with pytest.raises(SystemExit) as done:
        mgie_main(["train", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "usage: python -m xmgie_core.mgie train" in out and "--lora-rank" in out


# --- DDP --------------------------------------------------------------------------------------------------------------

def test_torchrun_two_processes(folders, records, tmp_path):
    """torchrun with 2 CPU processes (gloo): the log has one line per step (rank 0 writes) and the folder loads."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "xmgie_core.mgie.train", "--data", str(records), "--mgie", str(folders["mgie"]),
           "--unet", str(folders["unet"]), "--vae", str(folders["vae"]), "--out", str(tmp_path / "run"),
           "--resolution", str(RESOLUTION), "--batch-size", "2", "--steps", "3", "--device", "cpu"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    log = [json.loads(line) for line in (tmp_path / "run" / LOG).read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and [r["epoch"] for r in log] == [0, 1, 1]  # 2 batches per rank
    assert done.stdout.count("wrote ") == 1
    load_mgie_folder(tmp_path / "run" / MGIE_DIR)
