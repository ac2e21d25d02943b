"""Bundled workflows, checked without ComfyUI: UI/API twins agree, nodes and inputs exist, links are
consistent, and the thumbnails and sample images ship (and regenerate) as described."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fixtures.workflow_nodes import node_of

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = ROOT / "workflows"
ASSETS = WORKFLOWS / "assets"
UI_FILES = sorted(WORKFLOWS.glob("*.json"))  # what ComfyUI's templates menu lists
API_FILES = sorted((WORKFLOWS / "api").glob("*.json"))  # a subfolder, so the menu does not list them
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}

# ComfyUI core nodes the bundled workflows use (ComfyUI is not importable in CI): widget names in
# widgets_values order (LoadImage's image_upload adds an "upload" value), required inputs, output types.
CORE_NODES = {
    "LoadImage": {"widgets": ["image", "upload"], "required": ["image"], "outputs": ["IMAGE", "MASK"]},
    "SaveImage": {"widgets": ["filename_prefix"], "required": ["images", "filename_prefix"], "outputs": []},
    "PreviewImage": {"widgets": [], "required": ["images"], "outputs": []},
    "CheckpointLoaderSimple": {"widgets": ["ckpt_name"], "required": ["ckpt_name"],
                               "outputs": ["MODEL", "CLIP", "VAE"]},
    "CLIPTextEncode": {"widgets": ["text"], "required": ["text", "clip"], "outputs": ["CONDITIONING"]},
    "VAEEncode": {"widgets": [], "required": ["pixels", "vae"], "outputs": ["LATENT"]},
    "SetLatentNoiseMask": {"widgets": [], "required": ["samples", "mask"], "outputs": ["LATENT"]},
    "KSampler": {  # seed has control_after_generate: the UI stores its value ("fixed", ...) right after the seed
        "widgets": ["seed", "seed:control_after_generate", "steps", "cfg", "sampler_name", "scheduler", "denoise"],
        "required": ["model", "seed", "steps", "cfg", "sampler_name", "scheduler", "positive", "negative",
                     "latent_image", "denoise"],
        "outputs": ["LATENT"]},
    "VAEDecode": {"widgets": [], "required": ["samples", "vae"], "outputs": ["IMAGE"]},
    "UNETLoader": {"widgets": ["unet_name", "weight_dtype"], "required": ["unet_name", "weight_dtype"],
                   "outputs": ["MODEL"]},
    "InstructPixToPixConditioning": {"widgets": [], "required": ["positive", "negative", "vae", "pixels"],
                                     "outputs": ["CONDITIONING", "CONDITIONING", "LATENT"]},
    "RandomNoise": {"widgets": ["noise_seed", "noise_seed:control_after_generate"], "required": ["noise_seed"],
                    "outputs": ["NOISE"]},
    "KSamplerSelect": {"widgets": ["sampler_name"], "required": ["sampler_name"], "outputs": ["SAMPLER"]},
    "BasicScheduler": {"widgets": ["scheduler", "steps", "denoise"],
                       "required": ["model", "scheduler", "steps", "denoise"], "outputs": ["SIGMAS"]},
    "SamplerCustomAdvanced": {"widgets": [], "required": ["noise", "guider", "sampler", "sigmas", "latent_image"],
                              "outputs": ["LATENT", "LATENT"]},
    # the DiT editors' (FLUX.1 Kontext, Qwen-Image-Edit) loaders, text encoding and model patches
    "DualCLIPLoader": {"widgets": ["clip_name1", "clip_name2", "type", "device"],
                       "required": ["clip_name1", "clip_name2", "type"], "outputs": ["CLIP"]},
    "CLIPLoader": {"widgets": ["clip_name", "type", "device"], "required": ["clip_name", "type"], "outputs": ["CLIP"]},
    "VAELoader": {"widgets": ["vae_name"], "required": ["vae_name"], "outputs": ["VAE"]},
    "ReferenceLatent": {"widgets": [], "required": ["conditioning"], "outputs": ["CONDITIONING"]},
    "FluxGuidance": {"widgets": ["guidance"], "required": ["conditioning", "guidance"], "outputs": ["CONDITIONING"]},
    "ConditioningZeroOut": {"widgets": [], "required": ["conditioning"], "outputs": ["CONDITIONING"]},
    "TextEncodeQwenImageEditPlus": {"widgets": ["prompt"], "required": ["clip", "prompt"], "outputs": ["CONDITIONING"]},
    "ModelSamplingAuraFlow": {"widgets": ["shift"], "required": ["model", "shift"], "outputs": ["MODEL"]},
    "CFGNorm": {"widgets": ["strength"], "required": ["model", "strength"], "outputs": ["MODEL"]},
}
UI_ONLY_WIDGETS = {"upload"}


def ids(paths: list[Path]) -> list[str]:
    return [p.name for p in paths]


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def api_twin(ui_path: Path) -> Path:
    return WORKFLOWS / "api" / ui_path.name


def node_spec(pack, class_type: str) -> dict:
    """{"widgets", "required", "outputs"} for a core node (table above) or one of ours (INPUT_TYPES)."""
    if class_type in CORE_NODES:
        return CORE_NODES[class_type]
    assert class_type in pack.NODE_CLASS_MAPPINGS, f"unknown node class {class_type!r}"
    cls = pack.NODE_CLASS_MAPPINGS[class_type]
    inputs = cls.INPUT_TYPES()
    widgets = []
    for section in ("required", "optional"):
        for name, (kind, *opts) in inputs.get(section, {}).items():
            options = opts[0] if opts else {}
            if (isinstance(kind, list) or kind in WIDGET_TYPES) and not options.get("forceInput"):
                widgets.append(name)
                if options.get("control_after_generate"):
                    widgets.append(f"{name}:control_after_generate")
    return {"widgets": widgets, "required": list(inputs.get("required", {})), "outputs": list(cls.RETURN_TYPES)}


def test_workflow_files_come_in_twins():
    """Every UI workflow has an API twin and vice versa; the GB workflow is among them."""
    assert WORKFLOWS / "xmgie_gb_composite.json" in UI_FILES
    for ui in UI_FILES:
        assert api_twin(ui).is_file(), f"{ui.name} has no API twin {api_twin(ui).name}"
    for api in API_FILES:
        assert (WORKFLOWS / api.name).is_file(), f"api/{api.name} has no UI twin"


@pytest.mark.parametrize("path", UI_FILES, ids=ids(UI_FILES))
def test_ui_workflow_is_well_formed_litegraph(path):
    """Top-level keys, node fields, and every link consistent with both endpoints' slots and types."""
    wf = load(path)
    assert {"last_node_id", "last_link_id", "nodes", "links", "groups", "config", "extra"} <= set(wf)
    assert wf["version"] == 0.4
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert len(nodes) == len(wf["nodes"]), "duplicate node ids"
    assert wf["last_node_id"] >= max(nodes) and wf["last_link_id"] >= max(link[0] for link in wf["links"])
    assert sorted(n["order"] for n in wf["nodes"]) == list(range(len(nodes))), "node orders are not 0..n-1"
    for n in wf["nodes"]:
        missing = {"id", "type", "pos", "size", "flags", "order", "mode", "inputs", "outputs", "properties",
                   "widgets_values"} - set(n)
        assert not missing, f"node {n['id']} lacks {sorted(missing)}"
        assert n["properties"].get("Node name for S&R") == n["type"], f"node {n['id']} S&R name"
    links = {link[0]: link for link in wf["links"]}
    assert len(links) == len(wf["links"]), "duplicate link ids"
    for link_id, src, src_slot, dst, dst_slot, kind in wf["links"]:
        where = f"link {link_id} ({src}:{src_slot} -> {dst}:{dst_slot})"
        assert src in nodes and dst in nodes, f"{where}: missing node"
        assert src_slot < len(nodes[src]["outputs"]) and dst_slot < len(nodes[dst]["inputs"]), f"{where}: no slot"
        out, inp = nodes[src]["outputs"][src_slot], nodes[dst]["inputs"][dst_slot]
        assert link_id in (out["links"] or []), f"{where}: source output does not list it"
        assert inp["link"] == link_id, f"{where}: target input names link {inp['link']}"
        assert out["type"] == inp["type"] == kind, f"{where}: types {out['type']} / {inp['type']} / {kind}"
    for n in wf["nodes"]:
        for inp in n["inputs"]:
            assert inp["link"] is None or inp["link"] in links, f"node {n['id']} input {inp['name']}: dangling link"
        for out in n["outputs"]:
            for link_id in out["links"] or []:
                assert link_id in links, f"node {n['id']} output {out['name']}: dangling link {link_id}"


@pytest.mark.parametrize("path", API_FILES, ids=ids(API_FILES))
def test_api_workflow_nodes_are_known_and_complete(path, pack):
    """Known class types, every required input given, links point at existing outputs."""
    prompt = load(path)
    for node_id, node in prompt.items():
        spec = node_spec(pack, node["class_type"])
        missing = set(spec["required"]) - set(node["inputs"])
        assert not missing, f"node {node_id} ({node['class_type']}) lacks required inputs {sorted(missing)}"
        for name, value in node["inputs"].items():
            if isinstance(value, list):
                src, slot = value
                assert src in prompt, f"node {node_id}.{name} links to missing node {src}"
                n_out = len(node_spec(pack, prompt[src]["class_type"])["outputs"])
                assert 0 <= slot < n_out, f"node {node_id}.{name} links to output {slot} of {n_out}"


@pytest.mark.parametrize("path", UI_FILES, ids=ids(UI_FILES))
def test_ui_and_api_twins_agree(path, pack):
    """Same nodes; each UI link is the API's link on that input; widget values equal the API literals."""
    ui, prompt = load(path), load(api_twin(path))
    assert {str(n["id"]): n["type"] for n in ui["nodes"]} == {k: v["class_type"] for k, v in prompt.items()}
    nodes = {n["id"]: n for n in ui["nodes"]}
    for _, src, src_slot, dst, dst_slot, _ in ui["links"]:
        name = nodes[dst]["inputs"][dst_slot]["name"]
        assert prompt[str(dst)]["inputs"].get(name) == [str(src), src_slot], f"API node {dst}.{name} differs"
    api_links = sum(isinstance(v, list) for node in prompt.values() for v in node["inputs"].values())
    assert api_links == len(ui["links"]), "the API file has links the UI file lacks"
    for n in ui["nodes"]:
        names = node_spec(pack, n["type"])["widgets"]
        assert len(n["widgets_values"]) == len(names), f"node {n['id']}: widgets {names} vs {n['widgets_values']}"
        for name, value in zip(names, n["widgets_values"]):
            if name in UI_ONLY_WIDGETS or name.endswith(":control_after_generate"):
                continue
            literal = prompt[str(n["id"])]["inputs"].get(name)
            if isinstance(literal, list):  # a widget converted to an input: the link was checked above
                assert any(i.get("widget", {}).get("name") == name and i["link"] for i in n["inputs"]), \
                    f"node {n['id']} ({n['type']}) widget {name} is linked in the API file only"
                continue
            assert literal == value, \
                f"node {n['id']} ({n['type']}) widget {name}: UI {value!r} vs API {literal!r}"


@pytest.mark.parametrize("path", UI_FILES, ids=ids(UI_FILES))
def test_thumbnail_beside_ui_workflow(path):
    """ComfyUI's templates menu shows <name>.jpg beside <name>.json."""
    thumbnail = path.with_suffix(".jpg")
    assert thumbnail.is_file(), f"no thumbnail {thumbnail.name}"
    with Image.open(thumbnail) as img:
        assert img.format == "JPEG" and min(img.size) >= 64, f"{thumbnail.name}: {img.format} {img.size}"


@pytest.mark.parametrize("path", UI_FILES + API_FILES, ids=ids(UI_FILES + API_FILES))
def test_referenced_images_ship_in_assets(path):
    """Every image a LoadImage names exists in workflows/assets/ (small PNG)."""
    wf = load(path)
    if "nodes" in wf:
        names = [n["widgets_values"][0] for n in wf["nodes"] if n["type"] == "LoadImage"]
    else:
        names = [n["inputs"]["image"] for n in wf.values() if n["class_type"] == "LoadImage"]
    assert names, f"{path.name} loads no image"
    for name in names:
        asset = ASSETS / name
        assert asset.is_file(), f"{path.name} needs {name}, missing from {ASSETS}"
        assert asset.stat().st_size < 600 * 1024, f"{name} is {asset.stat().st_size // 1024} KB"


def test_gb_workflow_wiring():
    """Edited image and its alpha mask from one LoadImage, source from the other, composite mode."""
    prompt = load(WORKFLOWS / "api" / "xmgie_gb_composite.json")
    (gb,) = [n for n in prompt.values() if n["class_type"] == "XMGIEGBCompositor"]
    edited, mask, source = gb["inputs"]["edited"], gb["inputs"]["mask"], gb["inputs"]["source"]
    assert edited[1] == 0 and mask == [edited[0], 1], "mask must be the edited LoadImage's MASK output"
    assert source[1] == 0 and source[0] != edited[0]
    assert prompt[source[0]]["inputs"]["image"] == "xmgie_astronaut_source.png"
    assert prompt[edited[0]]["inputs"]["image"] == "xmgie_astronaut_edit.png"
    assert gb["inputs"]["mode"] == "composite"
    (save,) = [n for n in prompt.values() if n["class_type"] == "SaveImage"]
    assert save["inputs"]["filename_prefix"] == "xmgie_gb"


def test_edit_workflow_wiring():
    prompt = load(WORKFLOWS / "api" / "xmgie_edit.json")
    region_id, _ = node_of(prompt, "XMGIERegionPredictor")
    crop_id, crop = node_of(prompt, "XMGIECropForEdit")
    load_id, _ = node_of(prompt, "LoadImage")
    assert crop["inputs"]["image"] == [load_id, 0] and crop["inputs"]["mask"] == [region_id, 0]
    for cls in ("XMGIECrossAttentionMask", "XMGIEPFBSampler"):  # they work on the crop
        assert node_of(prompt, cls)[1]["inputs"]["mask"] == [crop_id, 1]
    assert node_of(prompt, "VAEEncode")[1]["inputs"]["pixels"] == [crop_id, 0]
    stitch_id, stitch = node_of(prompt, "XMGIEStitchEdit")
    assert stitch["inputs"]["crop"] == [crop_id, 2] and stitch["inputs"]["source"] == [load_id, 0]
    _, gb = node_of(prompt, "XMGIEGBCompositor")  # ... and GB on the full photo with the full mask
    assert (gb["inputs"]["edited"], gb["inputs"]["mask"], gb["inputs"]["source"]) == \
        ([stitch_id, 0], [region_id, 0], [load_id, 0])
    (instr_id, _), (_, cam) = node_of(prompt, "XMGIEInstruction"), node_of(prompt, "XMGIECrossAttentionMask")
    assert (cam["inputs"]["prompt"], cam["inputs"]["edit_words"]) == ([instr_id, 2], [instr_id, 3])


def test_face_workflow_wiring():
    prompt = load(WORKFLOWS / "api" / "xmgie_edit_face.json")
    crop_id, _ = node_of(prompt, "XMGIECropForEdit")
    _, pfb = node_of(prompt, "XMGIEPFBSampler")
    embedders = {nid: n for nid, n in prompt.items() if n["class_type"] == "XMGIEIDEmbedder"}
    protect = prompt[pfb["inputs"]["id_embed"][0]]
    assert protect["inputs"]["image"] == [crop_id, 0], "faces to protect must be found on the crop PFB edits"
    assert pfb["inputs"]["candidates"] > 1 and "vae" in pfb["inputs"]
    _, score = node_of(prompt, "XMGIEIdentityScore")
    gb_id, _ = node_of(prompt, "XMGIEGBCompositor")
    scored = prompt[score["inputs"]["source"][0]]
    assert len(embedders) == 2 and scored["inputs"]["image"] == ["1", 0] and score["inputs"]["edited"] == [gb_id, 0]


@pytest.mark.parametrize("path", API_FILES, ids=ids(API_FILES))
def test_bundled_face_embedders_use_the_licence_clean_dlib_default(path, pack):
    """insightface's packs are for non-commercial research only: bundled workflows use dlib, which is a choice of
    the node's backend list (a value outside it fails ComfyUI's validation)."""
    choices = pack.NODE_CLASS_MAPPINGS["XMGIEIDEmbedder"].INPUT_TYPES()["required"]["backend"][0]
    for node in load(path).values():
        if node["class_type"] == "XMGIEIDEmbedder":
            assert node["inputs"]["backend"] == "dlib" and "dlib" in choices


def test_sample_images_regenerate_from_make_samples():
    """The committed PNGs are exactly what workflows/assets/make_samples.py produces."""
    spec = importlib.util.spec_from_file_location("xmgie_make_samples", ASSETS / "make_samples.py")
    make_samples = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_samples)
    source = make_samples.source_image()
    rgba = make_samples.edited_rgba(source)
    assert np.array_equal(np.array(Image.open(make_samples.SOURCE_PNG)), source), "source PNG is stale"
    stored = np.array(Image.open(make_samples.EDIT_PNG))
    assert stored.shape == source.shape[:2] + (4,), f"edit PNG shape {stored.shape}, want RGBA"
    assert np.array_equal(stored, rgba), "edit PNG is stale"
    alpha = stored[..., 3]
    assert set(np.unique(alpha)) == {0, 255}, "alpha must be 0 (edit) or 255 (keep)"
    assert (stored[..., :3] != source).any(axis=-1)[alpha == 0].mean() > 0.99, "edit region is not visibly edited"


def test_seed_inputs_declare_their_control_widget(pack):
    """ComfyUI's frontend adds a 'control after generate' widget after every INT input named seed or noise_seed,
    declared or not; undeclared, every saved widget value after it would land in the wrong widget."""
    for name, cls in pack.NODE_CLASS_MAPPINGS.items():
        for section in ("required", "optional"):
            for inp, (kind, *opts) in cls.INPUT_TYPES().get(section, {}).items():
                if kind == "INT" and inp in ("seed", "noise_seed"):
                    assert (opts[0] if opts else {}).get("control_after_generate"), f"{name}.{inp}"


DIT_WORKFLOWS = {  # editor -> (workflow, Crop For Edit's editor, loader files users have)
    "kontext": ("xmgie_kontext_edit", "flux-kontext", {
        "UNETLoader": {"unet_name": "flux1-dev-kontext_fp8_scaled.safetensors"},
        "DualCLIPLoader": {"clip_name1": "clip_l.safetensors", "clip_name2": "t5xxl_fp16.safetensors", "type": "flux"},
        "VAELoader": {"vae_name": "ae.safetensors"}}),
    "qwen": ("xmgie_qwen_edit", "qwen-image-edit", {
        "UNETLoader": {"unet_name": "qwen_image_edit_2509_fp8_e4m3fn.safetensors"},
        "CLIPLoader": {"clip_name": "qwen_2.5_vl_7b_fp8_scaled.safetensors", "type": "qwen_image"},
        "VAELoader": {"vae_name": "qwen_image_vae.safetensors"}}),
}


@pytest.mark.parametrize("editor", DIT_WORKFLOWS)
def test_dit_workflow_wiring(editor):
    """Standard loaders with the users' file names; the crop at the editor's size feeds the latent, the reference
    image and PFB's mask; Stitch + GB on the photo with the full mask; the editor alone (stock KSampler, same inputs,
    seed and steps) is pasted back, and a Drift Map compares each result with the photo outside the mask."""
    name, crop_editor, loaders = DIT_WORKFLOWS[editor]
    prompt = load(WORKFLOWS / "api" / f"{name}.json")
    for class_type, want in loaders.items():
        assert {k: node_of(prompt, class_type)[1]["inputs"][k] for k in want} == want
    photo_id = next(nid for nid, n in prompt.items() if n["class_type"] == "LoadImage"
                    and n["inputs"]["image"] == "xmgie_astronaut_source.png")
    crop_id, crop_node = node_of(prompt, "XMGIECropForEdit")
    mask = crop_node["inputs"]["mask"]
    assert crop_node["inputs"]["editor"] == crop_editor and crop_node["inputs"]["image"] == [photo_id, 0]
    assert mask[1] == 1 and prompt[mask[0]]["class_type"] == "LoadImage"
    assert node_of(prompt, "VAEEncode")[1]["inputs"]["pixels"] == [crop_id, 0]
    pfb_id, pfb = node_of(prompt, "XMGIEPFBSampler")
    assert pfb["inputs"]["mask"] == [crop_id, 1]
    unet_id, _ = node_of(prompt, "UNETLoader")
    model = pfb["inputs"]["model"]
    while model[0] != unet_id:  # through the model patches only
        assert prompt[model[0]]["class_type"] in ("ModelSamplingAuraFlow", "CFGNorm")
        model = prompt[model[0]]["inputs"]["model"]
    positive = prompt[pfb["inputs"]["positive"][0]]
    if editor == "kontext":
        reference = prompt[positive["inputs"]["conditioning"][0]]
        assert positive["class_type"] == "FluxGuidance" and reference["class_type"] == "ReferenceLatent"
        assert reference["inputs"]["latent"] == [node_of(prompt, "VAEEncode")[0], 0]
        assert pfb["inputs"]["cfg"] == 1.0  # guidance-distilled: FluxGuidance, no CFG
    else:
        assert positive["class_type"] == "TextEncodeQwenImageEditPlus"
        for n in prompt.values():
            if n["class_type"] == "TextEncodeQwenImageEditPlus":  # reference = the crop, so the two line up
                assert n["inputs"]["image1"] == [crop_id, 0] and "image2" not in n["inputs"]
    stitch = {n["inputs"]["edited"][0]: nid for nid, n in prompt.items() if n["class_type"] == "XMGIEStitchEdit"}
    decoded = {prompt[d]["inputs"]["samples"][0]: d for d in stitch}
    (stock_id, stock), = [(nid, n) for nid, n in prompt.items() if n["class_type"] == "KSampler"]
    assert set(decoded) == {pfb_id, stock_id}
    shared = ("model", "positive", "negative", "latent_image", "seed", "steps", "cfg", "sampler_name", "scheduler",
              "denoise")
    assert {k: stock["inputs"][k] for k in shared} == {k: pfb["inputs"][k] for k in shared}
    gb_id, gb = node_of(prompt, "XMGIEGBCompositor")
    assert (gb["inputs"]["edited"], gb["inputs"]["mask"], gb["inputs"]["source"]) == \
        ([stitch[decoded[pfb_id]], 0], mask, [photo_id, 0])
    drifts = [n["inputs"] for n in prompt.values() if n["class_type"] == "XMGIEDriftMap"]
    assert sorted(d["edited"][0] for d in drifts) == sorted([gb_id, stitch[decoded[stock_id]]])
    assert all(d["source"] == [photo_id, 0] and d["mask"] == mask for d in drifts)
    assert "XMGIECrossAttentionMask" not in {n["class_type"] for n in prompt.values()}


def test_dit_workflows_regenerate_from_their_script():
    """The committed UI and API files are exactly what workflows/assets/make_dit_workflows.py builds."""
    spec = importlib.util.spec_from_file_location("xmgie_make_dit_workflows", ASSETS / "make_dit_workflows.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    for name, make in (("xmgie_kontext_edit", script.kontext), ("xmgie_qwen_edit", script.qwen)):
        ui, api = script.build(*make())
        assert load(WORKFLOWS / f"{name}.json") == ui and load(WORKFLOWS / "api" / f"{name}.json") == api, name
