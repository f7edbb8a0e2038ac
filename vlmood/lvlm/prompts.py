"""LVLM prompts, read from the data files in ``prompts/lvlm/`` (the wording lives there, not in code).

Files: ``baseline.txt`` (classify into the ID classes + ``"none of these classes"`` with a 0-100 confidence per
class), ``reguide_stage1.txt`` / ``reguide_stage2.txt`` (ReGuide, Kim et al., ICLR 2025: suggest image-specific
outlier classes, then classify over ID + suggested classes) and ``envision_near.txt`` / ``envision_far.txt``
(outlier class names from a text LLM, after EOE, Cao et al., ICML 2024). Lines starting with ``#`` at the top of a
file are comments (the first names the source idea). Placeholders: ``{classes}`` (the class list), ``{n}`` (how many
names to suggest) and ``{none}`` (:data:`NONE_CLASS`); every other brace is literal text (the answer format's
``{"<class>": <value>}``).

Class names are listed one per line after ``"- "``, so quotes, braces, colons and commas in a name need no escaping
and can never be read as a placeholder (the template is filled in one pass). Names with a line break or another
control character are refused: they would split the list.
"""
from __future__ import annotations

import re
from functools import lru_cache
from typing import Sequence

from .._io import read_text
from .._paths import data_root
from ..errors import InvalidInputError

NONE_CLASS = "none of these classes"
"""The extra answer every classification prompt offers; its confidence never counts toward ``S_max``."""

ENVISION_KINDS = ("near", "far")
_PLACEHOLDER = re.compile(r"\{(classes|n|none)\}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f\u2028\u2029]")


@lru_cache(maxsize=None)
def load_template(name: str) -> str:
    """The text of ``prompts/lvlm/<name>.txt`` without its leading ``#`` comment lines."""
    lines = read_text(data_root("prompts") / "lvlm" / f"{name}.txt", "LVLM prompt").splitlines()
    while lines and lines[0].lstrip().startswith("#"):
        lines.pop(0)
    return "\n".join(lines).strip("\n")


def check_class_names(classes: Sequence[str], what: str = "class") -> list[str]:
    """``classes`` as a list of non-empty strings without line breaks or control characters (one-line error)."""
    if isinstance(classes, str) or not isinstance(classes, Sequence):
        raise InvalidInputError(f"{what} names must be a list of strings, got {type(classes).__name__}")
    out = []
    for k, c in enumerate(classes):
        if not isinstance(c, str) or not c.strip():
            raise InvalidInputError(f"{what} name {k + 1} is {c!r}: names must be non-empty strings")
        if _CONTROL.search(c):
            raise InvalidInputError(f"{what} name {k + 1} ({c!r}) contains a line break or control character; "
                                    "prompts list one name per line")
        out.append(c)
    return out


def format_class_list(classes: Sequence[str]) -> str:
    """One ``- name`` line per class, the names verbatim."""
    return "\n".join(f"- {c}" for c in check_class_names(classes))


def _render(name: str, **values: str) -> str:
    """Fill a template in one pass: inserted class names are never scanned for placeholders."""
    values = {"none": NONE_CLASS, **values}
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)] if m.group(1) in values else m.group(0), load_template(name))


def _check_n(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InvalidInputError(f"n must be a positive integer, got {n!r}")
    return n


def _check_no_none(classes: list[str]) -> list[str]:
    if any(c.strip().casefold() == NONE_CLASS for c in classes):
        raise InvalidInputError(f"{NONE_CLASS!r} cannot be a class name: every prompt offers it as the answer "
                                "for an image of none of the classes")
    return classes


def baseline_prompt(classes: Sequence[str]) -> str:
    """The baseline prompt: classify into ``classes`` + :data:`NONE_CLASS`, a confidence 0-100 for every class."""
    return _render("baseline", classes=format_class_list(_check_no_none(check_class_names(classes))))


def reguide_stage1(classes: Sequence[str], n: int) -> str:
    """ReGuide stage 1: ask for ``n`` visually similar and ``n`` dissimilar class names, none of ``classes``."""
    return _render("reguide_stage1", classes=format_class_list(classes), n=str(_check_n(n)))


def _canon_keys(name: str) -> set[str]:
    """The spelling-insensitive keys a name may collide under: case, ``-``/``_``/spacing ignored, and the forms
    without a plural ``s`` / ``es`` ("Teddy-Bear", "teddy  bear", "teddy bears" all share "teddy bear")."""
    base = " ".join(re.sub(r"[-_\s]+", " ", name.casefold()).split())
    keys = {base}
    for suffix in ("s", "es"):
        if base.endswith(suffix) and len(base) > len(suffix) + 1:
            keys.add(base[: -len(suffix)])
    return keys


def stage2_classes(classes: Sequence[str], suggested: Sequence[str]) -> list[str]:
    """``classes`` followed by the ``suggested`` names that are new: a name that restates an ID class, is
    :data:`NONE_CLASS` or repeats an earlier suggestion (ignoring case, ``-``/``_``/spacing and plural endings) is
    dropped, so no ID class is split over two spellings."""
    out = _check_no_none(check_class_names(classes))
    seen = set().union(*(_canon_keys(c) for c in out)) | {NONE_CLASS}
    for s in check_class_names(suggested, "suggested class"):
        keys = _canon_keys(s)
        if not keys & seen:
            seen |= keys
            out.append(s)
    return out


def reguide_stage2(classes: Sequence[str], suggested: Sequence[str]) -> str:
    """ReGuide stage 2: classify over the ID ``classes`` + the new ``suggested`` outlier names + :data:`NONE_CLASS`
    (the candidates are :func:`stage2_classes`; the model is not told which are ID)."""
    return _render("reguide_stage2", classes=format_class_list(stage2_classes(classes, suggested)))


def envision_prompt(classes: Sequence[str], n: int, kind: str) -> str:
    """A text-only prompt asking for ``n`` outlier class names for the ID ``classes``: ``kind="near"`` (similar or
    related, but none of them) or ``"far"`` (unrelated)."""
    if kind not in ENVISION_KINDS:
        raise InvalidInputError(f"kind must be 'near' or 'far', got {kind!r}")
    return _render(f"envision_{kind}", classes=format_class_list(classes), n=str(_check_n(n)))


_BULLET = re.compile(r"^\s*(?:(?:[-*\u2022+]|\d{1,3}[.)]|\(\d{1,3}\))\s*)+")
_HEADER = re.compile(r"^\s*\**\s*(?:visually\s+)?(dis)?similar(?:\s+class(?:es|\s+names?)?)?\s*\**\s*:\s*", re.I)
_SENTENCE = re.compile(r"\b(?:i|i'm|i am|sorry|cannot|can't|unable|here are|here is|you)\b", re.I)
_CHAT_TOKEN = re.compile(r"<\|[^|>]{0,40}\|>|</?s>|\[/?INST\]")


def _clean_name(text: str) -> str:
    name = _BULLET.sub("", text).strip().strip("*_`").strip()
    if len(name) >= 2 and name[0] == name[-1] and name[0] in "\"'":
        name = name[1:-1].strip()
    return name.rstrip(".,;").strip()


def parse_suggestions(text: str | None, classes: Sequence[str], n: int | None = None) -> list[str]:
    """Outlier class names from a ReGuide stage-1 (or envision) answer: one name per line, bullets / numbering /
    quotes / chat-template tokens removed, ``Similar: a, b`` header lines split on commas, header-only lines and
    sentences (``?``, ``!``, first person, "sorry", "cannot"..., more than 6 words) skipped, ID class names (also
    with a trailing ``s``) and repeats dropped (case-insensitive); at most ``2 n`` names (``n`` similar + ``n``
    dissimilar) when ``n`` is given.
    Never raises: an unusable answer gives ``[]``."""
    if not text:
        return []
    ids = set().union(*(_canon_keys(c) for c in classes)) | {NONE_CLASS} if classes else {NONE_CLASS}
    out: list[str] = []
    seen: set[str] = set()
    for line in _CHAT_TOKEN.sub("\n", text).splitlines():
        m = _HEADER.match(_BULLET.sub("", line))
        parts = _BULLET.sub("", line)[m.end():].split(",") if m else [line]
        for part in parts:
            name = _clean_name(part)
            keys = _canon_keys(name)
            if (not name or name.endswith(":") or any(ch in name for ch in "?!{}") or _CONTROL.search(name)
                    or _SENTENCE.search(name) or len(name.split()) > 6 or len(name) > 80 or keys & ids or keys & seen):
                continue
            seen |= keys
            out.append(name)
    return out[: 2 * n] if n is not None else out
