"""The Instruction node's local model backend on a tiny random-weight LLaVA-style model built in the test
(tests/fixtures/tiny_vlm.py): prompt assembly with the image, generation, strict parsing, fallback on garbage,
the result cache, unloading, folder diagnostics, and the node itself."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

from fixtures.tiny_vlm import IMAGE_TOKEN, NUM_IMAGE_TOKENS, json_emitting, save_tiny_vlm
from xmgie_core.errors import XMGIEInputError
from xmgie_core.instruction import local
from xmgie_core.instruction.local import GenerationSettings, LocalVLM, local_plan, loaded_folders, unload
from xmgie_core.model_cache import MODELS
from xmgie_core.instruction.rules import rules_plan

INSTRUCTION = "give the astronaut a red scarf"
PLAN = {"expressive_instruction": "Wrap a knitted red scarf around the astronaut's neck, leaving the rest unchanged.",
        "source_description": "a photo of an astronaut in an orange suit",
        "target_description": "a photo of an astronaut in an orange suit wearing a red scarf",
        "edit_words": ["red scarf"], "background_words": ["astronaut"], "edit_type": "add"}


@pytest.fixture(scope="module")
def garbage_model(tmp_path_factory):
    """Random weights: its answers are never a plan."""
    return save_tiny_vlm(tmp_path_factory.mktemp("tiny_vlm"))


@pytest.fixture(scope="module")
def planning_model(tmp_path_factory):
    """Answers every prompt with PLAN's JSON."""
    folder = save_tiny_vlm(tmp_path_factory.mktemp("tiny_vlm_plan"))
    json_emitting(folder, json.dumps(PLAN))
    return folder


@pytest.fixture(autouse=True)
def fresh_state():
    local._RESULTS.clear()
    unload()
    yield
    unload()


def image(seed: int = 0) -> torch.Tensor:
    return torch.rand(1, 48, 64, 3, generator=torch.Generator().manual_seed(seed))


def test_prompt_assembly_puts_the_image_in_the_caption_turn_only(garbage_model, monkeypatch):
    vlm = LocalVLM(garbage_model)
    calls = []
    real = vlm.model.generate
    monkeypatch.setattr(vlm.model, "generate", lambda **kw: calls.append(kw) or real(**kw))
    image_id = vlm.processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    vlm.generate("Describe this image.", local.to_pil(image()), GenerationSettings(max_new_tokens=4))
    vlm.generate("Plan the edit.", None, GenerationSettings(max_new_tokens=4))
    with_image, text_only = calls
    assert with_image["pixel_values"].shape == (1, 3, 32, 32)
    assert int((with_image["input_ids"] == image_id).sum()) == NUM_IMAGE_TOKENS
    assert "pixel_values" not in text_only and int((text_only["input_ids"] == image_id).sum()) == 0
    prompt = vlm.processor.decode(text_only["input_ids"][0], skip_special_tokens=True)
    assert "Plan the edit." in prompt and prompt.rstrip().endswith("ASSISTANT:")
    assert with_image["do_sample"] is False and with_image["max_new_tokens"] == 4


def test_a_model_that_answers_with_a_plan_is_used(planning_model, monkeypatch):
    prompts = []
    real = LocalVLM.generate
    monkeypatch.setattr(LocalVLM, "generate", lambda self, p, img, s: prompts.append((p, img)) or real(self, p, img, s))
    plan = local_plan(image(), INSTRUCTION, planning_model, GenerationSettings())
    assert plan.backend == f"local:{planning_model.name}" and not plan.note
    assert (plan.target_description, plan.edit_words, plan.background_words, plan.edit_type) == \
        (PLAN["target_description"], ("red scarf",), ("astronaut",), "add")
    (caption_prompt, caption_image), (plan_prompt, plan_image) = prompts
    assert caption_image is not None and caption_image.size == (64, 48) and plan_image is None
    caption = json.dumps(PLAN)  # this model says the same thing whatever it is asked
    assert f"Image description: {caption}" in plan_prompt and f"Instruction: {INSTRUCTION}" in plan_prompt


def test_garbage_falls_back_to_rules_with_a_visible_note(garbage_model, caplog):
    with caplog.at_level(logging.WARNING):
        plan = local_plan(image(), INSTRUCTION, garbage_model, GenerationSettings(max_new_tokens=8))
    rules = rules_plan(INSTRUCTION)
    assert (plan.target_description, plan.edit_words) == (rules.target_description, rules.edit_words)
    assert plan.backend == f"rules (fallback from local:{garbage_model.name})"
    assert "could not be used (the answer is not JSON" in plan.note and plan.note in caplog.text
    assert json.loads(plan.to_json())["note"] == plan.note
    with pytest.raises(XMGIEInputError, match="model's answer could not be used .* rules backend could not read"):
        local_plan(image(), "the weather is nice", garbage_model, GenerationSettings(max_new_tokens=8))


def test_a_plan_that_fails_the_plan_check_falls_back_to_rules(tmp_path):
    """Well-formed JSON whose target still shows what the instruction removes, and whose edit word is only a
    substring of the target ('car' in 'carpet'), never reaches a prompt."""
    for change in ({"target_description": "a photo of a room with a carpet", "edit_words": ["car"],
                    "background_words": []},
                   {"target_description": "a photo of an astronaut with a scarf", "edit_words": ["astronaut"],
                    "background_words": [], "edit_type": "remove"}):
        local._RESULTS.clear()
        folder = save_tiny_vlm(tmp_path / str(len(change)))
        json_emitting(folder, json.dumps({**PLAN, **change}))
        instruction = "remove the scarf from the astronaut" if "edit_type" in change else INSTRUCTION
        plan = local_plan(image(), instruction, folder, GenerationSettings())
        assert plan.backend == f"rules (fallback from local:{folder.name})"
        assert "could not be used" in plan.note and ("CLIP tokens" in plan.note or "'scarf'" in plan.note)
        assert plan.target_description == rules_plan(instruction).target_description


def test_results_are_cached_by_image_instruction_and_settings(planning_model, monkeypatch):
    calls = []
    real = LocalVLM.generate
    monkeypatch.setattr(LocalVLM, "generate", lambda *a: calls.append(1) or real(*a))
    first = local_plan(image(), INSTRUCTION, planning_model, GenerationSettings())
    assert local_plan(image(), INSTRUCTION, planning_model, GenerationSettings()) is first and len(calls) == 2
    local_plan(image(1), INSTRUCTION, planning_model, GenerationSettings())
    local_plan(image(), INSTRUCTION, planning_model, GenerationSettings(seed=5))
    assert len(calls) == 6


def test_the_model_is_freed_unless_kept_loaded(planning_model):
    local_plan(image(), INSTRUCTION, planning_model, GenerationSettings())
    assert loaded_folders() == []
    local_plan(image(2), INSTRUCTION, planning_model, GenerationSettings(), keep_loaded=True)
    assert loaded_folders() == [planning_model]
    local_plan(image(3), INSTRUCTION, planning_model, GenerationSettings(), keep_loaded=True)
    assert MODELS.get(("local-vlm", planning_model), lambda: pytest.fail("loaded again")) is not None  # reused
    unload()
    assert loaded_folders() == [] and MODELS.keys("local-vlm") == []


@pytest.mark.parametrize("damage, message", [
    ("missing", "Model folder not found: .* under ComfyUI/models/LLM/"),
    ("pickled", r"missing model\.safetensors \(found only pytorch_model\.bin: pickled weights, which xMGIE never loads"),
    ("no_config", "missing config.json"),
    ("no_tokenizer", "missing a tokenizer"),
    ("no_processor", r"missing an image processor \(preprocessor_config.json\)"),
])
def test_an_incomplete_folder_says_what_is_missing(garbage_model, tmp_path, damage, message):
    folder = tmp_path / "model"
    if damage != "missing":
        shutil.copytree(garbage_model, folder)
    if damage == "pickled":
        (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    remove = {"no_config": ["config.json"], "no_tokenizer": ["tokenizer.json", "tokenizer_config.json"],
              "no_processor": ["preprocessor_config.json", "processor_config.json"]}.get(damage, [])
    for name in remove:
        (folder / name).unlink(missing_ok=True)
    with pytest.raises(XMGIEInputError, match=message):
        local_plan(image(), INSTRUCTION, folder, GenerationSettings())


def test_instruction_node(pack, planning_model):
    node = pack.NODE_CLASS_MAPPINGS["XMGIEInstruction"]()
    expressive, source, target, edit, background, kind, blob = node.plan(
        image(), "Add a blue hat to the person in the image", "rules", "", 0, 0.0, 64, False)
    assert (target, edit, background, kind) == ("a photo of the person with a blue hat", "blue hat", "person", "add")
    assert json.loads(blob)["source_description"] == source and expressive.startswith("Add a blue hat")
    out = node.plan(image(), INSTRUCTION, "local model", str(planning_model), 0, 0.0, 64, False)
    assert out[2] == PLAN["target_description"] and out[3] == "red scarf" and out[4] == "astronaut"
    with pytest.raises(ValueError, match="needs a model folder"):
        node.plan(image(), INSTRUCTION, "local model", "  ", 0, 0.0, 64, False)
    with pytest.raises(ValueError, match="Model folder 'Qwen-missing' not found"):
        node.plan(image(), INSTRUCTION, "local model", "Qwen-missing", 0, 0.0, 64, False)
    with pytest.raises(ValueError, match="image contains NaN"):
        node.plan(torch.full((1, 8, 8, 3), float("nan")), INSTRUCTION, "rules", "", 0, 0.0, 64, False)
