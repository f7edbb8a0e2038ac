"""Standard benchmark suites, defined as JSON data files in ``vlmood/evaluation/suites/`` over a user's data root."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import InvalidInputError

SUITES_DIR = Path(__file__).resolve().parent / "suites"


def list_suites() -> list[str]:
    """Names of the bundled suites (``imagenet-mos``, ``openood-v1.5-imagenet1k``, ``openood-v1.5-cifar10``, ...)."""
    return sorted(p.stem for p in SUITES_DIR.glob("*.json"))


def read_suite(name_or_file: str) -> dict[str, Any]:
    path = Path(name_or_file)
    if not path.is_file():
        path = SUITES_DIR / f"{name_or_file}.json"
    if not path.is_file():
        raise InvalidInputError(f"unknown suite {name_or_file!r}; bundled suites: {', '.join(list_suites())}")
    return json.loads(path.read_text(encoding="utf-8"))


def load_suite(name_or_file: str, root: str | Path, **kwargs: Any):
    """A :class:`Benchmark` for a suite whose paths are relative to ``root``.

    Every path is checked first: a missing one gives a single error listing each missing path, where it
    was looked for, and the expected layout.
    """
    from .benchmark import Benchmark

    suite = read_suite(name_or_file)
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
