"""Natural English to the rules' imperative forms (issue 21): one edit per instruction, polite wrappers, wishes
("I want the door to be red"), modal statements ("the lamp should be on", "there should be a kite in the sky"),
hypotheticals ("what if the house were made of glass?"), pronouns ("give her a hat" -> "give the woman a hat"),
quantifiers ("every car" -> "the cars"), hedges ("a bit darker" -> "darker") and "instead of" / "rather than".

Each rewrite keeps the instruction's own words; what cannot be rewritten is left for the rules to refuse.
"""

from __future__ import annotations

import re

from ..errors import XMGIEInputError
from .words import (ATTRIBUTES, EDIT_VERBS, HOLDING_VERBS, POSE_VERBS, PRONOUN_OBJECTS, PRONOUN_POSSESSIVES,
                    REMOVAL_STATES, WORDS, alternation, plural, verb_of)

DET = r"(?:a|an|the|some|this|that|these|those|his|her|its|their|my|your|our)"
SUBJECT = rf"(?:{DET}|all|every|each|both|it|this|everything|[A-Z]\w*)\b"
MODAL = (r"(?:should|must|needs?\s+to|has\s+to|have\s+to|ought\s+to|could|would|will|shall|might|can|may|"
         r"is\s+going\s+to|are\s+going\s+to|is\s+supposed\s+to|are\s+supposed\s+to|had\s+better)")
FOLLOW = (r"(?:a|an|the|some|it|this|that|these|those|his|her|its|their|my|your|him|them|all|every|more|up|off|on|"
          r"out|away|rid|everything|any|previous|above|prior)")
SECOND_EDIT = re.compile(rf"(?:\s*[,:]\s*(?:and\s+|then\s+|also\s+|now\s+)*|\s+(?:and|then|also|plus|afterwards|"
                         rf"after\s+"
                         rf"that)\s+(?:then\s+|also\s+)*)(?P<verb>(?:{alternation(EDIT_VERBS)}))\s+{FOLLOW}\b", re.I)
ABBREVIATIONS = re.compile(r"\b(?:mr|mrs|ms|dr|st|jr|sr|vs|etc|e\.g|i\.e|mt|prof)\.$", re.I)
COURTESY = set(WORDS["courtesy"])
PREFIXES = re.compile(rf"^(?:{alternation(WORDS['polite_prefixes'])})\b[\s,]*", re.I)
SUFFIXES = re.compile(rf"[\s,]+(?:{alternation(WORDS['polite_suffixes'])})$", re.I)
HEDGES = re.compile(rf"\b(?:{alternation(WORDS['hedges'])})\s+(?=\w)", re.I)
REMOVAL = alternation(REMOVAL_STATES)
ING_TO_VERB = {ing: verb for verb, ing in reversed(HOLDING_VERBS.items()) if ing.endswith("ing")}
HOLDING_ING = alternation(ING_TO_VERB)


def one_edit(text: str) -> str:
    """The instruction's single edit, without closing punctuation; a second sentence or a second imperative
    joined by 'and' / 'then' / ',' is a user error naming it ("Thanks!" and "please" may follow)."""
    pieces = [p for p in re.split(r"(?<=[.!?;])\s+", text) if p.strip()]
    sentences: list[str] = []
    for piece in pieces:
        if sentences and ABBREVIATIONS.search(sentences[-1]):
            sentences[-1] += " " + piece
        else:
            sentences.append(piece)
    kept = [s for s in sentences if _plain(s) not in COURTESY] or sentences
    first = kept[0].strip().rstrip(" .!?;,:")
    if len(kept) > 1:
        raise _extra(first, " ".join(kept[1:]))
    m = SECOND_EDIT.search(first)
    if m:
        raise _extra(first[:m.start()], first[m.start("verb"):])
    m = re.search(r"\s(?P<word>and|or|but|with|of|to|the|a|an|than|instead|into|then)$", first, re.I)
    if m:
        raise XMGIEInputError(f"The instruction {first!r} stops after {m['word']!r}: the words that should follow "
                              "are missing. Finish the sentence, e.g. 'make the car old and rusty'.")
    return first


def _plain(sentence: str) -> str:
    return " ".join(re.sub(r"[^\w' ]", " ", sentence.lower()).split())


def _extra(first: str, extra: str) -> XMGIEInputError:
    return XMGIEInputError(
        f"The instruction has extra text after the edit {first!r}: {extra!r}. The rules backend reads one edit per "
        f"instruction, in one sentence: send {first!r} alone, and each further edit as its own instruction.")


def natural_to_imperative(sentence: str) -> str:
    """The sentence rewritten into the imperative forms of the rules (see the module docstring)."""
    s = _contractions(sentence.replace("’", "'").replace("‘", "'"))
    s = _unwrap(s)
    s = _wish(s)
    s = _pronouns(s)
    for rewrite in (_there, _hypothetical, _modal):
        new = rewrite(s)
        if new is not None:
            s = new
            break
    s = _instead(s)
    s = HEDGES.sub("", s)
    return _quantifiers(s)


def _contractions(s: str) -> str:
    s = re.sub(r"\bcan't\b", "can not", s, flags=re.I)
    s = re.sub(r"\bwon't\b", "will not", s, flags=re.I)
    s = re.sub(r"n't\b", " not", s, flags=re.I)
    return re.sub(r"\b(it|there|that|what)'s\b", r"\1 is", s, flags=re.I)


def _unwrap(s: str) -> str:
    """Without polite wrappers: 'could you please add a moon? thanks' -> 'add a moon'; 'how about adding a dog' ->
    'add a dog'; 'can the car be blue?' -> 'the car should be blue'."""
    while True:
        new = SUFFIXES.sub("", PREFIXES.sub("", s.strip().rstrip(" .!?;,"))).strip().rstrip(" .!?;,")
        m = re.match(r"^(?:how|what)\s+about|^(?:try|consider|start)\s+(?=\w+ing\b)", new, re.I)
        gerund = re.match(r"^(?P<v>\w+ing)\b(?P<rest>.*)$", new[m.end():].strip(), re.I) if m else None
        verb = next((v for v in verb_of(gerund["v"]) if v in EDIT_VERBS), None) if gerund else None
        if verb:
            new = verb + gerund["rest"]
        new = re.sub(rf"^(?:can|could|would|will|may|might)\s+(?P<x>{SUBJECT}.*?)\s+be\s+", r"\g<x> should be ", new,
                     flags=re.I)
        if new == s or not new:
            return new or s
        s = new


def _wish(s: str) -> str:
    """'I want the door to be red' -> 'make the door red'; 'I'd like a lamp on the desk' -> 'add a lamp on the desk';
    'I don't want the chair' -> 'remove the chair'."""
    m = re.match(r"^(?:i|we)(?:\s+do\s+not|\s+would\s+not|'d\s+not)\s+(?:want|like|need)\s+(?:to\s+see\s+)?(?P<x>.+)$",
                 s, re.I)
    if m:
        return f"remove {m['x']}"
    m = re.match(r"^(?:i|we)(?:(?:\s+would|'d)\s+(?:really\s+)?(?:like|love|prefer)|\s+(?:really\s+)?want|\s+need|"
                 r"\s+wish\s+for|\s+wish|\s+prefer|\s+hope\s+for)\s+(?P<rest>.+)$", s, re.I)
    if not m:
        return s
    rest = m["rest"]
    if re.match(r"^there\s+to\s+be\s+", rest, re.I):
        return "add " + re.sub(r"^there\s+to\s+be\s+", "", rest, flags=re.I)
    if re.match(r"^to\s+", rest, re.I):
        return _unwrap(re.sub(r"^to\s+(?:see\s+|have\s+)?", "", rest, flags=re.I))
    n = re.match(r"^(?P<x>.+?)\s+to\s+(?:be|become)\s+(?P<p>.+)$", rest, re.I)
    if n:
        return _be(n["x"], n["p"])
    n = re.match(r"^(?P<x>.+?)\s+to\s+(?P<v>\w+)\b(?P<r>.*)$", rest, re.I)
    if n and re.match(SUBJECT, n["x"], re.I):
        return f"make {n['x']} {n['v']}{n['r']}"
    n = re.match(rf"^(?P<x>{DET}\s+.+?)\s+(?P<a>\w+)$", rest, re.I)
    if n and n["a"].lower() in ATTRIBUTES:
        return f"make {n['x']} {n['a']}"
    n = re.match(r"^no\s+(?:more\s+)?(?P<x>.+)$", rest, re.I)
    return f"remove {n['x']}" if n else f"add {rest}"


def _pronouns(s: str) -> str:
    """Personal pronouns as the person they name, honestly ('him' -> 'the man'); possessives as the owner's
    ('his hat' -> "the man's hat"; 'its tail' -> 'the tail'). 'her' before a noun is possessive, else an object."""
    def her(m: re.Match) -> str:
        after = s[m.end():]
        word = re.match(r"\s+([\w'-]+)(\s*)$", after)
        obj = (not after.strip() or re.match(rf"\s+(?:{DET}|some|to|with|in|on|at|by|for|from|into|look|appear|"
                                             rf"seem|wear|hold|carry|have|be|a\s+bit)\b", after, re.I)
               or (word and (word[1].lower() in ATTRIBUTES or re.match(r"^(?:make|let|keep|get)\b", s, re.I))))
        return PRONOUN_OBJECTS["her"] if obj else PRONOUN_POSSESSIVES["her"]

    s = re.sub(r"\bher\b", her, s, flags=re.I)
    s = re.sub(rf"\b(?:{'|'.join(p for p in PRONOUN_POSSESSIVES if p != 'her')})\b(?=\s+\w)",
               lambda m: PRONOUN_POSSESSIVES[m[0].lower()], s, flags=re.I)
    return re.sub(rf"\b(?:{'|'.join(p for p in PRONOUN_OBJECTS if p != 'her')})\b",
                  lambda m: PRONOUN_OBJECTS[m[0].lower()], s, flags=re.I)


def _be(x: str, p: str) -> str:
    """'X (should) be P' as an imperative: gone -> remove X; replaced with Y -> replace; made of Y / painted Y ->
    make X Y; wearing Y -> dress X in Y; holding Y -> let X hold Y; a noun phrase -> turn X into it; else make X P."""
    p = p.strip()
    if re.fullmatch(rf"(?:{REMOVAL})(?:\s+from\s+.+)?", p, re.I):
        return f"remove {x}"
    m = re.match(r"^(?:turned|switched)\s+(?P<p>on|off)$", p, re.I)
    if m:
        return f"make {x} {m['p']}"
    pose = next((v for v in verb_of(p.split()[0]) if v in POSE_VERBS), None) if p.lower().endswith("ing") or \
        re.match(r"^\w+ing\b", p, re.I) else None
    if pose:
        return f"make {x} {pose}"
    m = re.match(r"^replaced\s+(?:with|by)\s+(?P<y>.+)$", p, re.I)
    if m:
        return f"replace {x} with {m['y']}"
    m = re.match(r"^(?:made\s+(?:of|from|out\s+of)|(?:painted|colou?red|dyed)(?:\s+in)?|in)\s+(?P<y>.+)$", p, re.I)
    if m and (not p.lower().startswith("in ") or re.match(r"^(?:it|this|everything)$", x, re.I)):
        return f"make {x} {m['y']}"
    m = re.match(rf"^(?P<v>{HOLDING_ING})\s+(?P<y>.+)$", p, re.I)
    if m:
        return f"let {x} {ING_TO_VERB[m['v'].lower()]} {m['y']}"
    if re.match(r"^(?:like|looking\s+like)\s+", p, re.I):
        return f"make {x} look " + re.sub(r"^looking\s+", "", p, flags=re.I)
    if re.match(r"^(?:a|an|one)\s+", p, re.I) and not re.match(r"^(?:it|this|everything)$", x, re.I):
        return f"turn {x} into {p}"
    return f"make {x} {p}"


def _there(s: str) -> str | None:
    """'there should be a kite in the sky' -> 'add a kite in the sky'; 'there should be no cars' -> 'remove the
    cars'."""
    m = re.match(rf"^(?:let\s+there\s+be|there\s+(?:{MODAL})\s+(?P<neg>not\s+)?(?:be|have\s+been)|there\s+"
                 r"(?:is|are|was|were)(?P<neg2>\s+not)?|(?:what\s+if|imagine(?:\s+if|\s+that)?|suppose)\s+there\s+"
                 r"(?:was|were|is|are|had\s+been))\s+(?P<x>.+)$", s, re.I)
    if not m:
        return None
    x = m["x"]
    negative = re.match(r"^(?:no|any)\s+(?:more\s+)?(?P<x>.+)$", x, re.I)
    if m["neg"] or m["neg2"] or (negative and x.lower().startswith("no ")):
        return f"remove the {negative['x']}" if negative else f"remove {x}"
    return f"add {x}"


def _hypothetical(s: str) -> str | None:
    """'what if the house were made of glass' -> 'make the house glass'; 'what if the woman had a tattoo' -> 'give
    the woman a tattoo'."""
    m = re.match(r"^(?:what\s+if|imagine(?:\s+if|\s+that)?|suppose(?:\s+that)?|pretend(?:\s+that)?|how\s+about\s+if|"
                 r"what\s+would\s+\w+(?:\s+\w+)?\s+look\s+like\s+if|how\s+would\s+\w+(?:\s+\w+)?\s+look\s+if|make\s+"
                 r"(?:it\s+)?so\s+that|make\s+sure(?:\s+that)?|ensure(?:\s+that)?|so\s+that)\s+(?P<x>.+?)\s+(?P<v>were|"
                 r"was|is|are|became|becomes|become|had|has|have|got|looked|looks|look|wore|wears|could\s+be|would\s+be"
                 r"|were\s+to\s+be)\s+(?P<p>.+)$", s, re.I)
    if not m:
        return None
    verb = m["v"].lower()
    if verb in ("had", "has", "have", "got"):
        return f"give {m['x']} {m['p']}"
    if verb in ("wore", "wears"):
        return f"let {m['x']} wear {m['p']}"
    if verb.startswith("look") and not m["p"].lower().startswith("like"):
        return _be(m["x"], m["p"])
    if verb.startswith("look"):
        return f"make {m['x']} look {m['p']}"
    return _be(m["x"], m["p"])


def _modal(s: str) -> str | None:
    """'the lamp should be on' -> 'make the lamp on'; 'the man should have a beard' -> 'give the man a beard'; 'the
    cat should wear a bow tie' -> 'let the cat wear a bow tie'; 'the sign should not be there' -> 'remove the sign';
    'let the room be dark' -> 'make the room dark'."""
    m = re.match(rf"^(?:let\s+)?(?P<x>{SUBJECT}.*?)\s+(?:(?:{MODAL})\s+(?P<neg>not\s+)?(?P<be>be|become|"
                 rf"look|appear|seem|have|\w+)\b|(?P<let>be|become)\b)(?P<p>.*)$", s, re.I)
    if not m or (m["let"] and not s.lower().startswith("let ")):
        return None
    x, verb, p = m["x"], (m["be"] or m["let"]).lower(), m["p"].strip()
    if m["neg"]:
        if verb == "be" and re.fullmatch(r"(?:there|here|visible|in\s+the\s+\w+|present)?", p, re.I):
            return f"remove {x}"
        return f"remove {p} from {x}" if verb == "have" and p else None
    if verb in ("be", "become"):
        return _be(x, p)
    if verb in ("look", "appear", "seem"):
        return _be(x, re.sub(r"^to\s+be\s+", "", p, flags=re.I)) if not p.lower().startswith("like") else \
            f"make {x} look {p}"
    if verb == "have":
        return f"give {x} {p}"
    return f"let {x} {verb} {p}".strip()


def _instead(s: str) -> str:
    """'make the water blue instead of green' -> 'make the green water blue' (the old colour named so the plan drops
    it); 'put a dog on the sofa instead of the cat' -> 'replace the cat with a dog'."""
    s = re.sub(r"[\s,]+instead$", "", s, flags=re.I)
    m = re.match(r"^(?:instead\s+of|rather\s+than|in\s+place\s+of)\s+(?P<old>.+?),\s*(?P<main>.+)$", s, re.I) or \
        re.match(r"^(?P<main>.+?),?\s+(?:instead\s+of|rather\s+than|in\s+place\s+of)\s+(?P<old>.+)$", s, re.I)
    if not m:
        return s
    main, old = m["main"], m["old"]
    if all(w.lower() in ATTRIBUTES for w in old.split()):
        n = re.match(rf"^(?P<v>make|paint|colou?r|dye|turn|change)\s+(?P<d>{DET}\s+)?(?P<rest>.+)$", main, re.I)
        return f"{n['v']} {n['d'] or ''}{old} {n['rest']}" if n else s
    n = re.match(r"^(?:add|put|place|draw|paint|insert|use|have|show|make\s+it|make\s+it\s+into|turn\s+it\s+into|"
                 r"make\s+this|give\s+\w+(?:\s+\w+)?)\s+(?P<new>(?:a|an|some|one|two|three|\d+|the)\s+.+?)(?:\s+"
                 r"(?:on|in|at|to|next\s+to|by|near|there|here)\b.*)?$", main, re.I)
    new = n["new"] if n else main if re.match(r"^(?:a|an|some)\s", main, re.I) else None
    return f"replace {old} with {new}" if new else s


def _quantifiers(s: str) -> str:
    """'all (of) the people' -> 'the people'; 'every car' -> 'the cars' (adjectives before the noun kept)."""
    s = re.sub(r"\b(?:all|both)\s+(?:of\s+)?(?=the\b|his\b|her\b|their\b)", "", s, flags=re.I)
    s = re.sub(r"\ball\s+(?!the\b)(?=[a-z])", "the ", s, flags=re.I)

    def each(m: re.Match) -> str:
        words = m["np"].split()
        i = next((k for k, w in enumerate(words) if w.lower() not in ATTRIBUTES), len(words) - 1)
        words[i] = plural(words[i])
        return "the " + " ".join(words)

    return re.sub(r"\b(?:every|each)\s+(?:single\s+)?(?P<np>(?:\w+\s+){0,2}?\w+)\b(?=\s+(?:red|in|on|with|to|" +
                  "|".join(sorted(ATTRIBUTES)) + r")\b|\s*$)", each, s, flags=re.I)
