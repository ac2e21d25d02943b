"""PFB's DiT seam without ComfyUI: the generated tokens' grid (xmgie_core.token_grid), the DiT layouts and the
layer grammar's `double_k` / `single_k`, `dit.find` on stand-in modules, and the block replace patches driven
exactly as ComfyUI 0.3.64 drives patches_replace["dit"] (comfy/ldm/flux/model.py forward_orig,
comfy/ldm/qwen_image/model.py _forward): text and reference tokens untouched, earlier patches composed, the
options copied on write, the geometry in the right positional argument of each family's forward."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from xmgie_core.errors import XMGIEInputError
from xmgie_core.hosts.comfy import dit
from xmgie_core.pfb import BlockLayout, parse_layers
from xmgie_core.token_grid import TokenGrid

# ------------------------------------------------------------------------------------------ TokenGrid


@pytest.mark.parametrize("height, width", [(8, 12), (9, 12), (7, 5), (1, 1), (128, 128)])
def test_token_grid_of_a_latent_is_comfyuis_ceil(height, width):
    grid = TokenGrid.from_latent(height, width, 2)
    assert (grid.h, grid.w) == ((height + 1) // 2, (width + 1) // 2)  # Flux/Qwen process_img: (h + p // 2) // p
    assert grid.count == grid.h * grid.w and grid.stop == grid.count


def _sequence(text: int, grid: TokenGrid, reference: int, dim: int = 3, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, text + grid.count + reference, dim, generator=torch.Generator().manual_seed(0))


def test_to_grid_is_row_major_and_put_round_trips():
    grid = TokenGrid.from_latent(5, 8, 2, start=4)  # 3 x 4 tokens after 4 text tokens
    tokens = _sequence(4, grid, reference=6)
    features = grid.to_grid(tokens)
    assert features.shape == (2, 3, 3, 4)
    for r in range(3):
        for c in range(4):
            assert torch.equal(features[:, :, r, c], tokens[:, 4 + r * 4 + c])
    assert torch.equal(grid.put(tokens, features), tokens)


def test_put_changes_the_generated_slice_only():
    grid = TokenGrid(2, 3, start=5)
    tokens = _sequence(5, grid, reference=4)
    out = grid.put(tokens, torch.zeros(2, 3, 2, 3))
    assert torch.equal(out[:, :5], tokens[:, :5]), "text tokens changed"
    assert torch.equal(out[:, 11:], tokens[:, 11:]), "reference tokens changed"
    assert (out[:, 5:11] == 0).all() and out.shape == tokens.shape


def test_a_too_short_sequence_is_reported():
    grid = TokenGrid(4, 4, start=3)
    with pytest.raises(XMGIEInputError, match="has 10 tokens, fewer than the 16 image tokens of a 4x4 grid"):
        grid.to_grid(torch.zeros(1, 10, 2))


def test_shifted_grid_moves_the_start_only():
    assert TokenGrid(3, 4, 0).shifted(7) == TokenGrid(3, 4, 7)


# ------------------------------------------------------------------------------------------ layouts and layers


def test_dit_layout_names_factors_and_auto_first_half():
    flux = BlockLayout.from_dit(2, 3, 2)
    assert flux.names == ["double_0", "double_1", "single_0", "single_1", "single_2"]
    assert set(flux.factors.values()) == {(2, 2)}
    assert flux.default_layers() == ["double_0", "double_1", "single_0"]
    qwen = BlockLayout.from_dit(4, 0, 2)
    assert qwen.default_layers() == ["double_0", "double_1"]
    assert BlockLayout.from_dit(1, 1, 2).default_layers() == ["double_0"]


def test_layer_grammar_reads_dit_ranges_in_forward_order():
    layout = BlockLayout.from_dit(19, 38, 2)  # FLUX.1's block counts
    got = parse_layers("single_0-1:0.5@0.6, double_8-10", layout, 0.1, 0.9)
    assert [(b.name, b.weight, b.end) for b in got] == [
        ("double_8", 0.1, 0.9), ("double_9", 0.1, 0.9), ("double_10", 0.1, 0.9),
        ("single_0", 0.5, 0.6), ("single_1", 0.5, 0.6)]
    assert [b.name for b in parse_layers("auto", layout, 0, 1)] == layout.names[:29]


@pytest.mark.parametrize("spec, message", [
    ("single_0", r"This model has no layer single_0\. Its layers are: double_0, double_1, double_2\."),
    ("double_2-4", r"no layer double_3, double_4\. Its layers are: double_0, double_1, double_2\."),
    ("middle", r"no layer middle\. Its layers are: double_0"),
    ("output_0", r"no layer output_0\. Its layers are: double_0"),
    ("double_2-1", "runs backwards"),
])
def test_layer_the_dit_lacks_is_named_with_its_layers(spec, message):
    with pytest.raises(XMGIEInputError, match=message):
        parse_layers(spec, BlockLayout.from_dit(3, 0, 2), 0.0, 1.0)


# ------------------------------------------------------------------------------------------ stand-in models


class StandInFlux(nn.Module):
    def __init__(self, double: int = 2, single: int = 3):
        super().__init__()
        self.patch_size = 2
        self.double_blocks = nn.ModuleList(nn.Identity() for _ in range(double))
        self.single_blocks = nn.ModuleList(nn.Identity() for _ in range(single))


class StandInQwen(nn.Module):
    def __init__(self, layers: int = 4):
        super().__init__()
        self.patch_size = 2
        self.txt_norm = nn.Identity()
        self.transformer_blocks = nn.ModuleList(nn.Identity() for _ in range(layers))


class StandInUNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.input_blocks, self.middle_block, self.output_blocks = nn.ModuleList(), nn.Identity(), nn.ModuleList()


class MMDiT(nn.Module):
    """SD3's diffusion model: transformer blocks, but neither Flux's nor Qwen-Image's."""

    def __init__(self):
        super().__init__()
        self.joint_blocks = nn.ModuleList([nn.Identity()])


def test_find_recognises_each_family():
    assert dit.find(StandInFlux(2, 3)) == dit.DiT(dit.FLUX, 2, 3, 2)
    assert dit.find(StandInQwen(4)) == dit.DiT(dit.QWEN_IMAGE, 4, 0, 2)
    assert dit.find(StandInUNet()) is None and dit.find(MMDiT()) is None
    assert dit.is_unet(StandInUNet()) and not dit.is_unet(StandInFlux())
    assert dit.find(StandInQwen(3)).layout().names == ["double_0", "double_1", "double_2"]
    assert dit.find(StandInFlux()).block_key("single_2") == ("single_block", 2)


def test_supported_models_and_the_sentence_for_others():
    for model in (StandInUNet(), StandInFlux(), StandInQwen()):
        dit.check_supported(model, "PFB")
    with pytest.raises(XMGIEInputError, match=r"^PFB supports SD1\.x .* this model's diffusion model is a MMDiT\. "
                                              r"Load one of those checkpoints\.$"):
        dit.check_supported(MMDiT(), "PFB")
    with pytest.raises(XMGIEInputError, match="is an SD U-Net, not Flux .*: use the U-Net node instead\\.$"):
        dit.require_dit(StandInUNet(), "This needs a DiT", "use the U-Net node instead")


# ------------------------------------------------------------------------------------------ ComfyUI's block protocol


class Block:
    """A block with distinct, checkable effects on each stream; records what it was given."""

    def __init__(self, scale: float):
        self.scale, self.seen = scale, []

    def double(self, img, txt):
        self.seen.append((img.clone(), txt.clone()))
        return img * self.scale + 1, txt * 3 + 2

    def single(self, img):
        self.seen.append(img.clone())
        return img * self.scale - 1


def run_blocks(family: str, doubles: list[Block], singles: list[Block], img: torch.Tensor, txt: torch.Tensor,
               transformer_options: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The block loops of ComfyUI 0.3.64's Flux.forward_orig and QwenImageTransformer2DModel._forward, with their
    patches_replace["dit"] calls as they are written there (argument dicts and original_block wrappers)."""
    blocks_replace = transformer_options.get("patches_replace", {}).get("dit", {})
    for i, block in enumerate(doubles):
        if ("double_block", i) not in blocks_replace:
            img, txt = block.double(img, txt)
            continue
        if family == dit.FLUX:
            def block_wrap(args, block=block):
                out = {}
                out["img"], out["txt"] = block.double(args["img"], args["txt"])
                return out
            args = {"img": img, "txt": txt, "vec": "vec", "pe": "pe", "attn_mask": None,
                    "transformer_options": transformer_options}
        else:
            def block_wrap(args, block=block):
                out = {}
                out["img"], out["txt"] = block.double(args["img"], args["txt"])  # Qwen's block returns (txt, img)
                return out
            args = {"img": img, "txt": txt, "vec": "vec", "pe": "pe", "transformer_options": transformer_options}
        out = blocks_replace[("double_block", i)](args, {"original_block": block_wrap})
        img, txt = out["img"], out["txt"]
    joint = torch.cat((txt, img), 1)
    for i, block in enumerate(singles):
        if ("single_block", i) in blocks_replace:
            def single_wrap(args, block=block):
                return {"img": block.single(args["img"])}
            joint = blocks_replace[("single_block", i)]({"img": joint, "vec": "vec", "pe": "pe", "attn_mask": None,
                                                         "transformer_options": transformer_options},
                                                        {"original_block": single_wrap})["img"]
        else:
            joint = block.single(joint)
    return joint[:, txt.shape[1]:], joint[:, :txt.shape[1]]  # Flux drops the joint's text part; kept to check it


TEXT, REF = 5, 6
GRID = TokenGrid(2, 3)


def forward_inputs(batch: int = 2, dim: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(batch, GRID.count + REF, dim, generator=g), torch.randn(batch, TEXT, dim, generator=g)


def with_geometry_of_the_forward(options: dict, text: int = TEXT) -> dict:
    """What GeometryWrapper hands the forward: a copy of its transformer_options with the Geometry."""
    return {**options["transformer_options"], dit.GEOMETRY: dit.Geometry(text, GRID)}


@pytest.mark.parametrize("family, layers", [(dit.FLUX, ["double_1", "single_0"]), (dit.QWEN_IMAGE, ["double_0"])])
def test_hook_sees_the_generated_tokens_only_as_a_grid(family, layers):
    model = dit.DiT(family, 2, 2 if family == dit.FLUX else 0, 2)
    seen = []

    def hook(layer, h):
        seen.append((layer, h.clone()))
        return torch.zeros_like(h)

    doubles, singles = [Block(2.0), Block(0.5)], [Block(1.5), Block(1.0)][:model.single]
    img, txt = forward_inputs()
    options = with_geometry_of_the_forward(dit.with_layer_hook({}, model, hook, layers))
    out_img, out_txt = run_blocks(family, doubles, singles, img, txt, options)
    ref_img, ref_txt = run_blocks(family, [Block(2.0), Block(0.5)], [Block(1.5), Block(1.0)][:model.single],
                                  img, txt, {})
    assert [layer for layer, _ in seen] == layers
    for layer, h in seen:
        assert h.shape == (2, 4, GRID.h, GRID.w)
    if family == dit.QWEN_IMAGE:  # double_0: its output's generated tokens, then zeroed for block 1
        assert torch.equal(seen[0][1], GRID.to_grid(img * 2 + 1))
        assert torch.equal(doubles[1].seen[0][0][:, :GRID.count], torch.zeros(2, GRID.count, 4))
    else:  # single_0 sees the joint sequence's generated slice, after the text
        joint_in = singles[0].seen[0]
        assert torch.equal(seen[1][1], GRID.shifted(TEXT).to_grid(joint_in * 1.5 - 1))
    assert torch.equal(out_txt, ref_txt), "text tokens were changed"
    assert torch.equal(out_img[:, GRID.count:], ref_img[:, GRID.count:]), "reference tokens were changed"
    assert not torch.equal(out_img[:, :GRID.count], ref_img[:, :GRID.count])


def test_an_earlier_patch_in_the_slot_still_runs_and_the_hook_sees_its_result():
    model = dit.DiT(dit.FLUX, 1, 1, 2)
    earlier_calls = []

    def earlier(args, extra):
        earlier_calls.append(set(args))
        out = extra["original_block"](args)
        return {"img": out["img"] + 100, "txt": out["txt"]}

    first = {"transformer_options": {"patches_replace": {"dit": {("double_block", 0): earlier}}}}
    seen = []
    options = dit.with_layer_hook(first, model, lambda layer, h: seen.append(h.clone()) or h, ["double_0"])
    assert isinstance(options["transformer_options"]["patches_replace"]["dit"][("double_block", 0)], dit.TokenPatch)
    img, txt = forward_inputs()
    out_img, _ = run_blocks(dit.FLUX, [Block(2.0)], [Block(1.0)], img, txt, with_geometry_of_the_forward(options))
    assert earlier_calls == [{"img", "txt", "vec", "pe", "attn_mask", "transformer_options"}]
    assert torch.equal(seen[0], GRID.to_grid(img * 2 + 101)), "the hook must see the earlier patch's output"
    assert torch.equal(out_img, img * 2 + 101 - 1)  # the hook returned h: single block (scale 1, -1) unchanged


def test_with_layer_hook_copies_on_write_and_installs_the_geometry_once():
    model = dit.DiT(dit.QWEN_IMAGE, 3, 0, 2)
    other_wrapper, other_patch = object(), object()
    original = {"transformer_options": {"patches_replace": {"dit": {("double_block", 2): other_patch}},
                                        "wrappers": {dit.DIFFUSION_MODEL: {"other": [other_wrapper]}}, "x": 1},
                "sampler_cfg_function": "cfg"}
    before = copy.copy(original), repr(original)
    once = dit.with_layer_hook(original, model, lambda layer, h: h, ["double_0", "double_1"])
    twice = dit.with_layer_hook(once, model, lambda layer, h: h, ["double_0"])
    assert repr(original) == before[1] and original == before[0], "the original options were changed"
    to = twice["transformer_options"]
    assert to["wrappers"][dit.DIFFUSION_MODEL]["other"] == [other_wrapper]
    assert len(to["wrappers"][dit.DIFFUSION_MODEL]["xmgie_dit"]) == 1
    blocks = to["patches_replace"]["dit"]
    assert blocks[("double_block", 2)] is other_patch and set(blocks) == {("double_block", k) for k in range(3)}
    assert blocks[("double_block", 0)].previous is once["transformer_options"]["patches_replace"]["dit"][
        ("double_block", 0)], "a second hook composes with the first"
    assert twice["sampler_cfg_function"] == "cfg" and to["x"] == 1


def test_a_patch_without_its_geometry_says_where_the_node_goes():
    patch = dit.TokenPatch("double_0", lambda layer, h: h)
    img, txt = forward_inputs()
    with pytest.raises(XMGIEInputError, match="Put the xMGIE node last before the sampler"):
        patch({"img": img, "txt": txt, "transformer_options": {}}, {"original_block": lambda a: a})


# ------------------------------------------------------------------------------------------ geometry wrapper


@pytest.mark.parametrize("family, x, index", [
    (dit.FLUX, torch.zeros(2, 16, 9, 12), 7),  # Flux.forward(x, timestep, context, y, guidance, ref_latents,
    (dit.QWEN_IMAGE, torch.zeros(2, 16, 1, 9, 12), 6),  # control, transformer_options); Qwen without control
])
def test_geometry_wrapper_puts_the_geometry_into_a_copy_of_the_forwards_options(family, x, index):
    wrapper = dit.GeometryWrapper(dit.DiT(family, 1, 0, 2))
    options = {"patches": {"keep": [1]}}
    context = torch.zeros(2, 7, 8)
    args = [x, torch.ones(2), context, "a3", "a4", "a5", "a6", "a7"][:index] + [options]
    got = []
    wrapper(lambda *a, **k: got.append((a, k)) or "out", *args, extra="kw")
    (called, kwargs), = got
    assert kwargs == {"extra": "kw"} and len(called) == len(args)
    assert all(a is b for n, (a, b) in enumerate(zip(called, args)) if n != index)
    assert called[index] is not options and options == {"patches": {"keep": [1]}}
    assert called[index]["patches"] is options["patches"]
    assert called[index][dit.GEOMETRY] == dit.Geometry(7, TokenGrid(5, 6))
    assert dit.geometry(called[index]).joint == TokenGrid(5, 6, 7)


def test_geometry_wrapper_with_options_as_a_keyword():
    wrapper = dit.GeometryWrapper(dit.DiT(dit.FLUX, 1, 1, 2))
    got = []
    wrapper(lambda *a, **k: got.append(k), torch.zeros(1, 16, 4, 6), torch.ones(1), torch.zeros(1, 3, 8),
            transformer_options={"a": 1})
    assert got[0]["transformer_options"] == {"a": 1, dit.GEOMETRY: dit.Geometry(3, TokenGrid(2, 3))}
