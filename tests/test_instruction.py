"""The Instruction node's core: the rules backend on a table of instructions (every one in the seeds, the common
English forms, malformed input), the findability of every edit word in the target description with the real
CLIP tokenizer, and the strict parser of a model's JSON answer."""

from __future__ import annotations

import json

import pytest

from xmgie_core.errors import XMGIEInputError
from xmgie_core.instruction.plan import FIELDS, EditPlan
from xmgie_core.instruction.rules import rules_plan
from xmgie_core.hosts.diffusers.tokens import hf_token_positions

SEEDS = ["Add a NASA logo on the t-shirt", "Remove the fork", "Change the bird to a rabbit with white fur",
         "Replace the cookies with candles", "Make the tree's pink cherry blossoms bloom",
         "Draw Leonardo da Vinci's 'Mona Lisa' to the canvas", "Add a pedestrian walking along the beach",
         "Add a piece of lemon to the cup of coffee", "Wear the wolf in a red cape",
         "Change the pendant in the dog to a metal name tag", "Add a blue hat to the person in the image"]

# (instruction, edit type, target description, edit words, background words)
TABLE = [
    ('Add a NASA logo on the t-shirt', 'add', 'a photo of the t-shirt with a NASA logo', ['NASA logo'], ['t-shirt']),
    ('Remove the fork', 'remove', 'a photo of the empty background', ['empty background'], []),
    ('Change the bird to a rabbit with white fur', 'replace', 'a photo of a rabbit with white fur', ['rabbit with white fur'], []),
    ('Replace the cookies with candles', 'replace', 'a photo of candles', ['candles'], []),
    ("Make the tree's pink cherry blossoms bloom", 'attribute', "a photo of the tree's pink cherry blossoms in full bloom", ["tree's pink cherry blossoms in full bloom"], []),
    ("Draw Leonardo da Vinci's 'Mona Lisa' to the canvas", 'add', "a photo of the canvas with Leonardo da Vinci's 'Mona Lisa'", ["Leonardo da Vinci's 'Mona Lisa'"], ['canvas']),
    ('Add a pedestrian walking along the beach', 'add', 'a photo of a pedestrian walking along the beach', ['pedestrian'], ['beach']),
    ('Add a piece of lemon to the cup of coffee', 'add', 'a photo of the cup of coffee with a piece of lemon', ['piece of lemon'], ['cup of coffee']),
    ('Wear the wolf in a red cape', 'add', 'a photo of the wolf wearing a red cape', ['red cape'], ['wolf']),
    ('Change the pendant in the dog to a metal name tag', 'replace', 'a photo of the dog with a metal name tag', ['metal name tag'], ['dog']),
    ('Add a blue hat to the person in the image', 'add', 'a photo of the person with a blue hat', ['blue hat'], ['person']),
    ('give the man a red scarf', 'add', 'a photo of the man with a red scarf', ['red scarf'], ['man']),
    ('Give the girl a pair of sunglasses', 'add', 'a photo of the girl with a pair of sunglasses', ['pair of sunglasses'], ['girl']),
    ('put a vase of flowers on the table.', 'add', 'a photo of the table with a vase of flowers', ['vase of flowers'], ['table']),
    ('Place a cat next to the sofa', 'add', 'a photo of the sofa with a cat', ['cat'], ['sofa']),
    ('insert a rainbow in the sky', 'add', 'a photo of the sky with a rainbow', ['rainbow'], ['sky']),
    ('add fireworks above the city', 'add', 'a photo of the city with fireworks', ['fireworks'], ['city']),
    ('Add two ducks to the pond', 'add', 'a photo of the pond with two ducks', ['two ducks'], ['pond']),
    ("draw a mustache on the man's face", 'add', "a photo of the man's face with a mustache", ['mustache'], ["man's face"]),
    ('remove the glasses from the man', 'remove', 'a photo of the man', ['man'], []),
    ('Delete the car', 'remove', 'a photo of the empty background', ['empty background'], []),
    ('erase the text from the sign', 'remove', 'a photo of the sign', ['sign'], []),
    ('take away the umbrella', 'remove', 'a photo of the empty background', ['empty background'], []),
    ('get rid of the trash can', 'remove', 'a photo of the empty background', ['empty background'], []),
    ('Please remove the people in the background', 'remove', 'a photo of the empty background', ['empty background'], []),
    ('replace the apple with an orange', 'replace', 'a photo of an orange', ['orange'], []),
    ('swap the dog for a cat', 'replace', 'a photo of a cat', ['cat'], []),
    ('turn the cat into a tiger', 'replace', 'a photo of a tiger', ['tiger'], []),
    ('transform the house into a castle', 'replace', 'a photo of a castle', ['castle'], []),
    ('convert the bicycle to a motorcycle', 'replace', 'a photo of a motorcycle', ['motorcycle'], []),
    ('make the car red', 'attribute', 'a photo of the red car', ['red car'], []),
    ('paint the wall blue', 'attribute', 'a photo of the blue wall', ['blue wall'], []),
    ('change the colour of the dress to light blue', 'attribute', 'a photo of the light blue dress', ['light blue dress'], []),
    ('turn the statue into gold', 'attribute', 'a photo of the gold statue', ['gold statue'], []),
    ('make the table wooden', 'attribute', 'a photo of the wooden table', ['wooden table'], []),
    ('make the red car blue', 'attribute', 'a photo of the blue car', ['blue car'], []),
    ('change the colour of the light green door to red', 'attribute', 'a photo of the red door', ['red door'], []),
    ('make the red wooden table metal', 'attribute', 'a photo of the metal red table', ['metal red table'], []),
    ('make the sky darker', 'attribute', 'a photo of the darker sky', ['darker sky'], []),
    ('make the man smile', 'attribute', 'a photo of the man smiling', ['man smiling'], []),
    ('make the flowers wilt', 'attribute', 'a photo of the flowers wilted', ['flowers wilted'], []),
    ('make it winter', 'global', 'a photo of the scene in winter', ['winter'], []),
    ('Make it night', 'global', 'a photo of the scene at night', ['night'], []),
    ('make it snowy', 'global', 'a photo of the snowy scene', ['snowy'], []),
    ('in the style of Van Gogh', 'global', 'a painting of the scene in the style of Van Gogh', ['style of Van Gogh'], []),
    ('turn the image into a watercolor painting', 'global', 'a watercolor painting of the scene', ['watercolor painting'], []),
    ('make the photo look like a pencil sketch', 'global', 'a pencil sketch of the scene', ['pencil sketch'], []),
    ('Redraw it in the style of Studio Ghibli', 'global', 'a painting of the scene in the style of Studio Ghibli', ['style of Studio Ghibli'], []),
    ('add a 🎩 to the man', 'add', 'a photo of the man with a 🎩', ['🎩'], ['man']),
]


def test_the_table_covers_the_seeds_and_enough_forms():
    assert set(SEEDS) <= {row[0] for row in TABLE} and len(TABLE) >= 40
    assert {row[1] for row in TABLE} == {"add", "remove", "replace", "attribute", "global"}


@pytest.mark.parametrize("instruction, kind, target, edit, background", TABLE, ids=[row[0][:40] for row in TABLE])
def test_rules_backend(instruction, kind, target, edit, background, clip_tokenizer):
    plan = rules_plan(instruction)
    assert (plan.edit_type, plan.target_description, list(plan.edit_words), list(plan.background_words)) == \
        (kind, target, edit, background)
    assert plan.backend == "rules" and plan.source_description and plan.expressive_instruction
    for word in (*plan.edit_words, *plan.background_words):  # what CAM will look for, with SD's own tokenizer
        assert hf_token_positions(clip_tokenizer, plan.target_description, word)
    assert plan.instruction == " ".join(instruction.split())


@pytest.mark.parametrize("instruction, message", [
    ("", "The instruction is empty: write what to change"),
    ("   \n\t ", "The instruction is empty"),
    ("add a hat " * 500, "4999 characters long; write one edit in one sentence of at most 500"),
    ("Ajoutez un chapeau bleu à l'homme", "None of the rules backend's forms matched"),
    ("Добавь синюю шляпу мужчине", "does not look like English"),
    ("🎩🎩🎩", "does not look like English"),
    ("the weather is nice today", "None of the rules backend's forms matched.*or use the local model backend"),
])
def test_malformed_instructions_say_what_to_do(instruction, message):
    with pytest.raises(XMGIEInputError, match=message):
        rules_plan(instruction)


def answer(**change) -> str:
    data = {"expressive_instruction": "Give the man a red scarf.", "source_description": "a photo of a man",
            "target_description": "a photo of a man wearing a red scarf", "edit_words": ["red scarf"],
            "background_words": ["man"], "edit_type": "add"}
    data.update(change)
    return json.dumps({k: v for k, v in data.items() if v is not None})


def test_strict_parse_of_a_model_answer():
    plan = EditPlan.from_model_output("  " + answer() + "\n", "give the man a red scarf", "local")
    assert plan.edit_words == ("red scarf",) and plan.backend == "local" and plan.edit_type == "add"
    assert json.loads(plan.to_json())["target_description"] == "a photo of a man wearing a red scarf"
    assert set(json.loads(plan.to_json())) == {*FIELDS, "instruction", "backend", "note"}


@pytest.mark.parametrize("text, reason", [
    ("Sure! Here is the JSON: {}", "not JSON"),
    (answer() + answer(), "not JSON"),
    ("[1, 2]", "not a JSON object"),
    (answer(edit_type=None), "missing \\['edit_type'\\]"),
    (answer(extra="x"), "unexpected \\['extra'\\]"),
    (answer(edit_words="red scarf"), "edit_words is not a list of strings"),
    (answer(target_description=3), "target_description is not a string"),
    (answer(edit_type="recolour"), "edit_type 'recolour' is not one of"),
    (answer(edit_words=["blue hat"]), "'blue hat' is not a phrase of the target description"),
    (answer(edit_words=[]), "no edit words"),
    (answer(background_words=["red scarf"]), "both an edit word and a background word"),
    (answer(target_description=" "), "target description is empty"),
])
def test_strict_parse_rejects_what_downstream_nodes_cannot_use(text, reason):
    with pytest.raises(ValueError, match=reason):
        EditPlan.from_model_output(text, "give the man a red scarf", "local")
