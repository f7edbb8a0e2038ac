"""Where vlmood finds its bundled data files and where it keeps caches."""
from __future__ import annotations

import os
from pathlib import Path

_PKG = Path(__file__).resolve().parent


def data_root(kind: str) -> Path:
    """Folder of a bundled data kind (``"prompts"`` or ``"lexicons"``).

    Wheels carry the files inside the package (``vlmood/_data/``); a source checkout or an
    editable install reads them from the repository's top-level folders.
    """
    for cand in (_PKG / "_data" / kind, _PKG.parent / kind):
        if cand.is_dir():
            return cand
    raise FileNotFoundError(f"vlmood data folder {kind!r} not found next to the package ({_PKG})")


def cache_root() -> Path:
    """Root of vlmood's on-disk caches: ``$VLMOOD_CACHE`` or the platform's user cache dir."""
    env = os.environ.get("VLMOOD_CACHE")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("vlmood"))
