"""Command-line interface: ``vlmood score``, ``eval``, ``demo``, ``mine-negatives``, ``embed-texts``."""
from __future__ import annotations

import argparse
import csv
import io
import os
import sys
from pathlib import Path
from typing import Sequence

from .errors import ImageLoadError, VlmoodError


class _Parser(argparse.ArgumentParser):
    """Bad arguments: one line naming the problem on stderr, exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="SPEC",
                   help="open_clip:ARCH/PRETRAINED, open_clip:ARCH@CKPT, open_clip:ARCH/none, or hf:MODEL_ID_OR_DIR")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default=None,
                   help="autocast precision (default: bf16/fp16 on CUDA, fp32 on CPU)")


def _method(name: str) -> str:
    from .detectors import canonical_method
    from .errors import InvalidInputError

    try:
        return canonical_method(name)
    except InvalidInputError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    from .detectors import DETECTORS

    parser = _Parser(prog="vlmood", description="Out-of-distribution detection with vision-language models.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")

    s = sub.add_parser("score", help="score images: predicted class, ID score (higher = more in-distribution), is_ood",
                       description="Score images; writes one CSV row per image: path, class, score, is_ood, error.")
    _add_model_args(s)
    s.add_argument("--classes", required=True, metavar="FILE_OR_LIST",
                   help="ID class names: a file (one per line), a bundled list (imagenet1k, cifar10, cifar100) or 'cat,dog'")
    s.add_argument("--images", required=True, metavar="DIR|GLOB|CSV", help="folder (recursive), glob, or CSV manifest")
    s.add_argument("--method", default="mcm", type=_method, metavar="|".join(DETECTORS),
                   help="scoring rule (default: mcm; case, '-' and '_' are ignored)")
    s.add_argument("--templates", default=None, metavar="NAME_OR_FILE",
                   help="prompt templates: simple, imagenet7, imagenet80, or a file with one per line "
                        "(default: the method's own; simple for MCM-style methods)")
    s.add_argument("--threshold", type=float, default=None,
                   help="scores below this are flagged is_ood=1 (omit: no is_ood column values)")
    s.add_argument("--out", required=True, metavar="CSV", help="output CSV path")
    s.add_argument("--on-error", choices=("raise", "skip"), default="raise",
                   help="unreadable images: stop (raise, default) or list them in the output and go on (skip)")
    s.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")

    v = sub.add_parser("eval", help="evaluate detectors on an ID set and OOD sets; writes a report",
                       description="Encode every image once, score it with every method, and write report.md, "
                                   "results.csv, results.json and plots into --report DIR.")
    _add_model_args(v)
    v.add_argument("--suite", metavar="NAME_OR_FILE",
                   help="a standard suite (imagenet-mos, openood-v1.5-imagenet1k, openood-v1.5-cifar10, "
                        "openood-v1.5-cifar100) with --root; replaces --classes/--id/--ood")
    v.add_argument("--root", metavar="DIR", help="data root for --suite")
    v.add_argument("--classes", metavar="FILE_OR_LIST", help="ID class names (file, bundled list, or 'cat,dog')")
    v.add_argument("--id", metavar="SOURCE", help="ID images: folder, glob, manifest, or hf:NAME[:split]")
    v.add_argument("--ood", action="append", default=[], metavar="[GROUP/]NAME=SOURCE",
                   help="an OOD set, repeatable; GROUP (e.g. near/far) defaults to 'ood'")
    v.add_argument("--methods", default="mcm", help=f"comma-separated methods from {', '.join(sorted(DETECTORS))}")
    v.add_argument("--templates", default=None, metavar="NAME_OR_FILE", help="prompt templates (default: each method's own)")
    v.add_argument("--report", required=True, metavar="DIR", help="output folder")
    v.add_argument("--on-error", choices=("raise", "skip"), default="raise",
                   help="unreadable images: stop (raise) or list them in the report (skip)")
    v.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    v.add_argument("--workers", type=int, default=None, help="decoding workers (default min(4, cpus-1))")
    v.add_argument("--no-cache", action="store_true", help="do not read or write the feature cache")

    dm = sub.add_parser("demo", help="zero-shot OOD detection in the toy world with every detector (offline)",
                        description="Runs MCM, GL-MCM, Energy, MaxLogit, NegLabel and CSP with the shipped toy-world "
                                    "CLIP on generated images (6 ID shapes vs 6 other shapes and empty backgrounds) "
                                    "and writes the report.")
    dm.add_argument("--report", default="vlmood-demo", metavar="DIR", help="output folder (default vlmood-demo)")
    dm.add_argument("--n", type=int, default=300, help="images per set (default 300)")
    dm.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")

    n = sub.add_parser("mine-negatives", help="mine NegLabel/CSP negative labels for a class list",
                       description="Mine negative labels from a lexicon; .txt output lists 'label<TAB>pos' lines, "
                                   ".json output is a detector file for vlmood.NegLabel.load.")
    _add_model_args(n)
    n.add_argument("--classes", required=True, metavar="FILE_OR_LIST", help="ID class names")
    n.add_argument("--lexicon", default="neglabel",
                   help="neglabel (default), nouns, adjectives, wordnet, or a lexicon folder/file")
    n.add_argument("--pool", choices=("neglabel", "csp"), default="neglabel", help="candidate pool (default neglabel)")
    n.add_argument("--percentile", type=float, default=0.95, help="similarity quantile (default 0.95)")
    n.add_argument("--ratio", type=float, default=0.15, help="fraction kept per part of speech (default 0.15)")
    n.add_argument("--ngroups", type=int, default=100,
                   help="groups a saved .json detector scores with (default 100; at most the number of negatives)")
    n.add_argument("--out", required=True, metavar="FILE", help="negatives.txt or detector.json")

    e = sub.add_parser("embed-texts", help="fill the text-embedding cache ahead of time",
                       description="Embed prompts into the disk cache ($VLMOOD_CACHE or the platform cache dir).")
    _add_model_args(e)
    e.add_argument("--prompts", metavar="FILE", help="file with one prompt per line")
    e.add_argument("--classes", metavar="FILE_OR_LIST", help="class names to expand with --templates")
    e.add_argument("--templates", default=None, metavar="NAME_OR_FILE", help="templates for --classes (default: simple)")
    e.add_argument("--batch-size", type=int, default=256, help="prompts per forward pass (default 256)")
    return parser


def _check_output_file(path: str, flag: str) -> Path:
    out = Path(path)
    if out.is_dir():
        raise _UsageError(f"{flag} {path} is a folder; give a file path")
    parent = out.parent if str(out.parent) else Path(".")
    if parent.exists() and not os.access(parent, os.W_OK):
        raise _UsageError(f"{flag}: cannot write into {parent}")
    return out


def _check_output_dir(path: str, flag: str) -> Path:
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise _UsageError(f"{flag} {path} exists and is not a folder")
    return out


def _check_counts(args: argparse.Namespace) -> None:
    if getattr(args, "batch_size", 1) < 1:
        raise _UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if getattr(args, "workers", None) is not None and args.workers < 0:
        raise _UsageError(f"--workers must be >= 0, got {args.workers}")


def _cmd_score(args: argparse.Namespace) -> int:
    import numpy as np

    from .data import PathSource, list_images
    from .detectors import make_detector
    from .encoders import load_encoder, parse_spec
    from .features import extract_features
    from .text import load_classes, load_templates

    _check_counts(args)
    # cheap checks first: a typo should not wait for a model to load
    spec = parse_spec(args.model)
    classes = load_classes(args.classes)
    templates = load_templates(args.templates) if args.templates else None  # None: the method's own default
    out = _check_output_file(args.out, "--out")
    items = list_images(args.images)
    encoder = load_encoder(spec, device=args.device, precision=args.precision)
    det = make_detector(args.method, encoder, classes, templates=templates)
    if det.needs_local:
        encoder.require_local()
    det.fit()
    feats = extract_features(encoder, PathSource(items, name=str(args.images)), local=det.needs_local,
                             batch_size=args.batch_size, on_error=args.on_error)
    for path, err in feats.errors:
        print(f"vlmood: skipped: {err}", file=sys.stderr)
    scores = det.score_features(feats)
    labels = det.classify_features(feats)
    row = {path: i for i, path in enumerate(feats.ids)}
    errors = dict(feats.errors)

    from .text.cache import atomic_write_bytes

    out.parent.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "class", "score", "is_ood", "error"])
    for item in items:
        if item.path in errors:
            w.writerow([item.path, "", "", "", errors[item.path]])
            continue
        k = row[item.path]
        is_ood = "" if args.threshold is None else int(scores[k] < args.threshold)
        w.writerow([item.path, det.classes[labels[k]], f"{scores[k]:.8g}", is_ood, ""])
    atomic_write_bytes(out, buf.getvalue().encode())
    n_ood = "" if args.threshold is None else f", {int(np.sum(scores < args.threshold))} flagged OOD"
    print(f"scored {len(feats)} image(s) with {args.method}{n_ood}; skipped {len(errors)}; wrote {out}")
    return 0


def _parse_ood(values: list[str]) -> dict[str, dict[str, str]]:
    groups: dict[str, dict[str, str]] = {}
    for v in values:
        key, sep, src = v.partition("=")
        if not sep or not key or not src:
            raise _UsageError(f"--ood expects [GROUP/]NAME=SOURCE, got {v!r}")
        group, _, name = key.rpartition("/")
        if not name.strip() or name == "ID":
            raise _UsageError(f"--ood {v!r}: the set needs a name other than 'ID'")
        groups.setdefault(group or "ood", {})[name] = src
    return groups


def _cmd_eval(args: argparse.Namespace) -> int:
    from .detectors import canonical_method
    from .encoders import load_encoder, parse_spec
    from .evaluation import Benchmark, load_suite

    _check_counts(args)
    methods = [canonical_method(m.strip()) for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise _UsageError("--methods is empty")
    _check_output_dir(args.report, "--report")
    spec = parse_spec(args.model)
    if args.suite:
        if not args.root:
            raise _UsageError("--suite needs --root DIR (the folder holding the suite's data)")
        bench = load_suite(args.suite, args.root, on_error=args.on_error,
                           **({"templates": args.templates} if args.templates else {}))
    else:
        missing = [f for f, v in (("--classes", args.classes), ("--id", args.id), ("--ood", args.ood)) if not v]
        if missing:
            raise _UsageError(f"give {', '.join(missing)} (or --suite with --root)")
        bench = Benchmark(id=args.id, ood=_parse_ood(args.ood), classes=args.classes, templates=args.templates,
                          name=f"{spec}", on_error=args.on_error)
    encoder = load_encoder(spec, device=args.device, precision=args.precision)
    report = bench.run(encoder, methods, cache=not args.no_cache, batch_size=args.batch_size,
                       num_workers=args.workers)
    paths = report.save(args.report)
    print(report.to_markdown())
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from . import toyworld
    from .encoders import load_encoder

    if args.n < 10:
        raise _UsageError(f"--n must be at least 10, got {args.n}")
    encoder = load_encoder("toyworld", device=args.device)
    report = toyworld.benchmark(args.n).run(encoder, toyworld.demo_detectors())
    paths = report.save(args.report)
    print(report.to_markdown())
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


def _cmd_mine_negatives(args: argparse.Namespace) -> int:
    from .detectors import NegLabel
    from .encoders import load_encoder, parse_spec
    from .text import load_classes

    from . import lexicons

    spec = parse_spec(args.model)
    classes = load_classes(args.classes)
    out = _check_output_file(args.out, "--out")
    if not 0.0 <= args.percentile <= 1.0:
        raise _UsageError(f"--percentile must be in [0, 1], got {args.percentile}")
    if not 0.0 < args.ratio <= 1.0:
        raise _UsageError(f"--ratio must be in (0, 1], got {args.ratio}")
    if args.ngroups < 1:
        raise _UsageError(f"--ngroups must be >= 1, got {args.ngroups}")
    lexicons.load(args.lexicon)  # a bad lexicon fails before the model loads
    encoder = load_encoder(spec, device=args.device, precision=args.precision)
    det = NegLabel(encoder, classes, lexicon=args.lexicon, pool=args.pool, percentile=args.percentile,
                   ratio=args.ratio, ngroups=args.ngroups if out.suffix == ".json" else 1).fit()
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".json":
        det.save(out)
    else:
        from .text.cache import atomic_write_bytes

        lines = [f"# {len(det.negatives_)} {args.pool} negatives for {len(classes)} classes, {spec}, "
                 f"percentile {args.percentile}, ratio {args.ratio}"]
        lines += [f"{w}\t{p}" for w, p in det.negatives_]
        atomic_write_bytes(out, ("\n".join(lines) + "\n").encode())
    counts: dict[str, int] = {}
    for _, p in det.negatives_:
        counts[p] = counts.get(p, 0) + 1
    print(f"mined {len(det.negatives_)} negatives ({', '.join(f'{k}: {v}' for k, v in counts.items())}); wrote {out}")
    return 0


def _cmd_embed_texts(args: argparse.Namespace) -> int:
    from .encoders import load_encoder
    from .text import class_prompts, embed_texts, load_classes, load_templates
    from .text.embed import default_cache

    _check_counts(args)
    if not args.prompts and not args.classes:
        raise _UsageError("give --prompts FILE and/or --classes FILE_OR_LIST")
    prompts: list[str] = []
    if args.prompts:
        p = Path(args.prompts)
        if not p.is_file():
            raise _UsageError(f"prompts file not found: {p}")
        prompts += [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if args.classes:
        prompts += class_prompts(load_classes(args.classes), load_templates(args.templates))
    if not prompts:
        raise _UsageError(f"no prompts in {args.prompts}")
    encoder = load_encoder(args.model, device=args.device, precision=args.precision)
    embed_texts(encoder, prompts, batch_size=args.batch_size, cache=True, progress=True)
    print(f"cached {len(set(prompts))} prompt embedding(s) for {encoder.spec} in {default_cache().root}")
    return 0


class _UsageError(Exception):
    pass


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    commands = {"score": _cmd_score, "eval": _cmd_eval, "demo": _cmd_demo, "mine-negatives": _cmd_mine_negatives,
                "embed-texts": _cmd_embed_texts}
    try:
        return commands[args.command](args)
    except ImageLoadError as e:
        print(f"vlmood {args.command}: error: {e} (use --on-error skip to go on)", file=sys.stderr)
        return 1
    except (_UsageError, VlmoodError) as e:
        print(f"vlmood {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
