"""Execute a notebook in a real Jupyter kernel (nbclient + ipykernel), as a user's Jupyter would: the kernel
runs this interpreter, in a given folder, with its own vlmood cache. Import as ``from nbrun import execute``."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

NOTEBOOKS = Path(__file__).parent.parent / "notebooks"


def execute(name: str, cwd: Path, timeout: int = 600) -> Any:
    """Run ``notebooks/<name>`` top to bottom in a fresh kernel started in ``cwd``; returns the executed notebook
    (``nbformat.NotebookNode``). A cell error raises ``nbclient.exceptions.CellExecutionError`` with the cell's
    traceback. The kernel spec is written under ``cwd`` so that it is this interpreter, whatever Jupyter setup the
    machine has."""
    import nbformat
    from nbclient import NotebookClient

    spec = cwd / ".jupyter-data" / "kernels" / "vlmood-test"
    spec.mkdir(parents=True, exist_ok=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "vlmood tests", "language": "python"}))
    isolated = {"JUPYTER_PATH": str(cwd / ".jupyter-data"), "VLMOOD_CACHE": str(cwd / "vlmood-cache"),
                "IPYTHONDIR": str(cwd / ".ipython"),  # no user profile, startup files or history
                "JUPYTER_RUNTIME_DIR": str(cwd / ".jupyter-runtime")}
    saved = {k: os.environ.get(k) for k in (*isolated, "MPLBACKEND")}
    try:
        os.environ.update(isolated)
        os.environ.pop("MPLBACKEND", None)  # the kernel picks Jupyter's inline backend, as for a user
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        NotebookClient(nb, timeout=timeout, kernel_name="vlmood-test", resources={"metadata": {"path": str(cwd)}},
                       record_timing=False).execute()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return nb


def outputs_text(nb: Any) -> str:
    """Every text output (streams, plain-text results, errors) of an executed notebook, joined."""
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            out.append(o.get("text", "") + o.get("data", {}).get("text/plain", "") + "".join(o.get("traceback", [])))
    return "\n".join(out)


def images(nb: Any) -> int:
    """How many images (PNG outputs) an executed notebook shows."""
    return sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
