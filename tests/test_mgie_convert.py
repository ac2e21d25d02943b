"""`python -m xmgie_core.mgie convert` on a synthetic tiny ml-mgie release (tests/fixtures/mgie_release.py)."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fixtures.mgie_release import (
    BASE_VOCAB, EDIT_HEAD, Release, build_release, tiny_ip2p_unet, tiny_tokenizer, write_pickle_with_code,
)
from xmgie_core.errors import XMGIEInputError
from xmgie_core.mgie import ADDED_TOKENS, load_mgie_folder
from xmgie_core.mgie.convert import convert, main
from xmgie_core.mgie.unet_layout import UNET_FORMAT, diffusers_unet_to_ldm

ROOT = Path(__file__).resolve().parent.parent
EMBED, LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"


def _derived(key: str) -> bool:
    return key.endswith("rotary_emb.inv_freq")


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Release:
    return build_release(tmp_path_factory.mktemp("mgie_release"))


@pytest.fixture
def fresh(release: Release, tmp_path: Path) -> Release:
    """A private copy of the release a test may damage."""
    return release.copy_to(tmp_path / "in")


def _run(rel: Release, out: Path, **kwargs):
    return convert(**rel.args(), out_llm=out / "mgie_tiny", out_unet=out / "mgie_tiny_unet.safetensors",
                   progress=False, log=lambda _: None, **kwargs)


@pytest.fixture(scope="module")
def converted(release: Release, tmp_path_factory):
    return _run(release, tmp_path_factory.mktemp("mgie_out"))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _llm_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(folder.glob("model*.safetensors")):
        out.update(load_file(str(path)))
    return out


# --------------------------------------------------------------------------------------------------
# The conversion
# --------------------------------------------------------------------------------------------------

def test_llm_is_base_plus_delta_with_mllm_embeddings(release: Release, converted):
    """fp16 output: every LLaMA tensor = fp16(fp32(base) + fp32(delta)); embed_tokens / lm_head = mllm.pt's."""
    llm = _llm_tensors(converted.llm_folder)
    expected_keys = {k for k in release.base_sd if not _derived(k)}
    assert set(llm) == expected_keys
    for key in expected_keys - {EMBED, LM_HEAD}:
        want = (release.base_sd[key].float() + release.delta_sd[key].float()).half()
        assert llm[key].dtype == torch.float16 and torch.equal(llm[key], want), key
    for key in (EMBED, LM_HEAD):
        assert llm[key].shape == (BASE_VOCAB + 11, release.base_sd[key].shape[1])
        assert torch.equal(llm[key], release.mllm_sd[key]), key
    config = json.loads((converted.llm_folder / "config.json").read_text())
    assert config["model_type"] == "llama" and config["vocab_size"] == BASE_VOCAB + 11
    assert not any(k.startswith("mm_") for k in config)


def test_projector_edit_head_and_vision_come_from_their_inputs(release: Release, converted):
    mgie = load_file(str(converted.llm_folder / "mgie.safetensors"))
    assert torch.equal(mgie["mm_projector.weight"], release.delta_sd["model.mm_projector.weight"])
    assert torch.equal(mgie["mm_projector.bias"], release.delta_sd["model.mm_projector.bias"])
    head = {k: v for k, v in release.mllm_sd.items() if k.startswith("edit_head.")}
    assert set(head) == {k for k in mgie if k.startswith("edit_head.")}
    for key, value in head.items():
        assert torch.equal(mgie[key], value), key
    vision = {}
    for path in (converted.llm_folder / "vision").glob("*.safetensors"):
        vision.update(load_file(str(path)))
    clip_vision = {k: v for k, v in release.clip_sd.items() if k.startswith("vision_model.")}
    assert len(vision) == len(clip_vision)
    for key, value in clip_vision.items():
        stored = vision.get(key, vision.get(key.removeprefix("vision_model.")))
        assert stored is not None and torch.equal(stored, value.half()), key
    assert converted.unused_clip_keys == len(release.clip_sd) - len(clip_vision)  # the CLIP text half only


def test_every_input_tensor_is_used(release: Release, converted):
    """Each delta tensor is in the LLM or the projector; each base tensor in the LLM; each mllm tensor in the LLM,
    the edit head, or (emb) equal to the [IMG] rows of the embedding it came with."""
    llm = set(_llm_tensors(converted.llm_folder))
    mgie = set(load_file(str(converted.llm_folder / "mgie.safetensors")))
    assert {k for k in release.delta_sd if not _derived(k)} == llm | {"model." + k for k in mgie
                                                                        if k.startswith("mm_projector.")}
    assert {k for k in release.base_sd if not _derived(k)} == llm
    assert set(release.mllm_sd) - {"emb"} == {EMBED, LM_HEAD} | {k for k in mgie if k.startswith("edit_head.")}
    assert torch.equal(release.mllm_sd["emb"].reshape(8, -1), release.mllm_sd[EMBED][-8:])


def test_tokenizer_meta_and_checksums(release: Release, converted):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(converted.llm_folder, local_files_only=True)
    assert len(tokenizer) == BASE_VOCAB + 11
    assert [tokenizer.convert_tokens_to_ids(t) for t in ADDED_TOKENS] == list(range(BASE_VOCAB, BASE_VOCAB + 11))
    meta = json.loads((converted.llm_folder / "mgie.json").read_text())
    assert meta["img_token_ids"] == list(range(BASE_VOCAB + 3, BASE_VOCAB + 11))
    assert (meta["im_patch_id"], meta["im_start_id"], meta["im_end_id"]) == (BASE_VOCAB, BASE_VOCAB + 1, BASE_VOCAB + 2)
    assert meta["edit_head"] == EDIT_HEAD and meta["image_token_len"] == 16 and meta["vision_select_layer"] == -2
    roots = {"llama": release.llama, "delta": release.delta, "clip": release.clip, "mllm": release.mllm.parent,
             "unet": release.unet.parent}
    assert meta["sources"] == converted.sources
    for name, digest in meta["sources"].items():
        role, _, file = name.partition("/")
        assert digest == _sha256(roots[role] / file), name
    weight_files = [p for folder in (release.llama, release.delta) for p in folder.iterdir()
                    if p.suffix in (".safetensors", ".bin")]
    weight_files += [release.mllm, release.unet, release.clip / "model.safetensors"]
    for path in weight_files:
        assert _sha256(path) in meta["sources"].values(), path


def test_folder_loads(converted):
    model = load_mgie_folder(converted.llm_folder)
    assert model.meta.img_token_ids == tuple(range(BASE_VOCAB + 3, BASE_VOCAB + 11))
    emb = model.img_embeddings()
    with torch.no_grad():
        cond = model.edit_head(torch.zeros(1, 8, emb.shape[-1]), emb)
    assert cond.shape == (1, EDIT_HEAD["queries"], EDIT_HEAD["out_dim"]) and torch.isfinite(cond).all()


def test_unet_file_has_ldm_keys_that_round_trip(release: Release, converted):
    """Written with ComfyUI's (LDM) key names; diffusers' own LDM -> diffusers conversion gives back unet.pt."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    sd = load_file(str(converted.unet_file))
    assert sd["input_blocks.0.0.weight"].shape[1] == 8
    assert not any(k.startswith(("down_blocks.", "up_blocks.", "mid_block.")) for k in sd)
    back = convert_ldm_unet_checkpoint({"model.diffusion_model." + k: v for k, v in sd.items()},
                                       {"layers_per_block": 1})
    assert set(back) == set(release.unet_sd)
    for key, value in release.unet_sd.items():
        assert torch.equal(back[key], value), key
    with safe_open(str(converted.unet_file), "pt") as f:
        metadata = f.metadata()
    assert metadata["xmgie_format"] == UNET_FORMAT
    assert json.loads(metadata["xmgie_sources"]) == converted.sources
    assert converted.sources[metadata["xmgie_unet_source"]] == _sha256(release.unet)


def test_sd15_layout_maps_like_diffusers():
    """Full-size SD1.5 (InstructPix2Pix) layout, built on the meta device: the mapping is diffusers' inverse."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    with torch.device("meta"):
        unet = UNet2DConditionModel(in_channels=8, cross_attention_dim=768, attention_head_dim=8)
    sd = unet.state_dict()
    mapping = diffusers_unet_to_ldm(sd)
    assert len(mapping) == len(sd) == 686
    assert {mapping[k] for k in ("down_blocks.0.downsamplers.0.conv.weight", "up_blocks.0.upsamplers.0.conv.weight",
                                 "up_blocks.1.upsamplers.0.conv.weight", "mid_block.attentions.0.proj_in.weight")} == {
        "input_blocks.3.0.op.weight", "output_blocks.2.1.conv.weight", "output_blocks.5.2.conv.weight",
        "middle_block.1.proj_in.weight"}
    back = convert_ldm_unet_checkpoint({"model.diffusion_model." + mapping[k]: v for k, v in sd.items()},
                                       {"layers_per_block": 2})
    assert set(back) == set(sd) and all(back[k] is sd[k] for k in sd)


@pytest.mark.parametrize("base_format, delta_format, emb_shape", [("bin-single", "safetensors-single", "batch")])
def test_other_file_formats_and_fp32(tmp_path: Path, base_format: str, delta_format: str, emb_shape: str):
    """A .bin base, a single-file safetensors delta, emb as [1, 8, D], fp32 output: base + delta exactly."""
    rel = build_release(tmp_path / "in", base_format=base_format, delta_format=delta_format, emb_shape=emb_shape)
    result = _run(rel, tmp_path / "out", dtype="fp32")
    llm = _llm_tensors(result.llm_folder)
    for key in (k for k in rel.base_sd if not _derived(k) and k not in (EMBED, LM_HEAD)):
        assert llm[key].dtype == torch.float32
        assert torch.equal(llm[key], rel.base_sd[key].float() + rel.delta_sd[key].float()), key
    assert torch.equal(llm[EMBED], rel.mllm_sd[EMBED].float())
    assert load_file(str(result.unet_file))["out.2.weight"].dtype == torch.float32
    assert "llama/pytorch_model.bin" in result.sources and "delta/model.safetensors" in result.sources


# --------------------------------------------------------------------------------------------------
# Bad input: each a clear XMGIEInputError, before anything is written
# --------------------------------------------------------------------------------------------------

def _fails(rel: Release, tmp_path: Path, match: str, **kwargs) -> str:
    out = tmp_path / "out"
    with pytest.raises(XMGIEInputError, match=match) as info:
        _run(rel, out, **kwargs)
    assert not (out / "mgie_tiny").exists() and not (out / "mgie_tiny_unet.safetensors").exists()
    return str(info.value)


@pytest.mark.parametrize("damage, match", [
    (lambda r: (r.llama / "config.json").unlink(), r"--llama .* has no config\.json.*point --llama"),
    (lambda r: (r.delta / "pytorch_model-00002-of-00002.bin").unlink(),
     r"pytorch_model-00002-of-00002\.bin listed in pytorch_model\.bin\.index\.json are missing.*download"),
    (lambda r: [p.unlink() for p in r.llama.glob("model*")], r"--llama .* has no model weights.*Point --llama"),
    (lambda r: (r.clip / "preprocessor_config.json").unlink(), r"no preprocessor_config\.json.*clip-vit-large"),
    (lambda r: r.mllm.unlink(), r"--mllm .* does not exist.*mllm\.pt"),
    (lambda r: [p.unlink() for p in (*r.delta.glob("tokenizer*"), *r.llama.glob("tokenizer*"))],
     r"holds a tokenizer.*download LLaMA-7B's tokenizer"),
], ids=["no-config", "missing-shard", "no-weights", "no-preprocessor", "no-mllm", "no-tokenizer"])
def test_missing_pieces(fresh: Release, tmp_path: Path, damage, match: str):
    damage(fresh)
    _fails(fresh, tmp_path, match)


def _rewrite_delta(rel: Release, edit) -> None:
    """Rewrite the delta's .bin shards after `edit(shard_dict)`."""
    for path in sorted(rel.delta.glob("pytorch_model-*.bin")):
        sd = torch.load(path, weights_only=True)
        edit(sd)
        torch.save(sd, path)


def test_delta_of_another_base(fresh: Release, tmp_path: Path):
    config = json.loads((fresh.llama / "config.json").read_text())
    config["intermediate_size"] = 128
    (fresh.llama / "config.json").write_text(json.dumps(config))
    _fails(fresh, tmp_path, r"delta does not match the LLaMA base: intermediate_size 128 in --llama but 96 in "
                            r"--delta.*LLaMA-7B")


def test_delta_with_wrong_shapes(fresh: Release, tmp_path: Path):
    key = "model.layers.0.mlp.up_proj.weight"
    _rewrite_delta(fresh, lambda sd: sd.update({key: torch.zeros(8, 8, dtype=torch.float16)}) if key in sd else None)
    message = _fails(fresh, tmp_path, r"delta does not match the LLaMA base \(1 tensors of different shapes")
    assert key in message


def test_delta_missing_a_base_tensor(fresh: Release, tmp_path: Path):
    key = "model.layers.1.post_attention_layernorm.weight"
    _rewrite_delta(fresh, lambda sd: sd.pop(key, None))
    _fails(fresh, tmp_path, rf"The LLaVA delta lacks LLaMA tensors: {key}; the download of --delta .* is incomplete")


def test_leftover_tensors_are_listed(fresh: Release, tmp_path: Path):
    def edit(sd):
        if LM_HEAD in sd:  # one shard only
            sd["model.vision_tower.extra.weight"] = torch.zeros(2)
    _rewrite_delta(fresh, edit)
    shard = fresh.llama / "model-00001-of-00002.safetensors"
    save_file({**load_file(str(shard)), "model.unknown.weight": torch.zeros(3)}, str(shard))
    message = _fails(fresh, tmp_path, r"These input tensors would be left unused")
    assert "--llama: model.unknown.weight" in message and "--delta: model.vision_tower.extra.weight" in message


@pytest.mark.parametrize("edit, match", [
    (lambda sd: sd.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(2)}),
     r"holds tensors MGIE's mllm\.pt does not have: model\.layers\.0\.mlp\.up_proj\.weight.*not an MGIE mllm\.pt"),
    (lambda sd: sd.update({EMBED: sd[EMBED][:-1].clone()}),
     r"model\.embed_tokens\.weight has shape \(42, 64\).*\(43, 64\)"),
    (lambda sd: [sd.pop(k) for k in [k for k in sd if k.startswith("edit_head.mapper.decoder")]],
     r"edit head is not ml-mgie's EditMapper \(missing edit_head\.mapper\.decoder"),
    (lambda sd: sd.pop("edit_head.llm2hid.weight"), r"has no edit_head\.llm2hid\.weight.*not an MGIE mllm\.pt"),
    (lambda sd: sd.update({"emb": sd["emb"] + 1}), r"emb differs from the \[IMG0\]\.\.\[IMG7\] rows"),
], ids=["foreign-key", "wrong-rows", "no-decoder", "no-edit-head", "emb-differs"])
def test_not_an_mgie_mllm(fresh: Release, tmp_path: Path, edit, match: str):
    sd = torch.load(fresh.mllm, weights_only=True)
    edit(sd)
    torch.save(sd, fresh.mllm)
    _fails(fresh, tmp_path, match)


@pytest.mark.parametrize("which", ["mllm", "unet", "delta-shard"])
def test_pickle_with_code_is_refused(fresh: Release, tmp_path: Path, which: str):
    marker = tmp_path / "code_ran"
    target = {"mllm": fresh.mllm, "unet": fresh.unet,
              "delta-shard": fresh.delta / "pytorch_model-00001-of-00002.bin"}[which]
    write_pickle_with_code(target, marker)
    message = _fails(fresh, tmp_path, r"would run code or build objects other than tensors, so it was refused")
    assert str(target) in message and not marker.exists()


def test_unet_that_is_not_instructpix2pix(fresh: Release, tmp_path: Path):
    sd = torch.load(fresh.unet, weights_only=True)
    sd["conv_in.weight"] = sd["conv_in.weight"][:, :4].clone()
    torch.save(sd, fresh.unet)
    _fails(fresh, tmp_path, r"conv_in\.weight has shape \(32, 4, 3, 3\).*8 input channels")


def test_unet_with_foreign_tensors(fresh: Release, tmp_path: Path):
    sd = torch.load(fresh.unet, weights_only=True)
    sd["add_embedding.linear_1.weight"] = torch.zeros(2, 2)
    torch.save(sd, fresh.unet)
    _fails(fresh, tmp_path, r"outside the Stable Diffusion 1\.5 U-Net layout: add_embedding\.linear_1\.weight")


def test_unet_already_in_comfyui_layout(fresh: Release, tmp_path: Path, converted):
    save_file(load_file(str(converted.unet_file)), str(fresh.unet.with_suffix(".safetensors")))
    fresh.unet = fresh.unet.with_suffix(".safetensors")
    _fails(fresh, tmp_path, r"already in ComfyUI's layout: put it in ComfyUI/models/diffusion_models/")


def test_tokenizer_with_other_token_order(fresh: Release, tmp_path: Path):
    for path in fresh.delta.glob("tokenizer*"):
        path.unlink()
    tiny_tokenizer(("<im_start>", "<im_patch>", "<im_end>")).save_pretrained(fresh.delta)
    _fails(fresh, tmp_path, r"does not line up with MGIE's vocabulary: <im_patch> got id 33 \(MGIE's is 32\)")


def test_clip_of_another_size(fresh: Release, tmp_path: Path):
    config = json.loads((fresh.clip / "config.json").read_text())
    config["vision_config"]["hidden_size"] = 16
    (fresh.clip / "config.json").write_text(json.dumps(config))
    _fails(fresh, tmp_path, r"--clip .* does not fit its config\.json")


def test_existing_outputs_need_overwrite(release: Release, tmp_path: Path):
    out = tmp_path / "out"
    (out / "mgie_tiny").mkdir(parents=True)
    (out / "mgie_tiny" / "old.txt").write_text("x")
    with pytest.raises(XMGIEInputError, match=r"already exists and is not empty.*--overwrite"):
        _run(release, out)
    with pytest.raises(XMGIEInputError, match=r"must end in \.safetensors"):
        convert(**release.args(), out_llm=out / "x", out_unet=out / "unet.ckpt", progress=False)
    with pytest.raises(XMGIEInputError, match=r"--dtype 'fp8'"):
        _run(release, tmp_path / "o2", dtype="fp8")


def _cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


@pytest.mark.parametrize("which, damage, says", [
    ("unet", lambda p: p.write_text("hello, these are not the weights\n"), "it holds text"),
    ("unet", _cut, "zip archive .* without its end"),
    ("mllm", lambda p: p.write_bytes(b""), r"empty \(0 bytes\)"),
    ("llama", _cut, "missing: the download or copy stopped early"),
    ("delta", lambda p: p.write_bytes(bytes(range(256)) * 8), "neither a zip archive .* nor a pickle"),
], ids=["unet-text", "unet-cut", "mllm-empty", "llama-shard-cut", "delta-shard-garbage"])
def test_damaged_inputs_are_named(fresh: Release, tmp_path: Path, which: str, damage, says: str):
    target = {"unet": fresh.unet, "mllm": fresh.mllm, "llama": fresh.llama / "model-00001-of-00002.safetensors",
              "delta": fresh.delta / "pytorch_model-00001-of-00002.bin"}[which]
    damage(target)
    message = _fails(fresh, tmp_path, rf"{re.escape(str(target))} \(.*\) looks truncated or corrupt: .*{says}")
    assert "sha256" in message


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("outputs, match", [
    (lambda r, t: dict(out_llm=r.llama), r"--out-llm .* is, holds or lies inside the input --llama"),
    (lambda r, t: dict(out_llm=r.delta / "sub"), r"--out-llm .* lies inside the input --delta"),
    (lambda r, t: dict(out_llm=r.clip / ".." / r.clip.name), r"--out-llm .* the input --clip"),
    (lambda r, t: dict(out_unet=r.clip / "u.safetensors"), r"--out-unet .* lies inside the input --clip"),
    (lambda r, t: dict(out_unet=t / "o" / "m" / "u.safetensors"), r"--out-unet .* lies inside --out-llm"),
    (lambda r, t: dict(out_unet=Path("/proc/xmgie/u.safetensors")), r"/proc/xmgie/u\.safetensors cannot be written"),
    (lambda r, t: dict(out_llm=Path("/proc/xmgie/m")), r"/proc/xmgie/m cannot be written"),
    (lambda r, t: dict(out_llm=r.llama.parent), r"--out-llm .* holds .* the input --llama"),
], ids=["llm-is-input", "llm-in-input", "llm-is-input-via-dotdot", "unet-in-input", "unet-in-llm",
        "unet-unwritable", "llm-unwritable", "llm-holds-inputs"])
def test_outputs_are_checked_before_any_work_and_never_inside_an_input(fresh: Release, tmp_path: Path, monkeypatch,
                                                                       outputs, match):
    import xmgie_core.mgie.convert as convert_module

    def no_work(*args, **kwargs):
        raise AssertionError("the inputs were read before the outputs were checked")

    monkeypatch.setattr(convert_module, "_gather_inputs", no_work)
    before = _tree(fresh.root)
    args = {"out_llm": tmp_path / "o" / "m", "out_unet": tmp_path / "o" / "u.safetensors", **outputs(fresh, tmp_path)}
    with pytest.raises(XMGIEInputError, match=match):
        convert(**fresh.args(), **args, overwrite=True, progress=False, log=lambda _: None)
    assert _tree(fresh.root) == before and not (tmp_path / "o").exists()


def test_overwrite_replaces_only_converter_outputs_and_a_failure_keeps_them(release: Release, tmp_path: Path,
                                                                            monkeypatch):
    import xmgie_core.mgie.convert as convert_module

    out = tmp_path / "out"
    (out / "mgie_tiny").mkdir(parents=True)
    (out / "mgie_tiny" / "notes.txt").write_text("mine")
    with pytest.raises(XMGIEInputError, match=r"not an MGIE folder .* not replaced even with --overwrite"):
        _run(release, out, overwrite=True)
    (out / "mgie_tiny" / "notes.txt").unlink()
    _run(release, out)
    before = _tree(out)

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert_module, "write_unet", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        _run(release, out, overwrite=True, dtype="fp32")
    assert _tree(out) == before and sorted(p.name for p in out.iterdir()) == ["mgie_tiny", "mgie_tiny_unet.safetensors"]


def test_tiny_diffusers_mapping_is_complete():
    unet = tiny_ip2p_unet()
    mapping = diffusers_unet_to_ldm(unet.state_dict())
    assert set(mapping) == set(unet.state_dict()) and len(set(mapping.values())) == len(mapping)


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------

def test_cli_convert(release: Release, tmp_path: Path, capsys):
    out = tmp_path / "out"
    argv = ["--llama", str(release.llama), "--delta", str(release.delta), "--mllm", str(release.mllm),
            "--unet", str(release.unet), "--clip", str(release.clip), "--out-llm", str(out / "m"),
            "--out-unet", str(out / "u.safetensors"), "--dtype", "bf16"]
    assert main(argv) == 0
    printed = capsys.readouterr()
    assert f"wrote {out / 'm'}" in printed.out and "sha256 of the inputs" in printed.err  # progress bar
    assert load_file(str(out / "u.safetensors"))["out.2.weight"].dtype == torch.bfloat16
    assert main(argv) == 2  # outputs exist now
    assert "already exists" in capsys.readouterr().err
    assert main(argv + ["--overwrite", "--no-progress"]) == 0


def test_module_dispatcher_help():
    run = subprocess.run([sys.executable, "-m", "xmgie_core.mgie", "convert", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, env={"OMP_NUM_THREADS": "1", "PATH": ""})
    assert run.returncode == 0, run.stderr
    assert "python -m xmgie_core.mgie convert" in run.stdout and "--out-unet" in run.stdout
