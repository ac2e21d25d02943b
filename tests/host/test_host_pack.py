"""The pack under a real ComfyUI: its custom-node loader, GET /object_info, and the templates menu."""

from __future__ import annotations

import json
import sys

import comfy_harness as harness


def test_pack_loads_through_comfyui_loader(comfy_host, pack):
    """load_custom_node returns True, registers every node of ours, and logs no import error."""
    nodes = comfy_host.nodes
    ours = set(pack.NODE_CLASS_MAPPINGS)
    assert comfy_host.loaded
    assert set(comfy_host.registered) == ours, f"loader registered {comfy_host.registered}, pack maps {sorted(ours)}"
    errors = [line for line in comfy_host.load_log if str(comfy_host.pack_dir) in line and "Cannot import" in line]
    assert not errors, "\n".join(errors)
    assert nodes.LOADED_MODULE_DIRS.get(harness.PACK_FOLDER) == str(comfy_host.pack_dir)
    module_key = str(comfy_host.pack_dir).replace(".", "_x_")
    assert module_key in sys.modules, "the pack was not imported by ComfyUI's loader"
    for name in sorted(ours):
        cls = nodes.NODE_CLASS_MAPPINGS[name]
        assert cls.__module__.startswith(module_key), f"{name} comes from {cls.__module__}, not the loader's import"
        assert cls.RELATIVE_PYTHON_MODULE == f"custom_nodes.{harness.PACK_FOLDER}"
        assert nodes.NODE_DISPLAY_NAME_MAPPINGS.get(name) == pack.NODE_DISPLAY_NAME_MAPPINGS[name]


def test_object_info_lists_every_node_with_category_and_tooltips(comfy_client, pack):
    """GET /object_info: category "xMGIE/...", a tooltip on every input and every output."""
    info = comfy_client.node_info()
    problems = []
    for name in sorted(pack.NODE_CLASS_MAPPINGS):
        if name not in info:
            problems.append(f"{name}: missing from /object_info")
            continue
        node = info[name]
        if not node.get("category", "").startswith("xMGIE/"):
            problems.append(f"{name}: category {node.get('category')!r} does not start with 'xMGIE/'")
        for section in ("required", "optional"):
            for inp, spec in node["input"].get(section, {}).items():
                options = spec[1] if len(spec) > 1 else {}
                if not options.get("tooltip"):
                    problems.append(f"{name}: {section} input {inp!r} has no tooltip")
        tooltips = node.get("output_tooltips")
        if tooltips is None or len(tooltips) != len(node["output"]) or not all(tooltips):
            problems.append(f"{name}: output_tooltips {tooltips!r} do not cover outputs {node['output']!r}")
    assert not problems, "\n".join(problems)


def test_bundled_workflows_are_served_as_templates(comfy_client):
    """GET /workflow_templates lists our UI workflows; their JSON and .jpg thumbnail are served."""
    listed = comfy_client.get("/workflow_templates").json().get(harness.PACK_FOLDER, [])
    for ui_file in sorted(harness.WORKFLOWS_DIR.glob("*.json")):
        assert ui_file.stem in listed, f"{ui_file.name} not in /workflow_templates: {listed}"
        base = f"/api/workflow_templates/{harness.PACK_FOLDER}/{ui_file.stem}"
        assert comfy_client.get(base + ".json").json() == json.loads(ui_file.read_text())
        thumbnail = comfy_client.get(base + ".jpg")
        assert thumbnail.content[:3] == b"\xff\xd8\xff", f"{base}.jpg is not a JPEG"


def test_web_extension_is_served_and_listed_once(comfy_client):
    """GET /extensions lists web/js/xmgie.js exactly once (WEB_DIRECTORY only), and the file is served."""
    listed = [url for url in comfy_client.get("/extensions").json() if url.endswith("xmgie.js")]
    assert listed == [f"/extensions/{harness.PACK_FOLDER}/js/xmgie.js"], listed
    body = comfy_client.get(listed[0]).text
    assert "registerExtension" in body and "xmgie.nodes" in body
