"""Generate the DiT editor workflows xmgie_kontext_edit and xmgie_qwen_edit (UI format, API twin, thumbnail) from one
description each, so the twins cannot disagree (their provenance; deterministic).

Each: the photo and a painted mask (the alpha of xmgie_astronaut_edit.png; paint your own in LoadImage's mask
editor), ComfyUI's standard loaders with the file names of ComfyUI's own templates, Crop For Edit at the editor's
size, the editor's text encoding with the crop as its reference image, the PFB Sampler on the DiT, VAE decode,
Stitch Edit, GB Compositor, and a side-by-side group: the editor alone (stock KSampler, same inputs, seed and
steps, pasted back) vs the editor inside xMGIE, each with an XMGIE Drift Map against the photo.

Thumbnails: the photo with the mask in red and the crop box in yellow, and a caption (illustrations, as the other
workflows' thumbnails).

Run from anywhere: python workflows/assets/make_dit_workflows.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

ASSETS = Path(__file__).resolve().parent
WORKFLOWS = ASSETS.parent
REPO_ROOT = WORKFLOWS.parent
SOURCE, MASK = "xmgie_astronaut_source.png", "xmgie_astronaut_edit.png"
SEED, STEPS = 42, 20

# Linkable inputs (name, type) in slot order, outputs (name, type), and widget names in widgets_values order, of the
# nodes used here (ComfyUI 0.3.64 and this pack; tests/test_workflows.py checks them against INPUT_TYPES).
NODES = {
    "LoadImage": ([], [("IMAGE", "IMAGE"), ("MASK", "MASK")], ["image", "upload"]),
    "UNETLoader": ([], [("MODEL", "MODEL")], ["unet_name", "weight_dtype"]),
    "DualCLIPLoader": ([], [("CLIP", "CLIP")], ["clip_name1", "clip_name2", "type", "device"]),
    "CLIPLoader": ([], [("CLIP", "CLIP")], ["clip_name", "type", "device"]),
    "VAELoader": ([], [("VAE", "VAE")], ["vae_name"]),
    "ModelSamplingAuraFlow": ([("model", "MODEL")], [("MODEL", "MODEL")], ["shift"]),
    "CFGNorm": ([("model", "MODEL")], [("patched_model", "MODEL")], ["strength"]),
    "CLIPTextEncode": ([("clip", "CLIP")], [("CONDITIONING", "CONDITIONING")], ["text"]),
    "TextEncodeQwenImageEditPlus": ([("clip", "CLIP"), ("vae", "VAE"), ("image1", "IMAGE"), ("image2", "IMAGE"),
                                     ("image3", "IMAGE")], [("CONDITIONING", "CONDITIONING")], ["prompt"]),
    "ReferenceLatent": ([("conditioning", "CONDITIONING"), ("latent", "LATENT")],
                        [("CONDITIONING", "CONDITIONING")], []),
    "FluxGuidance": ([("conditioning", "CONDITIONING")], [("CONDITIONING", "CONDITIONING")], ["guidance"]),
    "ConditioningZeroOut": ([("conditioning", "CONDITIONING")], [("CONDITIONING", "CONDITIONING")], []),
    "VAEEncode": ([("pixels", "IMAGE"), ("vae", "VAE")], [("LATENT", "LATENT")], []),
    "VAEDecode": ([("samples", "LATENT"), ("vae", "VAE")], [("IMAGE", "IMAGE")], []),
    "KSampler": ([("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                  ("latent_image", "LATENT")], [("LATENT", "LATENT")],
                 ["seed", "seed:control_after_generate", "steps", "cfg", "sampler_name", "scheduler", "denoise"]),
    "PreviewImage": ([("images", "IMAGE")], [], []),
    "SaveImage": ([("images", "IMAGE")], [], ["filename_prefix"]),
    "XMGIECropForEdit": ([("image", "IMAGE"), ("mask", "MASK")],
                         [("image", "IMAGE"), ("mask", "MASK"), ("crop", "XMGIE_CROP")],
                         ["context_factor", "working_size", "multiple", "max_upscale", "editor"]),
    "XMGIEPFBSampler": ([("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                         ("latent_image", "LATENT"), ("mask", "MASK"), ("source", "CONDITIONING"),
                         ("id_embed", "ID_EMBED"), ("vae", "VAE")],
                        [("latent", "LATENT"), ("ips", "FLOAT"), ("report", "STRING")],
                        ["seed", "seed:control_after_generate", "steps", "cfg", "sampler_name", "scheduler", "denoise",
                         "source_mode", "layers", "outside_weight", "blend_end_percent", "latent_blend_end_percent",
                         "soft_edge", "cache", "cache_mb", "face_protection", "candidates"]),
    "XMGIEStitchEdit": ([("crop", "XMGIE_CROP"), ("edited", "IMAGE"), ("source", "IMAGE")], [("image", "IMAGE")], []),
    "XMGIEGBCompositor": ([("edited", "IMAGE"), ("mask", "MASK"), ("source", "IMAGE")],
                          [("image", "IMAGE"), ("blend_mask", "MASK")],
                          ["mode", "sigma_max", "sigma_scale", "edge_width"]),
    "XMGIEDriftMap": ([("source", "IMAGE"), ("edited", "IMAGE"), ("mask", "MASK")],
                      [("heat_map", "IMAGE"), ("report", "STRING")], ["full_scale", "margin"]),
}
UI_ONLY = ("upload", "seed:control_after_generate")


def node(id_: int, type_: str, title: str, pos: tuple[int, int], size: tuple[int, int], links: dict | None = None,
         **widgets) -> dict:
    """One node: `links` {input: (source id, slot)}, widgets by name (UI-only ones filled in)."""
    return {"id": id_, "type": type_, "title": title, "pos": list(pos), "size": list(size), "links": links or {},
            "widgets": widgets}


def pfb_widgets(cfg: float) -> dict:
    return dict(seed=SEED, steps=STEPS, cfg=cfg, sampler_name="euler", scheduler="simple", denoise=1.0,
                source_mode="noised", layers="auto", outside_weight=0.0, blend_end_percent=1.0,
                latent_blend_end_percent=0.5, soft_edge=True, cache=True, cache_mb=1024, face_protection=1.0,
                candidates=1)


def common_tail(model: int, vae: int, crop: int, latent: int, positive: int, negative: int, cfg: float,
                editor: str, prefix: str) -> list[dict]:
    """PFB -> decode -> stitch -> GB -> save, and the side-by-side group (ids 12-22)."""
    sampler = dict(seed=SEED, steps=STEPS, cfg=cfg, sampler_name="euler", scheduler="simple", denoise=1.0)
    return [
        node(12, "XMGIEPFBSampler", f"XMGIE PFB Sampler ({editor} on the crop; the source kept outside the mask)",
             (1500, 40), (360, 640), {"model": (model, 0), "positive": (positive, 0), "negative": (negative, 0),
                                      "latent_image": (latent, 0), "mask": (crop, 1)}, **pfb_widgets(cfg)),
        node(13, "VAEDecode", "VAE Decode", (1500, 730), (210, 46), {"samples": (12, 0), "vae": (vae, 0)}),
        node(14, "XMGIEStitchEdit", "XMGIE Stitch Edit (the edited crop back into the photo)", (1920, 40), (320, 90),
             {"crop": (crop, 2), "edited": (13, 0), "source": (1, 0)}),
        node(15, "XMGIEGBCompositor", "XMGIE GB Compositor (outside the blend zone = the photo exactly)",
             (1920, 180), (340, 200), {"edited": (14, 0), "mask": (2, 1), "source": (1, 0)},
             mode="composite", sigma_max=5.0, sigma_scale=10.0, edge_width=16.0),
        node(16, "SaveImage", "Save Image", (2320, 40), (420, 460), {"images": (15, 0)}, filename_prefix=prefix),
        node(17, "KSampler", f"{editor} alone: stock KSampler (same inputs, seed and steps)", (1500, 900), (360, 270),
             {"model": (model, 0), "positive": (positive, 0), "negative": (negative, 0), "latent_image": (latent, 0)},
             **sampler),
        node(18, "VAEDecode", "VAE Decode (editor alone)", (1500, 1220), (210, 46), {"samples": (17, 0),
                                                                                    "vae": (vae, 0)}),
        node(19, "XMGIEStitchEdit", "Editor alone, pasted back (no PFB, no GB)", (1920, 900), (320, 90),
             {"crop": (crop, 2), "edited": (18, 0), "source": (1, 0)}),
        node(20, "XMGIEDriftMap", f"XMGIE Drift Map: {editor} alone", (2320, 900), (400, 520),
             {"source": (1, 0), "edited": (19, 0), "mask": (2, 1)}, full_scale=0.05, margin=0.0),
        node(21, "XMGIEDriftMap", f"XMGIE Drift Map: {editor} inside xMGIE", (2760, 900), (400, 520),
             {"source": (1, 0), "edited": (15, 0), "mask": (2, 1)}, full_scale=0.05, margin=0.0),
        node(22, "PreviewImage", f"{editor} alone (result)", (1920, 1060), (360, 360), {"images": (19, 0)}),
    ]


def inputs_head(editor: str) -> list[dict]:
    return [
        node(1, "LoadImage", f"Load source image ({SOURCE})", (40, 40), (315, 314), image=SOURCE, upload="image"),
        node(2, "LoadImage", f"Mask: alpha of {MASK} (or paint one on your photo)", (40, 400), (315, 314),
             image=MASK, upload="image"),
    ]


def kontext() -> tuple[list[dict], list[dict]]:
    nodes = inputs_head("FLUX.1 Kontext") + [
        node(3, "UNETLoader", "Load Diffusion Model (FLUX.1 Kontext dev)", (40, 760), (315, 82),
             unet_name="flux1-dev-kontext_fp8_scaled.safetensors", weight_dtype="default"),
        node(4, "DualCLIPLoader", "DualCLIPLoader (clip_l + t5xxl, flux)", (40, 890), (315, 130),
             clip_name1="clip_l.safetensors", clip_name2="t5xxl_fp16.safetensors", type="flux", device="default"),
        node(5, "VAELoader", "Load VAE (ae.safetensors)", (40, 1070), (315, 58), vae_name="ae.safetensors"),
        node(6, "XMGIECropForEdit", "XMGIE Crop For Edit (the region's neighbourhood at a Kontext bucket)",
             (420, 40), (340, 230), {"image": (1, 0), "mask": (2, 1)}, context_factor=1.5, working_size=512,
             multiple="8", max_upscale=4.0, editor="flux-kontext"),
        node(7, "VAEEncode", "VAE Encode (the crop: latent and reference)", (420, 320), (210, 46),
             {"pixels": (6, 0), "vae": (5, 0)}),
        node(8, "CLIPTextEncode", "Edit instruction (CLIP Text Encode)", (820, 40), (400, 160), {"clip": (4, 0)},
             text="Change the dark collar to a red scarf, keep everything else unchanged"),
        node(9, "ReferenceLatent", "ReferenceLatent (the crop as Kontext's reference image)", (820, 250), (240, 46),
             {"conditioning": (8, 0), "latent": (7, 0)}),
        node(10, "FluxGuidance", "FluxGuidance", (820, 350), (240, 58), {"conditioning": (9, 0)}, guidance=2.5),
        node(11, "ConditioningZeroOut", "ConditioningZeroOut (negative; PFB's source branch)", (820, 460),
             (240, 26), {"conditioning": (8, 0)}),
    ] + common_tail(3, 5, 6, 7, 10, 11, 1.0, "Kontext", "xmgie_kontext_edit")
    return nodes, [group("Kontext alone vs Kontext inside xMGIE: drift outside the mask", (1480, 860, 1700, 600))]


def qwen() -> tuple[list[dict], list[dict]]:
    prompt = "Replace the dark collar with a red scarf, keep everything else unchanged"
    nodes = inputs_head("Qwen-Image-Edit") + [
        node(3, "UNETLoader", "Load Diffusion Model (Qwen-Image-Edit 2509)", (40, 760), (315, 82),
             unet_name="qwen_image_edit_2509_fp8_e4m3fn.safetensors", weight_dtype="default"),
        node(4, "CLIPLoader", "Load CLIP (Qwen2.5-VL 7B, qwen_image)", (40, 890), (315, 106),
             clip_name="qwen_2.5_vl_7b_fp8_scaled.safetensors", type="qwen_image", device="default"),
        node(5, "VAELoader", "Load VAE (qwen_image_vae.safetensors)", (40, 1050), (315, 58),
             vae_name="qwen_image_vae.safetensors"),
        node(6, "ModelSamplingAuraFlow", "ModelSamplingAuraFlow (shift 3, as ComfyUI's template)", (420, 760),
             (315, 58), {"model": (3, 0)}, shift=3.0),
        node(7, "CFGNorm", "CFGNorm", (420, 870), (315, 58), {"model": (6, 0)}, strength=1.0),
        node(8, "XMGIECropForEdit", "XMGIE Crop For Edit (the region's neighbourhood at ~1 MP, multiples of 16)",
             (420, 40), (340, 230), {"image": (1, 0), "mask": (2, 1)}, context_factor=1.5, working_size=512,
             multiple="8", max_upscale=4.0, editor="qwen-image-edit"),
        node(9, "TextEncodeQwenImageEditPlus", "Edit instruction (TextEncodeQwenImageEditPlus, the crop as image1)",
             (820, 40), (400, 200), {"clip": (4, 0), "vae": (5, 0), "image1": (8, 0)}, prompt=prompt),
        node(10, "TextEncodeQwenImageEditPlus", "Negative (empty; PFB's source branch)", (820, 290), (400, 200),
             {"clip": (4, 0), "vae": (5, 0), "image1": (8, 0)}, prompt=""),
        node(11, "VAEEncode", "VAE Encode (the crop)", (820, 540), (210, 46), {"pixels": (8, 0), "vae": (5, 0)}),
    ] + common_tail(7, 5, 8, 11, 9, 10, 2.5, "Qwen-Image-Edit", "xmgie_qwen_edit")
    return nodes, [group("Qwen-Image-Edit alone vs inside xMGIE: drift outside the mask", (1480, 860, 1700, 600))]


def group(title: str, bounding: tuple[int, int, int, int]) -> dict:
    return {"title": title, "bounding": list(bounding), "color": "#3f789e", "font_size": 24, "flags": {}}


def build(nodes: list[dict], groups: list[dict]) -> tuple[dict, dict]:
    """(UI workflow, API prompt)."""
    by_id = {n["id"]: n for n in nodes}
    links, ui_nodes, api = [], [], {}
    for n in nodes:  # link ids in node order, then input order
        slots, _, _ = NODES[n["type"]]
        for slot, (name, kind) in enumerate(slots):
            if name in n["links"]:
                src, src_slot = n["links"][name]
                links.append([len(links) + 1, src, src_slot, n["id"], slot, kind])
    order = topological(nodes)
    for n in nodes:
        slots, outs, widget_names = NODES[n["type"]]
        inputs = [{"name": name, "type": kind,
                   "link": next((l[0] for l in links if l[3] == n["id"] and l[4] == slot), None)}
                  for slot, (name, kind) in enumerate(slots)]
        outputs = []
        for slot, (name, kind) in enumerate(outs):
            used = [l[0] for l in links if l[1] == n["id"] and l[2] == slot]
            outputs.append({"name": name, "type": kind, "links": used or None,
                            **({"slot_index": slot} if used else {})})
        values = [n["widgets"].get(w, "fixed" if w.endswith(":control_after_generate") else None)
                  for w in widget_names]
        assert None not in values, f"node {n['id']} lacks a widget value: {widget_names} {n['widgets']}"
        ui_nodes.append({"id": n["id"], "type": n["type"], "title": n["title"], "pos": n["pos"], "size": n["size"],
                         "flags": {}, "order": order[n["id"]], "mode": 0, "inputs": inputs, "outputs": outputs,
                         "properties": {"Node name for S&R": n["type"]}, "widgets_values": values})
        api[str(n["id"])] = {
            "class_type": n["type"],
            "inputs": {**{w: v for w, v in zip(widget_names, values) if w not in UI_ONLY},
                       **{name: [str(src), slot] for name, (src, slot) in n["links"].items()}},
            "_meta": {"title": n["title"]}}
    assert all(src in by_id for n in nodes for src, _ in n["links"].values())
    ui = {"last_node_id": max(by_id), "last_link_id": len(links), "nodes": ui_nodes, "links": links,
          "groups": groups, "config": {}, "extra": {"ds": {"scale": 0.6, "offset": [0, 0]}}, "version": 0.4}
    return ui, api


def topological(nodes: list[dict]) -> dict[int, int]:
    """Execution order 0..n-1: a node after every node it reads from (ties by id)."""
    done: dict[int, int] = {}
    while len(done) < len(nodes):
        for n in sorted(nodes, key=lambda n: n["id"]):
            if n["id"] not in done and all(src in done for src, _ in n["links"].values()):
                done[n["id"]] = len(done)
                break
    return done


def thumbnail(crop_box: tuple[int, int, int, int], title: str, lines: list[str]) -> Image.Image:
    """The photo with the mask in red and the crop box dashed yellow, 384 px wide, with a caption."""
    photo = np.array(Image.open(ASSETS / SOURCE).convert("RGB")).astype(np.float64)
    region = np.array(Image.open(ASSETS / MASK).convert("RGBA"))[..., 3] == 0
    photo[region] = photo[region] * 0.3 + np.array([225.0, 35.0, 40.0]) * 0.7
    picture = Image.fromarray(photo.clip(0, 255).astype(np.uint8)).resize((384, 384), Image.LANCZOS)
    draw = ImageDraw.Draw(picture)
    top, left, bottom, right = (round(v * 384 / 512) for v in crop_box)
    for x in range(left, right, 8):
        draw.line([(x, top), (min(x + 4, right), top)], fill=(255, 220, 0), width=2)
        draw.line([(x, bottom), (min(x + 4, right), bottom)], fill=(255, 220, 0), width=2)
    for y in range(top, bottom, 8):
        draw.line([(left, y), (left, min(y + 4, bottom))], fill=(255, 220, 0), width=2)
        draw.line([(right, y), (right, min(y + 4, bottom))], fill=(255, 220, 0), width=2)
    sheet = Image.new("RGB", (384, 470), (32, 34, 40))
    sheet.paste(picture, (0, 0))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    draw.text((10, 392), title, fill=(240, 240, 240), font=font)
    for i, line in enumerate(lines):
        draw.text((10, 414 + 16 * i), line, fill=(200, 200, 200), font=font)
    return sheet


def crop_box(editor: str) -> tuple[int, int, int, int]:
    """The box Crop For Edit picks on the sample mask for `editor` (the pack's own planner)."""
    import torch

    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from xmgie_core import crop

    region = np.array(Image.open(ASSETS / MASK).convert("RGBA"))[..., 3] == 0
    return crop.plan_crop(torch.from_numpy(region.astype(np.float32))[None], editor=editor).box


def main() -> None:
    for name, make, editor, title, lines in [
        ("xmgie_kontext_edit", kontext, "flux-kontext", "FLUX.1 Kontext inside xMGIE",
         ["Crop at a Kontext bucket -> PFB -> Stitch -> GB;", "vs Kontext alone, with a drift map for each",
          "red = mask, yellow = crop (illustration)"]),
        ("xmgie_qwen_edit", qwen, "qwen-image-edit", "Qwen-Image-Edit 2509 inside xMGIE",
         ["Crop at ~1 MP (x16) -> PFB -> Stitch -> GB;", "vs Qwen-Image-Edit alone, with a drift map for each",
          "red = mask, yellow = crop (illustration)"]),
    ]:
        ui, api = build(*make())
        (WORKFLOWS / f"{name}.json").write_text(json.dumps(ui, indent=2) + "\n")
        (WORKFLOWS / "api" / f"{name}.json").write_text(json.dumps(api, indent=2) + "\n")
        thumbnail(crop_box(editor), title, lines).save(WORKFLOWS / f"{name}.jpg", quality=85, optimize=True)
        print(f"workflows/{name}.json, api/{name}.json, {name}.jpg")


if __name__ == "__main__":
    main()
