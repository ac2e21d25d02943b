"""The plan check, run on every plan from every backend before anything reaches a prompt (issue 21):

- the source and target descriptions are noun phrases: no sentence punctuation, no determiner before a determiner
  or a pronoun ("the her", "an all the"), no dangling last word ("and", "of", "look"), none of the instruction's
  own wish / modal words ("should", "instead", "please");
- for the rules backend, also every word comes from the instruction, the word lists or the description templates,
  and no pronoun or look / appear / seem verb is left;
- every edit and background word is found in the target description by the real CLIP tokenizer (open_clip's,
  the BPE of SD's text encoder), inside its 75 usable tokens;
- nothing the instruction asks to remove ("remove X", "replace X with", "instead of X", "without X", "from X to")
  is in the target description.

A failing plan raises PlanCheckError (an XMGIEInputError) naming the offending words.
"""

from __future__ import annotations

import re
from functools import lru_cache

from ..errors import XMGIEInputError
from ..tokens import find_positions, text_positions
from .plan import EditPlan
from .words import IRREGULAR_PLURALS, VERB_STATES, WORDS, plural

DETERMINERS = {"a", "an", "the", "every", "each", "some", "this", "that", "these", "those", "my", "your", "his",
               "her", "its", "our", "their", "all", "both", "any", "no"}
PRONOUNS = {"it", "him", "her", "them", "he", "she", "they", "me", "us", "i", "you", "we"}
DANGLING = {"and", "or", "but", "of", "with", "the", "a", "an", "to", "in", "on", "at", "from", "by", "for",
            "instead", "than", "as", "like", "look", "looks", "very", "more", "less", "into", "onto", "should", "would",
            "could", "be", "is", "are", "was", "were", "that", "which", "who", "rather", "its", "his",
            "their", "some", "every", "all", "not"}
STATE_ENDINGS = {state for state in VERB_STATES.values() if state.split()[-1] in DANGLING}
"""'switched on': a state phrase may end a description with 'on'."""
INSTRUCTION_ONLY = {"should", "would", "could", "must", "please", "instead", "rather", "want", "wish", "shall",
                    "ought", "if", "what", "let", "kindly"}
RULES_ONLY = PRONOUNS | {"look", "looks", "appear", "appears", "seem", "seems", "make", "add", "remove", "replace",
                         "change", "turn", "be", "is", "are", "was", "were", "been", "not", "than"}
TEMPLATE = {"a", "an", "the", "photo", "of", "with", "scene", "in", "at", "on", "empty", "background", "painting",
            "style", "wearing", "holding", "carrying", "riding", "eating", "drinking", "reading", "playing", "using",
            "man", "woman", "people", "person", "full", "switched", "by"}
DESCRIPTION_LISTS = ("colours", "shades", "materials", "adjectives", "verb_states", "state_verbs", "holding_verbs",
                     "seasons", "times_of_day", "weather", "weather_verbs", "moods", "artworks", "pronoun_objects",
                     "pronoun_possessives", "irregular_plurals")
"""The word lists whose words the rules backend may put into a description."""
CLIP_USABLE_TOKENS = 75
"""77 positions less the start and end tokens."""


class PlanCheckError(XMGIEInputError):
    def __init__(self, message: str, words: tuple[str, ...]):
        super().__init__(message)
        self.words = words
        """The offending words, as they appear in the plan."""


def _words(text: str) -> list[str]:
    """Words and single symbols ('🎩'), lower case; punctuation and quotes left out."""
    return re.findall(r"\w+(?:['-]\w+)*|[^\w\s'\".,;:!?()\[\]-]", text.lower())


@lru_cache(maxsize=1)
def clip_tokenizer():
    """open_clip's SimpleTokenizer: the CLIP BPE that SD 1.x / SDXL text encoders use (bundled vocabulary)."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


def _tokens_found(target: str, phrase: str) -> bool:
    """CAM's own finder (xmgie_core.tokens): the phrase's token sequence, or the text its byte-level pieces spell."""
    tokenizer = clip_tokenizer()
    ids, sub = [tokenizer.encode(target)[:CLIP_USABLE_TOKENS]], tokenizer.encode(phrase)
    piece = lambda t: tokenizer.decoder.get(t, "")  # noqa: E731
    return bool(sub) and bool(find_positions(ids, sub, set()) or text_positions(ids, sub, set(), piece))


def _description_problem(text: str, rules: bool, allowed: set[str]) -> tuple[str, tuple[str, ...]] | None:
    if re.search(r"[?!;]|\.(?:\s|$)", text):
        return "holds sentence punctuation", (re.search(r"[?!;]|\.(?:\s|$)", text)[0].strip(),)
    words = _words(text)
    for a, b in zip(words, words[1:]):
        if a in {"a", "an", "the"} and (b in DETERMINERS or b in PRONOUNS):
            return f"has '{a} {b}'", (b,)
    if words and words[-1] in DANGLING and not any(" ".join(words).endswith(" " + state) for state in STATE_ENDINGS):
        return f"ends with '{words[-1]}'", (words[-1],)
    bad = [w for w in words if w in INSTRUCTION_ONLY or (rules and w in RULES_ONLY)]
    if bad:
        return f"holds {', '.join(repr(w) for w in bad)}, which do not belong in a picture description", tuple(bad)
    if rules:
        unknown = [w for w in words if w not in allowed and w.split("'")[0] not in allowed]
        if unknown:
            return f"holds {', '.join(repr(w) for w in unknown)}, which the instruction does not say", tuple(unknown)
    return None


def asked_removed(instruction: str) -> list[str]:
    """The phrases the instruction asks to take away: 'remove the glasses from the man' -> ['glasses']; 'replace the
    cookies with candles' -> ['cookies']; 'make the water blue instead of green' -> ['green']."""
    s = re.sub(r"n't\b", " not", instruction.lower().replace("’", "'"))
    stop = r"(?=\s+(?:from|off|out|away|in|on|at|with|by|for|and|to|into|so|please)\b|\s*[.,;!?]|$)"
    patterns = [rf"\b(?:remove|delete|erase|eliminate|get\s+rid\s+of|take\s+away|take\s+out|take\s+off|crop\s+out|"
                rf"cut\s+out|without|no\s+more|instead\s+of|rather\s+than|in\s+place\s+of)\s+(?P<x>.+?){stop}",
                r"\b(?:replace|swap|exchange|trade)\s+(?P<x>.+?)\s+(?:with|by|for)\b",
                r"\bsubstitute\s+.+?\s+for\s+(?P<x>.+?)(?:\s*[.,;!?]|$)",
                r"\btake\s+(?P<x>.+?)\s+(?:off|out|away)\b",
                r"\bfrom\s+(?P<x>(?:a|an|the)?\s*\w+)\s+(?:to|into)\b"]
    found = []
    for pattern in patterns:
        for m in re.finditer(pattern, s):
            words = [w for w in _words(m["x"]) if w not in DETERMINERS and w not in PRONOUNS]
            if words:
                found.append(" ".join(words))
    return found


def check_plan(plan: EditPlan, rules: bool) -> None:
    """Raise PlanCheckError when the plan could put broken or contradicting words into a prompt (module docstring);
    `rules`: the plan is the rules backend's, built from the instruction's own words."""
    allowed = _allowed_words(plan.instruction) if rules else set()
    for field in ("target_description", "source_description"):
        text = getattr(plan, field)
        problem = _description_problem(text, rules, allowed)
        if problem:
            raise PlanCheckError(f"the {field.replace('_', ' ')} {text!r} {problem[0]}", problem[1])
    for kind, words in (("edit", plan.edit_words), ("background", plan.background_words)):
        for word in words:
            if not _tokens_found(plan.target_description, word):
                raise PlanCheckError(f"the {kind} word {word!r} is not among the CLIP tokens of the target "
                                     f"description {plan.target_description!r} (first {CLIP_USABLE_TOKENS})", (word,))
    target = " ".join(_words(plan.target_description))
    for phrase in asked_removed(plan.instruction):
        if re.search(rf"\b{re.escape(phrase)}\b", target):
            raise PlanCheckError(f"the target description {plan.target_description!r} still names {phrase!r}, which "
                                 "the instruction asks to take away", (phrase,))


def _allowed_words(instruction: str) -> set[str]:
    """The instruction's words (with their plurals and without 's), the word lists' and the templates'."""
    own = set(_words(instruction)) | {w.split("'")[0] for w in _words(instruction)}
    own |= {plural(w) for w in own} | set(IRREGULAR_PLURALS.values())
    listed = set()
    for key in DESCRIPTION_LISTS:
        value = WORDS[key]
        listed.update(_words(" ".join([*value, *value.values()] if isinstance(value, dict) else value)))
    return own | TEMPLATE | (listed - RULES_ONLY - INSTRUCTION_ONLY)
