"""Standard benchmark suites, defined as JSON data files in ``vlmood/evaluation/suites/`` over a user's data root."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .._io import printable, read_text
from ..errors import InvalidInputError

SUITES_DIR = Path(__file__).resolve().parent / "suites"


def list_suites() -> list[str]:
    """Names of the bundled suites (``imagenet-mos``, ``openood-v1.5-imagenet1k``, ``openood-v1.5-cifar10``, ...)."""
    return sorted(p.stem for p in SUITES_DIR.glob("*.json"))


class _SuiteError(ValueError):
    """A problem in a suite definition; :func:`read_suite` reports it as one line naming the file."""


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    dups = sorted({k for k in keys if keys.count(k) > 1})
    if dups:
        raise _SuiteError(f"key {dups[0]!r} appears twice in one object (the second would replace the first)")
    return dict(pairs)


def _is_text(v: Any) -> bool:
    return isinstance(v, str) and bool(v.strip())


def _validate(suite: Any) -> None:
    """Raise :class:`_SuiteError` naming the first key of ``suite`` that is missing or of the wrong type."""
    if not isinstance(suite, dict):
        raise _SuiteError(f"expected a JSON object, got {type(suite).__name__}")
    missing = [k for k in ("classes", "id", "ood") if k not in suite]
    if missing:
        raise _SuiteError(f"missing key(s) {', '.join(repr(k) for k in missing)}")
    classes = suite["classes"]
    if not (_is_text(classes) or isinstance(classes, list) and classes and all(_is_text(c) for c in classes)):
        raise _SuiteError("'classes' must be a bundled list name, a file, or a non-empty list of names")
    if not _is_text(suite["id"]):
        raise _SuiteError("'id' must be a non-empty path relative to the root")
    ood = suite["ood"]
    if not isinstance(ood, dict) or not ood:
        raise _SuiteError("'ood' must be an object {group: {name: path}}")
    for group, sets in ood.items():
        if not isinstance(sets, dict) or not sets:
            raise _SuiteError(f"'ood' group {group!r} must be a non-empty object {{name: path}}")
        bad = [n for n, p in sets.items() if not _is_text(p)]
        if bad:
            raise _SuiteError(f"'ood' set {bad[0]!r} in group {group!r} must have a non-empty path")
    for key in ("name",):
        if key in suite and not isinstance(suite[key], str):
            raise _SuiteError(f"{key!r} must be a string")
    t = suite.get("templates")
    if t is not None and not (_is_text(t) or isinstance(t, list) and all(isinstance(x, str) for x in t)):
        raise _SuiteError("'templates' must be a name, a file, or a list of templates")
    layout = suite.get("layout", [])
    if not isinstance(layout, list) or not all(isinstance(x, str) for x in layout):
        raise _SuiteError("'layout' must be a list of strings")


def read_suite(name_or_file: str) -> dict[str, Any]:
    """The suite definition of a bundled name or a JSON file, validated: one line naming the file and the
    problem for invalid JSON, duplicate keys, or a missing or mistyped key."""
    path = Path(name_or_file)
    if not path.is_file():
        path = SUITES_DIR / f"{name_or_file}.json"
    if not path.is_file():
        raise InvalidInputError(f"unknown suite {name_or_file!r}; bundled suites: {', '.join(list_suites())}")
    text = read_text(path, "suite file")
    where = printable(str(path))
    try:
        suite = json.loads(text, object_pairs_hook=_no_duplicate_keys)
        _validate(suite)
    except json.JSONDecodeError as e:
        raise InvalidInputError(f"suite file {where} is not valid JSON: {e.msg} (line {e.lineno}, "
                                f"column {e.colno})") from None
    except _SuiteError as e:
        raise InvalidInputError(f"suite file {where}: {e}") from None
    return suite


def load_suite(name_or_file: str, root: str | Path, **kwargs: Any):
    """A :class:`Benchmark` for a suite whose paths are relative to ``root``.

    Every path is checked first: a missing one gives a single error listing each missing path, where it
    was looked for, and the expected layout.
    """
    from .benchmark import Benchmark

    suite = read_suite(name_or_file)
    if not str(root).strip():
        raise InvalidInputError("the suite's data root is empty; give the folder holding its data ('.' for here)")
    root = Path(root).expanduser()
    wanted = {"ID": suite["id"], **{n: p for g in suite["ood"].values() for n, p in g.items()}}
    missing = [f"  {name}: {root / rel}" for name, rel in wanted.items() if not (root / rel).exists()]
    if missing:
        layout = "\n".join(f"  {ln}" for ln in suite.get("layout", []))
        raise InvalidInputError(
            f"suite {name_or_file!r}: {len(missing)} of {len(wanted)} data folders missing under {root}:\n"
            + "\n".join(missing) + (f"\nexpected layout:\n{layout}" if layout else "")
        )
    ood = {g: {n: str(root / p) for n, p in sets.items()} for g, sets in suite["ood"].items()}
    kwargs.setdefault("name", suite.get("name", name_or_file))
    kwargs.setdefault("templates", suite.get("templates"))
    return Benchmark(id=str(root / suite["id"]), ood=ood, classes=suite["classes"], **kwargs)
