"""Prompt templates and class-name lists (bundled data files in ``prompts/``, user files, or Python lists)."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Sequence

from .._io import read_text
from .._paths import data_root
from ..errors import InvalidInputError

DEFAULT_TEMPLATES = "simple"  # "a photo of a {}" (no full stop), as MCM and GL-MCM prompt
_WHAT = {"templates": "template file", "classes": "class list"}


def _read_lines(path: Path, what: str = "file") -> list[str]:
    """Non-empty lines of a UTF-8 text file (a byte-order mark is dropped); lines starting with ``#`` are
    comments. A non-UTF-8 or unreadable file raises a one-line :class:`InvalidInputError` naming it."""
    text = read_text(path, what)
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def builtin_names(kind: str) -> list[str]:
    """Names of the bundled ``"templates"`` or ``"classes"`` lists."""
    return sorted(p.stem for p in (data_root("prompts") / kind).glob("*.txt"))


def _resolve(spec: str, kind: str) -> list[str] | None:
    """Lines of a bundled list named ``spec`` or of a file at path ``spec``; None if neither exists."""
    builtin = data_root("prompts") / kind / f"{spec}.txt"
    if builtin.is_file():
        return _read_lines(builtin, f"bundled {_WHAT[kind]}")
    p = Path(spec).expanduser()
    if p.is_file():
        return _read_lines(p, _WHAT[kind])
    return None


def load_templates(spec: str | Sequence[str] | None = None) -> list[str]:
    """Prompt templates, each with exactly one ``{}`` for the class name.

    ``spec``: a bundled name (``simple``, ``imagenet7``, ``imagenet80``, ``neglabel_noun``, ``neglabel_adj``,
    ``csp_noun``, ``csp_adj``), a UTF-8 file with one template per line (``#`` comments), a single template
    string containing ``{}``, or a list of templates. ``None`` gives ``["a photo of a {}"]``, MCM's prompt.
    Repeated templates are refused (they would silently weigh double in the ensemble).
    """
    if spec is None:
        spec = DEFAULT_TEMPLATES
    if isinstance(spec, str):
        lines = _resolve(spec, "templates")
        if lines is None:
            if "{}" in spec:
                lines = [spec]
            else:
                raise InvalidInputError(
                    f"unknown templates {spec!r}: not a bundled set ({', '.join(builtin_names('templates'))}), "
                    "not a file, and not a template containing '{}'"
                )
    else:
        lines = [str(t) for t in spec]
    if not lines:
        raise InvalidInputError(f"template list {spec!r} is empty")
    bad = [t for t in lines if t.count("{}") != 1]
    if bad:
        raise InvalidInputError(f"templates must contain exactly one '{{}}' for the class name; bad: {bad[:3]}")
    dups = [t for t, n in Counter(lines).items() if n > 1]
    if dups:
        raise InvalidInputError(f"duplicate templates: {', '.join(repr(d) for d in dups[:3])}")
    return lines


def load_classes(spec: str | Sequence[str]) -> list[str]:
    """Class names, validated: non-empty, no blank names, no duplicates.

    ``spec``: a bundled list (``imagenet1k``, ``cifar10``, ``cifar100``), a file with one name per line
    (``#`` comments allowed), a comma-separated string (``"cat,dog"``), or a sequence of names.
    """
    if isinstance(spec, str):
        lines = _resolve(spec, "classes")
        if lines is None and "," not in spec:
            import difflib

            close = difflib.get_close_matches(spec.strip().lower(), builtin_names("classes"), n=3, cutoff=0.6)
            if close:
                raise InvalidInputError(
                    f"class list {spec!r} not found; did you mean {', '.join(close)}? "
                    f"(for a single class named {spec!r}, pass '{spec},' or a Python list)")
        if lines is None:
            if "," in spec or not any(c in spec for c in "/\\.") and spec.strip():
                lines = [s.strip() for s in spec.split(",")]
                if len(lines) > 1 and lines[-1] == "":
                    lines = lines[:-1]  # "cat," is the one-class list ["cat"]
            else:
                raise InvalidInputError(
                    f"class list {spec!r} not found: not a bundled list ({', '.join(builtin_names('classes'))}) "
                    "and no such file"
                )
    else:
        lines = [str(c).strip() for c in spec]
    if not lines:
        raise InvalidInputError("the class list is empty: give at least one in-distribution class name")
    if any(not c for c in lines):
        raise InvalidInputError(f"the class list {spec!r} contains an empty name")
    dups = [c for c, n in Counter(lines).items() if n > 1]
    if dups:
        raise InvalidInputError(f"duplicate class names: {', '.join(repr(d) for d in dups)}")
    return lines


def fill(template: str, name: str) -> str:
    """``template`` with ``{}`` replaced by ``name`` (no str.format: braces elsewhere stay literal)."""
    return template.replace("{}", name)


def class_prompts(classes: Sequence[str], templates: Sequence[str]) -> list[str]:
    """All prompts, class-major: ``[c0t0, c0t1, ..., c1t0, ...]`` (``C * T`` strings)."""
    return [fill(t, c) for c in classes for t in templates]
