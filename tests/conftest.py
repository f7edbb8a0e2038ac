import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # model hubs are unreachable in CI: fail fast, never hang


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own empty vlmood cache."""
    monkeypatch.setenv("VLMOOD_CACHE", str(tmp_path / "vlmood-cache"))


@pytest.fixture(scope="session")
def tiny():
    from vlmood.testing import tiny_encoder

    return tiny_encoder(seed=0)
