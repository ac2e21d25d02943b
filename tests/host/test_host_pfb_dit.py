"""PFB on ComfyUI's DiT editors (tiny random Flux / FLUX.1 Kontext and Qwen-Image(-Edit) models built from
ComfyUI's own classes, tests/host/tiny_dit.py), both source modes: an empty mask returns the source, a full mask
is the stock CFGGuider's sampling, the latent blend keeps the outside; text and reference-image tokens are never
blended; the source pass stops after the deepest blended block; the MODEL is untouched; interrupts; the PFB
Sampler and Guider nodes on 4-d and 5-d LATENTs; the reference latents on the source branch."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

import comfy_harness as harness
import tiny_dit as td

FAMILIES = [td.FLUX, td.QWEN]
MODES = ["noised", "inverted"]
H, W = 8, 12
"""Latent size: a 4 x 6 token grid."""


@pytest.fixture(scope="module")
def models(comfy_host):
    return {family: td.tiny_dit_model(family) for family in FAMILIES}


@pytest.fixture(scope="module")
def pfb_host(comfy_host):
    """The pack's hosts/comfy/pfb.py and nodes/pfb.py as ComfyUI loaded them."""
    nodes = sys.modules[comfy_host.nodes.NODE_CLASS_MAPPINGS["XMGIEPFBSampler"].__module__]
    return sys.modules[nodes.__name__.replace("nodes.pfb", "xmgie_core.hosts.comfy.pfb")], nodes


def inputs(family: str, reference_on_negative: bool = True) -> tuple[torch.Tensor, list, list]:
    """Source latent z, and an editor's positive and negative, both with z as the reference image (Kontext's
    ReferenceLatent, Qwen-Image-Edit's text encoder node)."""
    z = td.latent(family, H, W)
    return z, td.conditioning(family, reference=z), td.conditioning(family, seed=5,
                                                                     reference=z if reference_on_negative else None)


def half_mask() -> torch.Tensor:
    """Left half of the image (latent columns 0-5)."""
    mask = torch.zeros(1, 8 * H, 8 * W)
    mask[..., : 4 * W] = 1
    return mask


OUTSIDE = slice(W // 2 + 1, None)
"""Latent columns clear of the mask and of its border cell."""


def sample(guider, model, z: torch.Tensor, steps: int = 3, seed: int = 0, sampler: str = "euler") -> torch.Tensor:
    import comfy.sample
    import comfy.samplers

    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", steps)
    return guider.sample(comfy.sample.prepare_noise(z, seed), z, comfy.samplers.sampler_object(sampler), sigmas,
                         seed=seed, disable_pbar=True)


def pfb(pfb_host, model, positive, negative, z, mask, source=None, cfg=2.0, steps=3, **settings) -> torch.Tensor:
    from xmgie_core.pfb import PFBSettings

    guider = pfb_host[0].pfb_guider_class()(model, PFBSettings(mask, **settings))
    guider.set_conds(positive, negative, source)
    guider.set_cfg(cfg)
    return sample(guider, model, z, steps)


def stock(model, positive, negative, z, cfg=2.0, steps=3) -> torch.Tensor:
    import comfy.samplers

    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    return sample(guider, model, z, steps)


@pytest.mark.parametrize("family", FAMILIES)
def test_empty_mask_returns_the_source_latent_exactly(pfb_host, models, family):
    z, positive, negative = inputs(family)
    out = pfb(pfb_host, models[family], positive, negative, z, torch.zeros(1, 8 * H, 8 * W))
    assert torch.equal(out, z)


@pytest.mark.parametrize("family", FAMILIES)
def test_full_mask_is_the_stock_cfg_guiders_sampling(pfb_host, models, family):
    """`noised` (`inverted` starts the edit from the inversion's top instead of the seed's noise, by design)."""
    z, positive, negative = inputs(family)
    out = pfb(pfb_host, models[family], positive, negative, z, torch.ones(1, 8 * H, 8 * W), source_mode="noised")
    want = stock(models[family], positive, negative, z)
    assert out.shape == want.shape == z.shape
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", FAMILIES)
def test_latent_blend_to_the_end_keeps_the_source_outside_and_edits_inside(pfb_host, models, family, mode):
    z, positive, negative = inputs(family)
    out = pfb(pfb_host, models[family], positive, negative, z, half_mask(), source_mode=mode, latent_end=1.0)
    assert torch.equal(out[..., W // 2:], z[..., W // 2:]), "outside the mask the latent must be the source exactly"
    assert (out[..., : W // 2] - z[..., : W // 2]).abs().mean() > 0.1, "nothing was edited inside the mask"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", FAMILIES)
def test_outside_drifts_less_than_stock_sampling_when_the_latent_blend_ends_early(pfb_host, models, family, mode):
    z, positive, negative = inputs(family)
    out = pfb(pfb_host, models[family], positive, negative, z, half_mask(), source_mode=mode, latent_end=0.5)
    drift = (out[..., OUTSIDE] - z[..., OUTSIDE]).abs().mean()
    stock_drift = (stock(models[family], positive, negative, z)[..., OUTSIDE] - z[..., OUTSIDE]).abs().mean()
    assert 0 < drift < 0.75 * stock_drift


# ------------------------------------------------------------------------------------------ tokens and blocks


def blocks(model) -> tuple[list, list]:
    """(double-stream blocks, single-stream blocks) of the ModelPatcher's diffusion model."""
    dm = model.model.diffusion_model
    return (list(dm.double_blocks), list(dm.single_blocks)) if hasattr(dm, "double_blocks") else \
        (list(dm.transformer_blocks), [])


class BlockSpy:
    """Forward hooks recording each block's inputs and outputs as (img, txt) per call, in call order."""

    def __init__(self, model):
        self.doubles, self.singles = blocks(model)
        self.calls: list[tuple[str, int, str, dict]] = []
        self.handles = []
        for kind, group in (("double", self.doubles), ("single", self.singles)):
            for i, block in enumerate(group):
                self.handles.append(block.register_forward_pre_hook(self._pre(kind, i), with_kwargs=True))
                self.handles.append(block.register_forward_hook(self._post(kind, i), with_kwargs=True))

    @staticmethod
    def _streams(args, kwargs) -> dict:
        """Flux double: img=, txt=; Flux single: (x, ...); Qwen: hidden_states=, encoder_hidden_states=."""
        img = kwargs.get("img", kwargs.get("hidden_states", args[0] if args else None))
        return {"img": img.detach().clone(), "txt": kwargs.get("txt", kwargs.get("encoder_hidden_states"))}

    def _pre(self, kind, i):
        def hook(module, args, kwargs):
            streams = self._streams(args, kwargs)
            if streams["txt"] is not None:
                streams["txt"] = streams["txt"].detach().clone()
            self.calls.append((kind, i, "in", streams))
        return hook

    def _post(self, kind, i):
        def hook(module, args, kwargs, output):
            if kind == "single":
                streams = {"img": output.detach().clone(), "txt": None}
            elif "hidden_states" in kwargs:  # Qwen returns (txt, img)
                streams = {"img": output[1].detach().clone(), "txt": output[0].detach().clone()}
            else:
                streams = {"img": output[0].detach().clone(), "txt": output[1].detach().clone()}
            self.calls.append((kind, i, "out", streams))
        return hook

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()

    def batch_calls(self, kind: str, i: int, rows: int) -> int:
        return sum(1 for k, n, where, s in self.calls if (k, n, where) == (kind, i, "in") and s["img"].shape[0] == rows)


def spied(model, run):
    spy = BlockSpy(model)
    try:
        return run(), spy
    finally:
        spy.close()


@pytest.mark.parametrize("family, layers, nxt", [
    (td.FLUX, "double_0, single_0", [("double", 0, "double", 1), ("single", 0, "single", 1)]),
    (td.QWEN, "double_0-1", [("double", 0, "double", 1), ("double", 1, "double", 2)]),
])
def test_text_and_reference_tokens_are_never_blended(pfb_host, models, family, layers, nxt):
    """In the edit pass (2 rows: cond and uncond), each blended block's output goes on to the next block with its
    text tokens and reference-image tokens exactly as the block produced them, while its generated tokens outside
    the mask are replaced by the source branch's (which differ: another prompt)."""
    model = models[family]
    z, positive, negative = inputs(family)
    source = td.conditioning(family, seed=9, scale=3.0)
    _, spy = spied(model, lambda: pfb(pfb_host, model, positive, negative, z, half_mask(), source=source,
                                      layers=layers, latent_end=0.0, steps=2))
    text = positive[0][0].shape[1]
    grid = (H // 2) * (W // 2)
    for kind, i, next_kind, j in nxt:
        outs = [s for k, n, where, s in spy.calls if (k, n, where) == (kind, i, "out") and s["img"].shape[0] == 2]
        ins = [s for k, n, where, s in spy.calls if (k, n, where) == (next_kind, j, "in") and s["img"].shape[0] == 2]
        assert len(outs) == len(ins) == 2  # one edit pass per step
        for out, nxt_in in zip(outs, ins):
            start = text if kind == "single" else 0  # the single stream is [text | generated | reference]
            produced, passed = out["img"], nxt_in["img"]
            assert produced.shape[1] == start + 2 * grid  # the reference image has as many tokens as the latent
            assert torch.equal(passed[:, :start], produced[:, :start]), "text tokens were blended"
            assert torch.equal(passed[:, start + grid:], produced[:, start + grid:]), "reference tokens were blended"
            if kind == "double":
                assert torch.equal(nxt_in["txt"], out["txt"]), "the text stream was blended"
            g_produced = produced[:, start:start + grid].reshape(2, H // 2, W // 2, -1)
            g_passed = passed[:, start:start + grid].reshape(2, H // 2, W // 2, -1)
            assert torch.equal(g_passed[:, :, : W // 4], g_produced[:, :, : W // 4]), "inside the mask: the edit's"
            assert not torch.allclose(g_passed[:, :, W // 4:], g_produced[:, :, W // 4:]), "outside: the source's"


@pytest.mark.parametrize("family, layers, run_in_source, skipped", [
    (td.FLUX, "double_1", [("double", 0), ("double", 1)], [("single", 0), ("single", 1)]),
    (td.FLUX, "double_0, single_0", [("double", 0), ("double", 1), ("single", 0)], [("single", 1)]),
    (td.QWEN, "auto", [("double", 0), ("double", 1)], [("double", 2)]),  # auto: the first half, double_0-1
])
def test_source_pass_stops_after_the_deepest_blended_block(pfb_host, models, family, layers, run_in_source,
                                                           skipped):
    model = models[family]
    z, positive, negative = inputs(family)
    steps = 3
    _, spy = spied(model, lambda: pfb(pfb_host, model, positive, negative, z, half_mask(), layers=layers,
                                      latent_end=0.0, steps=steps))
    for kind, i in run_in_source:
        assert spy.batch_calls(kind, i, rows=1) == steps and spy.batch_calls(kind, i, rows=2) == steps
    for kind, i in skipped:
        assert spy.batch_calls(kind, i, rows=1) == 0, f"{kind}_{i} ran in the source pass"
        assert spy.batch_calls(kind, i, rows=2) == steps


@pytest.mark.parametrize("family", FAMILIES)
def test_outside_weight_one_is_the_latent_blend_alone_without_a_source_pass(pfb_host, models, family):
    """alpha = 1 blends nothing, so no source pass runs: the cost of the latent blend alone (bench_dit's
    'latent'); the latent blend still keeps the outside the source."""
    model = models[family]
    z, positive, negative = inputs(family)
    out, spy = spied(model, lambda: pfb(pfb_host, model, positive, negative, z, half_mask(), outside_weight=1.0,
                                        latent_end=1.0))
    assert all(s["img"].shape[0] == 2 for k, n, where, s in spy.calls), "a source pass ran"
    assert torch.equal(out[..., W // 2:], z[..., W // 2:]) and not torch.equal(out[..., : W // 2], z[..., : W // 2])


# ------------------------------------------------------------------------------------------ the MODEL, interrupts


def model_state(model) -> tuple[str, dict]:
    return repr(model.model_options), {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}


def assert_unchanged(model, before) -> None:
    options, state = before
    assert repr(model.model_options) == options, "the MODEL's options were changed"
    now = model.model.diffusion_model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], v) for k, v in state.items()), "weights changed"
    assert not model.model.diffusion_model._forward_hooks and not model.model.diffusion_model._forward_pre_hooks


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", FAMILIES)
def test_model_unchanged_after_sampling(pfb_host, models, family, mode):
    model = models[family]
    before = model_state(model)
    z, positive, negative = inputs(family)
    pfb(pfb_host, model, positive, negative, z, half_mask(), source_mode=mode, layers="auto")
    assert_unchanged(model, before)


def node_args(family: str, **change) -> dict:
    z, positive, negative = inputs(family)
    args = dict(positive=positive, negative=negative, latent_image={"samples": z}, seed=3, steps=3, cfg=2.0,
                sampler_name="euler", scheduler="simple", denoise=1.0, mask=half_mask(), source_mode="noised",
                layers="auto", outside_weight=0.0, blend_end_percent=1.0, latent_blend_end_percent=1.0,
                soft_edge=True, cache=False, cache_mb=256)
    return {**args, **change}


def run_sampler_node(comfy_host, model, family, **change) -> dict:
    node = comfy_host.nodes.NODE_CLASS_MAPPINGS["XMGIEPFBSampler"]()
    return node.sample(model, **node_args(family, **change))[0]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", FAMILIES)
def test_interrupt_stops_the_run_and_restores_the_state(comfy_host, pfb_host, models, family, mode):
    """An interrupt on the second model call (noised: the first edit pass; inverted: the inversion) raises
    ComfyUI's InterruptProcessingException, clears the flag, leaves the MODEL as it was, and the next run (with the
    source cache the interrupted run started) equals an uninterrupted one."""
    import comfy.model_management as mm

    base = models[family]
    before = model_state(base)
    model = base.clone()
    interrupt = harness.interrupt_on_call(2)
    model.set_model_unet_function_wrapper(interrupt)
    pfb_host[1].SOURCE_CACHE.clear()
    with pytest.raises(mm.InterruptProcessingException):
        run_sampler_node(comfy_host, model, family, source_mode=mode, cache=True)
    assert len(interrupt.calls) == 2 and not mm.processing_interrupted()
    assert_unchanged(base, before)
    again = run_sampler_node(comfy_host, base, family, source_mode=mode, cache=True)["samples"]
    fresh = run_sampler_node(comfy_host, base, family, source_mode=mode, cache=False)["samples"]
    assert torch.equal(again, fresh)


# ------------------------------------------------------------------------------------------ the nodes


def call(comfy_host, name: str, *args):
    cls = comfy_host.nodes.NODE_CLASS_MAPPINGS[name]
    return getattr(cls(), cls.FUNCTION)(*args)[0]


def run_guider_node(comfy_host, model, family, latent: dict, **change) -> dict:
    a = node_args(family, latent_image=latent, **change)
    guider = call(comfy_host, "XMGIEPFBGuider", model, a["positive"], a["negative"], a["cfg"], a["mask"],
                  a["source_mode"], a["layers"], a["outside_weight"], a["blend_end_percent"],
                  a["latent_blend_end_percent"], a["soft_edge"], a["cache"], a["cache_mb"])
    return call(comfy_host, "SamplerCustomAdvanced", call(comfy_host, "RandomNoise", a["seed"]), guider,
                call(comfy_host, "KSamplerSelect", a["sampler_name"]),
                call(comfy_host, "BasicScheduler", model, a["scheduler"], a["steps"], 1.0), latent)


def latents(comfy_host, family: str) -> dict[str, dict]:
    """The LATENTs a user has: VAEEncode's (Flux 4-d; Qwen-Image's Wan VAE 5-d [B, 16, 1, h, w]) and, for Qwen,
    EmptySD3LatentImage's 4-d zeros, which ComfyUI's samplers unsqueeze (fix_empty_latent_channels)."""
    found = {"encoded": {"samples": td.latent(family, H, W)}}
    if family == td.QWEN:
        found["empty_sd3"] = call(comfy_host, "EmptySD3LatentImage", 8 * W, 8 * H, 1)
        found["encoded_4d"] = {"samples": td.latent(family, H, W)[:, :, 0]}
    return found


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", FAMILIES)
def test_sampler_and_guider_nodes_run_on_dit_latents(comfy_host, models, family, mode):
    """Both nodes give the same result on every LATENT a user has, in the model's latent format (Qwen: 5-d, as
    KSampler returns it), with the source exactly outside the mask (latent blend to the end)."""
    model = models[family]
    for name, latent in latents(comfy_host, family).items():
        source = latent["samples"]
        source = source[:, :, None] if family == td.QWEN and source.ndim == 4 else source
        by_sampler = run_sampler_node(comfy_host, model, family, latent_image=latent, source_mode=mode)["samples"]
        by_guider = run_guider_node(comfy_host, model, family, latent, source_mode=mode)["samples"]
        assert by_sampler.shape == source.shape, name
        assert torch.equal(by_sampler, by_guider), name
        assert torch.equal(by_sampler[..., W // 2:], source[..., W // 2:]), name
        assert not torch.equal(by_sampler[..., : W // 2], source[..., : W // 2]), name


@pytest.mark.parametrize("family", FAMILIES)
def test_nodes_with_an_empty_mask_return_the_source_in_the_models_format(comfy_host, models, family):
    model = models[family]
    empty = torch.zeros(1, 8 * H, 8 * W)
    for name, latent in latents(comfy_host, family).items():
        by_sampler = run_sampler_node(comfy_host, model, family, latent_image=latent, mask=empty)["samples"]
        by_guider = run_guider_node(comfy_host, model, family, latent, mask=empty)["samples"]
        assert torch.equal(by_sampler, by_guider), name
        assert torch.equal(by_sampler.flatten(), latent["samples"].flatten()), name


def test_best_of_n_on_a_5d_qwen_latent(comfy_host, pfb_host, models, monkeypatch):
    """Best-of-N repeats the Qwen-Image latent [1, 16, 1, h, w] into N candidates (the faces' scores are stubbed:
    this is about the latent's shape, see test_host_pfb for the scoring)."""
    from xmgie_core.identity.faces import Face, IdEmbed

    nodes = pfb_host[1]
    face = Face((30.0, 10.0, 60.0, 50.0), np.array([[38, 25], [52, 25], [45, 32], [40, 40], [50, 40]], np.float32),
                0.99, np.ones(8, np.float32) / np.sqrt(8))
    embed = IdEmbed([[face]], (8 * H, 8 * W), "insightface")
    scores = [0.2, 0.9, 0.5]

    class VAE:
        def decode(self, samples):
            self.seen = samples.clone()
            return torch.zeros(samples.shape[0], 8 * H, 8 * W, 3)

    vae = VAE()
    monkeypatch.setattr(nodes, "recognizer_for", lambda e: None)
    monkeypatch.setattr(nodes, "score_images", lambda r, e, images: (scores[:images.shape[0]], "a\nb\nc"))
    out, ips, _ = comfy_host.nodes.NODE_CLASS_MAPPINGS["XMGIEPFBSampler"]().sample(
        models[td.QWEN], **node_args(td.QWEN, id_embed=embed, candidates=3, vae=vae))
    assert out["samples"].shape == (3, 16, 1, H, W) and ips == [0.9, 0.5, 0.2]
    assert torch.equal(out["samples"], vae.seen[[1, 2, 0]])
    assert not torch.equal(vae.seen[0], vae.seen[1])


# ------------------------------------------------------------------------------------------ reference latents


@pytest.mark.parametrize("family", FAMILIES)
def test_source_branch_gets_the_editors_reference_latents(pfb_host, models, family):
    """Kontext / Qwen-Image-Edit: the negative without a reference (as a user may wire it) and no source
    conditioning: the source pass (1 row) still gets the positive's reference image, as the edit's rows do."""
    z, positive, negative = inputs(family, reference_on_negative=False)
    assert "reference_latents" in positive[0][1] and "reference_latents" not in negative[0][1]
    model = models[family].clone()
    seen = []
    model.set_model_unet_function_wrapper(
        lambda apply_model, args: seen.append((args["c"]["c_crossattn"], args["c"].get("ref_latents"))) or
        apply_model(args["input"], args["timestep"], **args["c"]))
    pfb(pfb_host, model, positive, negative, z, half_mask(), cfg=1.0, latent_end=0.0, steps=2)  # edit: cond only
    source = [refs for context, refs in seen if torch.equal(context, negative[0][0])]
    edit = [refs for context, refs in seen if torch.equal(context, positive[0][0])]
    assert len(source) == len(edit) == 2 and len(seen) == 4
    assert all(refs is not None and len(refs) == 1 and torch.equal(refs[0], e[0]) for refs, e in zip(source, edit))
