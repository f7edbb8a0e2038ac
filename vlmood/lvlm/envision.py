"""LLM-envisioned negative labels for NegLabel, in the spirit of EOE (Cao et al., "Envisioning Outlier Exposure by
Large Language Models for Out-of-Distribution Detection", ICML 2024).

A text LLM (any :class:`~vlmood.lvlm.base.LVLMClient`, asked without an image) is prompted with the ID classes for
``n`` outlier class names of a kind: ``near`` (visually or semantically similar to the ID classes, but none of
them) or ``far`` (unrelated). Its answer is read as a list (one name per line, bullets and numbering removed, or
comma-separated), cleaned (quotes, trailing punctuation, chat-template tokens), de-duplicated case-insensitively,
and every ID class name (and its plural) is dropped. The client's response cache keeps the answers, so asking again
costs nothing. Feed the result to a CLIP detector: ``NegLabel(encoder, classes, negatives=words)``.
"""
from __future__ import annotations

import re
import warnings
from typing import Any, Sequence

from ..errors import InvalidInputError, VlmoodError
from ..text.prompts import load_classes
from .base import LVLMClient, Request

KINDS = ("near", "far")
_BULLET = re.compile(r"^\s*(?:[-*\u2022\u2023\u25e6]|\(?\d{1,4}[.):]|[a-z][.)])\s+", re.IGNORECASE)
_TOKENS = re.compile(r"<\|[^|>]{1,40}\|>|</?s>|\[/?INST\]", re.IGNORECASE)
_MAX_WORDS = 6


def _names(text: str) -> list[str]:
    """Candidate names from an LLM's list answer (see the module docstring)."""
    text = _TOKENS.sub("\n", text or "")
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.rstrip().endswith(":")]  # not "Here are:"
    listed = [ln for ln in lines if _BULLET.match(ln)]
    if listed:
        items = [_BULLET.sub("", ln) for ln in listed]
    elif len(lines) == 1 or any(ln.count(",") >= 2 for ln in lines):
        items = [part for ln in lines for part in ln.split(",")]
    else:
        items = lines
    out = []
    for item in items:
        item = re.split(r"\s[-\u2013\u2014:]\s|:\s", item, maxsplit=1)[0]  # "fox - a small canid" -> "fox"
        item = item.strip().strip("\"'`*_").strip().rstrip(".;:!").strip().strip("\"'`*_").strip()
        if item and len(item.split()) <= _MAX_WORDS and not item.endswith("?"):
            out.append(item)
    return out


def _plural(word: str) -> str:
    w = word.lower()
    if w.endswith(("s", "x", "z", "ch", "sh")):
        return w + "es"
    if w.endswith("y") and len(w) > 1 and w[-2] not in "aeiou":
        return w[:-1] + "ies"
    return w + "s"


def envision_negatives(client: LVLMClient, classes: Any, n_near: int = 50, n_far: int = 50,
                       kinds: Sequence[str] = KINDS, **params: Any) -> list[str]:
    """Outlier class names an LLM envisions for ``classes``: ``n_near`` near ones, then ``n_far`` far ones.

    ``kinds`` chooses which to ask for; ``params`` go to the client (``temperature``, ``max_tokens``...). Returns
    de-duplicated names (case-insensitive, first spelling kept) that are not ID class names (nor their plurals), in
    the order given. A failed request is a one-line :class:`~vlmood.errors.VlmoodError`; an answer with fewer names
    than asked gives a warning (the names there are are kept).
    """
    from .prompts import envision_prompt

    names = load_classes(classes)
    counts = {"near": n_near, "far": n_far}
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise InvalidInputError(f"kinds must be some of {KINDS}, got {list(kinds)!r}")
    for k in kinds:
        n = counts[k]
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InvalidInputError(f"n_{k} must be a positive integer, got {n!r}")
    ids = {c.strip().lower() for c in names} | {_plural(c.strip()) for c in names}
    seen: set[str] = set()
    out: list[str] = []
    requests = [Request(envision_prompt(names, counts[k], k)) for k in kinds]
    replies = client.generate_many(requests, **params)
    for kind, reply in zip(kinds, replies):
        if reply.text is None:
            raise VlmoodError(f"envisioning {kind} outlier class names failed: {reply.error}")
        got = 0
        for name in _names(reply.text):
            key = name.lower()
            if key in ids or key in seen:
                continue
            seen.add(key)
            out.append(name)
            got += 1
        if got < counts[kind]:
            warnings.warn(f"the LLM gave {got} usable {kind} outlier class names of the {counts[kind]} asked for",
                          stacklevel=2)
    return out
