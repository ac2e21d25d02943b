"""The rules backend: a deterministic reading of common English edit instructions, no weights.

It sees only the instruction, not the image, so its source description names what the instruction names. Forms
(first match wins): style / global edits ("make it winter", "in the style of Van Gogh"); remove X [from Y];
replace X with Y; colour / material / adjective changes ("make the car red", "paint the wall blue", "change the
colour of X to Y"); change / turn / transform / make X into / to Y; give X a Y; wear / dress X in Y; add / put /
place / draw X [on / to / in ... Y].
"""

from __future__ import annotations

import re

from ..errors import XMGIEInputError
from .plan import EditPlan, clean_instruction

COLOURS = {"red", "orange", "yellow", "green", "blue", "purple", "violet", "pink", "brown", "black", "white", "gray",
           "grey", "golden", "silver", "beige", "turquoise", "cyan", "magenta", "teal", "navy", "crimson", "maroon"}
MATERIALS = {"wooden", "wood", "metal", "metallic", "gold", "glass", "stone", "marble", "plastic", "leather", "paper",
             "ice", "bronze", "steel", "velvet", "silk", "wool", "woolen", "denim", "brick", "concrete", "crystal"}
ADJECTIVES = {"old", "young", "older", "younger", "bigger", "smaller", "larger", "taller", "shorter", "happy", "sad",
              "angry", "wet", "dry", "shiny", "rusty", "dirty", "clean", "broken", "frozen", "snowy", "sunny",
              "cloudy", "dark", "darker", "bright", "brighter", "colorful", "colourful", "transparent", "fluffy",
              "furry", "striped", "spotted", "bald", "curly", "blond", "blonde", "sleeping", "smiling", "open",
              "closed", "empty", "full", "ripe", "rotten", "burnt", "wrinkled", "muddy", "foggy", "glowing"}
VERB_STATES = {"bloom": "in full bloom", "blossom": "in full blossom", "smile": "smiling", "laugh": "laughing",
               "cry": "crying", "glow": "glowing", "shine": "shining", "melt": "melting", "burn": "burning",
               "fly": "flying", "dance": "dancing", "sleep": "sleeping", "rust": "rusted", "freeze": "frozen",
               "wilt": "wilted", "sparkle": "sparkling"}
TIMES = {"winter": "in winter", "summer": "in summer", "autumn": "in autumn", "fall": "in fall", "spring": "in spring",
         "night": "at night", "nighttime": "at night", "daytime": "in daytime", "sunset": "at sunset",
         "sunrise": "at sunrise", "dusk": "at dusk", "dawn": "at dawn"}
MOODS = {"snowy", "rainy", "foggy", "sunny", "cloudy", "stormy", "vintage", "retro", "black and white", "monochrome",
         "sepia", "cyberpunk", "underwater", "futuristic", "dark", "darker", "brighter", "autumnal", "wintry"}
ARTWORKS = ("painting", "drawing", "sketch", "illustration", "cartoon", "anime", "art", "mosaic", "photo", "render")
DETERMINERS = r"(?:a|an|the|some|this|that|these|those|his|her|its|their|my|your|our)"
SCENE = r"(?:\s+(?:in|of|from|on)\s+(?:the|this)\s+(?:image|picture|photo|photograph|scene|painting|frame))+$"
ADD_PREPS = r"(?:on top of|next to|in front of|onto|into|on|to|in|at|near|beside|behind|above|below|under|over|around)"
WHOLE = r"(?:it|this|everything|the (?:image|picture|photo|photograph|scene|painting|whole (?:image|picture|scene)))"
PLURAL_END = re.compile(r"(?<!s)s$|(?:ies|es)$")


SHADES = ("light", "dark", "bright", "pale", "deep")


def bare(phrase: str) -> str:
    """Without a leading determiner, a trailing 'in the image', or quotes around the whole: 'the red car' -> 'red car'."""
    phrase = re.sub(SCENE, "", phrase.strip(), flags=re.I)
    return re.sub(rf"^{DETERMINERS}\s+", "", phrase, flags=re.I).strip()


def article(noun: str) -> str:
    """'a' / 'an' + noun (none for plurals)."""
    if PLURAL_END.search(noun.split()[-1].lower()):
        return noun
    return ("an " if noun[0].lower() in "aeiou" else "a ") + noun


def indefinite(phrase: str) -> str:
    """The phrase as something new in the picture: the user's 'a' / 'an' / 'some' / number kept, 'the X' -> 'a X',
    no determiner kept as written (names, plurals): 'a NASA logo', 'a bird', 'candles', "da Vinci's 'Mona Lisa'"."""
    phrase = re.sub(SCENE, "", phrase.strip(), flags=re.I)
    if re.match(r"^(?:a|an|some|one|two|three|four|five|several|many|\d+)\s", phrase, flags=re.I):
        return phrase
    if re.match(rf"^{DETERMINERS}\s", phrase, flags=re.I):
        return article(bare(phrase))
    return phrase


def _plan(instruction: str, expressive: str, source: str, target: str, edit: list[str], background: list[str],
          kind: str) -> EditPlan:
    return EditPlan(instruction, expressive, source, target, tuple(edit), tuple(b for b in background if b), kind)


def _global(instruction: str, style: str) -> EditPlan:
    words = bare(re.sub(r"^(?:(?:look\s+)?like|in(?=\s+the\s+style\s+of\b))\s+", "", style.strip(), flags=re.I))
    low = words.lower()
    if low.startswith("the style of ") or low.startswith("style of "):
        edit = re.sub(r"^the\s+", "", words, flags=re.I)
        target = f"a painting of the scene in the {edit}"
    elif low in TIMES:
        edit, target = low, f"a photo of the scene {TIMES[low]}"
    elif low.endswith(ARTWORKS):
        edit, target = words, f"{article(words)} of the scene"
    else:
        edit, target = words, f"a photo of the {words} scene"
    return _plan(instruction, f"Change the whole image: {words}, keeping its composition and content.",
                 "a photo of the scene", target, [edit], [], "global")


def _remove(instruction: str, x: str, y: str | None) -> EditPlan:
    """Without a place the hole becomes background; 'remove the glasses from the man' leaves the man there."""
    thing, place = bare(x), bare(y) if y else None
    fill = place or "empty background"
    where = f" from the {place}" if place else ""
    return _plan(instruction, f"Remove the {thing}{where} and fill its place with the surrounding "
                 f"{place or 'background'} so no trace of it remains, leaving everything else unchanged.",
                 f"a photo of the {place} with {article(thing)}" if place else f"a photo with {article(thing)}",
                 f"a photo of the {fill}", [fill], [], "remove")


def _in_context(phrase: str) -> tuple[str, str | None]:
    """'pendant in the dog' -> ('pendant', 'dog'); 'bird' -> ('bird', None)."""
    m = re.match(r"^(.+?)\s+(?:in|on|of|at|around)\s+(?:the|a|an|his|her|its|their)\s+(.+)$", phrase, flags=re.I)
    return (m.group(1), m.group(2)) if m else (phrase, None)


def _replace(instruction: str, x: str, y: str) -> EditPlan:
    old, where = _in_context(bare(x))
    new = indefinite(y)
    scene = f"a photo of the {where} with " if where else "a photo of "
    return _plan(instruction, f"Replace the {old} with {new}, keeping its position and size and the rest of the image "
                 "unchanged.", scene + article(old), scene + new, [bare(y)], [where], "replace")


def _attribute(instruction: str, x: str, attr: str) -> EditPlan:
    thing = bare(x)
    attr = attr.strip().lower()
    if attr in VERB_STATES:
        state = VERB_STATES[attr]
        target, edit = f"a photo of the {thing} {state}", f"{thing} {state}"
    else:
        attr = "gray" if attr == "grey" else attr
        kept = _without_old(thing, attr)
        target, edit = f"a photo of the {attr} {kept}", f"{attr} {kept}"
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


def _is_attribute(phrase: str) -> bool:
    words = bare(phrase).lower()
    return words in COLOURS | MATERIALS | ADJECTIVES or words in VERB_STATES or \
        bool(re.fullmatch(rf"(?:{'|'.join(SHADES)})\s+\w+", words) and words.split()[1] in COLOURS)


def _wearing(instruction: str, who: str, item: str, verb: str) -> EditPlan:
    person, thing = bare(who), indefinite(item)
    return _plan(instruction, f"Give the {person} {thing} that fits the pose and lighting, leaving the {person} and "
                 "everything else unchanged.", f"a photo of the {person}", f"a photo of the {person} {verb} {thing}",
                 [bare(item)], [person], "add")


def _add(instruction: str, x: str, prep: str | None, y: str | None) -> EditPlan:
    thing, new = bare(x), indefinite(x)
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


RULES = [
    (rf"^(?:make|turn|convert|change|transform|render|redraw|repaint)\s+{WHOLE}\s+(?:look\s+like\s+|into\s+|to\s+|"
     r"like\s+)?(?P<style>.+)$", lambda i, m: _global(i, m["style"]) if not _names_object(m["style"]) else None),
    (r"^(?:(?:re)?draw|paint|render|redo)?\s*(?:it|this|everything)?\s*(?P<style>(?:in\s+)?the style of .+)$",
     lambda i, m: _global(i, m["style"])),
    (r"^(?:remove|delete|erase|take away|take out|get rid of|eliminate|clear)\s+(?P<x>.+?)(?:\s+(?:from|off|out of)"
     r"\s+(?P<y>.+))?$", lambda i, m: _remove(i, m["x"], m["y"])),
    (r"^(?:replace|swap|substitute)\s+(?P<x>.+?)\s+(?:with|by|for)\s+(?P<y>.+)$",
     lambda i, m: _replace(i, m["x"], m["y"])),
    (r"^(?:change|turn|make)\s+the\s+colou?r\s+of\s+(?P<x>.+?)\s+(?:to|into)\s+(?P<a>.+)$",
     lambda i, m: _attribute(i, m["x"], m["a"])),
    (r"^(?:paint|colou?r|dye)\s+(?P<x>.+)\s+(?P<a>\w+)$",
     lambda i, m: _attribute(i, m["x"], m["a"]) if _is_attribute(m["a"]) else None),
    (r"^(?:change|turn|transform|convert|make)\s+(?P<x>.+?)\s+(?:into|to|in to)\s+(?P<y>.+)$",
     lambda i, m: _attribute(i, m["x"], m["y"]) if _is_attribute(m["y"]) else _replace(i, m["x"], m["y"])),
    (r"^(?:make|let)\s+(?P<x>.+)\s+(?P<a>(?:light|dark|bright|pale|deep)\s+\w+|\w+)$",
     lambda i, m: _attribute(i, m["x"], m["a"]) if _is_attribute(m["a"]) else None),
    (r"^give\s+(?P<x>.+?)\s+(?P<y>(?:a|an|some)\s+.+)$", lambda i, m: _wearing(i, m["x"], m["y"], "with")),
    (r"^(?:wear|dress|clothe)\s+(?P<x>.+?)\s+(?:in|with)\s+(?P<y>.+)$",
     lambda i, m: _wearing(i, m["x"], m["y"], "wearing")),
    (rf"^(?:add|put|place|insert|draw|paint|include|attach|overlay|stick)\s+(?P<x>.+?)(?:\s+(?P<p>{ADD_PREPS})\s+"
     r"(?P<y>.+))?$", lambda i, m: _add(i, m["x"], m["p"], m["y"])),
]


def _names_object(style: str) -> bool:
    """'make it winter' is a global edit; 'turn the image into a painting' too; but a bare noun phrase after
    'make it' ('make it a cat') is not understood as one."""
    s = bare(re.sub(r"^(?:look\s+)?like\s+", "", style.strip(), flags=re.I)).lower()
    return not (s in TIMES or s in MOODS or s.endswith(ARTWORKS) or "style of" in s)


def rules_plan(instruction: str) -> EditPlan:
    """Read an English edit instruction; an instruction no rule understands is a user error saying what to do."""
    text = clean_instruction(instruction)
    sentence = re.sub(r"^(?:please|can you|could you|would you|kindly|now)\s+", "", text, flags=re.I)
    sentence = sentence.rstrip(" .!?;").replace("’", "'")
    for pattern, build in RULES:
        m = re.match(pattern, sentence, flags=re.I)
        if m:
            try:
                plan = build(text, m)
            except (ValueError, IndexError):
                plan = None
            if plan is not None:
                return plan
    if not re.search(r"[A-Za-z]{2}", sentence) or re.search(r"[^\x00-\x7F\u2018-\u201d]{3}", sentence):
        hint = "It does not look like English: the rules backend reads English only."
    else:
        hint = "None of the rules backend's forms matched."
    raise XMGIEInputError(
        f"Could not read the instruction {text!r}. {hint} Write one edit such as 'add a blue hat to the man', "
        "'remove the fork', 'replace the cookies with candles', 'make the car red', 'make it winter' or 'in the "
        "style of Van Gogh', or use the local model backend.")
