"""What the Instruction node produces (MGIE's expressive instruction; the learnable-regions paper's t_o, t_e), and its strict JSON form.

  source description  t_o: what the source image shows (the PFB source branch's prompt)
  target description  t_e: what the edited image shows (the sampler's and CAM's prompt)
  edit words          phrases of t_e that may act only inside the edit region (CAM)
  background words    phrases of t_e kept out of the region (CAM)
  edit type           add | remove | replace | attribute | global
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass

from ..errors import XMGIEInputError

EDIT_TYPES = ("add", "remove", "replace", "attribute", "global")
FIELDS = ("expressive_instruction", "source_description", "target_description", "edit_words", "background_words",
          "edit_type")
"""The keys a model backend must answer with, no more and no fewer."""


@dataclass(frozen=True)
class EditPlan:
    instruction: str
    expressive_instruction: str
    source_description: str
    target_description: str
    edit_words: tuple[str, ...]
    background_words: tuple[str, ...]
    edit_type: str
    backend: str = "rules"
    note: str = ""
    """Anything the user should know about how the plan was made (e.g. a model answer that was not used)."""

    def __post_init__(self) -> None:
        if self.edit_type not in EDIT_TYPES:
            raise ValueError(f"edit_type {self.edit_type!r} is not one of {', '.join(EDIT_TYPES)}")
        if not self.target_description.strip():
            raise ValueError("the target description is empty")
        if not self.edit_words:
            raise ValueError("there are no edit words")
        target = self.target_description.lower()
        for word in (*self.edit_words, *self.background_words):
            if not word.strip() or "," in word or word.lower() not in target:
                raise ValueError(f"the word {word!r} is not a phrase of the target description "
                                 f"{self.target_description!r}")
        if set(w.lower() for w in self.edit_words) & set(w.lower() for w in self.background_words):
            raise ValueError("a phrase is both an edit word and a background word")

    def to_json(self) -> str:
        data = asdict(self)
        data["edit_words"], data["background_words"] = list(self.edit_words), list(self.background_words)
        return json.dumps(data, ensure_ascii=False)

    @classmethod
    def from_model_output(cls, text: str, instruction: str, backend: str) -> "EditPlan":
        """Strict parse of a model's answer: one JSON object with exactly FIELDS (strings; lists of strings for
        the words), every word a phrase of the target description. Raises ValueError saying what is wrong."""
        try:
            data = json.loads(text.strip())
        except json.JSONDecodeError as e:
            raise ValueError(f"the answer is not JSON ({e.msg} at character {e.pos})") from None
        if not isinstance(data, dict):
            raise ValueError("the answer is not a JSON object")
        if set(data) != set(FIELDS):
            missing, extra = sorted(set(FIELDS) - set(data)), sorted(set(data) - set(FIELDS))
            raise ValueError(f"the answer's keys are wrong (missing {missing}, unexpected {extra})")
        for key in FIELDS:
            value = data[key]
            if key.endswith("_words"):
                if not isinstance(value, list) or not all(isinstance(w, str) for w in value):
                    raise ValueError(f"{key} is not a list of strings")
            elif not isinstance(value, str):
                raise ValueError(f"{key} is not a string")
        return cls(instruction, data["expressive_instruction"].strip(), data["source_description"].strip(),
                   data["target_description"].strip(), tuple(w.strip() for w in data["edit_words"]),
                   tuple(w.strip() for w in data["background_words"]), data["edit_type"].strip(), backend)


CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
"""Control characters other than tab / newline / carriage return, and bidirectional overrides: never prompt text."""


def clean_instruction(text: str, max_chars: int = 500) -> str:
    """One line, single spaces; an empty or overlong instruction, or one holding a control character, is a user
    error."""
    control = CONTROL.search(text)
    if control:
        raise XMGIEInputError(f"The instruction holds the control character U+{ord(control[0]):04X} at character "
                              f"{control.start()}; control characters would go into the prompts. Type the instruction "
                              "as plain text, e.g. 'give the man a red scarf'.")
    cleaned = " ".join(text.split())
    if not cleaned:
        raise XMGIEInputError("The instruction is empty: write what to change, e.g. 'give the man a red scarf'.")
    if len(cleaned) > max_chars:
        raise XMGIEInputError(f"The instruction is {len(cleaned)} characters long; write one edit in one sentence "
                              f"of at most {max_chars} characters, e.g. 'replace the cookies with candles'.")
    return cleaned
