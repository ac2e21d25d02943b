"""The Instruction node in a real ComfyUI: models/LLM registered, a local model found there by name and run on
ComfyUI's device, and the bundled workflow where its outputs feed CAM's prompt and words and a CLIP Text Encode."""

from __future__ import annotations

import json
from pathlib import Path

import torch

import comfy_harness as harness
from fixtures.tiny_vlm import json_emitting, save_tiny_vlm

WORKFLOW = "api/xmgie_instruction_edit.json"
PLAN = {"expressive_instruction": "Wrap a red scarf around the astronaut's neck.",
        "source_description": "a photo of an astronaut", "target_description": "a photo of an astronaut with a red scarf",
        "edit_words": ["red scarf"], "background_words": ["astronaut"], "edit_type": "add"}


def test_llm_folder_is_registered_and_a_model_there_is_found_by_name(comfy_host, tmp_path):
    import folder_paths

    assert any(Path(r) == Path(folder_paths.models_dir) / "LLM" for r in folder_paths.get_folder_paths("LLM"))
    folder_paths.add_model_folder_path("LLM", str(tmp_path))  # an extra models/LLM location, as extra_model_paths
    folder = save_tiny_vlm(tmp_path / "xmgie-tiny-vlm")
    json_emitting(folder, json.dumps(PLAN))
    node = comfy_host.nodes.NODE_CLASS_MAPPINGS["XMGIEInstruction"]()
    out = node.plan(torch.rand(1, 32, 32, 3), "give the astronaut a red scarf", "local model", "xmgie-tiny-vlm", 0, 0.0,
                    64, False)
    assert out[2:6] == (PLAN["target_description"], "red scarf", "astronaut", "add")
    assert json.loads(out[6])["backend"] == "local:xmgie-tiny-vlm"


def test_instruction_workflow_wiring():
    prompt = harness.load_workflow(WORKFLOW)
    instr_id, instr = harness.node_of(prompt, "XMGIEInstruction")
    _, cam = harness.node_of(prompt, "XMGIECrossAttentionMask")
    _, pfb = harness.node_of(prompt, "XMGIEPFBSampler")
    assert (cam["inputs"]["prompt"], cam["inputs"]["edit_words"], cam["inputs"]["background_words"]) == \
        ([instr_id, 2], [instr_id, 3], [instr_id, 4])
    assert prompt[pfb["inputs"]["source"][0]]["inputs"]["text"] == [instr_id, 1]
    assert instr["inputs"]["backend"] == "rules"


def test_instruction_workflow_runs(runner, tiny_checkpoint):
    prompt = harness.load_workflow(WORKFLOW)
    _, loader = harness.node_of(prompt, "CheckpointLoaderSimple")
    loader["inputs"]["ckpt_name"] = tiny_checkpoint.name
    _, sampler = harness.node_of(prompt, "XMGIEPFBSampler")
    sampler["inputs"]["steps"] = 2
    save_id = harness.provide_images_and_prefix(runner, prompt, f"xmgie_instruction_edit_{runner.name}")
    harness.check_edit_inside_only(runner, prompt, save_id)
