"""The rules backend: a deterministic reading of English edit instructions, no weights.

It sees only the instruction, not the image, so its source description names what the instruction names. The
sentence is first rewritten into the imperative (natural.py: one edit, polite wrappers, wishes, modals,
hypotheticals, pronouns, quantifiers, "instead of"); then the forms below are tried, first match wins: global edits
("make it winter", "change the weather to foggy", "in the style of Van Gogh", "apply a vintage filter"); remove X
[from Y]; replace X with Y; switch X on / off, open / close X; the colour of X; change / turn X into Y; make X
look Y; make X a Y; let / have X hold / wear Y; give X Y; wear / dress X in Y; add / put / place / draw X [on Y].
Every plan passes the plan check (check.py) or the instruction is refused, naming the part that was not read.
"""

from __future__ import annotations

import re

from ..errors import XMGIEInputError
from .check import PlanCheckError, check_plan
from .natural import natural_to_imperative, one_edit
from .plan import EditPlan, clean_instruction
from .words import (ARTWORKS, ATTRIBUTES, COLOURS, EDIT_VERBS, HOLDING_VERBS, MATERIALS, MOODS, POSE_VERBS, SHADES,
                    STATE_VERBS, TIMES, VERB_STATES, WEATHER_VERBS, WORDS, alternation, is_plural)

DETERMINERS = r"(?:a|an|the|some|this|that|these|those|his|her|its|their|my|your|our)"
SCENE = (r"(?:\s+(?:in|of|from|on|out\s+of)\s+(?:the|this)\s+(?:image|picture|photo|photograph|scene|painting|frame|"
         r"pic|shot))+$")
ADD_PREPS = (r"(?:on top of|next to|in front of|in the middle of|at the top of|at the bottom of|onto|into|on|to|in|at|"
             r"near|beside|behind|above|below|under|over|around|inside|between|across|along|by)")
WHOLE = alternation(WORDS["whole_image"])
GLOBAL_NOUNS = alternation(WORDS["global_nouns"])
FILTER_NOUNS = alternation(WORDS["filter_nouns"])
DAY_PARTS = set(WORDS["day_parts"])
INTENSIFIERS = set(WORDS["intensifiers"])
ADJECTIVE_ENDING = re.compile(r"(?:y|ful|ous|ish|ic|al|ive|ed|en|er|est|less|able|ible|ant|ent|ar|id|ile|ry)$")


def bare(phrase: str) -> str:
    """Without a leading determiner or a trailing 'in the image': 'the red car' -> 'red car'."""
    phrase = re.sub(SCENE, "", phrase.strip(), flags=re.I)
    return re.sub(rf"^{DETERMINERS}\s+", "", phrase, flags=re.I).strip()


def article(noun: str) -> str:
    """'a' / 'an' + noun (none for plurals)."""
    if is_plural(noun.split()[-1]):
        return noun
    return ("an " if noun[0].lower() in "aeiou" else "a ") + noun


def indefinite(phrase: str) -> str:
    """The phrase as something new in the picture: the user's 'a' / 'an' / 'some' / number kept, 'the X' -> 'a X',
    no determiner kept as written (names, plurals): 'a NASA logo', 'a bird', 'candles', "da Vinci's 'Mona Lisa'"."""
    phrase = re.sub(SCENE, "", phrase.strip(), flags=re.I)
    if re.match(r"^(?:a|an|some|one|two|three|four|five|several|many|more|\d+)\s", phrase, flags=re.I):
        return phrase
    if re.match(rf"^{DETERMINERS}\s", phrase, flags=re.I):
        return article(bare(phrase))
    return phrase


def _plan(instruction: str, expressive: str, source: str, target: str, edit: list[str], background: list[str],
          kind: str) -> EditPlan:
    return EditPlan(instruction, expressive, source, target, tuple(edit), tuple(b for b in background if b), kind)


def _style_words(style: str) -> str:
    return bare(re.sub(r"^(?:(?:look|looking|seem|appear)\s+)?(?:like\s+)?(?:in(?=\s+the\s+style\s+of\b)\s+)?", "",
                       style.strip(), flags=re.I))


def _is_global(style: str) -> bool:
    """'winter', 'a rainy day', 'a watercolor painting', 'the style of Monet', 'it was painted by Monet', 'anime style',
    'foggy', 'black and white': words that change the whole picture, not an object."""
    s = _style_words(style).lower()
    words = s.split()
    return bool(words) and (
        s in TIMES or s in MOODS or s in WEATHER_VERBS or s.endswith(ARTWORKS) or "style of" in s or
        bool(re.search(r"\b(?:painted|drawn|made|done)\s+by\s+\S", s)) or
        (len(words) == 2 and words[1] in DAY_PARTS and (words[0] in MOODS or words[0] in ATTRIBUTES)))


def _is_look(style: str) -> bool:
    """'sepia toned', 'blurry', 'more colourful': adjectives only (the whole picture given a look)."""
    words = style.lower().split()
    return 0 < len(words) <= 3 and all(_is_attribute(w, loose=True) or w in MOODS or w in INTENSIFIERS or w == "and"
                                       for w in words)


def _global(instruction: str, style: str) -> EditPlan:
    words = _style_words(style)
    low = words.lower()
    painter = re.search(r"\b(?:painted|drawn|made|done)\s+by\s+(?P<who>.+)$", words, flags=re.I)
    if painter:
        words = low = f"style of {painter['who']}"
    if low.startswith("the style of ") or low.startswith("style of "):
        edit = re.sub(r"^the\s+", "", words, flags=re.I)
        target = f"a painting of the scene in the {edit}"
    elif low in TIMES:
        edit, target = low, f"a photo of the scene {TIMES[low]}"
    elif low in WEATHER_VERBS:
        edit = WEATHER_VERBS[low]
        target = f"a photo of the {edit} scene"
    elif low.split()[-1] in DAY_PARTS:
        edit, target = words, f"a photo of the scene on {article(words)}"
    elif low.endswith(ARTWORKS):
        edit, target = words, f"{article(words)} of the scene"
    else:
        edit, target = words, f"a photo of the {words} scene"
    return _plan(instruction, f"Change the whole image: {words}, keeping its composition and content.",
                 "a photo of the scene", target, [edit], [], "global")


def _owner(thing: str) -> tuple[str | None, str]:
    """"man's hat" -> ('man', 'hat'); 'hat' -> (None, 'hat')."""
    m = re.match(r"^(?P<owner>.+?)'s?\s+(?P<thing>.+)$", thing)
    return (m["owner"], m["thing"]) if m and not m["thing"].startswith("'") else (None, thing)


def _remove(instruction: str, x: str, y: str | None) -> EditPlan:
    """Without a place the hole becomes background; 'remove the glasses from the man' (or "the man's glasses")
    leaves the man there."""
    place, thing = (bare(y), bare(x)) if y else _owner(bare(x))
    fill = place or "empty background"
    where = f" from the {place}" if place else ""
    return _plan(instruction, f"Remove the {thing}{where} and fill its place with the surrounding "
                 f"{place or 'background'} so no trace of it remains, leaving everything else unchanged.",
                 f"a photo of the {place} with {article(thing)}" if place else f"a photo with {article(thing)}",
                 f"a photo of the {fill}", [fill], [], "remove")


def _in_context(phrase: str) -> tuple[str, str | None]:
    """'pendant in the dog' -> ('pendant', 'dog'); "man's hat" -> ('hat', 'man'); 'bird' -> ('bird', None)."""
    m = re.match(r"^(.+?)\s+(?:in|on|of|at|around)\s+(?:the|a|an|his|her|its|their)\s+(.+)$", phrase, flags=re.I)
    if m:
        return m.group(1), m.group(2)
    owner, thing = _owner(phrase)
    return thing, owner


def _replace(instruction: str, x: str, y: str) -> EditPlan:
    old, where = _in_context(bare(x))
    new = indefinite(y)
    scene = f"a photo of the {where} with " if where else "a photo of "
    return _plan(instruction, f"Replace the {old} with {new}, keeping its position and size and the rest of the image "
                 "unchanged.", scene + article(old), scene + new, [bare(y)], [where], "replace")


def _attribute(instruction: str, x: str, attr: str) -> EditPlan:
    thing = bare(x)
    attr = " ".join(attr.split()).lower()
    if attr in VERB_STATES:
        state = VERB_STATES[attr]
        target, edit = f"a photo of the {thing} {state}", f"{thing} {state}"
    else:
        attr = "gray" if attr == "grey" else attr
        owner, owned = _owner(thing)
        kept = _without_old(owned, attr)
        edit = f"{attr} {kept}"
        target = f"a photo of the {owner}'s {edit}" if owner else f"a photo of the {edit}"
    return _plan(instruction, f"Make the {thing} {VERB_STATES.get(attr, attr)}, keeping its shape and the rest of the "
                 "image unchanged.", f"a photo of the {thing}", target, [edit], [], "attribute")


def _without_old(thing: str, attr: str) -> str:
    """The thing without the attribute the edit replaces: a 'red car' made blue is a 'blue car', not a 'blue red
    car'. Modifiers before the noun of the same kind (colours, with their light/dark shades, for a colour; materials
    for a material) give way; the noun and other modifiers stay."""
    kind = COLOURS if attr.split()[-1] in COLOURS else MATERIALS if attr in MATERIALS else set()
    *modifiers, noun = thing.split()
    kept = [w for i, w in enumerate(modifiers) if w.lower() not in kind and not (
        w.lower() in SHADES and i + 1 < len(modifiers) and modifiers[i + 1].lower() in kind)]
    return " ".join([*kept, noun])


def _is_attribute(phrase: str, loose: bool = False) -> bool:
    """A colour, material, adjective or state from the word lists, with a shade or intensifier before it ('light
    blue', 'more colourful'); `loose` also takes an unlisted single word that ends like an English adjective."""
    words = bare(phrase).lower().split()
    if len(words) == 3 and words[1] == "and":  # 'black and white', 'old and rusty'
        return _is_attribute(words[0], loose) and _is_attribute(words[2], loose)
    if not words:
        return False
    *before, core = words
    if any(w not in SHADES and w not in INTENSIFIERS for w in before) or len(before) > 1:
        return False
    if before and before[0] in SHADES and before[0] not in INTENSIFIERS and core not in COLOURS:
        return False
    return core in ATTRIBUTES or (not before and core in VERB_STATES) or (
        loose and bool(ADJECTIVE_ENDING.search(core)) and core not in POSE_VERBS | EDIT_VERBS | DAY_PARTS)


def _make_attribute(instruction: str, rest: str, loose: bool) -> EditPlan | None:
    """'the dress light blue' -> the dress made light blue; 'the man look older' -> the man made older: the
    attribute is the last one to three words ('black and white') that read as one, the thing what comes before
    (at least one word besides a determiner), a look / appear / seem / become before the attribute dropped."""
    words = rest.split()
    for n in (3, 2, 1):
        thing = words[:-n]
        while thing and thing[-1].lower() in ("look", "appear", "seem", "become", "get", "grow", "be", "to", "in"):
            thing = thing[:-1]
        if any(not re.fullmatch(DETERMINERS, w, flags=re.I) for w in thing) and _is_attribute(" ".join(words[-n:]),
                                                                                               loose):
            return _attribute(instruction, " ".join(thing), " ".join(words[-n:]))
    return None


def _wearing(instruction: str, who: str, item: str, verb: str) -> EditPlan:
    person, thing = bare(who), indefinite(item)
    return _plan(instruction, f"Give the {person} {thing} that fits the pose and lighting, leaving the {person} and "
                 "everything else unchanged.", f"a photo of the {person}", f"a photo of the {person} {verb} {thing}",
                 [bare(item)], [person], "add")


def _give(instruction: str, rest: str) -> EditPlan | None:
    """'give the old man glasses': the receiver is a determiner, its adjectives and one noun (with "'s" parts)."""
    words = rest.split()
    i = 1 if re.fullmatch(DETERMINERS, words[0], flags=re.I) else 0
    while i < len(words) - 1 and words[i].lower() in ATTRIBUTES:
        i += 1
    while i < len(words) - 2 and words[i].endswith("'s"):
        i += 1
    if i >= len(words) - 1:
        return None
    return _wearing(instruction, " ".join(words[:i + 1]), " ".join(words[i + 1:]), "with")


def _add(instruction: str, x: str, prep: str | None, y: str | None) -> EditPlan:
    thing, new = bare(x), indefinite(x)
    if y is not None and len(thing.split()) > 1 and thing.endswith("ing"):  # "a pedestrian walking along the beach"
        return _add(instruction, f"{x} {prep} {y}", None, None)
    if y is not None:
        place = bare(y)
        return _plan(instruction, f"Add {new} {prep.lower()} the {place}, matching the scene's lighting, scale and "
                     "perspective, and leave everything else unchanged.", f"a photo of the {place}",
                     f"a photo of the {place} with {new}", [thing], [place], "add")
    m = re.match(r"^(.+?)\s+(\w+ing)\b\s*(.*)$", thing)  # "pedestrian walking along the beach"
    main, place = (m.group(1), re.search(r"\bthe\s+(.+)$", m.group(3))) if m else (thing, None)
    place_words = bare(place.group(1)) if place else None
    return _plan(instruction, f"Add {new}, matching the scene's lighting, scale and perspective, and leave "
                 "everything else unchanged.", f"a photo of the {place_words}" if place_words else "a photo",
                 f"a photo of {new}", [main], [place_words] if place_words else [], "add")


class PoseChange(XMGIEInputError):
    """An instruction that asks a person or animal to move: out of the rules backend's scope."""


def _pose(verb: str) -> None:
    raise PoseChange(f"'{verb}' asks for a pose or action change, which the rules backend does not plan (it adds, "
                     "removes, replaces and recolours things, changes states and restyles the whole picture)")


def _from_to(instruction: str, x: str, a: str, b: str) -> EditPlan:
    """'change the car from red to blue' -> the red car made blue; 'change the animal from a dog to a cat' ->
    replace."""
    if _is_attribute(b):
        return _attribute(instruction, f"{a} {bare(x)}", b)
    return _replace(instruction, a, b)


VERB = r"(?:make|turn|change|convert|transform|render|redraw|repaint|set|switch|alter)"
HOLD = alternation(HOLDING_VERBS)
REMOVE = (r"(?:remove|delete|erase|take\s+away|take\s+out|take\s+off|get\s+rid\s+of|eliminate|clear|hide|crop\s+out|"
          r"cut\s+out|wipe\s+out|wipe\s+away|wipe\s+off|wipe|rub\s+out|pull\s+out|without|no\s+more|no)")
RULES = [
    # global edits
    (rf"^{VERB}\s+(?P<whole>{WHOLE})\s+(?:look\s+like\s+|into\s+|to\s+|like\s+|in\s+|at\s+|during\s+|as\s+|look\s+|"
     r"appear\s+|seem\s+)?(?P<style>.+)$", lambda i, m: _global(i, m["style"]) if _is_global(m["style"]) or (
         not re.fullmatch(r"it|this|everything", m["whole"], flags=re.I) and _is_look(m["style"])) else None),
    (r"^(?:(?:re)?draw|paint|render|redo|make|do)?\s*(?:it|this|everything)?\s*(?P<style>(?:in\s+)?the\s+style\s+of"
     r"\s+.+)$", lambda i, m: _global(i, m["style"])),
    (rf"^{VERB}\s+the\s+(?:{GLOBAL_NOUNS})\s+(?:from\s+.+?\s+)?(?:to\s+|into\s+|as\s+|in\s+)?(?P<style>.+)$",
     lambda i, m: _global(i, m["style"]) if _is_global(m["style"]) else None),
    (rf"^{VERB}\s+(?:the\s+)?(?:{alternation(TIMES)})\s+(?:in)?to\s+(?P<style>.+)$",
     lambda i, m: _global(i, m["style"]) if _is_global(m["style"]) else None),
    (rf"^{VERB}\s+(?:it\s+|this\s+)?(?:to|into)\s+(?P<style>.+)$",
     lambda i, m: _global(i, m["style"]) if _is_global(m["style"]) else None),
    (rf"^(?:apply|add|use|put|give\s+(?:{WHOLE}))\s+(?:a|an|the|some)?\s*(?P<style>.+?)\s+(?:{FILTER_NOUNS})$",
     lambda i, m: _global(i, m["style"])),
    (rf"^(?:let|make|have)\s+it\s+(?P<style>{alternation(WEATHER_VERBS)})$", lambda i, m: _global(i, m["style"])),
    (r"^(?P<style>.+?\s+(?:painting|drawing|sketch|style))$", lambda i, m: _global(i, m["style"])),
    # remove
    (rf"^{REMOVE}\s+(?P<x>.+?)(?:\s+(?:from|off|out\s+of)\s+(?P<y>.+))?$", lambda i, m: _remove(i, m["x"], m["y"])),
    (r"^take\s+(?P<x>.+?)\s+(?:off\s+of|off|out\s+of|away\s+from|from)\s+(?P<y>.+)$",
     lambda i, m: _remove(i, m["x"], m["y"])),
    (r"^(?:take|get)\s+(?P<x>.+?)\s+(?:off|out|away)(?:\s+of\s+.+)?$", lambda i, m: _remove(i, m["x"], None)),
    (r"^(?:make|let|have)\s+(?P<x>.+?)\s+(?:disappear|vanish|go\s+away|invisible|gone)$",
     lambda i, m: _remove(i, m["x"], None)),
    # replace
    (r"^(?:replace|swap|exchange|trade|switch)\s+(?:out\s+)?(?P<x>.+?)\s+(?:with|by|for)\s+(?P<y>.+)$",
     lambda i, m: _replace(i, m["x"], m["y"])),
    (r"^substitute\s+(?P<y>.+?)\s+for\s+(?P<x>.+)$", lambda i, m: _replace(i, m["x"], m["y"])),
    (r"^substitute\s+(?P<x>.+?)\s+(?:with|by)\s+(?P<y>.+)$", lambda i, m: _replace(i, m["x"], m["y"])),
    (r"^(?:put|place|use)\s+(?P<y>.+?)\s+(?:in\s+place\s+of|where)\s+(?P<x>.+?)(?:\s+is|\s+was|\s+are)?$",
     lambda i, m: _replace(i, m["x"], m["y"])),
    # states: on / off, open / close
    (r"^(?:switch|turn|flip|power|shut|click)\s+(?P<p>on|off)\s+(?P<x>.+)$",
     lambda i, m: _attribute(i, m["x"], m["p"])),
    (r"^(?:switch|turn|flip|power|shut)\s+(?P<x>.+?)\s+(?P<p>on|off)$", lambda i, m: _attribute(i, m["x"], m["p"])),
    (rf"^(?P<v>{alternation(STATE_VERBS)})\s+(?:up\s+)?(?P<x>(?!.*\s(?:with|into|to)\s).+)$",
     lambda i, m: _attribute(i, m["x"], STATE_VERBS[" ".join(m["v"].lower().split())])),
    # colours, materials, adjectives
    (r"^(?:change|turn|make|set|switch)\s+the\s+colou?r\s+of\s+(?P<x>.+?)\s+(?:from\s+(?P<a>.+?)\s+)?(?:to|into)\s+"
     r"(?P<b>.+)$", lambda i, m: _from_to(i, m["x"], m["a"], m["b"]) if m["a"] else _attribute(i, m["x"], m["b"])),
    (r"^(?:change|turn|make|set|switch)\s+(?P<x>.+?)(?:'s)?\s+colou?r\s+(?:to|into)\s+(?P<a>.+)$",
     lambda i, m: _attribute(i, m["x"], m["a"]) if _is_attribute(m["a"]) else None),
    (r"^(?:change|turn|make|switch|paint|transform|convert|colou?r|dye)\s+(?P<x>.+?)\s+from\s+(?P<a>.+?)\s+(?:to|into)"
     r"\s+(?P<b>.+)$", lambda i, m: _from_to(i, m["x"], m["a"], m["b"])),
    (r"^(?:paint|colou?r|recolou?r|dye|tint|spray(?:\s+paint)?)\s+(?P<rest>.+)$",
     lambda i, m: _make_attribute(i, m["rest"], loose=False)),
    (r"^(?:change|turn|transform|convert|make)\s+(?P<x>.+?)\s+(?:into|to|in\s+to)\s+(?P<y>.+)$",
     lambda i, m: _attribute(i, m["x"], m["y"]) if _is_attribute(m["y"]) else _replace(i, m["x"], m["y"])),
    (r"^(?:make|let|get|have|render)\s+(?P<x>.+?)\s+(?:look|appear|seem)\s+like\s+(?P<y>.+)$",
     lambda i, m: _replace(i, m["x"], m["y"])),
    (r"^(?:make|let|get|keep|render)\s+(?P<rest>.+)$", lambda i, m: _make_attribute(i, m["rest"], loose=True)),
    (r"^turn\s+(?P<rest>.+)$", lambda i, m: _make_attribute(i, m["rest"], loose=False)),
    # causatives: let / have / get / make X hold / wear / smile; pose changes refused
    (rf"^(?:let|have|get|make)\s+(?P<x>.+?)\s+(?:to\s+)?(?P<v>{HOLD})\s+"
     r"(?P<y>(?!(?:in|on|at|with|to|into|around|near|by|out|up|down|over|away|off)\b).+)$",
     lambda i, m: _wearing(i, m["x"], m["y"], HOLDING_VERBS[" ".join(m["v"].lower().split())])),
    (rf"^(?:let|have|get|make)\s+(?P<x>.+?)\s+(?:to\s+)?(?P<v>{alternation(VERB_STATES)})$",
     lambda i, m: _attribute(i, m["x"], m["v"])),
    (rf"^(?:let|have|get|make)\s+(?P<x>.+?)\s+(?:to\s+)?(?P<v>{alternation(POSE_VERBS)})\b.*$",
     lambda i, m: _pose(m["v"])),
    (r"^(?:make|turn)\s+(?P<x>.+?)\s+(?P<y>(?:a|an|one)\s+.+)$", lambda i, m: _replace(i, m["x"], m["y"])),
    # give, wear, add
    (r"^give\s+(?P<x>.+?)\s+(?P<y>(?:a|an|some|two|three|\d+)\s+.+)$",
     lambda i, m: _wearing(i, m["x"], m["y"], "with")),
    (r"^give\s+(?P<rest>.+)$", lambda i, m: _give(i, m["rest"])),
    (r"^(?:wear|dress|clothe)\s+(?P<x>.+?)\s+(?:up\s+)?(?:in|with)\s+(?P<y>.+)$",
     lambda i, m: _wearing(i, m["x"], m["y"], "wearing")),
    (rf"^(?:add|put|place|insert|draw|paint|include|attach|overlay|stick|create|generate|hang|plant|build|write|"
     r"sprinkle|(?:make|have|see|show|get)(?=\s+(?:a|an|some|more|two|three|\d+)\s))\s+(?P<x>.+?)"
     rf"(?:\s+(?P<p>{ADD_PREPS})\s+(?P<y>.+))?$",
     lambda i, m: _add(i, m["x"], m["p"], m["y"])),
    (rf"^(?P<x>(?:a|an|some)\s+.+?)\s+(?P<p>{ADD_PREPS})\s+(?P<y>.+)$", lambda i, m: _add(i, m["x"], m["p"], m["y"])),
]

CLOSEST = [
    (r"\b(?:remove|delete|erase|rid|take|without|gone|disappear|no)\b", "remove the fork"),
    (r"\b(?:replace|swap|substitute|exchange|instead|rather)\b", "replace the cookies with candles"),
    (r"\b(?:style|painting|drawing|sketch|cartoon|filter|look like)\b", "in the style of Van Gogh"),
    (rf"\b(?:{alternation(TIMES)}|weather|season|snow|rain|foggy)\b", "make it winter"),
    (r"\b(?:give|wear|dress|hold|carry|have|has)\b", "give the man a red scarf"),
    (r"\b(?:add|put|place|draw|insert|there)\b", "add a blue hat to the man"),
    (r"\b(?:on|off|open|close|shut|switch)\b", "switch the lights off"),
    (r"\b(?:into|to)\b", "turn the cat into a tiger"),
    (r"", "make the car red"),
]
"""The supported form shown with an error, by the words of the instruction (first match)."""


def closest_form(sentence: str) -> str:
    return next(example for pattern, example in CLOSEST if re.search(pattern, sentence, flags=re.I))


def _unread_part(text: str, words: tuple[str, ...]) -> str:
    """The instruction from the first offending word on (a few words), or the whole instruction."""
    for word in words:
        m = re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text, flags=re.I)
        if m:
            return " ".join(text[m.start():].split()[:6])
    return text


def rules_plan(instruction: str) -> EditPlan:
    """Read an English edit instruction; an instruction no rule understands, or whose plan fails the plan check,
    is a user error naming the part not read and the closest supported form."""
    text = clean_instruction(instruction)
    sentence = natural_to_imperative(one_edit(text))
    try:
        for pattern, build in RULES:
            m = re.match(pattern, sentence, flags=re.I)
            if m:
                plan = build(text, m)
                if plan is not None:
                    check_plan(plan, rules=True)
                    return plan
    except PoseChange as e:
        raise XMGIEInputError(f"Could not read the instruction {text!r}: {e}. The closest form the rules backend "
                              "reads: 'make the man smile'; or use the local model backend.") from None
    except PlanCheckError as e:
        raise XMGIEInputError(
            f"Could not read the instruction {text!r}: the part {_unread_part(text, e.words)!r} was not understood "
            f"({e}). The closest form the rules backend reads: {closest_form(sentence)!r}; rephrase like it, or use "
            "the local model backend.") from None
    if not re.search(r"[A-Za-z]{2}", sentence) or re.search(r"[^\x00-\x7F\u2018-\u201d]{3}", sentence):
        hint = "It does not look like English: the rules backend reads English only."
    else:
        hint = f"None of the rules backend's forms matched {sentence!r}."
    raise XMGIEInputError(
        f"Could not read the instruction {text!r}. {hint} The closest form the rules backend reads: "
        f"{closest_form(sentence)!r}. Write one edit such as 'add a blue hat to the man', 'remove the fork', 'replace "
        "the cookies with candles', 'make the car red', 'switch the lights off', 'make it winter' or 'in the style of "
        "Van Gogh', or use the local model backend.")
