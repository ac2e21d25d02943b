"""ComfyUI node contracts, checked without ComfyUI: mappings, tooltips, and running the GB node."""

from __future__ import annotations

import copy
import types

import pytest
import torch
from fixtures.pack import load_pack


def test_every_node_is_mapped_with_a_display_name(pack):
    assert set(pack.NODE_CLASS_MAPPINGS) == set(pack.NODE_DISPLAY_NAME_MAPPINGS)
    assert pack.WEB_DIRECTORY == "./web"
    for name, display in pack.NODE_DISPLAY_NAME_MAPPINGS.items():
        assert display.startswith("XMGIE ")


@pytest.mark.parametrize("name", list(load_pack().NODE_CLASS_MAPPINGS))
def test_node_contract(pack, name):
    cls = pack.NODE_CLASS_MAPPINGS[name]
    assert cls.CATEGORY.startswith("xMGIE/")
    assert callable(getattr(cls, cls.FUNCTION))
    inputs = cls.INPUT_TYPES()
    for section in ("required", "optional"):
        for inp, spec in inputs.get(section, {}).items():
            assert len(spec) == 2 and spec[1].get("tooltip"), f"{name}.{inp} has no tooltip"
    assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES)
    assert all(cls.OUTPUT_TOOLTIPS)


def test_gb_node_runs_both_modes(pack):
    node = pack.NODE_CLASS_MAPPINGS["XMGIEGBCompositor"]()
    src, edit = torch.zeros(1, 48, 48, 3), torch.ones(1, 48, 48, 3)
    mask = torch.zeros(1, 48, 48)
    mask[:, 12:36, 12:36] = 1
    image, blend = node.composite(edit, mask, "composite", 5.0, 10.0, 16.0, source=src)
    assert image.shape == src.shape and blend.shape == mask.shape
    assert float(image[0, 24, 24, 0]) == pytest.approx(1.0, abs=1e-5) and float(image[0, 0, 0, 0]) == 0.0
    image, strength = node.composite(edit, mask, "blur", 5.0, 10.0, 16.0)
    assert torch.allclose(image, edit, atol=1e-6)  # a flat image is unchanged by blurring
    assert float(strength[0, 12, 12]) == pytest.approx(torch.exp(torch.tensor(-1 / 200)).item(), abs=1e-6)


def test_gb_node_composite_needs_source(pack):
    node = pack.NODE_CLASS_MAPPINGS["XMGIEGBCompositor"]()
    with pytest.raises(ValueError, match="connect the original"):
        node.composite(torch.rand(1, 8, 8, 3), torch.ones(1, 8, 8), "composite", 5.0, 10.0, 16.0)


def test_samples_are_copied_into_comfy_input_without_overwriting(pack, tmp_path, monkeypatch):
    import sys
    import types

    fake = types.ModuleType("folder_paths")
    fake.get_input_directory = lambda: str(tmp_path)
    monkeypatch.setitem(sys.modules, "folder_paths", fake)
    (tmp_path / "xmgie_astronaut_source.png").write_bytes(b"user's own file")
    copied = pack.nodes.samples.install_samples()
    assert [p.name for p in copied] == ["xmgie_astronaut_edit.png"]
    assert (tmp_path / "xmgie_astronaut_source.png").read_bytes() == b"user's own file"
    assert pack.nodes.samples.install_samples() == []


class _FakeSampling:
    def percent_to_sigma(self, p: float) -> float:
        return 14.6 * (1 - p)


class _FakeModelPatcher:
    """The ModelPatcher surface the CAM node uses: clone(), model_options, get_model_object, model.diffusion_model."""

    def __init__(self, diffusion_model=None):
        self.model_options = {"transformer_options": {}}
        unet = types.SimpleNamespace(input_blocks=[], middle_block=[], output_blocks=[])  # what a U-Net has
        self.model = types.SimpleNamespace(diffusion_model=unet if diffusion_model is None else diffusion_model)

    def clone(self):
        c = _FakeModelPatcher()
        c.model_options = copy.deepcopy(self.model_options)
        c.model = self.model
        return c

    def get_model_object(self, name):
        assert name == "model_sampling"
        return _FakeSampling()


class FakeClip:
    """The comfy.sd.CLIP surface the CAM node uses: tokenize (77-token chunks), encode_from_tokens_scheduled
    (a deterministic stand-in encoder: one embedding row per token id), tokenizer.clip_l."""

    def __init__(self, clip_tokenizer):
        self.hf = clip_tokenizer
        inv = {v: k for k, v in clip_tokenizer.get_vocab().items()}
        self.tokenizer = types.SimpleNamespace(clip_l=types.SimpleNamespace(
            tokenizer=clip_tokenizer, start_token=49406, end_token=49407, pad_token=49407, inv_vocab=inv))
        self.table = torch.randn(49408, 8, generator=torch.Generator().manual_seed(0))
        self.encoded: list[str] = []

    def tokenize(self, text):
        ids = self.hf(text, padding="max_length", max_length=77, truncation=True)["input_ids"]
        return {"l": [[(t, 1.0) for t in ids]]}

    def encode_from_tokens_scheduled(self, tokens):
        ids = torch.tensor([t for t, _ in tokens["l"][0]])
        self.encoded.append(ids)
        return [[self.table[ids].cumsum(0)[None], {"pooled_output": self.table[ids[-1]][None]}]]


def test_cam_node_patches_a_clone(pack, clip_tokenizer):
    node = pack.NODE_CLASS_MAPPINGS["XMGIECrossAttentionMask"]()
    prompt = "a man wearing a red scarf in a park"
    model, clip = _FakeModelPatcher(), FakeClip(clip_tokenizer)
    patched, positive = node.patch(model, clip, prompt, "red scarf", torch.ones(1, 64, 64), "paper", 0.5, 0.8,
                                   True, False, True, 0.25, 0.75, "park")
    assert model.model_options == {"transformer_options": {}}
    to = patched.model_options["transformer_options"]
    cam = to["optimized_attention_override"]
    assert to["patches"]["attn2_patch"] == [cam.arm] and to["patches"]["attn2_output_patch"] == [cam.correct_output]
    assert to["wrappers"]["outer_sample"]["xmgie_cam"] == [cam.check_sampler_conds]
    (cond, extras), = positive  # the prompt, encoded by the node: what the patch masks
    assert torch.equal(cond, clip.encode_from_tokens_scheduled(clip.tokenize(prompt))[0][0])
    assert cam.prompt.text == prompt and cam.prompt.matches(cond) and "pooled_output" in extras
    spec = cam.spec
    assert spec.edit_positions == (5, 6) and spec.background_positions == (9,) and spec.prompt_tokens == 77
    assert spec.levels == frozenset({"input", "output"}) and spec.mode == "paper" and spec.strength == 0.8
    assert (spec.sigma_start, spec.sigma_end) == pytest.approx((14.6 * 0.75, 14.6 * 0.25))


def test_cam_node_names_the_mismatched_text_from_the_workflow(pack, clip_tokenizer):
    """The workflow's own CLIP Text Encode texts (hidden PROMPT) let the error name what the sampler got."""
    node = pack.NODE_CLASS_MAPPINGS["XMGIECrossAttentionMask"]()
    prompt, other = "a man wearing a red scarf", "a photo of a snowman standing in a park"
    clip = FakeClip(clip_tokenizer)
    graph = {"4": {"class_type": "CLIPTextEncode", "inputs": {"text": other, "clip": ["3", 1]}}}
    patched, _ = node.patch(_FakeModelPatcher(), clip, prompt, "red scarf", torch.ones(1, 8, 8), "renormalized",
                            0.5, 1.0, True, True, True, 0.0, 1.0, graph=graph)
    cam = patched.model_options["transformer_options"]["optimized_attention_override"]
    theirs = clip.encode_from_tokens_scheduled(clip.tokenize(other))[0][0]
    with pytest.raises(ValueError, match=f"'{prompt}' never reaches the sampler: its positive conditioning "
                                         f"\\(77 tokens\\) was encoded from '{other}'"):
        cam.prompt.require_in({"positive": [{"cross_attn": theirs}], "negative": []})


def test_model_folders_are_registered_and_found_by_name(pack, tmp_path, monkeypatch):
    import sys

    registered: dict[str, list[str]] = {}
    (tmp_path / "extra" / "clipseg-tiny").mkdir(parents=True)
    fake = types.SimpleNamespace(
        models_dir=str(tmp_path / "models"),
        add_model_folder_path=lambda name, path, is_default=False: registered.setdefault(name, []).append(path),
        get_folder_paths=lambda name: [str(tmp_path / "extra")] if name == "clipseg" else [],
    )
    monkeypatch.setitem(sys.modules, "folder_paths", fake)
    folders = pack.nodes.model_folders
    folders.register_model_folders()
    assert registered == {name: [str(tmp_path / "models" / name)] for name in folders.PACK_FOLDERS}
    assert folders.find_model_folder("clipseg-tiny", ("clipseg",), "CLIPSeg", "x") == tmp_path / "extra" / "clipseg-tiny"
    with pytest.raises(ValueError, match=rf"'other' not found; looked in: {tmp_path / 'extra'}"):
        folders.find_model_folder("other", ("clipseg",), "CLIPSeg", "clipseg-rd64-refined")
    with pytest.raises(ValueError, match="needs a model folder: the name of a folder under ComfyUI/models/clipseg/"):
        folders.find_model_folder(" ", ("clipseg",), "CLIPSeg", "clipseg-rd64-refined")


@pytest.mark.parametrize("name", ["../secrets", "clipseg-tiny/../../models", "a/../b", ".."])
def test_a_model_folder_name_never_leaves_the_model_folders(pack, tmp_path, monkeypatch, name):
    import sys

    (tmp_path / "extra" / "a").mkdir(parents=True)
    (tmp_path / "extra" / "b").mkdir()
    (tmp_path / "secrets").mkdir()
    fake = types.SimpleNamespace(get_folder_paths=lambda kind: [str(tmp_path / "extra")])
    monkeypatch.setitem(sys.modules, "folder_paths", fake)
    with pytest.raises(ValueError, match=r"climbs out of the model folders \('\.\.'\): names are looked up inside "
                                         r"ComfyUI/models/clipseg/ only"):
        pack.nodes.model_folders.find_model_folder(name, ("clipseg",), "CLIPSeg", "clipseg-rd64-refined")


@pytest.fixture()
def symlink_loop(tmp_path):
    (tmp_path / "loop").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop")
    return tmp_path / "loop"


def test_a_symlink_loop_as_a_model_folder_is_named_by_every_model_node(pack, symlink_loop, tmp_path, monkeypatch):
    import sys

    message = r"is a symlink loop \(a link that leads back to itself.*Point the link at the real model folder"
    image = torch.rand(1, 32, 32, 3)
    with pytest.raises(ValueError, match=message):
        pack.NODE_CLASS_MAPPINGS["XMGIEInstruction"]().plan(image, "give the man a red scarf", "local model",
                                                            str(symlink_loop), 0, 0.0, 64, False)
    with pytest.raises(ValueError, match=message):
        pack.NODE_CLASS_MAPPINGS["XMGIEMGIEGuidance"]().guide(image, "give the man a red scarf", str(symlink_loop), 0,
                                                              96, False)
    region = dict(mode="clipseg", instruction="x", target_description="a red scarf", source_description="a scarf",
                  edit_words="red scarf", threshold=0.5, grow=0, smoothing=0.0, seed=0, draws=2, steps=2, strength=0.5)
    with pytest.raises(ValueError, match=message):
        pack.NODE_CLASS_MAPPINGS["XMGIERegionPredictor"]().predict(image, **region, clipseg_folder=str(symlink_loop))
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "inside").symlink_to(symlink_loop)  # a loop met by name inside the model folders
    monkeypatch.setitem(sys.modules, "folder_paths", types.SimpleNamespace(
        get_folder_paths=lambda kind: [str(tmp_path / "models")]))
    with pytest.raises(ValueError, match=message):
        pack.nodes.model_folders.find_model_folder("inside", ("clipseg",), "CLIPSeg", "clipseg-rd64-refined")


def test_the_core_loaders_name_a_symlink_loop(symlink_loop):
    from xmgie_core.instruction.local import GenerationSettings, local_plan
    from xmgie_core.mgie.folder import cached_mgie
    from xmgie_core.region.clipseg import load_clipseg

    for load in (load_clipseg, cached_mgie,
                 lambda f: local_plan(torch.rand(1, 8, 8, 3), "give the man a red scarf", f, GenerationSettings())):
        with pytest.raises(ValueError, match="is a symlink loop"):
            load(symlink_loop)


NUMBER_CASES = [(node, name) for node, cls in load_pack().NODE_CLASS_MAPPINGS.items()
                for name in load_pack().nodes.inputs.numeric_specs(cls)]


def _placeholder_call(cls, **change):
    """Call the node's FUNCTION with None for every argument but `change` (the number check runs first)."""
    import inspect

    params = list(inspect.signature(getattr(cls, cls.FUNCTION)).parameters)[1:]
    return getattr(cls(), cls.FUNCTION)(**{**{p: None for p in params}, **change})


@pytest.mark.parametrize("node,name", NUMBER_CASES)
@pytest.mark.parametrize("bad", ["nan", "inf", "-inf", "below", "above"])
def test_every_number_input_of_every_node_is_range_checked(pack, node, name, bad):
    """NaN passes ComfyUI's own min/max validation; the node itself must stop it, naming the input and range."""
    cls = pack.NODE_CLASS_MAPPINGS[node]
    options = pack.nodes.inputs.numeric_specs(cls)[name]
    value = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf"),
             "below": options.get("min", float("-inf")) - 1, "above": options.get("max", float("inf")) + 1}[bad]
    if value in (float("inf"), float("-inf")) and bad in ("below", "above"):
        pytest.skip("no limit on that side")
    with pytest.raises(ValueError, match=rf"{pack.NODE_DISPLAY_NAME_MAPPINGS[node]}: {name} must be between .* "
                                         r"Set it on the node within that range"):
        _placeholder_call(cls, **{name: value})


def test_every_node_declares_limits_on_its_numbers(pack):
    for node, name in NUMBER_CASES:
        options = pack.nodes.inputs.numeric_specs(pack.NODE_CLASS_MAPPINGS[node])[name]
        assert "min" in options and "max" in options, f"{node}.{name} has no min/max"


def test_numbers_within_limits_reach_the_node(pack):
    node = pack.NODE_CLASS_MAPPINGS["XMGIEGBCompositor"]()
    src, edit, mask = torch.zeros(1, 16, 16, 3), torch.ones(1, 16, 16, 3), torch.ones(1, 16, 16)
    image, _ = node.composite(edit, mask, "composite", 0.0, 256.0, 0.0, source=src)  # the limits themselves
    assert torch.equal(image, edit)
