"""Wall time of a fully cached ``vlmood eval`` (every feature and text embedding already on disk).

The run of issue 12: 450 images (150 ID in two class folders, 150 near-OOD, 150 far-OOD; 400x300 JPEGs), an
open_clip ViT-B/16 checkpoint file with random weights (about 600 MB of float32, written by this script),
MCM + Energy + MaxLogit + GL-MCM. One cold run fills the caches; then each warm run is a fresh
``python -m vlmood eval`` process timed from its start to its exit (interpreter start, imports, reading the
caches, scoring, writing the report): into the same report folder (its six figures show the same report, so they
are kept), into a new folder each time (the six figures drawn), and with ``--no-plots``. Reference rows: an empty
interpreter and one that only imports torch. A probe run says whether the warm run imported torch and matplotlib.

``--before REV`` (repeatable) also times the warm run of an older commit (a ``git worktree`` of this repository,
run with ``PYTHONPATH`` pointing at it) on the same caches, so before and after come from one run on one machine.

Usage::

    python benchmarks/warm_eval.py --before 34cd47d --before e895d72  # cold run, warm runs of each REV and of this tree
    python benchmarks/warm_eval.py --workdir /tmp/we --repeats 5  # keep the images, checkpoint and caches
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_overhead import make_jpegs  # noqa: E402  (400x300 noise JPEGs)


def setup(work: Path, arch: str, n: int) -> Path:
    ckpt = work / f"{arch}.safetensors"
    if not ckpt.exists():
        import open_clip
        import torch
        from safetensors.torch import save_file

        torch.manual_seed(0)
        model = open_clip.create_model(arch, pretrained=None)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt) + ".part")
        os.replace(str(ckpt) + ".part", ckpt)
    per = n // 3
    for name, count, seed in (("id/cat", per // 2, 1), ("id/dog", per - per // 2, 2), ("near", per, 3),
                              ("far", per, 4)):
        if not (work / name).is_dir():
            make_jpegs(work / name, count, seed)
    return ckpt


def eval_cmd(work: Path, ckpt: Path, arch: str, args: argparse.Namespace) -> list[str]:
    return [sys.executable, "-m", "vlmood", "eval", "--model", f"open_clip:{arch}@{ckpt}", "--classes", "cat,dog",
            "--id", str(work / "id"), "--ood", f"near/a={work / 'near'}", "--ood", f"far/b={work / 'far'}",
            "--methods", args.methods, "--precision", args.precision, "--report", str(work / "report"),
            "--workers", "1"]


def timed_run(cmd: list[str], env: dict[str, str], cwd: Path, check: bool = True) -> tuple[float, str]:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=cwd)  # cwd: not this checkout (sys.path[0])
    dt = time.perf_counter() - t0
    if check and p.returncode != 0:
        sys.exit(f"failed ({p.returncode}): {' '.join(cmd)}\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    return dt, p.stdout + p.stderr


PROBE = """
import sys
from vlmood.cli import main
try:
    main(sys.argv[1:])
finally:
    print("torch:", "torch" in sys.modules, "matplotlib:", "matplotlib" in sys.modules, "open_clip:",
          "open_clip" in sys.modules, file=sys.stderr)
"""


def with_report(cmd: list[str], folder: Path) -> list[str]:
    i = cmd.index("--report")
    return cmd[:i + 1] + [str(folder)] + cmd[i + 2:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="ViT-B-16")
    ap.add_argument("--images", type=int, default=450)
    ap.add_argument("--methods", default="mcm,energy,maxlogit,glmcm")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--before", metavar="REV", action="append", default=[],
                    help="also time the warm run of this commit (repeatable)")
    ap.add_argument("--workdir", help="keep images, checkpoint and caches here (default: a temporary folder)")
    ap.add_argument("--out", help="write the figures as JSON")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp).resolve()
        work.mkdir(parents=True, exist_ok=True)
        ckpt = setup(work, args.arch, args.images)
        env = {**os.environ, "VLMOOD_CACHE": str(work / "cache"), "PYTHONWARNINGS": "ignore"}
        env_now = {**env, "PYTHONPATH": str(ROOT)}
        cmd = eval_cmd(work, ckpt, args.arch, args)
        out: dict = {"arch": args.arch, "images": args.images, "methods": args.methods, "precision": args.precision,
                     "checkpoint_mb": round(ckpt.stat().st_size / 2**20, 1), "cpus": os.cpu_count()}
        cold, log = timed_run(cmd, env_now, work)
        out["first_run_s"] = round(cold, 2)
        print(f"first run (fills whatever is not cached yet): {cold:.1f} s")
        rows: list[tuple[str, list[float]]] = []
        rows.append(("python -c pass", [timed_run([sys.executable, "-c", "pass"], env, work)[0]
                                        for _ in range(args.repeats)]))
        rows.append(("python -c 'import torch'", [timed_run([sys.executable, "-c", "import torch"], env, work)[0]
                                                  for _ in range(args.repeats)]))
        for rev in args.before:
            wt = Path(tmp) / f"before-{rev}"
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(wt), rev],
                           check=True, capture_output=True)
            try:
                env_before = {**env, "PYTHONPATH": str(wt)}
                probe = subprocess.run([sys.executable, "-c", "import vlmood, sys; print(vlmood.__file__)"],
                                       env=env_before, capture_output=True, text=True, cwd=work).stdout.strip()
                assert probe.startswith(str(wt)), f"the worktree's vlmood is not the one imported: {probe}"
                before_cmd = with_report(cmd, work / f"report-{rev}")
                timed_run(before_cmd, env_before, work)  # its own report folder, figures of its own code
                rows.append((f"warm vlmood eval, before ({rev})",
                             [timed_run(before_cmd, env_before, work)[0] for _ in range(args.repeats)]))
            finally:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(wt)],
                               capture_output=True)
        warm = []
        for _ in range(args.repeats):
            dt, log = timed_run(cmd, env_now, work)
            warm.append(dt)
        rows.append(("warm vlmood eval, this tree (figures kept)", warm))
        rows.append(("warm vlmood eval, new folder (figures drawn)",
                     [timed_run(with_report(cmd, work / f"report-new-{k}"), env_now, work)[0]
                      for k in range(args.repeats)]))
        plotless = with_report(cmd, work / "report-no-plots") + ["--no-plots"]
        rows.append(("warm vlmood eval --no-plots, this tree",
                     [timed_run(plotless, env_now, work)[0] for _ in range(args.repeats)]))
        probe = [sys.executable, "-c", PROBE, *cmd[3:]]
        imported = timed_run(probe, env_now, work)[1].strip().splitlines()[-1]
        out["warm run imports"] = imported
        print(f"a warm run (same folder) imports: {imported}")
        print(f"\n{'':44s} {'median s':>9s}  runs")
        for name, ts in rows:
            print(f"{name:44s} {statistics.median(ts):9.2f}  {', '.join(f'{t:.2f}' for t in ts)}")
            out[name] = {"median_s": round(statistics.median(ts), 3), "runs_s": [round(t, 3) for t in ts]}
        print("\nlast warm run's output (tail):\n" + "\n".join(log.strip().splitlines()[-6:]))
        if args.out:
            Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
