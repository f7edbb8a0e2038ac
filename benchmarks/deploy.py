"""The deploy path, end to end from the command line, on toy-world images written to disk:

1. ``vlmood calibrate`` fits a detector and sets its threshold on calibration ID images (ImageFolder layout);
2. ``vlmood score --detector`` scores fresh ID images and OOD images (another seed; the 6 other shapes; empty
   backgrounds) with the saved threshold;
3. the TPR on the fresh ID images and the FPR on each OOD set are counted from the CSVs ``score`` wrote.

Usage: ``python benchmarks/deploy.py [--method neglabel] [--n 300] [--tpr 0.95] [--out benchmarks/deploy.txt]``.
Prints the transcript (commands and their output) and writes it to ``--out``.
"""
from __future__ import annotations

import argparse
import csv
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from vlmood import toyworld
from vlmood.toyworld import ID_SHAPES, OOD_SHAPES


def _write(images, folder: Path, labels=None) -> None:
    for i, im in enumerate(images):
        sub = folder / labels[i] if labels is not None else folder
        sub.mkdir(parents=True, exist_ok=True)
        im.save(sub / f"{i:04d}.png")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="neglabel")
    ap.add_argument("--n", type=int, default=300, help="images per set")
    ap.add_argument("--tpr", type=float, default=0.95)
    ap.add_argument("--out", default=None, help="write the transcript here too")
    args = ap.parse_args(argv)
    lines: list[str] = []

    def say(text: str) -> None:
        print(text)
        lines.append(text)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ims, labels = toyworld.load_images(5001, args.n)
        _write(ims, root / "calib-id", labels)
        _write(toyworld.load_images(5002, args.n)[0], root / "fresh-id")
        _write(toyworld.load_images(5003, args.n, OOD_SHAPES)[0], root / "other-shapes")
        _write(toyworld.load_images(5004, args.n, empty=True)[0], root / "empty")
        extra = ["--param", "ratio=0.5", "--param", "ngroups=1", "--param",
                 f"lexicon={toyworld.lexicon_dir()}"] if args.method in ("neglabel", "csp") else []
        commands = [["calibrate", "--model", "toyworld", "--classes", ",".join(ID_SHAPES), "--method", args.method,
                     *extra, "--id", "calib-id", "--tpr", str(args.tpr), "--out", "shapes.vlmood"]]
        commands += [["score", "--detector", "shapes.vlmood", "--images", name, "--out", f"{name}.csv"]
                     for name in ("fresh-id", "other-shapes", "empty")]
        for cmd in commands:
            say("$ vlmood " + " ".join(shlex.quote(c) for c in cmd).replace(str(toyworld.lexicon_dir()),
                                                                              "<toy lexicon>"))
            run = subprocess.run([sys.executable, "-m", "vlmood", *cmd], cwd=root, capture_output=True, text=True)
            for ln in (run.stdout + run.stderr).splitlines():
                say("  " + ln.replace(str(toyworld.lexicon_dir()), "<toy lexicon>"))
            if run.returncode:
                return run.returncode
        say("")
        for name, what in (("fresh-id", "TPR on fresh ID images"), ("other-shapes", "FPR on near-OOD (other shapes)"),
                           ("empty", "FPR on far-OOD (empty backgrounds)")):
            with open(root / f"{name}.csv", newline="") as f:
                rows = list(csv.DictReader(f))
            kept = sum(r["is_ood"] == "0" for r in rows)
            say(f"{what}: {kept}/{len(rows)} = {100 * kept / len(rows):.2f}% kept as ID"
                + (f" (target {100 * args.tpr:g}%)" if name == "fresh-id" else ""))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
