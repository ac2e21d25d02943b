"""The templates menu (docs/comfyui-internals.md §6.6): the running server lists every bundled UI workflow
(workflows/*.json) under the pack's folder name, and serves each one and its thumbnail."""

from __future__ import annotations

import json

import pytest

import comfy_harness as harness

UI_WORKFLOWS = sorted(harness.WORKFLOWS_DIR.glob("*.json"))


def test_workflow_templates_lists_every_ui_workflow(comfy_client):
    listed = comfy_client.get("/workflow_templates").json()
    assert harness.PACK_FOLDER in listed, f"the pack is not among the template packs: {sorted(listed)}"
    assert sorted(listed[harness.PACK_FOLDER]) == [f.stem for f in UI_WORKFLOWS]


@pytest.mark.parametrize("workflow", UI_WORKFLOWS, ids=lambda f: f.stem)
def test_each_template_and_its_thumbnail_are_served(comfy_client, workflow):
    base = f"/api/workflow_templates/{harness.PACK_FOLDER}/{workflow.stem}"
    served = comfy_client.get(base + ".json")
    assert json.loads(served.content) == json.loads(workflow.read_text()), "served template differs from the file"
    thumb = comfy_client.get(base + ".jpg")
    assert thumb.headers.get("Content-Type", "").startswith("image/jpeg"), thumb.headers
    assert thumb.content == workflow.with_suffix(".jpg").read_bytes()
