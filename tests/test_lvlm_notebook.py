"""notebooks/lvlm.ipynb runs end to end against the loopback server: parser statuses, scores, a mixed benchmark."""
import json
from pathlib import Path

import pytest

pytest.importorskip("httpx")

NOTEBOOK = Path(__file__).parent.parent / "notebooks" / "lvlm.ipynb"


def test_lvlm_notebook_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VLMOOD_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)  # the notebook finds the test server from the installed checkout
    nb = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    scope: dict = {}
    for k, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), f"lvlm.ipynb cell {k}", "exec"), scope)
    out = capsys.readouterr().out
    statuses = [line.split()[0] for line in out.splitlines() if "valid=" in line]
    assert statuses == ["partial", "truncated", "refusal", "no_confidence", "none_of_these", "prediction_only"]
    assert scope["det"].statuses_ == {"refusal": 1, "truncated": 1, "complete": 2}
    rows = {r["method"]: r for r in scope["report"].rows}
    assert rows["lvlm"]["auroc"] == 1.0 and "refusal: 1" in out
    assert "requests on the second run: 0" in out
