"""The English word lists the rules backend and the plan check read (words.json, one data file), as sets, maps and
regex alternations."""

from __future__ import annotations

import json
import re
from pathlib import Path

WORDS: dict = json.loads(Path(__file__).with_name("words.json").read_text(encoding="utf-8"))

COLOURS = set(WORDS["colours"])
SHADES = set(WORDS["shades"])
MATERIALS = set(WORDS["materials"])
ADJECTIVES = set(WORDS["adjectives"])
VERB_STATES: dict[str, str] = WORDS["verb_states"]
STATE_VERBS: dict[str, str] = WORDS["state_verbs"]
HOLDING_VERBS: dict[str, str] = WORDS["holding_verbs"]
POSE_VERBS = set(WORDS["pose_verbs"])
TIMES: dict[str, str] = {**WORDS["seasons"], **WORDS["times_of_day"]}
WEATHER = set(WORDS["weather"])
WEATHER_VERBS: dict[str, str] = WORDS["weather_verbs"]
MOODS = set(WORDS["moods"]) | WEATHER
ARTWORKS = tuple(WORDS["artworks"])
PRONOUN_OBJECTS: dict[str, str] = WORDS["pronoun_objects"]
PRONOUN_POSSESSIVES: dict[str, str] = WORDS["pronoun_possessives"]
IRREGULAR_PLURALS: dict[str, str] = WORDS["irregular_plurals"]
REMOVAL_STATES = set(WORDS["removal_states"])
EDIT_VERBS = set(WORDS["edit_verbs"])
ATTRIBUTES = COLOURS | MATERIALS | ADJECTIVES


def alternation(words) -> str:
    """A regex alternation of the phrases, longest first, spaces matching any whitespace."""
    return "|".join(r"\s+".join(map(re.escape, w.split())) for w in sorted(words, key=len, reverse=True))


def plural(noun: str) -> str:
    """English plural of one noun: irregulars from the word list, else -s / -es / -ies."""
    low = noun.lower()
    if low in IRREGULAR_PLURALS:
        return IRREGULAR_PLURALS[low]
    if re.search(r"(?:s|x|z|ch|sh)$", low):
        return noun + "es"
    if re.search(r"[^aeiou]y$", low):
        return noun[:-1] + "ies"
    return noun + "s"


def is_plural(noun: str) -> bool:
    low = noun.lower()
    return low in IRREGULAR_PLURALS.values() or bool(re.search(r"(?<!s)s$|(?:ies|es)$", low))


def verb_of(gerund: str) -> list[str]:
    """The verbs an -ing form may come from: 'sitting' -> ['sitt', 'sit', 'sitte'], 'waving' -> [..., 'wave'],
    'lying' -> [..., 'lie'] (the caller keeps the one its list knows)."""
    stem = re.sub(r"ing$", "", gerund.lower())
    candidates = [stem, stem + "e"]
    if len(stem) > 2 and stem[-1] == stem[-2]:
        candidates.append(stem[:-1])
    if stem.endswith("y"):
        candidates.append(stem[:-1] + "ie")
    return candidates
