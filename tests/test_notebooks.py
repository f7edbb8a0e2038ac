"""The notebooks: committed with their (small) outputs so they read on GitHub, and executed top to bottom in a real
Jupyter kernel (the quickstart and the evaluation notebook here; clipn, lvlm and few_shot by their own tests, which
check their numbers). Outputs of the committed files are not compared with a new run (timings, dates differ)."""
import json
import re

import pytest
from nbrun import NOTEBOOKS, execute, images, outputs_text

MAX_KB = 400


@pytest.mark.parametrize("name", sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")))
def test_committed_with_small_outputs(name):
    path = NOTEBOOKS / name
    nb = json.loads(path.read_text(encoding="utf-8"))
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code and all(c.get("execution_count") for c in code), f"{name}: run it and commit it with outputs"
    assert sum(bool(c.get("outputs")) for c in code) >= len(code) // 2
    errors = [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"{name} was committed with an error output"
    assert path.stat().st_size < MAX_KB * 1024, f"{name} is {path.stat().st_size // 1024} KB; keep it small"


def _number(text, label):
    m = re.search(re.escape(label) + r"\s*([0-9.]+)%", text)
    assert m, f"{label!r} not in the notebook's output"
    return float(m.group(1)) / 100


def test_quickstart_runs_in_a_kernel(tmp_path):
    nb = execute("quickstart.ipynb", tmp_path)
    text = outputs_text(nb)
    # own folders, a manifest and a Hugging Face dataset give the same images, so the same accuracy and scores
    lines = [ln for ln in text.splitlines() if "60 images, labelled" in ln]
    assert len(lines) == 3 and len({ln.split("ID accuracy", 1)[1] for ln in lines}) == 1
    assert "negatives mined:" in text
    # the calibrated detector, saved and reloaded, keeps about 95% of fresh ID images
    assert abs(_number(text, "TPR on fresh ID images:") - 0.95) <= 0.05
    assert (tmp_path / "shapes.vlmood").is_file() and (tmp_path / "quickstart-report" / "report.md").is_file()
    # after report.save(), in the same kernel: the report's figure and the user's own pyplot figure are shown, and
    # the backend is still Jupyter's inline one
    cells = [c for c in nb.cells if c.cell_type == "code"]
    saved = next(i for i, c in enumerate(cells) if "report.save(" in c.source)
    for needle in ('report.plot()["comparison"]', "plt.show()"):
        i, cell = next((i, c) for i, c in enumerate(cells) if needle in c.source)
        assert i > saved and any("image/png" in o.get("data", {}) for o in cell.outputs), needle
    assert "backend: module://matplotlib_inline.backend_inline" in text
    assert "metrics equal: True | thresholds equal: True" in text


def test_evaluation_runs_in_a_kernel(tmp_path):
    nb = execute("evaluation.ipynb", tmp_path)
    text = outputs_text(nb)
    assert "metrics equal: True | thresholds equal: True" in text
    assert images(nb) >= 5  # comparison, ROC, histograms, top labels, mistakes
    assert (tmp_path / "suite-report" / "scores.csv").is_file()
