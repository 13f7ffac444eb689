"""Surface noise for generated questions: casing, a question mark, keyboard typos.

Noise never changes an answer: typos touch only words of 4+ letters (not numbers, units,
postcodes or and/or/not).
"""

from __future__ import annotations

import random
import re

_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm")


def _keyboard_neighbours() -> dict[str, str]:
    # Rows are staggered: the row below sits half a key right, so its neighbours are c-1 and c.
    out: dict[str, str] = {}
    for r, row in enumerate(_ROWS):
        for c, ch in enumerate(row):
            near = [row[i] for i in (c - 1, c + 1) if 0 <= i < len(row)]
            if r > 0:
                near += [_ROWS[r - 1][i] for i in (c, c + 1) if i < len(_ROWS[r - 1])]
            if r < 2:
                near += [_ROWS[r + 1][i] for i in (c - 1, c) if 0 <= i < len(_ROWS[r + 1])]
            out[ch] = "".join(near)
    return out


KEYBOARD_NEIGHBOURS = _keyboard_neighbours()
TYPO_KINDS = ("neighbour", "missing", "double")
# Only words of 4+ letters get typos: numbers, units (kw/MW), postcodes and and/or/not stay
# intact, so a typo can never change the answer.
_TYPO_WORD = re.compile(r"[A-Za-z]{4,}")


def add_typo(text: str, rng: random.Random, kind: str | None = None) -> str:
    """One keyboard-neighbour substitution, missing letter or doubled letter in one word."""
    words = list(_TYPO_WORD.finditer(text))
    if not words:
        return text
    m = rng.choice(words)
    word, i = m.group(), rng.randrange(len(m.group()))
    kind = kind or rng.choice(TYPO_KINDS)
    if kind == "neighbour":
        sub = rng.choice(KEYBOARD_NEIGHBOURS[word[i].lower()])
        new = word[:i] + (sub.upper() if word[i].isupper() else sub) + word[i + 1 :]
    elif kind == "missing":
        new = word[:i] + word[i + 1 :]
    elif kind == "double":
        new = word[:i] + word[i] + word[i:]
    else:
        raise ValueError(f"unknown typo kind {kind!r}")
    return text[: m.start()] + new + text[m.end() :]


_QUESTION_STARTS = ("how", "what", "which", "where", "are", "is", "do")


def restyle(question: str, rng: random.Random) -> str:
    """Casing as users type it (mostly lower case, some capitalised or shouted), often a '?'."""
    r = rng.random()
    if r < 0.55:
        question = question.lower()
    elif r < 0.75:
        question = question[0].upper() + question[1:]
    elif r < 0.78:
        question = question.upper()
    if question.split()[0].lower() in _QUESTION_STARTS and rng.random() < 0.7:
        question += "?"
    return question
