"""MGIE core (xmgie_core/mgie): the edit head against torch.nn.Transformer, the LLaVA v1 prompt, the [IMG] position
rule, the demo's remove_alter, the folder format (save, check, load) and generation on a tiny MGIE folder checked
against a direct computation (tests/fixtures/tiny_mgie.py)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch import nn

from fixtures.tiny_mgie import EDIT_HEAD, IMAGE_TOKEN_LEN, INSTRUCTION, TEXT, build_tiny_mgie, save_tiny_mgie

TAIL = "!Z"  # written after [IMG7]: [IMG0] is then earlier than len(hid) - 8
from xmgie_core.errors import XMGIEInputError
from xmgie_core.mgie import (
    ADDED_TOKENS, MGIE, PROMPT_TEMPLATE, VICUNA_SYSTEM, EditMapper, MGIEMeta, cached_mgie, check_mgie_folder,
    clean_expressive, img_position, load_mgie_folder, mgie_conditioning, mgie_prompt, save_mgie_folder, unload_mgie,
)

torch.set_num_threads(1)


# ---- edit head ------------------------------------------------------------------------------------------------------

def tiny_head(seed: int = 0) -> EditMapper:
    torch.manual_seed(seed)
    return EditMapper(**EDIT_HEAD).eval()


@pytest.mark.filterwarnings("ignore:enable_nested_tensor")
@torch.no_grad()
def manual_head(head: EditMapper, llm: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """ml-mgie's EditMapper.forward written out with a separately built nn.Transformer holding the same weights."""
    cfg = head.config
    transformer = nn.Transformer(batch_first=True, norm_first=True, d_model=cfg["hidden"], nhead=cfg["heads"],
                                 num_encoder_layers=cfg["layers"], num_decoder_layers=cfg["layers"],
                                 dim_feedforward=cfg["feedforward"], dropout=0.0).eval()
    state = {k.removeprefix("mapper."): v for k, v in head.state_dict().items() if k.startswith("mapper.")}
    transformer.load_state_dict(state)
    sd = head.state_dict()
    hid = (llm + emb) @ sd["llm2hid.weight"].T + sd["llm2hid.bias"]
    hid = transformer(hid, sd["query"].expand(llm.shape[0], -1, -1))
    return hid @ sd["hid2feat.weight"].T + sd["hid2feat.bias"]


@pytest.mark.filterwarnings("ignore:enable_nested_tensor")
def test_edit_head_equals_manual_transformer():
    head = tiny_head()
    torch.manual_seed(1)
    llm, emb = torch.randn(2, 8, 64), torch.randn(8, 64)
    with torch.no_grad():
        out = head(llm, emb)
        per_batch = head(llm, emb.expand(2, -1, -1))
    assert out.shape == (2, EDIT_HEAD["queries"], EDIT_HEAD["out_dim"])
    torch.testing.assert_close(out, manual_head(head, llm, emb), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(per_batch, out)
    # the two batch items differ (the head is not ignoring its input)
    assert not torch.allclose(out[0], out[1])


def test_edit_head_defaults_and_names_match_ml_mgie():
    with torch.device("meta"):
        head = EditMapper()
    sd = head.state_dict()
    assert sd["llm2hid.weight"].shape == (512, 4096)
    assert sd["query"].shape == (1, 77, 512)
    assert sd["hid2feat.weight"].shape == (768, 512)
    assert sd["mapper.encoder.layers.3.linear1.weight"].shape == (2048, 512)
    assert sd["mapper.decoder.layers.3.multihead_attn.in_proj_weight"].shape == (3 * 512, 512)
    assert "mapper.encoder.norm.weight" in sd and "mapper.decoder.norm.weight" in sd
    assert "mapper.encoder.layers.4.linear1.weight" not in sd
    assert head.mapper.encoder.layers[0].self_attn.num_heads == 4
    assert head.mapper.encoder.layers[0].norm_first and head.mapper.batch_first


def test_negative_is_head_on_zeros():
    head = tiny_head()
    torch.manual_seed(2)
    hidden, emb = torch.randn(1, 8, 64), torch.randn(8, 64)
    with torch.no_grad():
        positive, negative = mgie_conditioning(head, hidden, emb)
        torch.testing.assert_close(positive, head(hidden, emb))
        torch.testing.assert_close(negative, head(torch.zeros(1, 8, 64), emb))
    assert not torch.allclose(positive, negative)


def test_edit_head_rejects_wrong_sizes():
    head = tiny_head()
    with pytest.raises(XMGIEInputError, match=r"\[batch, 8, 64\]"):
        head(torch.zeros(1, 8, 32), torch.zeros(8, 32))
    with pytest.raises(XMGIEInputError, match="do.*not match"):
        head(torch.zeros(2, 8, 64), torch.zeros(3, 8, 64))


# ---- prompt, position rule, cleaning --------------------------------------------------------------------------------

def test_prompt_layout():
    prompt = mgie_prompt("make the frame red", 4)
    system = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
              "detailed, and polite answers to the user's questions.")
    assert VICUNA_SYSTEM == system
    assert prompt == (system + " USER: what will this image be like if 'make the frame red'\n"
                      "<im_start><im_patch><im_patch><im_patch><im_patch><im_end> ASSISTANT:")
    assert PROMPT_TEMPLATE.format(text="T") == system + " USER: T ASSISTANT:"
    assert mgie_prompt("x", 256).count("<im_patch>") == 256


def test_prompt_ids_keep_image_tokens_together():
    model = MGIE(*build_tiny_mgie(rig=False))
    ids = model.prompt_ids(INSTRUCTION)[0].tolist()
    meta = model.meta
    start = ids.index(meta.im_start_id)
    assert ids[0] == model.tokenizer.bos_token_id
    assert ids[start + 1:start + 1 + IMAGE_TOKEN_LEN] == [meta.im_patch_id] * IMAGE_TOKEN_LEN
    assert ids[start + 1 + IMAGE_TOKEN_LEN] == meta.im_end_id
    assert ids.count(meta.im_patch_id) == IMAGE_TOKEN_LEN
    assert model.tokenizer.decode(ids[1:]) == mgie_prompt(INSTRUCTION, IMAGE_TOKEN_LEN)


def test_img_position():
    img0 = 100
    seq = [1, 5, 6, 7, 8, 9, img0] + list(range(101, 108)) + [2]  # prompt 1..9, IMG0..7, EOS
    hid_len = len(seq) - 1
    assert img_position(seq, hid_len, img0) == 5  # the state that predicts [IMG0]
    assert img_position(seq, hid_len, img0) == hid_len - 9
    # more text after [IMG7]: index([IMG0]) - 1, earlier than len(hid) - 9
    tail = seq[:-1] + [30, 31, 32, 2]
    assert img_position(tail, len(tail) - 1, img0) == 5 < len(tail) - 1 - 9
    # no [IMG0]: the fallback len(hid) - 9
    plain = [1, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 2]
    assert img_position(plain, len(plain) - 1, img0) == len(plain) - 1 - 9
    # [IMG0] too late for 8 states after it: the min() keeps the window inside hid
    late = [1] + list(range(20, 30)) + [img0, 101, 102]
    assert late.index(img0) - 1 > len(late) - 1 - 9
    assert img_position(late, len(late) - 1, img0) == len(late) - 1 - 9


@pytest.mark.parametrize("text, expected", [
    # the demo joins the stripped sentences with '.' and no space: "red.Clouds" is ml-mgie's own output
    ("<s> A chat. USER: x ASSISTANT: The sky turns red. Clouds glow orange.</s>", "The sky turns red.Clouds glow orange."),
    ("Make the sky red. Add clouds. Add birds. Add sun.", "Make the sky red.Add clouds."),
    ("Make the sky red", "Make the sky red."),
    ("Make it darker. An alternative is to dim it.", "Make it darker.An."),
    ("Make it darker. ALTERNATIVELY dim it", "Make it darker."),
    ("Give him a beard [IMG0][IMG1][IMG2]</s>", "Give him a beard."),
    ("ASSISTANT:  spaced out .  second .  third", "spaced out.second."),
    ("A.B.C", "A.B."),
    ("", ""),
])
def test_clean_expressive(text, expected):
    assert clean_expressive(text) == expected


def _remove_alter(s):  # ml-mgie demo.ipynb, verbatim
    if 'ASSISTANT:' in s: s = s[s.index('ASSISTANT:')+10:].strip()  # noqa: E701
    if '</s>' in s: s = s[:s.index('</s>')].strip()  # noqa: E701
    if 'alternative' in s.lower(): s = s[:s.lower().index('alternative')]  # noqa: E701
    if '[IMG0]' in s: s = s[:s.index('[IMG0]')]  # noqa: E701
    s = '.'.join([s.strip() for s in s.split('.')[:2]])
    if s[-1]!='.': s += '.'  # noqa: E701,E225
    return s.strip()


@pytest.mark.parametrize("text", ["x ASSISTANT: a. b. c.</s> d", "Use red. Alternative: x. y", "Turn it blue[IMG0][IMG1]",
                                  "one. two", "   lead. trail   ", "a ASSISTANT: b ASSISTANT: c"])
def test_clean_expressive_equals_demo(text):
    assert clean_expressive(text) == _remove_alter(text)


# ---- metadata -------------------------------------------------------------------------------------------------------

def test_meta_json_round_trip_and_validation():
    meta = MGIEMeta(im_patch_id=32000, im_start_id=32001, im_end_id=32002, img_token_ids=tuple(range(32003, 32011)),
                    sources={"mllm.pt": "ab" * 32})
    assert meta.edit_head_args() == dict(llm_dim=4096, hidden=512, out_dim=768, queries=77, heads=4, layers=4,
                                         feedforward=2048)
    assert MGIEMeta.from_json(meta.to_json()) == meta
    data = json.loads(meta.to_json())
    assert data["format"] == "xmgie-mgie-1" and data["image_token_len"] == 256 and data["vision_select_layer"] == -2
    bad = [({"format": "other"}, "format"), ({"img_token_ids": [1, 2]}, "img_token_ids"),
           ({"im_patch_id": 32003}, "distinct"), ({"edit_head": {"width": 3}}, "unknown keys"),
           ({"surprise": 1}, "unknown keys"), ({"image_token_len": "256"}, "integer")]
    for change, message in bad:
        with pytest.raises(XMGIEInputError, match=message) as e:
            MGIEMeta.from_json(json.dumps({**data, **change}))
        assert "python -m xmgie_core.mgie convert" in str(e.value)
    with pytest.raises(XMGIEInputError, match="lacks"):
        MGIEMeta.from_json(json.dumps({k: v for k, v in data.items() if k != "im_end_id"}))
    with pytest.raises(XMGIEInputError, match="not valid JSON"):
        MGIEMeta.from_json("{")


# ---- the tiny folder ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def img_folder(tmp_path_factory):
    return save_tiny_mgie(tmp_path_factory.mktemp("mgie") / "tiny_mgie", force_img=True, tail=TAIL)


@pytest.fixture(scope="module")
def img_model(img_folder):
    return load_mgie_folder(img_folder)


def make_image():
    torch.manual_seed(5)
    return torch.randint(0, 256, (1, 40, 48, 3)).float() / 255  # exact 8-bit values


@torch.no_grad()
def direct(model: MGIE, image: torch.Tensor, instruction: str, new_tokens: list[int], p: int):
    """The [IMG] states and conditioning computed without generate: one LLM forward over the full sequence."""
    from PIL import Image

    seq = model.prompt_ids(instruction)[0].tolist() + new_tokens
    pil = Image.fromarray((image[0] * 255).round().byte().numpy())
    pixels = model.image_processor(images=pil, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 32, 32)
    feats = model.projector(model.vision(pixels, output_hidden_states=True).hidden_states[-2][:, 1:])
    assert feats.shape == (1, IMAGE_TOKEN_LEN, 64)
    embed = model.llm.model.embed_tokens
    embeds = embed(torch.tensor([seq]))
    patch = [i for i, t in enumerate(seq) if t == model.meta.im_patch_id]
    embeds[0, patch] = feats[0]
    states = model.llm.model(inputs_embeds=embeds).last_hidden_state[0]
    img_hidden = states[p:p + 8].unsqueeze(0)
    emb = embed.weight[list(model.meta.img_token_ids)]
    return img_hidden, model.edit_head(img_hidden, emb), model.edit_head(torch.zeros_like(img_hidden), emb)


def test_generate_equals_direct_computation(img_model):
    image = make_image()
    result = img_model.generate(image, INSTRUCTION, max_new_tokens=40)
    tok, meta = img_model.tokenizer, img_model.meta
    expected = (tok.encode(TEXT, add_special_tokens=False) + list(meta.img_token_ids)
                + tok.encode(TAIL, add_special_tokens=False) + [tok.eos_token_id])
    assert result.new_tokens == expected
    assert result.img_generated
    assert result.expressive_instruction == TEXT
    prompt_len = img_model.prompt_ids(INSTRUCTION).shape[1]
    p = prompt_len + len(TEXT) - 1  # the state at '.', which predicts [IMG0]
    assert p < prompt_len + len(result.new_tokens) - 1 - 9  # the index rule, not the fallback, gives p
    img_hidden, positive, negative = direct(img_model, image, INSTRUCTION, result.new_tokens, p)
    assert result.img_hidden.shape == (1, 8, 64)
    assert result.positive.shape == result.negative.shape == (1, EDIT_HEAD["queries"], EDIT_HEAD["out_dim"])
    torch.testing.assert_close(result.img_hidden, img_hidden, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(result.positive, positive, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(result.negative, negative, rtol=1e-4, atol=1e-5)
    # the states depend on the image (the <im_patch> embeddings were replaced)
    other = img_model.generate(1 - image, INSTRUCTION, max_new_tokens=40)
    assert other.new_tokens == result.new_tokens
    assert not torch.allclose(other.img_hidden, result.img_hidden)
    torch.testing.assert_close(other.negative, result.negative)


def test_input_embeddings_replace_only_patches(img_model):
    image = make_image()
    embeds, mask = img_model.input_embeddings(INSTRUCTION, image[0])  # [H,W,3] accepted too
    ids = img_model.prompt_ids(INSTRUCTION)
    plain = img_model.llm.model.embed_tokens(ids)
    assert embeds.shape == plain.shape and mask.shape == ids.shape and bool(mask.all())
    is_patch = ids[0] == img_model.meta.im_patch_id
    torch.testing.assert_close(embeds[0, ~is_patch], plain[0, ~is_patch])
    with torch.no_grad():
        feats = img_model.image_features(img_model.preprocess(image))
    torch.testing.assert_close(embeds[0, is_patch], feats[0])


def test_fallback_when_img_not_generated(tmp_path):
    folder = save_tiny_mgie(tmp_path / "no_img", force_img=False)
    model = load_mgie_folder(folder)
    image = make_image()
    result = model.generate(image, INSTRUCTION, max_new_tokens=40)
    tok = model.tokenizer
    assert result.new_tokens == tok.encode(TEXT, add_special_tokens=False) + [tok.eos_token_id]
    assert not result.img_generated
    assert result.expressive_instruction == TEXT
    hid_len = model.prompt_ids(INSTRUCTION).shape[1] + len(result.new_tokens) - 1
    img_hidden, positive, _ = direct(model, image, INSTRUCTION, result.new_tokens, hid_len - 9)
    torch.testing.assert_close(result.img_hidden, img_hidden, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(result.positive, positive, rtol=1e-4, atol=1e-5)


def test_generation_stopped_before_all_img_tokens_uses_min_rule(img_model):
    """max_new_tokens ends generation after [IMG0]..[IMG2]: p = len(hid) - 9, not index([IMG0]) - 1."""
    image = make_image()
    result = img_model.generate(image, INSTRUCTION, max_new_tokens=len(TEXT) + 3)
    assert result.new_tokens[-3:] == list(img_model.meta.img_token_ids[:3])
    hid_len = img_model.prompt_ids(INSTRUCTION).shape[1] + len(result.new_tokens) - 1
    img_hidden, _, _ = direct(img_model, image, INSTRUCTION, result.new_tokens, hid_len - 9)
    torch.testing.assert_close(result.img_hidden, img_hidden, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def manual_greedy(model: MGIE, image: torch.Tensor, instruction: str, steps: int) -> tuple[list[int], torch.Tensor]:
    """Greedy decoding without cache, banning any token that would repeat a 3-gram of the whole sequence (prompt
    included); returns the new tokens and the last-layer states of every position but the last."""
    prompt = model.prompt_ids(instruction)[0].tolist()
    feats = model.image_features(model.preprocess(image))[0]
    seq, new = list(prompt), []
    for _ in range(steps):
        embeds = model.llm.model.embed_tokens(torch.tensor([seq]))
        embeds[0, [i for i, t in enumerate(seq) if t == model.meta.im_patch_id]] = feats
        out = model.llm(inputs_embeds=embeds, output_hidden_states=True)
        logits = out.logits[0, -1].clone()
        for i in range(len(seq) - 2):
            if seq[i:i + 2] == seq[-2:]:
                logits[seq[i + 2]] = -float("inf")
        token = int(logits.argmax())
        seq.append(token)
        new.append(token)
        states = out.hidden_states[-1][0]
        if token == model.tokenizer.eos_token_id:
            break
    return new, states


def test_greedy_bookkeeping_matches_manual_loop():
    """Random weights (no rig): generate's tokens and concatenated hidden states equal a plain no-cache loop."""
    model = MGIE(*build_tiny_mgie(rig=False))
    image = make_image()
    result = model.generate(image, INSTRUCTION, max_new_tokens=12)
    new, states = manual_greedy(model, image, INSTRUCTION, 12)
    assert result.new_tokens == new
    hid_len = model.prompt_ids(INSTRUCTION).shape[1] + len(new) - 1
    assert states.shape[0] == hid_len  # the last forward saw every position but the newest token
    p = img_position(model.prompt_ids(INSTRUCTION)[0].tolist() + new, hid_len, model.meta.img_token_ids[0])
    torch.testing.assert_close(result.img_hidden[0], states[p:p + 8], rtol=1e-4, atol=1e-5)


def test_no_repeat_ngram_counts_the_prompt(tmp_path):
    """The instruction contains 'Red', so after 'Re' the rigged 'd' would repeat the prompt's 3-gram 'Red': as in
    ml-mgie (whose generate saw the prompt ids) it is banned."""
    model = MGIE(*build_tiny_mgie())
    image = make_image()
    instruction = "make a Red dusk"
    result = model.generate(image, instruction, max_new_tokens=6)
    tok = model.tokenizer
    assert result.new_tokens[:2] == tok.encode("Re", add_special_tokens=False)
    assert result.new_tokens[2] != tok.convert_tokens_to_ids("d")
    new, _ = manual_greedy(model, image, instruction, 6)
    assert result.new_tokens == new


def test_seed_and_determinism(img_model):
    image = make_image()
    a = img_model.generate(image, INSTRUCTION, max_new_tokens=20, seed=1)
    b = img_model.generate(image, INSTRUCTION, max_new_tokens=20, seed=2)
    assert a.new_tokens == b.new_tokens
    torch.testing.assert_close(a.positive, b.positive)


def test_bad_generate_inputs(img_model):
    image = make_image()
    with pytest.raises(XMGIEInputError, match="empty"):
        img_model.generate(image, "   ")
    with pytest.raises(XMGIEInputError, match="reserved tokens"):
        img_model.generate(image, "add [IMG0] here")
    with pytest.raises(XMGIEInputError, match="one at a time"):
        img_model.generate(image.repeat(2, 1, 1, 1), INSTRUCTION)
    with pytest.raises(XMGIEInputError, match="NaN"):
        img_model.generate(torch.full((1, 8, 8, 3), float("nan")), INSTRUCTION)
    with pytest.raises(XMGIEInputError, match="max_new_tokens"):
        img_model.generate(image, INSTRUCTION, max_new_tokens=0)


def test_cache_and_unload(img_folder):
    a = cached_mgie(img_folder)
    assert cached_mgie(img_folder) is a
    unload_mgie(img_folder)
    assert cached_mgie(img_folder) is not a
    unload_mgie()


# ---- folder checks --------------------------------------------------------------------------------------------------

def test_saved_folder_layout_and_tensors(img_folder, img_model):
    from safetensors.torch import load_file

    names = {p.name for p in img_folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "mgie.json", "mgie.safetensors", "vision"} <= names
    assert {p.name for p in (img_folder / "vision").iterdir()} >= {"config.json", "model.safetensors",
                                                                    "preprocessor_config.json"}
    tensors = load_file(str(img_folder / "mgie.safetensors"))
    assert set(tensors) == {"mm_projector.weight", "mm_projector.bias"} | {
        f"edit_head.{k}" for k in img_model.edit_head.state_dict()}
    torch.testing.assert_close(tensors["edit_head.query"], img_model.edit_head.query.detach())
    tok = img_model.tokenizer
    assert [tok.convert_tokens_to_ids(t) for t in ADDED_TOKENS] == list(range(len(tok) - 11, len(tok)))
    assert json.loads((img_folder / "config.json").read_text())["model_type"] == "llama"


def _copy(img_folder, tmp_path):
    return shutil.copytree(img_folder, tmp_path / "copy")


@pytest.mark.parametrize("remove, message", [
    ("mgie.json", "mgie.json"),
    ("mgie.safetensors", "mgie.safetensors"),
    ("vision", "vision/"),
    ("model.safetensors", "LLaMA weights"),
    ("tokenizer.json", "tokenizer"),
    ("config.json", "LLaMA config"),
    ("vision/model.safetensors", "CLIP vision weights"),
    ("vision/preprocessor_config.json", "preprocessor_config.json"),
])
def test_check_names_missing_piece(img_folder, tmp_path, remove, message):
    folder = _copy(img_folder, tmp_path)
    target = folder / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(XMGIEInputError) as e:
        check_mgie_folder(folder)
    text = str(e.value)
    assert message in text and "ComfyUI/models/LLM/copy" in text and "python -m xmgie_core.mgie convert" in text
    with pytest.raises(XMGIEInputError):
        load_mgie_folder(folder)


def test_check_accepts_the_saved_folder(img_folder):
    check_mgie_folder(img_folder)


def test_non_mgie_folder_and_missing_folder(tmp_path, img_folder):
    plain = tmp_path / "llama"
    shutil.copytree(img_folder, plain, ignore=shutil.ignore_patterns("mgie.*"))
    with pytest.raises(XMGIEInputError, match="not an MGIE folder.*python -m xmgie_core.mgie convert"):
        check_mgie_folder(plain)
    with pytest.raises(XMGIEInputError, match="not found"):
        check_mgie_folder(tmp_path / "absent")


def test_bin_only_folder_refused(img_folder, tmp_path):
    folder = _copy(img_folder, tmp_path)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(XMGIEInputError, match="found only pytorch_model.bin: pickled weights, which xMGIE never loads"):
        check_mgie_folder(folder)
    with pytest.raises(XMGIEInputError, match="pytorch_model.bin"):
        load_mgie_folder(folder)


def test_mgie_tensors_must_match_exactly(img_folder, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _copy(img_folder, tmp_path)
    tensors = load_file(str(folder / "mgie.safetensors"))
    save_file({**tensors, "edit_head.extra": torch.zeros(1)}, str(folder / "mgie.safetensors"))
    with pytest.raises(XMGIEInputError, match=r"unused \['edit_head.extra'\]"):
        load_mgie_folder(folder)
    del tensors["edit_head.hid2feat.bias"]
    save_file(tensors, str(folder / "mgie.safetensors"))
    with pytest.raises(XMGIEInputError, match=r"missing \['edit_head.hid2feat.bias'\]"):
        load_mgie_folder(folder)


def test_meta_must_agree_with_tokenizer(img_folder, tmp_path):
    folder = _copy(img_folder, tmp_path)
    data = json.loads((folder / "mgie.json").read_text())
    data["img_token_ids"] = data["img_token_ids"][::-1]
    (folder / "mgie.json").write_text(json.dumps(data))
    with pytest.raises(XMGIEInputError, match=r"\[IMG0\] is \d+ in the tokenizer but \d+ in mgie.json"):
        load_mgie_folder(folder)


def test_save_refuses_parts_that_do_not_fit(tmp_path):
    llm, tok, vision, processor, projector, head, meta = build_tiny_mgie(rig=False)
    wrong_head = EditMapper(**{**EDIT_HEAD, "llm_dim": 32})
    with pytest.raises(XMGIEInputError, match="edit head takes 32 features but the LLM's hidden size is 64"):
        save_mgie_folder(tmp_path / "bad", llm, tok, vision, processor, projector, wrong_head, meta)
    wrong_meta = MGIEMeta.from_tokenizer(tok, image_token_len=9, edit_head=dict(EDIT_HEAD))
    with pytest.raises(XMGIEInputError, match="16 patch tokens but image_token_len is 9"):
        save_mgie_folder(tmp_path / "bad", llm, tok, vision, processor, projector, head, wrong_meta)
    assert not (tmp_path / "bad").exists()


def test_loads_in_bfloat16(img_folder, img_model):
    model = load_mgie_folder(img_folder, dtype=torch.bfloat16)
    assert {p.dtype for m in (model.llm, model.vision, model.projector, model.edit_head) for p in m.parameters()} == {
        torch.bfloat16}
    result = model.generate(make_image(), INSTRUCTION, max_new_tokens=40)
    assert result.new_tokens == img_model.generate(make_image(), INSTRUCTION, max_new_tokens=40).new_tokens
    assert result.positive.dtype == torch.bfloat16 and result.positive.shape == (1, EDIT_HEAD["queries"],
                                                                                 EDIT_HEAD["out_dim"])
