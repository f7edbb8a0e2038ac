"""Parse an LVLM's classification answer into per-class confidences: :func:`parse_response`.

The prompts ask for ``Prediction: <class>`` then ``Confidence: {"<class>": <value>, ...}`` (0-100 per class,
``"none of these classes"`` included), but real answers deviate. Handled: JSON or Python-dict confidences, quoted,
unquoted or brace/bracket-wrapped keys (``{cat}: 80``), percent signs, ``x/100`` or ``x/10`` values, values as strings
(``"85%"``), exponents (``8e1``), fractions (every value <= 1 with a decimal point: scaled to 0-100), several answers
in one response (the complete one listing the most classes is used; ties: the one after a ``Confidence:`` label, then
the last; a repeated key does not start a new answer), a dict cut off by the token limit, case differences, plural
replies (``cats`` -> ``cat``; never ``glass`` -> ``glasses``), stray punctuation and markdown, one lost leading letter
(``at`` -> ``cat``: only when exactly one class fits, the answer lists every other class and the name is a key, never
a stated prediction, so ``owl`` is not ``bowl``), chat-template
tokens (``<|im_end|>``, ``</s>``, ``<|eot_id|>``, ``[INST]``...; text after an end-of-turn token is dropped),
``<think>...</think>`` blocks, refusals, descriptions without numbers, every confidence 0, confidences on classes
outside the list (ignored, named in ``reason``) and class names that contain the format's delimiters (quotes, colons,
braces, commas: a key is matched against the class names longest first, so ``"a, b: c": 70`` is the class
``a, b: c``; a class name inside a longer word is not a key: ``sea-lion`` is not ``lion``, a ``-`` starts a key only
as a bullet at a line start or after a space). A stated prediction that starts with a class name counts only when
punctuation or a number follows (``cat (95%)``, not ``house cat`` -> ``house``). Nothing raises for any text; a malformed ``classes`` argument is a usage error
(:class:`~vlmood.errors.InvalidInputError`).

Statuses (:data:`STATUSES`); :data:`VALID_STATUSES` are those that can be valid, and ``ParsedResponse.valid`` is the
authority (two of them are valid only under a condition):

=============== ===== ====================================================================================
status          valid meaning
=============== ===== ====================================================================================
complete        yes   a confidence for every class in ``classes``
partial         yes   confidences for some classes, the list not cut off (missing classes are absent)
truncated       cond. the list was cut off (unclosed ``{``, or text ending in ``, "ke`` / ``:``); the complete
                      entries are kept and an entry whose number touches the end of the text is dropped (it may
                      be cut: ``"dog": 1`` of ``15``). Valid only when the kept entries decide ``S_max``: a kept
                      confidence is 100, or the stated prediction is an ID class whose kept confidence is the
                      highest kept one
single_value    cond. one number not attached to a class (``Confidence: 85``, ``... 90% sure``); valid when the
                      stated prediction is an ID class (it gets the number)
none_of_these   yes   the answer is "none of these classes": stated (``Prediction: none of these classes``,
                      ``None of the above``) or the strictly highest confidence, with no positive ID-class
                      confidence; or every ID class given with confidence 0 (an all-zero answer means
                      none-of-these); or the none label is the only listed class given (``{"owl": 93,
                      "none of these classes": 7}``: owl is not listed, so OOD). ``S_max`` = 0
bad_value       no    a listed class is written with a value that is not a number (``NaN``, ``"high"``, ``null``):
                      ``S_max`` is unknown, so the answer is invalid whichever class it is (the readable values
                      are kept in ``confidences``, the reason names the class)
prediction_only no    a stated prediction (an ID class, or a name not in the list) without any number
refusal         no    no answer, and the text refuses ("I'm sorry, I can't ...", "As an AI ..."). A refusal
                      phrase beside an answer is ignored (the answer is parsed)
no_confidence   no    text without class confidences (a description, numbers not tied to class names)
off_list        no    confidences only for names that are not in ``classes``
empty           no    None, non-text, or only whitespace / punctuation / chat-template tokens
parse_error     no    an internal parser error (never expected; the reason names it)
=============== ===== ====================================================================================

``prediction`` is a name from ``classes`` or None: None when the answer is "none of these classes" (the reason says
so), when no class can be named, or when a truncated answer is undecided and states no prediction. A stated ``Prediction:`` wins over the
highest confidence (a disagreement is noted in ``reason``); without one it is the class with the highest confidence
(ties: the first in class order; the none label wins only when strictly highest).

The literal label ``"none of these classes"`` may be in ``classes`` (the detector passes it): then its confidence is
kept in ``confidences`` like any class, but it never counts as an ID class (completeness aside) and ``prediction`` is
None when it is the answer. Its confidence is also in ``ParsedResponse.none_confidence`` either way.

Cost: one regex pass over the text and a few dict look-ups per entry (a suffix look-up per distinct class-name
length), so a full answer over 1000 classes parses in about 0.04 s (4000: 0.06 s); the class index is built once per class list (LRU cache).
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Iterable, Sequence

from ..errors import InvalidInputError

NONE_LABEL = "none of these classes"
"""The extra answer of every classification prompt (``vlmood.lvlm.prompts.NONE_CLASS``)."""

STATUSES = ("complete", "partial", "truncated", "single_value", "none_of_these", "bad_value", "prediction_only",
            "refusal", "no_confidence", "off_list", "empty", "parse_error")
VALID_STATUSES = frozenset({"complete", "partial", "truncated", "single_value", "none_of_these"})
"""Statuses that can be valid; ``truncated`` and ``single_value`` are valid only under the conditions in the module
doc, so use ``ParsedResponse.valid``."""


@dataclass
class ParsedResponse:
    """One parsed answer. ``confidences``: class name (exactly as in ``classes``) -> 0-100, missing classes absent;
    ``prediction``: a class name or None; ``valid``; ``status`` (see :data:`STATUSES`); ``reason``: one line saying
    what was read and what was ignored or repaired; ``none_confidence``: the "none of these classes" value if given."""

    confidences: dict[str, float]
    prediction: str | None
    valid: bool
    status: str
    reason: str
    none_confidence: float | None = None


# ----------------------------------------------------------------------------------------------- text clean-up
_END_TOKENS = re.compile(r"<\|(?:im_end|eot_id|endoftext|end|eom_id)\|>|</s>|<end_of_turn>|<eos>|<\|END_OF_TURN_TOKEN\|>",
                         re.I)
_TOKENS = re.compile(r"<\|[^|<>\n]{1,40}\|>|</?s>|\[/?INST\]|<</?SYS>>|<(?:start|end)_of_turn>|<(?:eos|bos|pad|unk)>"
                     r"|</?think>|</?answer>", re.I)
_THINK = re.compile(r"<think>.*?</think>", re.I | re.S)
_ROLE = re.compile(r"^\s*(?:assistant|model|gpt|bot)\s*:?[ \t]*(?:\n|$)", re.I)
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ufffd\ufeff\u200b-\u200d]")
_QUOTES = str.maketrans({"\u201c": '"', "\u201d": '"', "\u201e": '"', "\u2018": "'", "\u2019": "'", "\u00ab": '"',
                         "\u00bb": '"', "\u2032": "'"})
_REFUSAL = re.compile(r"\b(?:i'?\s*a?m\s+sorry|i\s+apologi[sz]e|sorry,|as\s+an\s+ai\b|i\s+(?:can\s*not|can'?t|cannot|"
                      r"am\s+(?:not\s+able|unable)|'m\s+(?:not\s+able|unable)|won'?t|do\s+not|don'?t)\s+(?:help|assist|"
                      r"provide|identify|classify|determine|see|view|analy[sz]e|process|comply|answer|tell|recogni[sz]e|"
                      r"access|make|do\s+that)|unable\s+to\s+(?:help|assist|identify|classify|determine|see|view|"
                      r"analy[sz]e|process|answer))", re.I)
_LABEL = re.compile(r"(?im)^[ \t>*#\-\u2022]*(?:\*\*|__)?[ \t]*(?:final[ \t]+|my[ \t]+)?(?:prediction|predicted[ \t]+class|"
                    r"predicted|answer|classification|class|label|category)[ \t]*(?:\*\*|__)?[ \t]*[:=][ \t]*"
                    r"(?:\*\*|__)?(?P<val>[^\n]*)")

_NUM = r"[-+]?(?:\d+(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+)?"  # 8e1 = 80
_ENTRY = re.compile(
    r"(?:[ \t]*(?:[:=|]|->|=>|[ \t][-\u2013\u2014][ \t]|\()[ \t*_]*|[ \t]+(?=" + _NUM + r"[ \t]*(?:%|percent\b)))"
    r"(?P<q>[\"']?)[ \t]*(?P<num>" + _NUM + r")[ \t]*(?P<pct>%|percent\b)?"
    r"(?:[ \t]*/[ \t]*(?P<den>100|10|1)(?![\d.]))?[ \t]*(?P=q)"
    r"(?!\w|\.\d|[\"']?[ \t]*[:=])", re.I)
_CONF_LABEL = re.compile(r"(?i)\bconfidences?[ \t]*(?:\*\*|__)?[ \t]*[:=]")
_BADVAL = re.compile(r"(?P<q>[\"'`*]*)(?P<key>[^\"'`*{}\[\],;:=\n]{1,80})(?P=q)[ \t]*[:=][ \t]*"
                     r"(?P<val>\"[^\"\n]{0,30}\"|'[^'\n]{0,30}'|[^\W\d_][\w/.-]{0,20})")
_KV_LINE = re.compile(r"[ \t]*[-*\u2022]?[ \t]*[\"'`*]*[^:\n]{1,60}[\"'`*]*[ \t]*[:=][^\n]{0,30}(?:\n|$)")
_WS_SEP = re.compile(r"^[ \t]+(?=[-+.\d])")  # an entry found by the "name 85%" rule (no separator character)

_STRUCT = set("{[(,;:|<\n-\u2022.")  # what may precede a key
_KEY_TRAIL = " \t*`_"
_WRAP = {"}": "{", "]": "[", ")": "(", ">": "<"}
_LABEL_WORDS = re.compile(r"\b(?:confidence|confidences|probability|probabilities|certainty|score|scores|likelihood)\b")
_NONE_KEYS = re.compile(r"^(?:none|none of (?:these|the|them|those|above)\b.*|none of these classes|no class(?:es)?|"
                        r"neither|not any of (?:these|the|them)\b.*|other|others)$")


def _lower(s: str) -> str:
    """Lower case with the same length as ``s`` (positions stay aligned)."""
    low = s.lower()
    if len(low) == len(s):
        return low
    return "".join(c if len(c.lower()) != 1 else c.lower() for c in s)


def _canon(s: str) -> str:
    """Case-, punctuation- and space-insensitive form of a name."""
    return " ".join(re.sub(r"[\W_]+", " ", _lower(s)).split())


def _singulars(c: str) -> list[str]:
    """Candidate singular forms of a canonical name's last word (cats -> cat, boxes -> box, berries -> berry)."""
    if len(c) < 4 or c[-1] != "s" or c.endswith("ss") or not c[-2].isalpha():
        return []
    out = [c[:-1]]
    if c.endswith("es"):
        out.append(c[:-2])
    if c.endswith("ies"):
        out.append(c[:-3] + "y")
    return out


def _clean_text(text: Any) -> tuple[str, list[str]]:
    notes: list[str] = []
    if text is None:
        return "", notes
    if isinstance(text, (bytes, bytearray, memoryview)):
        text = bytes(text).decode("utf-8", errors="replace")
        notes.append("decoded bytes as UTF-8")
    elif not isinstance(text, str):
        return "", [f"not text ({type(text).__name__})"]
    text = unicodedata.normalize("NFKC", text).translate(_QUOTES)
    text = _CONTROL.sub("", text).replace("\r\n", "\n").replace("\r", "\n")
    text = text.replace('\\"', '"').replace("\\'", "'").replace("\\n", "\n")
    if _THINK.search(text):
        text = _THINK.sub(" ", text)
        notes.append("removed a <think> block")
    for m in _END_TOKENS.finditer(text):
        before = _TOKENS.sub("", text[:m.start()])
        if re.search(r"\w", before):
            if re.search(r"\w", _TOKENS.sub("", text[m.end():])):
                notes.append("dropped the text after an end-of-turn token")
            text = text[:m.start()]
            break
    text, n = _TOKENS.subn(" ", text)
    if n:
        notes.append("removed chat-template tokens")
    text = _ROLE.sub("", text)
    return text, notes


# ----------------------------------------------------------------------------------------------- class index
class _Index:
    """Look-ups from answer keys to class names, built once per class list."""

    def __init__(self, classes: tuple[str, ...]):
        self.classes = classes
        self.order = {c: i for i, c in enumerate(classes)}
        self.none_class = next((c for c in classes if _canon(c) == NONE_LABEL), None)
        self.ids = [c for c in classes if c != self.none_class]
        self.by_len: dict[int, dict[str, str | None]] = {}
        self.canon: dict[str, str | None] = {}
        self.single: dict[str, str | None] = {}
        self.drop1: dict[str, str | None] = {}
        for c in classes:
            low = _lower(unicodedata.normalize("NFKC", c).translate(_QUOTES))
            exact = self.by_len.setdefault(len(low), {})
            exact[low] = c if exact.get(low, c) == c else None  # None: ambiguous ("Cat" and "cat")
            k = _canon(c)
            self.canon[k] = c if self.canon.get(k, c) == c else None
            self.single[k] = c if self.single.get(k, c) == c else None  # a reply's plural -> a singular class only
        for c in classes:
            k = _canon(c)
            if len(k) >= 3 and k[0].isalpha():
                key = k[1:]
                self.drop1[key] = c if self.drop1.get(key, c) == c else None
        self.lengths = sorted(self.by_len, reverse=True)

    def fuzzy(self, token: str, quoted: bool = True, lost: bool = True) -> tuple[str, str | None, str]:
        """``(kind, class, note)`` for a cleaned key: kind ``class`` / ``none`` / ``label`` / ``lost`` / ``off`` /
        ``junk``. ``lost``: the name is a class with its first letter lost (``at`` -> ``cat``), kept only when the
        answer lists every other class (decided in :func:`_from_group`; never for a stated prediction). An unknown
        name counts as a key (``off``) when quoted (<= 8 words) or short (<= 3 words, not ending in a number);
        longer unquoted text before a number is prose, not a key."""
        k = _canon(token)
        if not k:
            return "junk", None, ""
        keys = [("", self.canon, k)] + [("plural", self.single, x) for x in [k] + _singulars(k)]
        for how, table, key in keys:
            if key in table:
                c = table[key]
                if c is None:
                    return "off", token, f"ambiguous name {token!r}"
                if c == self.none_class:
                    return "none", c, ""
                return "class", c, (f"read {token!r} as {c!r}" if how else "")
        if _NONE_KEYS.match(k):
            return "none", self.none_class, ""
        if _LABEL_WORDS.search(k) or k in ("prediction", "answer", "value"):
            return "label", None, ""
        if lost and len(k) >= 2 and k.replace(" ", "").isalpha() and k in self.drop1 and k not in self.single:
            c = self.drop1[k]
            if c is not None:
                return "lost", c, f"read {token!r} as {c!r} (lost first letter; every other class listed)"
        words = k.split()
        if re.search(r"[^\W\d_]", k) and len(k) <= 80 and (len(words) <= 8 if quoted else
                                                          len(words) <= 3 and not words[-1].isdigit()):
            return "off", token.strip(), ""
        return "junk", None, ""

    def suffix(self, low: str, end: int, floor: int) -> int:
        """Length of the longest class name (lower case) that ends at ``low[end]`` and starts at a word boundary;
        0 when none (or when the name is ambiguous). The caller checks what precedes it."""
        for n in self.lengths:
            start = end - n
            if start < 0:
                continue
            hit = self.by_len[n].get(low[start:end], 0)
            if hit == 0:
                continue
            if hit is None:
                return 0
            if start > 0 and low[start - 1].isalnum() and low[start].isalnum():
                continue
            return n
        return 0

    def prefix(self, low: str) -> str | None:
        """The longest class name that ``low`` starts with, followed by nothing, punctuation or a number (``cat (95%)``,
        ``cat - 90``; not ``house cat`` -> ``house`` nor ``dog house`` -> ``dog``)."""
        for n in self.lengths:
            if n > len(low):
                continue
            hit = self.by_len[n].get(low[:n])
            rest = low[n:].lstrip()
            if hit and (not rest or not (rest[0].isalpha() or low[n - 1].isalnum() and low[n].isalnum())):
                return hit
        return None


@lru_cache(maxsize=32)
def _index(classes: tuple[str, ...]) -> _Index:
    return _Index(classes)


def _check_classes(classes: Any) -> tuple[str, ...]:
    if isinstance(classes, (str, bytes)) or not isinstance(classes, Iterable):
        raise InvalidInputError(f"classes must be a list of class names, got {type(classes).__name__}")
    out = tuple(classes)
    if not out:
        raise InvalidInputError("classes is empty: give at least one class name")
    bad = [c for c in out if not isinstance(c, str) or not c.strip()]
    if bad:
        raise InvalidInputError(f"class names must be non-empty strings, got {bad[0]!r}")
    seen: set[str] = set()
    for c in out:
        if c in seen:
            raise InvalidInputError(f"duplicate class name {c!r}")
        seen.add(c)
    return out


# ----------------------------------------------------------------------------------------------- entries
@dataclass
class _Entry:
    kind: str  # class | none | off | label
    name: str | None
    value: float
    raw: str
    key_start: int
    end: int
    frac: bool  # written with a decimal point and no % sign
    token: str = ""  # the key as written (for a ``lost`` entry that falls back to ``off``)


def _resolve_key(text: str, low: str, ix: _Index, floor: int, pos: int,
                 prev_end: int) -> tuple[str, str | None, int, str, str]:
    """``(kind, name, key_start, note, token)`` of the key that ends just before ``pos`` (the separator)."""
    end = pos
    while end > floor and text[end - 1] in _KEY_TRAIL:
        end -= 1
    ends = [end]  # candidate key ends: peel closing quotes / wrapping brackets one at a time
    wraps: list[str] = []
    e = end
    while e > floor and len(ends) < 5 and text[e - 1] in "\"'}])>*`":
        if text[e - 1] in _WRAP:
            wraps.append(_WRAP[text[e - 1]])
        e -= 1
        ends.append(e)
    # 1. exact (case-insensitive) class name, longest first, preceded by a delimiter
    for e in ends:
        n = ix.suffix(low, e, floor)
        if not n:
            continue
        start = e - n
        j = _skip_back(text, start, wraps)
        if j <= max(floor, 0) or j <= prev_end or text[j - 1] in _STRUCT and (
                text[j - 1] != "-" or j < 2 or text[j - 2].isspace()):  # '-' is a bullet, not "sea-lion"
            name = ix.by_len[n][low[start:e]]
            kind = "none" if name == ix.none_class else "class"
            return kind, name, j, "", name
    # 2. the key token (quoted string, or text after the last delimiter), matched loosely
    floor = max(floor, prev_end)
    e = end
    while e > floor and text[e - 1] in "}])>*`":
        e -= 1
    q = text[e - 1] if e > floor and text[e - 1] in "\"'" else None
    if q:
        s = text.rfind(q, floor, e - 1)
        token, start = text[max(s, floor - 1) + 1:e - 1], max(s, floor)
    else:
        s = max(max(text.rfind(ch, floor, e) for ch in "{[(,;:|\n"), floor - 1)
        token, start = text[s + 1:e], s + 1
    start = _skip_back(text, start, wraps, quotes=False)
    token = re.sub(r"^\s*(?:\d+[.)]\s+|[-*\u2022#>]+\s*)", "", token).strip(" \t\n*`_\"'-{}[]<>()")
    kind, name, note = ix.fuzzy(token, quoted=q is not None)
    return kind, name, max(start, floor), note, token


def _skip_back(text: str, j: int, wraps: list[str], quotes: bool = True) -> int:
    """Move a key start back over quotes, markdown and the opening brackets that wrap it (``{cat}``)."""
    skip = " \t\"'*`_" if quotes else " \t"
    todo = list(wraps)
    while j > 0:
        ch = text[j - 1]
        if ch in skip:
            j -= 1
        elif todo and ch == todo[0]:
            todo.pop(0)
            j -= 1
        else:
            break
    return j


def _entries(text: str, low: str, ix: _Index) -> list[_Entry]:
    out: list[_Entry] = []
    prev_end = 0
    maxlen = ix.lengths[0] + 4
    for m in _ENTRY.finditer(text):
        pos = m.start()
        floor = max(0, min(prev_end, pos - maxlen))
        # a key can reach back over a previous "entry" that was part of a name with a delimiter ("a:1 b": 40)
        kind, name, kstart, note, token = _resolve_key(text, low, ix, floor, pos, prev_end)
        if _WS_SEP.match(m.group(0)) and kind not in ("class", "none"):
            kind = "label"  # "... 90%": a percentage in prose is a confidence value, not a key
        elif kind == "junk":
            kind = "free"
        if kind in ("class", "none"):
            while out and out[-1].end > kstart:
                out.pop()
        num = float(m.group("num"))
        if m.group("den"):
            num = num / float(m.group("den")) * 100.0
        frac = ("." in m.group("num") or "e-" in m.group("num").lower()) and not m.group("pct") and not m.group("den")
        out.append(_Entry(kind, name, num, note, kstart, m.end(), frac, token))
        prev_end = m.end()
    return out


@dataclass
class _Group:
    entries: list[_Entry]
    start: int
    opened: bool
    closed: bool = False
    truncated: bool = False
    dropped: _Entry | None = None
    seen: set | None = None
    repeat: bool = False  # began with a key repeated from the previous group (same dict)


def _groups(text: str, entries: list[_Entry]) -> list[_Group]:
    groups: list[_Group] = []
    cur: _Group | None = None
    prev_end = 0
    for e in entries:
        if e.kind in ("label", "free"):
            prev_end = e.end
            continue
        between = text[prev_end:e.key_start]
        opened = "{" in between
        closed = "}" in between
        label = cur is not None and _LABEL.search(between) is not None
        repeat = cur is not None and e.kind in ("class", "none") and (e.kind, e.name) in (cur.seen or ())
        if cur is None or opened or closed or label or repeat:
            inherit = False
            if cur is not None:
                cur.closed = closed and between.rfind("}") < (between.rfind("{") if opened else len(between))
                inherit = repeat and not (opened or closed or label)  # {"cat": 95, "dog": 3, "cat": 10}
                if cur.opened and not cur.closed and not inherit:
                    cur.truncated = True  # abandoned: a new answer began before this one closed
            cur = _Group([], e.key_start, inherit and cur.opened or opened and between.rfind("{") > between.rfind("}"),
                         seen=set(), repeat=inherit)
            groups.append(cur)
        cur.entries.append(e)
        cur.seen.add((e.kind, e.name))
        prev_end = e.end
    if cur is not None:
        tail = text[cur.entries[-1].end:]
        if cur.opened:
            cur.closed = "}" in tail
            cur.truncated = not cur.closed
        else:
            t = tail.rstrip()
            cur.truncated = bool(t) and (t[-1] in ",:=" or re.fullmatch(r"\s*,\s*[\"']?[^\"'\n.!?]*", t) is not None)
        if cur.truncated and not tail.strip(" \t\n%\"'"):
            cur.dropped = cur.entries.pop()  # its number touches the end of the text: it may be cut
    return groups


# ----------------------------------------------------------------------------------------------- prediction
def _prediction(value: str, ix: _Index) -> tuple[str, str | None, str]:
    """``(kind, name, note)`` for a stated prediction: kind ``class`` / ``none`` / ``off``."""
    v = re.split(r"(?i)\bconfidences?\b|\{", value)[0]
    v = re.sub(r"\([^)]*\)\s*$", "", v.strip())
    v = v.strip(" \t*`_\"'[]{}<>").rstrip(".!,;: \t").strip(" \t*`_\"'[]{}<>")
    if not v:
        return "off", None, ""
    kind, name, note = ix.fuzzy(v, lost=False)
    if kind in ("class", "none"):
        return kind, name, note
    low = _lower(v)
    hit = ix.prefix(low)
    if hit is not None:
        return ("none" if hit == ix.none_class else "class"), hit, ""
    if _NONE_KEYS.match(_canon(v)) or _canon(v).startswith("none of"):
        return "none", ix.none_class, ""
    return "off", v[:40], ""


def _stated(text: str, ix: _Index, lo: int, hi: int, after: int) -> tuple[str, str | None, str] | None:
    """The last ``Prediction:`` line in ``[lo, hi)``, else the first in ``[hi, after)``."""
    found = [m for m in _LABEL.finditer(text) if lo <= m.start() < after]
    before = [m for m in found if m.start() < hi]
    pick = before[-1] if before else (next((m for m in found if m.start() >= hi), None))
    if pick is None:
        return None
    got = _prediction(pick.group("val"), ix)
    return got if got[1] is not None or got[0] == "none" else None


def _fmt(v: float) -> str:
    return f"{v:g}"


def _names(xs: list[str], k: int = 3) -> str:
    shown = ", ".join(repr(x) for x in xs[:k])
    return shown + (f" (+{len(xs) - k} more)" if len(xs) > k else "")


# ----------------------------------------------------------------------------------------------- main
def parse_response(text: Any, classes: Sequence[str]) -> ParsedResponse:
    """Parse one LVLM answer over ``classes`` (see the module doc for the statuses and rules).

    Never raises for any ``text`` (None, bytes, junk); raises :class:`~vlmood.errors.InvalidInputError` when
    ``classes`` is not a non-empty list of distinct non-empty strings.
    """
    ix = _index(_check_classes(classes))
    try:
        return _parse(text, ix)
    except Exception as e:  # pragma: no cover - a bug; the caller still gets an invalid response, not a crash
        return ParsedResponse({}, None, False, "parse_error", f"parser error: {type(e).__name__}: {e}")


def _result(status: str, valid: bool, notes: list[str], conf: dict[str, float] | None = None,
            pred: str | None = None, none_conf: float | None = None) -> ParsedResponse:
    return ParsedResponse(conf or {}, pred, valid, status, "; ".join(n for n in notes if n), none_conf)


def _parse(raw: Any, ix: _Index) -> ParsedResponse:
    text, notes = _clean_text(raw)
    if not re.search(r"\w", text):
        what = "no response (None)" if raw is None else "empty response"
        return _result("empty", False, [what] + notes)
    low = _lower(text)
    entries = _entries(text, low, ix)
    groups = [g for g in _groups(text, entries) if g.entries or g.dropped]
    free = [e for e in entries if e.kind in ("label", "free")]

    if groups:
        done = [i for i, g in enumerate(groups) if not g.truncated and any(e.kind != "off" for e in g.entries)]
        ends = [gr.entries[-1].end if gr.entries else gr.start for gr in groups]

        def rank(i: int) -> tuple[int, bool, int]:  # most listed classes, then after a "Confidence:" label, last
            listed = {(e.kind, e.name) for e in groups[i].entries if e.kind in ("class", "none", "lost")}
            return len(listed), _CONF_LABEL.search(text, ends[i - 1] if i else 0, groups[i].start) is not None, i
        gi = max(done, key=rank) if done else len(groups) - 1
        g = groups[gi]
        if len(groups) > 1:
            how = ("last one" if not done else "last complete one" if gi == done[-1]
                   else "complete one with the most listed classes")
            notes.insert(0, f"{len(groups)} confidence lists in the response; used the {how} (#{gi + 1})")
            if gi + 1 < len(groups) and groups[gi + 1].repeat or g.repeat:
                notes.insert(1, "a class is repeated within one list")
        lo = ends[gi - 1] if gi > 0 else 0
        hi = g.start
        after = groups[gi + 1].start if gi + 1 < len(groups) else len(text)
        stated = _stated(text, ix, lo, hi, after)
        region = _region(text, g, lo, after)
        return _from_group(g, stated, ix, notes, _unreadable(region, ix, g))

    stated = _stated(text, ix, 0, len(text), len(text))
    skind, sname, snote = stated if stated else (None, None, "")
    notes.append(snote)
    values = [e for e in free if e.kind == "label"]  # "free": numbers after junk keys (times, dates...)
    if values and skind is not None:
        v = values[-1].value
        if values[-1].frac and 0 < v <= 1:
            v *= 100.0
            notes.append("the value was a fraction of 1: scaled to 0-100")
        v = min(max(v, 0.0), 100.0)
        if len(values) > 1:
            notes.append(f"{len(values)} numbers without class names; used the last ({_fmt(v)})")
        if skind == "class" and sname != ix.none_class:
            notes.insert(0, f"one confidence ({_fmt(v)}) for the stated prediction {sname!r}")
            return _result("single_value", True, notes, {sname: v}, sname)
        if skind == "none":
            notes.insert(0, f"prediction: {NONE_LABEL} (confidence {_fmt(v)}); S_max = 0")
            conf = {ix.none_class: v} if ix.none_class else {}
            return _result("none_of_these", True, notes, conf, None, v)
        notes.insert(0, f"one confidence ({_fmt(v)}) but the stated prediction {sname!r} is not a listed class")
        return _result("single_value", False, notes)
    if len(values) == 1 and not _REFUSAL.search(text):
        notes.insert(0, f"one confidence ({_fmt(values[0].value)}) but no predicted class")
        return _result("single_value", False, notes)
    if skind == "class" and sname != ix.none_class:
        notes.insert(0, f"prediction {sname!r} without any confidence")
        return _result("prediction_only", False, notes, None, sname)
    if skind == "none":
        notes.insert(0, f"prediction: {NONE_LABEL} without numbers; S_max = 0")
        return _result("none_of_these", True, notes)
    if _REFUSAL.search(text):
        return _result("refusal", False, ["the model refused: " + _snippet(text)] + notes)
    if skind == "off":
        notes.insert(0, f"prediction {sname!r} is not a listed class, and no confidence")
        return _result("prediction_only", False, notes)
    whole = _prediction(text, ix) if len(text.strip()) <= max(ix.lengths[0], len(NONE_LABEL)) + 12 else ("off", None, "")
    if whole[0] == "class" and whole[1] != ix.none_class and "\n" not in text.strip():
        return _result("prediction_only", False, [f"only a class name ({whole[1]!r}), no confidence", whole[2]] + notes,
                       None, whole[1])
    if whole[0] == "none":
        return _result("none_of_these", True, [f"answer: {NONE_LABEL} without numbers; S_max = 0"] + notes)
    if free:
        return _result("no_confidence", False, [f"{len(free)} number(s) but none tied to a class name: "
                                                + _snippet(text)] + notes)
    return _result("no_confidence", False, ["no class confidences in the text: " + _snippet(text)] + notes)


def _region(text: str, g: _Group, lo: int, hi: int) -> str:
    """The text of the list ``g``: from its ``{`` (else its first line) to its ``}`` (else its last ``key: value``
    line), within ``[lo, hi)``."""
    last = g.entries[-1].end if g.entries else g.start
    if g.opened:
        start = max(text.rfind("{", lo, g.start), lo)
        end = text.find("}", last, hi)
        return text[start:hi if end < 0 else end]
    start = max(text.rfind("\n", lo, g.start) + 1, lo)
    end = text.find("\n", last, hi)
    end = hi if end < 0 else end
    while end < hi:
        m = _KV_LINE.match(text, end + 1)
        if m is None or m.end() > hi:
            break
        end = m.end()
    return text[start:end]


def _unreadable(region: str, ix: _Index, g: _Group) -> list[str]:
    """Listed classes written with a value that is not a number (``NaN``, ``"high"``, ``null``) in ``region``."""
    read = {e.name for e in g.entries if e.kind in ("class", "none")}
    out: list[str] = []
    for m in _BADVAL.finditer(region):
        val = m.group("val").strip("\"'")
        if re.match(r"\s*" + _NUM, val):
            continue
        kind, name, _ = ix.fuzzy(m.group("key").strip(" \t*`_-"), lost=False)
        if kind in ("class", "none") and name is not None and name not in read and name not in out:
            out.append(name)
    return out


def _snippet(text: str, n: int = 60) -> str:
    s = " ".join(text.split())
    return repr(s[:n] + ("..." if len(s) > n else ""))


def _from_group(g: _Group, stated: tuple[str, str | None, str] | None, ix: _Index,
                notes: list[str], unreadable: list[str] | None = None) -> ParsedResponse:
    skind, sname, snote = stated if stated else (None, None, "")
    notes.append(snote)
    # a name with a lost first letter ("at" -> "cat") counts only when the answer lists every other class
    named = {e.name for e in g.entries if e.kind in ("class", "none")} | set(unreadable or ())
    for e in g.entries:
        if e.kind == "lost":
            others = [c for c in ix.classes if c != e.name]
            if e.name not in named and all(c in named for c in others):
                e.kind = "class"
            else:
                e.kind, e.name, e.raw = "off", e.token, ""
    notes.extend(e.raw for e in g.entries if e.raw)
    vals = [e.value for e in g.entries if e.kind in ("class", "none")]
    if vals and all(0.0 <= v <= 1.0 for v in vals) and any(e.frac for e in g.entries if e.kind in ("class", "none")) \
            and max(vals) > 0:
        scale = 100.0
        notes.append("values were fractions of 1: scaled to 0-100")
    else:
        scale = 1.0
    conf: dict[str, float] = {}
    none_conf: float | None = None
    off: list[str] = []
    clipped = False
    for e in g.entries:
        v = e.value * scale
        if v < 0 or v > 100:
            clipped = True
            v = min(max(v, 0.0), 100.0)
        if e.kind == "class" and e.name is not None:
            conf.setdefault(e.name, v)
        elif e.kind == "none":
            none_conf = v if none_conf is None else none_conf
            if e.name is not None:
                conf.setdefault(e.name, v)
        elif e.kind == "off" and e.name:
            off.append(e.name)
    if clipped:
        notes.append("values outside 0-100 clipped")
    if off:
        notes.append(f"ignored {len(off)} confidence(s) for names not in the class list: {_names(off)}")
    conf = dict(sorted(conf.items(), key=lambda kv: ix.order[kv[0]]))
    idc = {c: v for c, v in conf.items() if c != ix.none_class}
    missing = len(ix.classes) - len(conf)
    missing_ids = len(ix.ids) - len(idc)

    if not conf and none_conf is None:
        if g.truncated:
            return _result("truncated", False, ["cut off before any listed class's confidence"] + notes)
        return _result("off_list", False, [f"confidences only for names not in the class list: {_names(off)}"]
                       + [n for n in notes if not n.startswith("ignored")])

    if unreadable:
        return _result("bad_value", False, [f"unreadable value for {len(unreadable)} listed class(es): "
                                             f"{_names(unreadable)}; S_max unknown"] + notes,
                       conf, sname if skind == "class" and sname != ix.none_class else None, none_conf)
    smax = max(idc.values()) if idc else 0.0
    best = max(idc, key=lambda c: (idc[c], -ix.order[c])) if idc else None
    if skind == "class" and sname != ix.none_class:
        pred: str | None = sname
        if best is not None and idc.get(sname, -1.0) < smax:
            notes.append(f"stated prediction {sname!r} is not the highest confidence ({best!r})")
    elif skind == "none":
        pred = None
    else:
        if skind == "off" and sname:
            notes.append(f"stated prediction {sname!r} is not a listed class")
        pred = None if (none_conf is not None and none_conf > smax) or best is None else best
    says_none = skind == "none" or (skind != "class" and none_conf is not None and none_conf > smax)

    if g.truncated:
        kept = f"cut off after {len(conf)} of {len(ix.classes)} classes"
        if g.dropped is not None:
            kept += f" (dropped the last, possibly cut value of {g.dropped.name or 'an unknown name'!r})"
        decided = bool(idc) and (smax >= 100.0 or (skind == "class" and sname in idc and idc[sname] == smax))
        if decided:
            return _result("truncated", True, [kept + f"; the kept entries decide S_max = {_fmt(smax)}"] + notes,
                           conf, pred, none_conf)
        return _result("truncated", False, [kept + "; the missing classes could change S_max"] + notes,
                       conf, pred if skind == "class" else None, none_conf)
    all_zero = not idc or all(v == 0 for v in idc.values())
    if all_zero and (missing_ids == 0 or says_none or (not idc and none_conf is not None)):
        why = "every ID-class confidence is 0" if idc else f"only a {NONE_LABEL!r} confidence"
        if skind == "class" and sname != ix.none_class:
            notes.append(f"stated prediction {sname!r} ignored")
        return _result("none_of_these", True, [f"{why}: read as {NONE_LABEL}; S_max = 0"] + notes,
                       conf, None, none_conf)
    head = f"prediction: {NONE_LABEL}; " if pred is None and says_none else ""
    if missing == 0:
        return _result("complete", True, [head + f"all {len(ix.classes)} classes"] + notes, conf, pred, none_conf)
    absent = [c for c in ix.classes if c not in conf]
    return _result("partial", True, [head + f"{len(conf)} of {len(ix.classes)} classes; missing {_names(absent)}"]
                   + notes, conf, pred, none_conf)
