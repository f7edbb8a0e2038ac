"""Command-line interface: ``vlmood score``, ``calibrate``, ``eval``, ``train``, ``demo``, ``mine-negatives``,
``embed-texts``, ``cache``, ``lvlm``."""
from __future__ import annotations

import argparse
import csv
import io
import math
import os
import shlex
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

from ._io import printable, read_text
from .errors import EncoderLoadError, ImageLoadError, InvalidInputError, VlmoodError, WorkerKilledError


class _StoreOnce(argparse.Action):
    """The default ``store`` action, but an option given twice is an error: with plain ``store`` the later value
    silently replaces the earlier one (``--classes a,b --classes c,d`` would score with ``c,d`` alone)."""

    def __call__(self, parser, namespace, values, option_string=None):  # type: ignore[override]
        seen = namespace.__dict__.setdefault("_given_once", {})
        if self.dest in seen:
            parser.error(f"{option_string} given twice ({seen[self.dest]!r} and {values!r}); give it once")
        seen[self.dest] = values
        setattr(namespace, self.dest, values)


class _BoolOnce(argparse.BooleanOptionalAction):
    """``--X`` / ``--no-X`` (default None: automatic), given at most once: ``--progress --no-progress`` is refused
    rather than the later one silently winning."""

    def __call__(self, parser, namespace, values, option_string=None):  # type: ignore[override]
        seen = namespace.__dict__.setdefault("_given_once", {})
        if self.dest in seen:
            parser.error(f"{option_string} given after {seen[self.dest]}; give one of them once")
        seen[self.dest] = option_string
        super().__call__(parser, namespace, values, option_string)


TRAIN_METHODS = ("coop", "locoop", "clipn")
CLIPN_ON_ERROR = ("skip", "error")
_PROMPT_ONLY = ("--train", "--classes", "--shots", "--n-ctx", "--init", "--csc", "--lam", "--top-k", "--views",
                "--on-missing")
"""``train`` options of prompt learning (coop, locoop) only."""
_CLIPN_ONLY = ("--data", "--caption-column", "--image-column", "--split", "--weight-decay", "--warmup-steps",
               "--n-no-prompts", "--grad-clip", "--grad-checkpointing", "--on-error")
"""``train`` options of clipn only."""


class _Parser(argparse.ArgumentParser):
    """Bad arguments: one line naming the problem on stderr, exit status 2. Single-value options may be given
    only once (repeatable ones use ``action="append"``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)  # --methods must never silently mean --method
        super().__init__(*args, **kwargs)
        self.register("action", None, _StoreOnce)
        self.register("action", "store", _StoreOnce)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _add_model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--model", required=required, metavar="SPEC",
                   help="open_clip:ARCH/PRETRAINED, open_clip:ARCH@CKPT, open_clip:ARCH/none, or hf:MODEL_ID_OR_DIR"
                        + ("" if required else " (with --detector: default the model the detector file records)"))
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default=None,
                   help="precision of the model's weights and forward (default: bf16/fp16 on CUDA, fp32 on CPU)")


def _finite(text: str) -> float:
    """argparse type: a finite float (``nan``/``inf`` would silently compare False with every score)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _method(name: str) -> str:
    from .detectors import canonical_method

    try:
        return canonical_method(name)
    except InvalidInputError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_source_args(p: argparse.ArgumentParser) -> None:
    """Options shared by every command that reads image sources (``score``, ``calibrate``, ``eval``)."""
    p.add_argument("--image-column", default=None, metavar="NAME",
                   help="image column of hf: datasets (default: image)")
    p.add_argument("--label-column", default=None, metavar="NAME",
                   help="label column of hf: datasets (default: label, when the dataset has one); folders take labels "
                        "from ImageFolder subfolders, manifests from their label column")
    p.add_argument("--on-error", choices=("raise", "skip"), default="raise",
                   help="unreadable images: stop (raise, default) or record them and go on (skip)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    p.add_argument("--workers", type=int, default=None, help="decoding workers (default min(4, cpus-1))")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the feature cache")


def _add_detector_args(p: argparse.ArgumentParser, classes_help: str) -> None:
    """How ``score`` and ``calibrate`` build one detector: method, classes, text side and hyper-parameters."""
    from .detectors import DETECTORS

    p.add_argument("--classes", metavar="FILE_OR_LIST", help=classes_help)
    p.add_argument("--method", default=None, type=_method, metavar="|".join(DETECTORS),
                   help="scoring rule (default: mcm; case, '-' and '_' are ignored)")
    p.add_argument("--templates", default=None, metavar="NAME_OR_FILE",
                   help="prompt templates: simple, imagenet7, imagenet80, or a file with one per line "
                        "(default: the method's own; simple for MCM-style methods)")
    p.add_argument("--prompts", metavar="FILE",
                   help="learned prompts from `vlmood train` (.safetensors): the ID class embeddings come from them "
                        "instead of --templates (NegLabel/CSP: the ID side only)")
    p.add_argument("--no", metavar="FILE",
                   help="CLIPN's trained no side for the clipn methods: the file `vlmood train clipn` wrote, or a "
                        "reference checkpoint of xmed-lab/CLIPN, trained on --model (default: the one vlmood ships, "
                        "for the toy-world model only)")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="method hyper-parameter NAME=VALUE passed to the detector (repeatable; VALUE: int, float, "
                        "true/false or text; each parameter once), e.g. --param temperature=0.5. Parameters: "
                        + _params_help())
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the methods that draw random numbers (neglabel, csp: the negative grouping; "
                        "default: their own, 0); refused for methods that draw none")


def build_parser() -> argparse.ArgumentParser:
    from .detectors import DETECTORS

    from . import __version__

    parser = _Parser(prog="vlmood", description="Out-of-distribution detection with vision-language models.")
    parser.add_argument("--version", action="version", version=f"vlmood {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")

    s = sub.add_parser("score", help="score images: predicted class, ID score (higher = more in-distribution), is_ood",
                       description="Score images; writes one CSV row per image: path (id for hf: datasets), class, "
                                   "score, is_ood, error. With --detector FILE (from `vlmood calibrate` or "
                                   "`vlmood eval --save-detectors`) the file's method, classes, text side and "
                                   "threshold are used.")
    _add_model_args(s, required=False)
    s.add_argument("--detector", metavar="FILE",
                   help="a saved detector (.vlmood): its model, method, classes, text side and calibrated threshold "
                        "(is_ood); excludes --method/--classes/--templates/--prompts/--no/--param/--seed")
    _add_detector_args(s, "ID class names: a file (one per line), a bundled list (imagenet1k, cifar10, cifar100) or "
                          "'cat,dog'; optional with --prompts (default: the prompts' classes, which it must equal)")
    s.add_argument("--images", required=True, metavar="SOURCE",
                   help="images: folder (recursive), glob, CSV manifest, or hf:NAME[:split]")
    s.add_argument("--threshold", type=_finite, default=None,
                   help="scores below this (and NaN scores) are flagged is_ood=1 (default: the --detector file's "
                        "calibrated threshold; without one, the is_ood column is empty)")
    s.add_argument("--out", required=True, metavar="CSV|PARQUET",
                   help="output file: .csv, or .parquet (with --engine ray: also a folder or URI the workers write)")
    _add_source_args(s)
    s.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="local (this process, default) or ray: decode in Ray tasks and score in a pool of --workers "
                        "actors, each loading the model and the fitted detector once (pip install 'vlmood[ray]')")
    s.add_argument("--address", default=None, metavar="ADDR",
                   help="--engine ray: the Ray cluster (auto, HOST:6379, ray://HOST:10001; default: $RAY_ADDRESS, or a "
                        "local Ray started here)")
    s.add_argument("--num-gpus-per-worker", type=_finite, default=0.0, metavar="G",
                   help="--engine ray: GPUs per scoring actor (default 0; 0.5 puts two actors on a GPU)")

    cb = sub.add_parser("calibrate", help="fit a detector, calibrate its threshold on ID images, save it (.vlmood)",
                        description="Fit a detector, set its threshold so that --tpr of the --id images are kept as "
                                    "in-distribution, and save it (method, classes, text side, threshold, model) "
                                    "for `vlmood score --detector FILE` or vlmood.load_detector(FILE).")
    _add_model_args(cb)
    _add_detector_args(cb, "ID class names: a file (one per line), a bundled list or 'cat,dog'; optional with "
                           "--prompts")
    cb.add_argument("--id", required=True, metavar="SOURCE",
                    help="ID images to calibrate on: folder, glob, manifest, or hf:NAME[:split]")
    cb.add_argument("--tpr", type=_finite, default=0.95,
                    help="fraction of ID images kept as in-distribution (default 0.95)")
    cb.add_argument("--out", required=True, metavar="FILE", help="detector file to write (e.g. detector.vlmood)")
    _add_source_args(cb)

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
    v.add_argument("--templates", default=None, metavar="NAME_OR_FILE",
                   help="prompt templates of the zero-shot methods (default: each method's own)")
    v.add_argument("--prompts", metavar="FILE",
                   help="learned prompts from `vlmood train`: every method in --methods is also scored with them, "
                        "in the same image pass, as METHOD+LEARNER (e.g. glmcm+locoop) beside the zero-shot METHOD "
                        "(not the clipn methods, whose text side is the templates of their two towers); "
                        "--classes may then be omitted (the prompts' classes are used; given, they must be equal)")
    v.add_argument("--no", metavar="FILE",
                   help="CLIPN's trained no side for the clipn methods: the file `vlmood train clipn` wrote, or a "
                        "reference checkpoint of xmed-lab/CLIPN, trained on --model (default: the one vlmood ships, "
                        "for the toy-world model only)")
    v.add_argument("--no-zero-shot", action="store_true",
                   help="with --prompts: score only the learned variants, not the zero-shot methods")
    v.add_argument("--report", required=True, metavar="DIR", help="output folder")
    v.add_argument("--no-plots", action="store_true",
                   help="write the tables and per-image scores only, not the figures (drawing them takes about "
                        "half a second each; without this option, figures already in --report that show this very "
                        "report are kept, not drawn again); figures an earlier run left in --report are named as "
                        "stale")
    v.add_argument("--save-detectors", metavar="DIR",
                   help="also save every evaluated detector, calibrated at 95%% TPR on the ID set, as "
                        "DIR/METHOD.vlmood (for `vlmood score --detector`)")
    _add_source_args(v)
    v.add_argument("--param", action="append", default=[], metavar="[METHOD.]NAME=VALUE",
                   help="method hyper-parameter [METHOD.]NAME=VALUE passed to the detectors (repeatable; VALUE: int, float, true/false or text; each parameter once), e.g. --param temperature=0.5 (every method in --methods, each must take it) or --param neglabel.ngroups=50 (that method only). Parameters: " + _params_help())
    v.add_argument("--seed", type=int, default=None,
                   help="seed of the methods that draw random numbers (neglabel, csp: the negative grouping; "
                        "default: their own, 0); other methods ignore it, and it is refused if none draws")

    t = sub.add_parser(
        "train", help="train a method's learned part: prompts (CoOp, LoCoOp) or CLIPN's 'no' text tower",
        description="coop, locoop: learn the prompt context of a frozen CLIP from SHOTS labelled images per ID class "
                    "(--train, --classes) and write it to --out, for `vlmood score/eval --prompts`. coop: CoOp (Zhou "
                    "et al., IJCV 2022), cross-entropy on the global image feature; locoop: LoCoOp (Miyai et al., "
                    "NeurIPS 2023), plus --lam times the entropy-maximisation term on ID-irrelevant patches (needs "
                    "local features: an open_clip ViT or ModifiedResNet). Each augmented view is encoded once (--views "
                    "per image) and reused across epochs. clipn: CLIPN (Wang et al., ICCV 2023), a 'no' text tower "
                    "and no prompts trained on image-caption pairs (--data) beside the frozen CLIP, written to --out "
                    "for `vlmood score/eval --no`; each image and caption is encoded once; several GPUs or processes "
                    "through torchrun. The run folder (--run-dir) holds checkpoint.pt and log.jsonl (coop/locoop: "
                    "also sample.json); --resume continues an interrupted run with the same arguments.")
    t.add_argument("method", choices=TRAIN_METHODS, help="coop, locoop or clipn")
    _add_model_args(t)
    t.add_argument("--out", required=True, metavar="FILE",
                   help="file to write (.safetensors): the learned prompts (coop/locoop) or CLIPN's no side (clipn)")
    t.add_argument("--epochs", type=int, default=None, help="epochs (default: 50 for coop/locoop, 10 for clipn, as "
                                                            "the references)")
    t.add_argument("--batch-size", type=int, default=None,
                   help="batch size (default: 32 for coop/locoop; 512 pairs per process for clipn)")
    t.add_argument("--lr", type=_finite, default=None,
                   help="learning rate (coop/locoop: SGD, default 0.002, cosine schedule after 1 warmup epoch at "
                        "1e-5; clipn: AdamW, default 3e-4, cosine schedule after --warmup-steps)")
    t.add_argument("--seed", type=int, default=0,
                   help="seeds the few-shot sample, the context, the augmentations and the order (clipn: the order "
                        "and the prompt choices) (default 0)")
    t.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its last checkpoint")
    t.add_argument("--run-dir", default=None, metavar="DIR",
                   help="run folder: checkpoint, log.jsonl (coop/locoop: sample.json) (default: --out with the "
                        "suffix .run)")
    t.add_argument("--progress", action=_BoolOnce, default=None,
                   help="progress bars (default: when the output is a terminal)")
    c = t.add_argument_group("coop and locoop")
    c.add_argument("--train", metavar="SOURCE",
                   help="labelled training images (required): an ImageFolder folder (a subfolder per class), a "
                        "manifest with a label column, or hf:NAME[:split]")
    c.add_argument("--classes", metavar="FILE_OR_LIST",
                   help="ID class names, in the order the prompts keep (required; file, bundled list, or 'cat,dog')")
    c.add_argument("--shots", type=int, default=None,
                   help="training images per class, sampled with --seed (default 16)")
    c.add_argument("--n-ctx", type=int, default=None,
                   help="context tokens (default 16; with --init, the phrase's token count)")
    c.add_argument("--init", default=None, metavar="PHRASE",
                   help="initialise the context from a phrase such as 'a photo of a' (default: random N(0, 0.02))")
    c.add_argument("--csc", action="store_true", help="class-specific context (one context per class)")
    c.add_argument("--lam", type=_finite, default=None, help="locoop: weight of the entropy term (default 0.25)")
    c.add_argument("--top-k", type=int, default=None,
                   help="locoop: a patch is ID-irrelevant when its label is not among its top K classes "
                        "(default: 200 per 1000 classes, at least 1)")
    c.add_argument("--views", type=int, default=None,
                   help="augmented views encoded per training image (default 8)")
    c.add_argument("--on-missing", choices=("error", "use-all"), default=None,
                   help="a class with fewer than --shots images: stop (error, default) or train on all it has")
    n_ = t.add_argument_group("clipn")
    n_.add_argument("--data", metavar="SOURCE",
                    help="image-caption pairs (required): a CSV/TSV manifest with an image-path column and a caption "
                         "column, webdataset-style .tar shards (a path, glob or {a..b} pattern), or hf:NAME[:split]")
    n_.add_argument("--caption-column", default=None, metavar="NAME",
                    help="caption column of a manifest or dataset (default caption)")
    n_.add_argument("--image-column", default=None, metavar="NAME",
                    help="image column of a manifest or dataset (default image; manifests also find path, file...)")
    n_.add_argument("--split", default=None, help="split of a Hugging Face dataset (hf:NAME)")
    n_.add_argument("--weight-decay", type=_finite, default=None,
                    help="AdamW weight decay (default 0.2; not on biases, norms and gains)")
    n_.add_argument("--warmup-steps", type=int, default=None, help="linear warmup steps (default 0)")
    n_.add_argument("--n-no-prompts", type=int, default=None, metavar="K",
                    help="learnable 'no' prompts (default 16); each caption trains with one of them or their mean")
    n_.add_argument("--grad-clip", type=_finite, default=None, metavar="NORM",
                    help="clip the gradient norm to NORM (default: no clipping, as the reference)")
    n_.add_argument("--grad-checkpointing", action="store_true",
                    help="recompute the no tower's activations in the backward pass (less memory, slower)")
    n_.add_argument("--on-error", choices=CLIPN_ON_ERROR, default=None,
                    help="unreadable training images: leave their pairs out, counted in the log (skip, default) or "
                         "stop (error)")

    dm = sub.add_parser("demo", help="zero-shot OOD detection in the toy world with every detector (offline)",
                        description="Runs MCM, GL-MCM, Energy, MaxLogit, NegLabel, CSP, CLIPN-CTW and CLIPN-ATD "
                                    "with the shipped toy-world CLIP (and its shipped CLIPN no side) on generated "
                                    "images (6 ID shapes vs 6 other shapes and empty backgrounds) and writes the "
                                    "report.")
    dm.add_argument("--report", default="vlmood-demo", metavar="DIR", help="output folder (default vlmood-demo)")
    dm.add_argument("--n", type=int, default=300, help="images per set (default 300)")
    dm.add_argument("--no-plots", action="store_true", help="write the tables and per-image scores only")
    dm.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")

    n = sub.add_parser("mine-negatives", help="mine NegLabel/CSP negative labels for a class list",
                       description="Mine negative labels from a lexicon; .txt output lists 'label<TAB>pos' lines, "
                                   ".json output is a detector file for vlmood.NegLabel.load.")
    _add_model_args(n)
    n.add_argument("--classes", required=True, metavar="FILE_OR_LIST", help="ID class names")
    n.add_argument("--lexicon", default="neglabel",
                   help="neglabel (default), nouns, adjectives, wordnet, or a lexicon folder/file")
    n.add_argument("--pool", choices=("neglabel", "csp"), default="neglabel", help="candidate pool (default neglabel)")
    n.add_argument("--percentile", type=_finite, default=0.95, help="similarity quantile (default 0.95)")
    n.add_argument("--ratio", type=_finite, default=0.15, help="fraction kept per part of speech (default 0.15)")
    n.add_argument("--ngroups", type=int, default=100,
                   help="groups a saved detector scores with (default 100; at most the number of negatives)")
    n.add_argument("--seed", type=int, default=None,
                   help="seed of the negative grouping a saved detector scores with (default 0); not for .txt")
    n.add_argument("--out", required=True, metavar="FILE",
                   help="negatives.txt (the words) or detector.vlmood (a NegLabel/CSP detector for "
                        "`vlmood score --detector` or vlmood.load_detector)")

    e = sub.add_parser("embed-texts", help="fill the text-embedding cache ahead of time",
                       description="Embed prompts into the disk cache ($VLMOOD_CACHE or the platform cache dir).")
    _add_model_args(e)
    e.add_argument("--prompts", metavar="FILE", help="file with one prompt per line")
    e.add_argument("--classes", metavar="FILE_OR_LIST", help="class names to expand with --templates")
    e.add_argument("--templates", default=None, metavar="NAME_OR_FILE", help="templates for --classes (default: simple)")
    e.add_argument("--batch-size", type=int, default=256, help="prompts per forward pass (default 256)")

    ca = sub.add_parser("cache", help="show or clear vlmood's disk caches (text embeddings, image features)",
                        description="The caches live in $VLMOOD_CACHE (default: the platform user cache folder).")
    csub = ca.add_subparsers(dest="cache_command", required=True, parser_class=_Parser, metavar="ACTION")
    csub.add_parser("info", help="size and entries per kind and encoder",
                    description="List each cached namespace: kind, encoder, precision, entries, size, last change.")
    cc = csub.add_parser("clear", help="delete cached namespaces (everything, one encoder's, or old ones)",
                         description="Delete whole cache namespaces. Without options: everything.")
    cc.add_argument("--encoder", metavar="FINGERPRINT",
                    help="only this encoder's entries (a fingerprint or a unique prefix, as `vlmood cache info` shows)")
    cc.add_argument("--older-than", type=_finite, default=None, metavar="DAYS",
                    help="only namespaces not written for more than DAYS days")

    lv = sub.add_parser("lvlm", help="OOD detection with a local vision-language chat model (OpenAI-compatible "
                        "server: vLLM, Ollama, llama.cpp, LM Studio, SGLang)",
                        description="Ask a vision-language chat model served over the OpenAI chat-completions "
                                    "protocol. The API key, when the server needs one, is read from "
                                    "VLMOOD_LVLM_API_KEY or OPENAI_API_KEY (never from the command line).")
    lsub = lv.add_subparsers(dest="lvlm_command", required=True, parser_class=_Parser, metavar="SUBCOMMAND")
    for name, help_ in (("score", "score images: S_max = the highest ID-class confidence / 100 (baseline or "
                                  "ReGuide prompting)"),
                        ("envision", "ask the model for outlier class names (near and far) to use as NegLabel's "
                                     "negatives")):
        q = lsub.add_parser(name, help=help_, description=help_)
        q.add_argument("--base-url", required=True, metavar="URL",
                       help="the server's OpenAI-compatible base URL, e.g. http://localhost:8000/v1")
        q.add_argument("--model", required=True, metavar="NAME", help="the model name the server serves")
        q.add_argument("--classes", required=True, metavar="FILE_OR_LIST", help="ID class names")
        q.add_argument("--out", required=True, metavar="FILE",
                       help="scores.csv" if name == "score" else "negatives.txt (one name per line)")
        q.add_argument("--concurrency", type=int, default=16, help="requests in flight (default 16)")
        q.add_argument("--timeout", type=_finite, default=60.0, help="seconds per request (default 60)")
        q.add_argument("--max-retries", type=int, default=5, help="retries on errors, 429 and 5xx (default 5)")
        q.add_argument("--max-tokens", type=int, default=None, help="answer length limit (default 512)")
        q.add_argument("--cache", default=None, metavar="DIR",
                       help="response cache folder (default $VLMOOD_CACHE/lvlm); a rerun sends no request twice")
        q.add_argument("--no-cache", action="store_true", help="do not read or write the response cache")
        if name == "score":
            q.add_argument("--images", required=True, metavar="DIR|GLOB|CSV", help="images to score")
            q.add_argument("--prompt", choices=("baseline", "reguide"), default="baseline",
                           help="baseline (one question) or reguide (the model first suggests outlier classes)")
            q.add_argument("--invalid", choices=("exclude", "ood", "retry"), default="exclude",
                           help="invalid answers: leave the score empty (exclude, default), score 0 (ood), or ask "
                                "again (retry)")
            q.add_argument("--retries", type=int, default=2, help="re-asks per image with --invalid retry")
            q.add_argument("--class-batch", type=int, default=None, metavar="B",
                           help="ask about at most B ID classes per prompt (S_max = the maximum over batches)")
            q.add_argument("--threshold", type=_finite, default=None, help="is_ood = not score >= threshold")
        else:
            q.add_argument("--near", type=int, default=50, help="near outlier names to ask for (default 50)")
            q.add_argument("--far", type=int, default=50, help="far outlier names to ask for (default 50)")
    return parser


def _require_nonempty(args: argparse.Namespace, *flags: str) -> None:
    """An empty path or name (``--images ""``) would mean the current folder: refuse it."""
    for flag in flags:
        value = getattr(args, flag.lstrip("-").replace("-", "_"), None)
        if isinstance(value, str) and not value.strip():
            hint = " (use '.' for the current folder)" if flag in ("--images", "--id", "--root") else ""
            raise _UsageError(f"{flag} is empty; give a value{hint}")


def _nearest_existing(path: Path) -> Path:
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _check_writable(path: str, flag: str) -> None:
    """``path`` (a file or folder to create or overwrite) can be written: its nearest existing ancestor is a
    folder we may write into. Checked before any model loads, so a typo does not cost a whole run."""
    target = Path(os.path.abspath(path))
    base = _nearest_existing(target)
    if base != target and not base.is_dir():
        raise _UsageError(f"{flag} {printable(path)}: {printable(str(base))} is a file, not a folder")
    # the folder that receives new entries: an existing folder itself, the folder of an existing file
    # (replaced through a temporary file beside it), or the nearest existing ancestor of a new path
    folder = (target if target.is_dir() else target.parent) if base == target else base
    if not os.access(folder, os.W_OK | os.X_OK):
        raise _UsageError(f"{flag} {printable(path)}: cannot write into {printable(str(folder))} (permission denied)")


def _check_output_file(path: str, flag: str) -> Path:
    if not path.strip():
        raise _UsageError(f"{flag} is empty; give a file path")
    out = Path(path)
    if out.is_dir():
        raise _UsageError(f"{flag} {printable(path)} is a folder; give a file path")
    _check_writable(path, flag)
    return out


def _check_output_dir(path: str, flag: str) -> Path:
    if not path.strip():
        raise _UsageError(f"{flag} is empty; give a folder (use '.' for the current folder)")
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise _UsageError(f"{flag} {printable(path)} exists and is not a folder")
    _check_writable(path, flag)
    return out


def _check_not_inside(report: str, sources: Sequence[Any], flag: str = "--report",
                      why: str = "its plots would be read as images by the next run") -> None:
    """An output folder (``--report``, ``--run-dir``) inside an image folder would be read back as images (or as a
    class subfolder) by the next run."""
    rep = Path(os.path.realpath(report))
    for src in sources:
        if isinstance(src, (str, os.PathLike)) and Path(src).is_dir():
            folder = Path(os.path.realpath(src))
            if rep == folder or folder in rep.parents:
                raise _UsageError(f"{flag} {printable(str(report))} is inside the image folder "
                                  f"{printable(str(src))}; {why}: choose another folder")


def _check_counts(args: argparse.Namespace) -> None:
    if getattr(args, "batch_size", 1) < 1:
        raise _UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if getattr(args, "workers", None) is not None and args.workers < 0:
        raise _UsageError(f"--workers must be >= 0, got {args.workers}")


_NOT_PARAMS = frozenset({"self", "encoder", "encoder_or_model", "classes", "templates", "cache", "prompts", "no",
                         "neg_templates", "negatives", "score"})
"""Detector arguments that are not hyper-parameters: set by other options (``--classes``, ``--no``, the method
name for CLIPN's ``score``) or not expressible as one ``--param`` value."""


def method_params(method: str) -> dict[str, Any]:
    """The hyper-parameters ``--param`` may set for ``method``: name -> :class:`inspect.Parameter`, read from the
    ``__init__`` signatures of the detector class and, while they pass ``**kw`` on, its bases."""
    import inspect

    from .detectors import DETECTORS

    out: dict[str, Any] = {}
    for klass in DETECTORS[method].__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or klass is object:
            continue
        sig = inspect.signature(init)
        for prm in sig.parameters.values():
            if prm.kind in (prm.VAR_POSITIONAL, prm.VAR_KEYWORD) or prm.name in _NOT_PARAMS:
                continue
            out.setdefault(prm.name, prm)
        if not any(prm.kind == prm.VAR_KEYWORD for prm in sig.parameters.values()):
            break
    return out


def _param_kind(prm: Any) -> str:
    """``int``, ``float``, ``bool``, ``str`` or ``any``: the first type of the parameter's annotation."""
    ann = prm.annotation if isinstance(prm.annotation, str) else getattr(prm.annotation, "__name__", "")
    first = str(ann).split("|")[0].strip()
    return first if first in ("int", "float", "bool", "str") else "any"


def _param_value(text: str, kind: str, flag: str) -> Any:
    """``--param`` VALUE as ``kind``: int, float (finite), bool (true/false), str; ``any``: the first that fits."""
    low = text.strip().lower()
    if kind == "str":
        return text
    if kind in ("bool", "any") and low in ("true", "false"):
        return low == "true"
    if kind == "bool":
        raise _UsageError(f"{flag}: expected true or false, got {text!r}")
    try:
        return int(text)
    except ValueError:
        if kind == "int":
            raise _UsageError(f"{flag}: expected an integer, got {text!r}") from None
    try:
        value = float(text)
    except ValueError:
        if kind == "float":
            raise _UsageError(f"{flag}: expected a number, got {text!r}") from None
        return text
    if not math.isfinite(value):
        raise _UsageError(f"{flag}: must be a finite number, got {text!r}")
    return value


def _method_params(values: Sequence[str] | None, methods: Sequence[str], seed: int | None,
                   scoped: bool) -> dict[str, dict[str, Any]]:
    """``--param [METHOD.]NAME=VALUE`` and ``--seed`` as keyword arguments per method, checked against each
    method's ``__init__`` (names and types; the detector checks the ranges). An unscoped NAME goes to every method
    in ``methods``, each of which must accept it; a name set twice for one method, or ``seed`` with ``--seed``,
    is refused."""
    from .detectors import canonical_method

    out: dict[str, dict[str, Any]] = {m: {} for m in methods}
    given: dict[tuple[str, str], str] = {}
    for v in values or []:
        flag = f"--param {v}"
        key, sep, text = v.partition("=")
        scope, dot, name = key.strip().rpartition(".")
        name = name.strip()
        if not sep or not name:
            raise _UsageError(f"--param expects {'[METHOD.]' if scoped else ''}NAME=VALUE, got {v!r}")
        if dot and not scoped and not scope.strip():
            raise _UsageError(f"--param expects NAME=VALUE, got {v!r}")
        targets = list(methods)
        if dot:
            try:
                m = canonical_method(scope.strip())
            except InvalidInputError as e:
                raise _UsageError(f"{flag}: {e}") from None
            if m not in methods:
                where = "--methods" if scoped else f"--method ({methods[0]})"
                raise _UsageError(f"{flag}: {m} is not among {where}")
            targets = [m]
        if name == "seed" and seed is not None:
            raise _UsageError(f"{flag} and --seed {seed} both set the seed; give one")
        for m in targets:
            accepted = method_params(m)
            if name not in accepted:
                hint = "" if dot or len(targets) == 1 else f" (scope it to a method: --param METHOD.{name}=VALUE)"
                raise _UsageError(f"{flag}: {m} takes no parameter {name!r}; its parameters: "
                                  f"{', '.join(accepted) or 'none'}{hint}")
            if (m, name) in given:
                raise _UsageError(f"{flag}: {name!r} of {m} is already set by --param {given[m, name]}; "
                                  "give it once")
            given[m, name] = v
            out[m][name] = _param_value(text, _param_kind(accepted[name]), flag)
    if seed is not None:
        seeded = [m for m in methods if "seed" in method_params(m)]
        if not seeded:
            from .detectors import DETECTORS

            drawing = ", ".join(k for k in DETECTORS if "seed" in method_params(k))
            raise _UsageError(f"--seed applies to the methods that draw random numbers ({drawing}); "
                              f"{', '.join(methods)} draw none: drop --seed")
        for m in seeded:
            out[m]["seed"] = seed
    return out


def _params_help() -> str:
    """Every method's ``--param`` names, for the help texts."""
    from .detectors import DETECTORS

    return "; ".join(f"{k}: {', '.join(method_params(k)) or '-'}" for k in DETECTORS)


def _source_arg(args: argparse.Namespace, source: Any, labelled: bool = True) -> Any:
    """A ``--images``/``--id``/``--ood`` value for :func:`vlmood.data.as_source`: ``hf:`` datasets opened with
    ``--image-column`` and (``labelled`` sources only: not OOD sets) ``--label-column``; everything else as given
    (scanned later, before the model loads)."""
    if not (isinstance(source, str) and source.startswith("hf:")):
        return source
    from .data import as_source

    column = args.label_column if labelled else None
    src = as_source(source, image_column=args.image_column if args.image_column is not None else "image",
                    label_column=column if column is not None else "label" if labelled else None)
    if column is not None and src.labels is None and column not in getattr(src.ds, "column_names", []):
        raise _UsageError(f"dataset {printable(source)!r} has no label column {args.label_column!r}; columns: "
                          f"{src.ds.column_names}")
    return src


def _check_columns(args: argparse.Namespace, sources: Sequence[Any]) -> None:
    """``--image-column``/``--label-column`` name columns of ``hf:`` datasets: refused when no source is one (they
    would be silently ignored)."""
    given = [f for f in ("--image-column", "--label-column") if _given(args, f)]
    if given and not any(isinstance(x, str) and x.startswith("hf:") for x in sources):
        raise _UsageError(f"{' and '.join(given)} name columns of hf: datasets, and no image source here is one "
                          "(folders take labels from their subfolders, manifests from their label column)")


def _detector_plan(args: argparse.Namespace) -> dict[str, Any]:
    """The detector ``score``/``calibrate`` will build, checked without loading any model."""
    from .encoders import parse_spec
    from .text import load_classes, load_templates

    method = args.method or "mcm"
    params = _method_params(args.param, [method], args.seed, scoped=False)[method]
    spec = parse_spec(args.model)
    if args.prompts is not None and args.templates is not None:
        raise _UsageError("--templates and --prompts exclude each other: learned prompts replace the templates")
    clipn = _clipn_methods([method])
    if clipn and args.prompts is not None:
        raise _UsageError("--prompts (learned prompts) do not apply to CLIPN, whose text side is the templates of "
                          "its yes and no towers: drop --prompts (its no side is --no FILE)")
    _check_no(args, spec, clipn, f"--method {method}")
    learned = _load_prompts(args)
    classes = load_classes(args.classes) if args.classes is not None else None
    if learned is not None:
        classes = learned.check_classes(classes)
    elif classes is None:
        raise _UsageError("give --classes FILE_OR_LIST (or --prompts FILE, whose classes are used)")
    templates = load_templates(args.templates) if args.templates is not None else None  # None: the method's own
    label = method if learned is None else _learned_label(method, learned)
    return {"spec": spec, "method": method, "params": params, "clipn": bool(clipn), "learned": learned,
            "classes": classes, "templates": templates, "label": label}


def _build_detector(args: argparse.Namespace, plan: dict[str, Any], encoder: Any) -> Any:
    from .detectors import make_detector

    extra = {"no": _load_no(args, encoder)} if plan["clipn"] else {}
    det = make_detector(plan["method"], encoder, plan["classes"], templates=plan["templates"],
                        prompts=plan["learned"], **extra, **plan["params"])
    if det.needs_local:
        encoder.require_local()
    return det.fit()


def _score(args: argparse.Namespace, det: Any, source: Any) -> tuple[Any, Any]:
    """``(features, scores)`` of ``source`` under the fitted ``det`` with the CLI's batch size, workers, error rule and
    cache; patch features (GL-MCM) are reduced batch by batch, never all held in memory; skipped images listed."""
    from .features import extract_features, local_plan, score_detector

    full, reducers = local_plan({"det": det})
    feats = extract_features(det.encoder, source, local=full, local_reducers=reducers or None,
                             batch_size=args.batch_size, num_workers=args.workers, on_error=args.on_error,
                             cache=not args.no_cache)
    for _, err in feats.errors:
        print(f"vlmood: skipped: {printable(err)}", file=sys.stderr)
    return feats, score_detector(det, feats, "det")


def _check_not_manifest(images: Any, out: Path, flag: str = "--images") -> None:
    if isinstance(images, str) and Path(images).is_file() and os.path.realpath(images) == os.path.realpath(out):
        raise _UsageError(f"--out {printable(str(out))} is the {flag} manifest itself; it would be overwritten")


def _cmd_score(args: argparse.Namespace) -> int:
    from .data import as_source
    from .encoders import load_encoder

    # cheap checks first: arguments, then paths, then the model (a typo should not wait for a model to load)
    _check_counts(args)
    _require_nonempty(args, "--images", "--classes", "--templates", "--prompts", "--no", "--detector", "--model",
                      "--image-column", "--label-column")
    _check_columns(args, [args.images])
    _check_engine(args)
    if args.detector is not None:
        return _score_saved(args)
    if args.model is None:
        raise _UsageError("give --model SPEC (or --detector FILE, which records its model)")
    plan = _detector_plan(args)
    out = _check_output_file(args.out, "--out")
    _check_not_manifest(args.images, out)
    source = as_source(_source_arg(args, args.images))
    encoder = load_encoder(plan["spec"], device=args.device, precision=args.precision, defer=not args.no_cache)
    det = _build_detector(args, plan, encoder)
    return _write_scores(args, det, source, out, args.threshold, plan["label"])


def _score_saved(args: argparse.Namespace) -> int:
    """``vlmood score --detector FILE``: the saved detector, its model (or --model) and its calibrated threshold."""
    from .data import as_source
    from .detectors.persist import read_detector_meta
    from .encoders import load_encoder, parse_spec

    from . import load_detector

    meta = read_detector_meta(args.detector)  # a bad file fails before any image or model is read
    clash = [f for f in ("--classes", "--method", "--templates", "--prompts", "--no", "--seed") if _given(args, f)]
    clash += ["--param"] if args.param else []
    if clash:
        raise _UsageError(f"--detector {printable(args.detector)} already holds the method, classes, text side and "
                          f"hyper-parameters; drop {', '.join(clash)}")
    recorded = meta.get("encoder") or {}
    if meta.get("method") == "lvlm":
        raise _UsageError(f"{printable(args.detector)} is a vision-language-model detector: score with it in Python "
                          "(vlmood.load_detector(FILE).score(images)) or with `vlmood lvlm score`")
    if args.model is None and not recorded.get("spec"):
        raise _UsageError(f"{printable(args.detector)} records no encoder spec (a NegLabel JSON file of an earlier "
                          "vlmood): give --model")
    spec = parse_spec(args.model if args.model is not None else recorded["spec"])
    out = _check_output_file(args.out, "--out")
    _check_not_manifest(args.images, out)
    source = as_source(_source_arg(args, args.images))
    precision, device = args.precision, args.device
    if device is None and not args.no_cache:
        from .encoders.base import device_type_without_torch

        device = device_type_without_torch(None)  # "cpu" where no GPU is visible (as load_encoder(defer=True))
    if precision is None and args.model is None:  # the recorded model at the precision its threshold was set at
        from .detectors.persist import _usable_precision

        precision = _usable_precision(recorded.get("precision"), device)
    encoder = load_encoder(spec, device=device, precision=precision, defer=not args.no_cache)
    det = load_detector(args.detector, encoder)  # another model's fingerprint: warns, drops the threshold
    if det.needs_local:
        encoder.require_local()
    thr = args.threshold if args.threshold is not None else det.threshold_
    how = (f"threshold {thr:.6g} given" if args.threshold is not None else
           f"threshold {thr:.6g} calibrated at {100 * det.tpr_:.4g}% TPR" if thr is not None and det.tpr_ else
           f"threshold {thr:.6g} saved" if thr is not None else "no threshold: is_ood left empty")
    return _write_scores(args, det, source, out, thr, f"{det.name} from {printable(args.detector)} ({how})")


def _check_engine(args: argparse.Namespace) -> None:
    """``--engine ray`` options: refused without the engine, checked before any model loads."""
    ray_only = [f for f, given in (("--address", args.address is not None),
                                   ("--num-gpus-per-worker", args.num_gpus_per_worker != 0.0)) if given]
    if args.engine != "ray" and ray_only:
        raise _UsageError(f"{' and '.join(ray_only)} apply to --engine ray")
    if args.num_gpus_per_worker < 0:
        raise _UsageError(f"--num-gpus-per-worker must be >= 0, got {args.num_gpus_per_worker}")
    if args.engine == "ray":
        if args.workers == 0:
            raise _UsageError("--workers with --engine ray is the number of scoring actors: give at least 1")
        if args.no_cache:
            raise _UsageError("--no-cache: the ray engine does not use the feature cache; drop --no-cache")
        suffix = Path(args.out).suffix.lower()
        if suffix not in (".csv", ".parquet") and "://" not in args.out and Path(args.out).is_file():
            raise _UsageError(f"--out {printable(args.out)} is a file: give a .csv, a .parquet or a folder")
    elif Path(args.out).suffix.lower() == ".parquet":
        raise _UsageError("--out .parquet is written by --engine ray; the local engine writes a .csv")


def _write_scores_ray(args: argparse.Namespace, det: Any, source: Any, out: Path, thr: float | None,
                      label: str) -> int:
    """``--engine ray``: :func:`vlmood.scale.score_with_ray`; a .csv ``--out`` gets the local engine's columns."""
    from .scale import score_with_ray
    from .text.cache import atomic_write_bytes

    det.threshold_ = thr  # the is_ood_<name> column
    to_csv = out.suffix.lower() == ".csv"
    res = score_with_ray(source, det.encoder, det, address=args.address, num_workers=args.workers or 2,
                         num_gpus_per_worker=args.num_gpus_per_worker, batch_size=args.batch_size,
                         device=args.device, precision=args.precision, out=None if to_csv else str(out))
    if not to_csv:
        print(f"scored {len(source)} image(s) with {label} on Ray; wrote {printable(str(res))}")
        return 0
    from .data import PathSource

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path" if isinstance(source, PathSource) else "id", "class", "score", "is_ood", "error"])
    score, flag = f"score_{det.name}", f"is_ood_{det.name}"
    errors = 0
    for r in res.sort_values("row").to_dict("records"):  # not itertuples: "class" is a keyword, renamed there
        err = r.get("error")
        err = "" if err is None or isinstance(err, float) and math.isnan(err) else str(err)  # pandas: NaN = none
        errors += bool(err)
        is_ood = "" if err or thr is None or flag not in r else int(bool(r[flag]))
        w.writerow([printable(str(r["id"])), "" if err else r["class"], "" if err else f"{r[score]:.8g}", is_ood,
                    printable(str(err))])
    atomic_write_bytes(out, buf.getvalue().encode("utf-8"))
    print(f"scored {len(res) - errors} image(s) with {label} on Ray; {errors} with errors; wrote {printable(str(out))}")
    if errors and args.on_error == "raise":
        print("vlmood score: error: some images could not be scored (their rows say why; --on-error skip accepts "
              "this)", file=sys.stderr)
        return 1
    return 0


def _write_scores(args: argparse.Namespace, det: Any, source: Any, out: Path, thr: float | None, label: str) -> int:
    """Score ``source`` with the fitted ``det``; one CSV row per image of the source, in its order."""
    import numpy as np

    from .data import PathSource
    from .text.cache import atomic_write_bytes

    if args.engine == "ray":
        return _write_scores_ray(args, det, source, out, thr, label)
    feats, scores = _score(args, det, source)
    labels = det.classify_features(feats)
    row = {i: k for k, i in enumerate(feats.ids)}
    errors = dict(feats.errors)
    flagged = None if thr is None else ~(scores >= thr)  # NaN scores are OOD, never ID
    out.parent.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path" if isinstance(source, PathSource) else "id", "class", "score", "is_ood", "error"])
    for i in source.ids:
        if i in errors:  # unreadable, or features that were not finite (extract_features records both)
            w.writerow([printable(i), "", "", "", printable(errors[i])])
            continue
        k = row[i]
        is_ood = "" if flagged is None else int(flagged[k])
        w.writerow([printable(i), det.classes[labels[k]], f"{scores[k]:.8g}", is_ood, ""])
    atomic_write_bytes(out, buf.getvalue().encode("utf-8"))
    n_ood = "" if flagged is None else f", {int(np.sum(flagged))} flagged OOD"
    print(f"scored {len(feats)} image(s) with {label}{n_ood}; skipped {len(errors)}; wrote {printable(str(out))}")
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    import numpy as np

    from .data import as_source
    from .encoders import load_encoder

    _check_counts(args)
    _require_nonempty(args, "--id", "--classes", "--templates", "--prompts", "--no", "--image-column",
                      "--label-column")
    _check_columns(args, [args.id])
    if not 0.0 < args.tpr <= 1.0:
        raise _UsageError(f"--tpr must be in (0, 1], got {args.tpr}")
    plan = _detector_plan(args)
    out = _check_output_file(args.out, "--out")
    _check_not_manifest(args.id, out, "--id")
    source = as_source(_source_arg(args, args.id))
    encoder = load_encoder(plan["spec"], device=args.device, precision=args.precision, defer=not args.no_cache)
    det = _build_detector(args, plan, encoder)
    feats, scores = _score(args, det, source)
    finite = np.isfinite(scores)
    if not finite.any():
        raise _UsageError(f"none of the {len(scores)} ID image(s) got a finite score; nothing to calibrate on")
    thr = det.calibrate(scores[finite], args.tpr)
    n, kept = len(scores), int(np.sum(scores >= thr))
    print(f"calibrated {plan['label']} on {n} ID image(s) of {printable(source.name)}: threshold {thr:.6g} keeps "
          f"{kept}/{n} ({100 * kept / n:.2f}%; target {100 * args.tpr:.4g}%)"
          + (f"; {n - int(finite.sum())} image(s) with non-finite scores left out" if not finite.all() else ""))
    spread = 2 * math.sqrt(args.tpr * (1 - args.tpr) / n)
    print(f"on new ID images like these, expect a TPR of about {100 * args.tpr:.4g}% (+/- {100 * spread:.2g} points, "
          f"2 sigma, from {n} calibration images; a finite test set adds its own sampling noise)")
    if feats.labels is not None:
        from .data import map_labels

        try:
            truth = map_labels(feats.labels, det.classes)
        except InvalidInputError as e:  # e.g. subfolders that are not the class names: no accuracy, no wrong one
            print(f"ID accuracy: n/a ({printable(str(e))})")
        else:
            print(f"ID accuracy on these images: {100 * float(np.mean(det.classify_features(feats) == truth)):.2f}%")
    det.save(out)
    print(f"wrote {printable(str(out))} (use: vlmood score --detector {shlex.quote(str(out))} --images ... --out "
          "scores.csv)")
    return 0


def _lvlm_client(args: argparse.Namespace) -> Any:
    """The ``vlmood lvlm`` client, checked against the server (reachable, model served) before any image is read."""
    import importlib.util

    if importlib.util.find_spec("httpx") is None:  # the client imports it lazily: check here, once, with the fix
        raise _UsageError("vlmood lvlm needs the lvlm extra (httpx): pip install 'vlmood[lvlm]'")
    from .lvlm.http import OpenAIClient
    for flag, v, lo in (("--concurrency", args.concurrency, 1), ("--max-retries", args.max_retries, 0),
                        ("--max-tokens", 1 if args.max_tokens is None else args.max_tokens, 1)):
        if v < lo:
            raise _UsageError(f"{flag} must be >= {lo}, got {v}")
    if args.timeout <= 0:
        raise _UsageError(f"--timeout must be > 0, got {args.timeout:g}")
    if args.cache is not None and args.no_cache:
        raise _UsageError("--cache and --no-cache exclude each other")
    cache: Any = False if args.no_cache else (True if args.cache is None else args.cache)
    kw = {} if args.max_tokens is None else {"max_tokens": args.max_tokens}
    client = OpenAIClient(args.base_url, args.model, timeout=args.timeout, max_retries=args.max_retries,
                          concurrency=args.concurrency, cache=cache, **kw)
    client.check()
    return client


def _cmd_lvlm(args: argparse.Namespace) -> int:
    """``vlmood lvlm score`` / ``vlmood lvlm envision``."""
    import numpy as np

    from .text import load_classes
    from .text.cache import atomic_write_bytes

    _require_nonempty(args, "--classes", "--out", "--base-url", "--model", "--cache",
                      *(("--images",) if args.lvlm_command == "score" else ()))
    classes = load_classes(args.classes)
    out = _check_output_file(args.out, "--out")
    if args.lvlm_command == "envision":
        for flag, v in (("--near", args.near), ("--far", args.far)):
            if v < 0:
                raise _UsageError(f"{flag} must be >= 0, got {v}")
        kinds = [k for k, v in (("near", args.near), ("far", args.far)) if v > 0]
        if not kinds:
            raise _UsageError("--near and --far are both 0: nothing to ask for")
        client = _lvlm_client(args)
        from .lvlm.envision import envision_negatives

        words = envision_negatives(client, classes, n_near=args.near, n_far=args.far, kinds=kinds)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out, "".join(f"{w}\n" for w in words).encode("utf-8"))
        print(f"wrote {len(words)} outlier class names to {printable(str(out))} (use them as NegLabel's negatives: "
              "NegLabel(encoder, classes, negatives=words))")
        return 0
    from .data import PathSource, list_images
    from .lvlm.detector import LVLMDetector

    for flag, v, lo in (("--retries", args.retries, 0), ("--class-batch", args.class_batch or 1, 1)):
        if v < lo:
            raise _UsageError(f"{flag} must be >= {lo}, got {v}")
    if Path(args.images).is_file() and os.path.realpath(args.images) == os.path.realpath(out):
        raise _UsageError(f"--out {printable(args.out)} is the --images manifest itself; it would be overwritten")
    items = list_images(args.images)
    client = _lvlm_client(args)
    det = LVLMDetector(client, classes, prompt=args.prompt, invalid=args.invalid, retries=args.retries,
                       class_batch=args.class_batch)
    scores, labels = det.respond(PathSource(items, name=str(args.images)))
    thr = args.threshold
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "class", "score", "is_ood", "status", "valid", "reason"])
    for k, item in enumerate(items):
        p = det.responses_[k]
        score = "" if not np.isfinite(scores[k]) else f"{scores[k]:.8g}"
        is_ood = "" if thr is None else int(not (scores[k] >= thr))
        cls = det.classes[labels[k]] if labels[k] >= 0 else ""
        w.writerow([printable(item.path), cls, score, is_ood, p.status, int(bool(p.valid)), printable(p.reason)])
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, buf.getvalue().encode("utf-8"))
    counts = ", ".join(f"{k}: {v}" for k, v in sorted(det.statuses_.items()))
    print(f"scored {len(items)} image(s) with {args.model} ({args.prompt}); invalid {det.n_invalid_} "
          f"({counts}); wrote {printable(str(out))}")
    if items and det.statuses_.get("error", 0) == len(items):  # not one answer: the server, not the images
        first = next(p.reason for p in det.responses_ if p.status == "error")
        print(f"vlmood lvlm: error: no request got an answer (first: {printable(first)})", file=sys.stderr)
        return 1
    return 0


def _load_prompts(args: argparse.Namespace) -> Any:
    """The ``--prompts`` file, read and checked before the model loads (its fit to the model is checked once the
    model is loaded: another width is an error, another model a one-line warning); None without ``--prompts``."""
    if args.prompts is None:
        return None
    from .tuning import LearnedPrompts

    return LearnedPrompts.load(args.prompts)


def _clipn_methods(methods: Sequence[str]) -> list[str]:
    """The CLIPN methods (``clipn``, ``clipnctw``, ``clipnatd``) among canonical method names."""
    from .detectors import DETECTORS, CLIPN

    return [m for m in methods if issubclass(DETECTORS[m], CLIPN)]


def _check_no(args: argparse.Namespace, spec: Any, clipn: Sequence[str], flag: str) -> None:
    """``--no`` before the model loads: only with a clipn method; an existing file (a safetensors file must hold
    ``prompt_no``); without it, only for the toy-world model, whose no side ships with vlmood."""
    if args.no is not None and not clipn:
        raise _UsageError(f"--no FILE is CLIPN's no side, used only by the clipn methods (clipn, clipn-ctw, "
                          f"clipn-atd), and {flag} has none: drop --no or score with a clipn method")
    if args.no is not None:
        path = Path(os.path.expanduser(args.no))
        if not path.is_file():
            raise _UsageError(f"--no {printable(args.no)}: " + ("is a folder; give the CLIPN file" if path.is_dir()
                                                                else "CLIPN file not found"))
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            try:
                with safe_open(str(path), framework="pt") as f:
                    keys = set(f.keys())
            except Exception as e:  # noqa: BLE001 - any unreadable file: one line
                first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
                raise _UsageError(f"--no {printable(args.no)} is not a readable safetensors file "
                                  f"({printable(first[:200])})") from None
            if "prompt_no" not in keys:
                raise _UsageError(f"--no {printable(args.no)} is not a CLIPN file (it has no 'prompt_no' tensor); "
                                  "give the file `vlmood train clipn` wrote, or a reference checkpoint")
    elif clipn:
        from .toyworld import model as toy

        if spec.name != toy.ARCH or not toy.CLIPN_CHECKPOINT.is_file():
            raise _UsageError(f"the clipn methods need --no FILE, CLIPN's trained no side for {spec} (written by "
                              "`vlmood train clipn`, or a reference checkpoint of xmed-lab/CLIPN); vlmood ships one "
                              "only for the toy-world model")


def _load_no(args: argparse.Namespace, encoder: Any) -> Any:
    """The ``--no`` file as a :class:`vlmood.clipn.CLIPNModel` on ``encoder`` (loaded once for every clipn
    detector), or None (the detectors then use the shipped no side). A file of another base model is a usage
    error (exit 2), not a failure of the environment."""
    if args.no is None:
        return None
    from .clipn.model import CLIPNModel

    try:
        return CLIPNModel.load(os.path.expanduser(args.no), encoder=encoder)
    except EncoderLoadError as e:  # a --no file that cannot be read or does not fit: the argument is wrong
        raise _UsageError(f"--no: {e}") from None


def _learned_label(method: str, prompts: Any) -> str:
    """Report label of ``method`` with learned prompts: ``METHOD+LEARNER`` (``glmcm+locoop``)."""
    return f"{method}+{prompts.meta.get('method') or 'prompts'}"


def _parse_methods(text: str) -> list[str]:
    """``--methods``: comma-separated names, canonicalised; a method given twice is refused."""
    from .detectors import canonical_method

    methods: dict[str, str] = {}
    for raw in (m.strip() for m in text.split(",")):
        if not raw:
            continue
        key = canonical_method(raw)
        if key in methods:
            same = f" (as {methods[key]!r} and {raw!r})" if methods[key] != raw else ""
            raise _UsageError(f"--methods lists {key!r} twice{same}; give each method once")
        methods[key] = raw
    if not methods:
        raise _UsageError("--methods is empty")
    return list(methods)


def _parse_ood(values: list[str]) -> dict[str, dict[str, str]]:
    """``--ood [GROUP/]NAME=SOURCE`` values as ``{group: {name: source}}``; a name given twice is refused."""
    groups: dict[str, dict[str, str]] = {}
    seen: dict[str, str] = {}
    for v in values:
        key, sep, src = v.partition("=")
        group, _, name = key.rpartition("/")
        group, name = group.strip() or "ood", name.strip()
        if not sep or not name:
            raise _UsageError(f"--ood expects [GROUP/]NAME=SOURCE, got {v!r}")
        if not src.strip():
            raise _UsageError(f"--ood {v!r}: the SOURCE is empty; give a folder, glob, manifest or hf:NAME")
        if name in ("ID", "mean") or group == "ID":
            raise _UsageError(f"--ood {v!r}: the set needs a name other than 'ID' and 'mean', and a group other "
                              "than 'ID' (reserved for the ID set and the group means)")
        if name in seen:
            raise _UsageError(f"--ood: the set name {name!r} is given twice ({seen[name]!r} and {v!r}); "
                              "each OOD set needs its own name")
        seen[name] = v
        groups.setdefault(group, {})[name] = src
    return groups


def _cmd_eval(args: argparse.Namespace) -> int:
    from .encoders import load_encoder, parse_spec
    from .evaluation import Benchmark, load_suite
    from .text import load_templates

    _check_counts(args)
    methods = _parse_methods(args.methods)
    params = _method_params(args.param, methods, args.seed, scoped=True)
    _require_nonempty(args, "--suite", "--root", "--classes", "--id", "--templates", "--prompts", "--no",
                      "--save-detectors", "--image-column", "--label-column")
    spec = parse_spec(args.model)
    clipn = _clipn_methods(methods)
    _check_no(args, spec, clipn, f"--methods {args.methods}")
    if args.no_zero_shot and clipn:
        raise _UsageError(f"--no-zero-shot keeps only the methods scored with --prompts, and the clipn methods "
                          f"({', '.join(clipn)}) take no learned prompts: drop them from --methods, or drop "
                          "--no-zero-shot")
    if args.no_zero_shot and args.prompts is None:
        raise _UsageError("--no-zero-shot drops the zero-shot methods in favour of --prompts FILE; give --prompts")
    if args.no_zero_shot and args.templates is not None:
        raise _UsageError("--templates sets the zero-shot methods' prompts, which --no-zero-shot drops; give one")
    learned = _load_prompts(args)
    if args.templates is not None:
        load_templates(args.templates)
    if args.suite is not None:
        given = [f for f, v in (("--classes", args.classes), ("--id", args.id), ("--ood", args.ood)) if v]
        if given:
            raise _UsageError(f"--suite defines the classes and image sets; drop {', '.join(given)} "
                              "(or drop --suite to give your own)")
        if args.root is None:
            raise _UsageError("--suite needs --root DIR (the folder holding the suite's data)")
        _check_columns(args, [])
        _check_output_dir(args.report, "--report")
        bench = load_suite(args.suite, args.root, on_error=args.on_error,
                           **({"templates": args.templates} if args.templates is not None else {}))
    else:
        if args.root is not None:
            raise _UsageError("--root is only used with --suite")
        classes = args.classes if args.classes is not None or learned is None else learned.classes
        missing = [f for f, v in (("--classes", classes), ("--id", args.id), ("--ood", args.ood)) if not v]
        if missing:
            raise _UsageError(f"give {', '.join(missing)} (or --suite with --root)")
        ood = _parse_ood(args.ood)
        _check_columns(args, [args.id, *(src for g in ood.values() for src in g.values())])
        _check_output_dir(args.report, "--report")
        bench = Benchmark(id=_source_arg(args, args.id), classes=classes, templates=args.templates,
                          ood={g: {n: _source_arg(args, src, labelled=False) for n, src in sets.items()}
                               for g, sets in ood.items()},
                          name=f"{spec}", on_error=args.on_error)
    if learned is not None:
        learned.check_classes(bench.classes)
    _check_not_inside(args.report, [bench.id, *(src for g in bench.ood.values() for src in g.values())])
    if args.save_detectors is not None:
        _check_output_dir(args.save_detectors, "--save-detectors")
    bench.open_sources()  # every folder, glob and manifest is scanned before the model loads
    encoder = load_encoder(spec, device=args.device, precision=args.precision, defer=not args.no_cache)
    no = _load_no(args, encoder)
    detectors: dict[str, Any] = {} if args.no_zero_shot else {
        m: {"method": m, "no": no, **params[m]} if m in clipn else {"method": m, **params[m]} for m in methods}
    if learned is not None:
        detectors.update({_learned_label(m, learned): {"method": m, "prompts": learned, **params[m]}
                          for m in methods if m not in clipn})
    if args.save_detectors is not None:  # built here, so that the fitted objects can be saved after the run
        detectors = bench.build_detectors(encoder, detectors)
    report = bench.run(encoder, detectors, cache=not args.no_cache, batch_size=args.batch_size,
                       num_workers=args.workers)
    paths = report.save(args.report, plots=not args.no_plots)
    print(report.to_markdown())
    if args.no_plots:
        _name_stale_figures(Path(args.report))
    print(f"wrote {', '.join(printable(str(p)) for p in paths.values())}")
    if args.save_detectors is not None:
        _save_detectors(detectors, report, Path(args.save_detectors))
    return 0


def _name_stale_figures(folder: Path) -> None:
    """With ``--no-plots``: name the figures an earlier run left in the report folder (they do not show this run)."""
    stale = sorted(p.name for p in folder.glob("*.png")
                   if p.name in ("comparison.png", "roc.png") or p.name.startswith("hist_"))
    if stale:
        shown = ", ".join(printable(n) for n in stale[:4]) + (f" and {len(stale) - 4} more" if len(stale) > 4 else "")
        print(f"note: {printable(str(folder))} still holds figures of an earlier run ({shown}); they do not show "
              "this run (--no-plots): remove them or run without --no-plots", file=sys.stderr)


def _save_detectors(detectors: dict[str, Any], report: Any, folder: Path) -> None:
    """Each evaluated detector with the report's threshold (``Report.thresholds``: at ``TPR`` on its finite ID
    scores), as ``folder/<label>.vlmood`` (labels made file-safe; two labels never share a file)."""
    from .evaluation.report import TPR, unique_stems

    folder.mkdir(parents=True, exist_ok=True)
    stems = unique_stems(detectors)
    for label, det in detectors.items():
        thr = report.thresholds.get(label)
        if thr is None:
            print(f"vlmood: not saving {printable(label)}: no finite ID score to calibrate on", file=sys.stderr)
            continue
        det.threshold_, det.tpr_ = thr, TPR
        path = det.save(folder / f"{stems[label]}.vlmood")
        print(f"saved {printable(label)} (threshold {thr:.6g} at {100 * TPR:.4g}% TPR) to {printable(str(path))}")


def _given(args: argparse.Namespace, flag: str) -> bool:
    """Whether ``flag`` was given (method-specific ``train`` options default to None, or False for switches)."""
    value = getattr(args, flag.lstrip("-").replace("-", "_"), None)
    return value is not None and value is not False


def _cmd_train(args: argparse.Namespace) -> int:
    """``vlmood train coop|locoop|clipn``: refuse the other family's options, then train."""
    clipn = args.method == "clipn"
    foreign = [f for f in (_PROMPT_ONLY if clipn else _CLIPN_ONLY) if _given(args, f)]
    if foreign:
        them = "them" if len(foreign) > 1 else "it"
        if clipn:
            raise _UsageError(f"{', '.join(foreign)} {'are options' if len(foreign) > 1 else 'is an option'} of "
                              f"prompt learning (coop, locoop); clipn trains on image-caption pairs (--data): drop "
                              f"{them}")
        raise _UsageError(f"{', '.join(foreign)} {'are options' if len(foreign) > 1 else 'is an option'} of clipn "
                          f"training; {args.method} learns prompts from labelled images (--train, --classes): drop "
                          f"{them}")
    return _train_clipn(args) if clipn else _train_prompts(args)


def _train_prompts(args: argparse.Namespace) -> int:
    """``vlmood train coop|locoop``: learned prompts from a few labelled images per class."""
    import numpy as np

    from .data import as_source, map_labels
    from .encoders import load_encoder, parse_spec
    from .text import load_classes
    from .tuning import CoOp, LoCoOp
    from .tuning.trainer import CHECKPOINT, LOG

    missing = [f"{f} {m}" for f, m in (("--train", "SOURCE"), ("--classes", "FILE_OR_LIST")) if not _given(args, f)]
    if missing:
        raise _UsageError(f"train {args.method} needs {' and '.join(missing)}")
    for name, default in (("shots", 16), ("epochs", 50), ("batch_size", 32), ("lr", 0.002), ("views", 8),
                          ("on_missing", "error")):
        if getattr(args, name) is None:
            setattr(args, name, default)
    # cheap checks first: arguments, then paths and the training set's labels, then the model
    for flag, value, least in (("--shots", args.shots, 1), ("--epochs", args.epochs, 1), ("--n-ctx", args.n_ctx, 1),
                               ("--top-k", args.top_k, 1), ("--batch-size", args.batch_size, 1),
                               ("--views", args.views, 1), ("--seed", args.seed, 0)):
        if value is not None and value < least:
            raise _UsageError(f"{flag} must be >= {least}, got {value}")
    if args.lr <= 0:
        raise _UsageError(f"--lr must be > 0, got {args.lr}")
    if args.lam is not None and args.lam < 0:
        raise _UsageError(f"--lam must be >= 0, got {args.lam}")
    locoop_only = [f for f, v in (("--lam", args.lam), ("--top-k", args.top_k)) if v is not None]
    if args.method == "coop" and locoop_only:
        raise _UsageError(f"{' and '.join(locoop_only)} set LoCoOp's entropy term; CoOp has none: drop "
                          f"{'them' if len(locoop_only) > 1 else 'it'} or train locoop")
    _require_nonempty(args, "--train", "--classes", "--init", "--run-dir")
    spec = parse_spec(args.model)
    if spec.backend != "open_clip":
        raise _UsageError(f"prompt learning needs an open_clip model with a causal text tower; {spec} is a "
                          "Hugging Face transformers model")
    classes = load_classes(args.classes)
    out = _check_output_file(args.out, "--out")
    run = _check_output_dir(args.run_dir if args.run_dir is not None else str(out.with_suffix(".run")), "--run-dir")
    if os.path.abspath(run) == os.path.abspath(out):
        raise _UsageError(f"--run-dir {printable(str(run))} is --out itself; give another --run-dir")
    run_flag = "--run-dir" if args.run_dir is not None else "the run folder (beside --out)"
    _check_not_inside(str(run), [args.train], run_flag,
                      "its files would be mixed into the training images (a new class folder) by the next run")
    if (run / CHECKPOINT).is_file() and not args.resume:
        raise _UsageError(f"--run-dir {printable(str(run))} already holds a run ({CHECKPOINT}); pass --resume to "
                          "continue it, or choose another --run-dir (or --out)")
    src = as_source(args.train)
    name = f"--train {printable(str(args.train))}"
    if not src.labels:
        raise _UsageError(f"{name} has no labels: prompt learning needs a class per image (ImageFolder subfolders "
                          "or a manifest label column)")
    counts = np.bincount(map_labels(src.labels, classes, source=name), minlength=len(classes))
    short = [f"{c!r} ({int(n)})" for c, n in zip(classes, counts) if n < args.shots]
    if short and args.on_missing == "error":
        more = f" and {len(short) - 8} more" if len(short) > 8 else ""
        raise _UsageError(f"{name} has fewer than {args.shots} images for {len(short)} of {len(classes)} classes: "
                          f"{', '.join(short[:8])}{more}; pass --on-missing use-all to train on the images there are, "
                          "or lower --shots")
    encoder = load_encoder(spec, device=args.device, precision=args.precision)
    hyper: dict[str, Any] = {"n_ctx": args.n_ctx, "init": args.init, "csc": args.csc, "seed": args.seed}
    if args.method == "locoop":
        hyper.update({k: v for k, v in (("lam", args.lam), ("top_k", args.top_k)) if v is not None})
    trainer = (LoCoOp if args.method == "locoop" else CoOp)(encoder, classes, **hyper)
    prompts = trainer.fit(src, shots=args.shots, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                          views=args.views, out=run, resume=args.resume, on_missing=args.on_missing.replace("-", "_"),
                          progress=args.progress)
    prompts.save(out)
    log = prompts.meta.get("log", {})
    loss, acc = log.get("final_loss"), log.get("final_acc")
    print(f"trained {args.method} on {prompts.meta['images']['count']} image(s) ({len(classes)} classes, up to "
          f"{args.shots} shots), {args.epochs} epochs: final loss "
          f"{'n/a' if loss is None else f'{loss:.4f}'}, train accuracy {'n/a' if acc is None else f'{acc:.3f}'}")
    print(f"wrote {printable(str(out))}; log {printable(str(run / LOG))}; checkpoint "
          f"{printable(str(run / CHECKPOINT))}")
    return 0


def _train_clipn(args: argparse.Namespace) -> int:
    """``vlmood train clipn``: CLIPN's no side on image-caption pairs; under torchrun (``WORLD_SIZE`` > 1) one
    process per device, rank 0 printing and writing ``--out``."""
    from .clipn.pairs import as_pairs
    from .clipn.trainer import CHECKPOINT, LOG, CLIPNTrainer, env_world, init_distributed
    from .encoders import load_encoder, parse_spec

    rank, world, _ = env_world()
    if rank != 0:  # one voice: the other processes' warnings repeat rank 0's (errors are still printed)
        warnings.simplefilter("ignore")
    if args.data is None:
        raise _UsageError("train clipn needs --data SOURCE (image-caption pairs: a CSV/TSV manifest, .tar shards or "
                          "hf:NAME)")
    for name, default in (("epochs", 10), ("batch_size", 512), ("lr", 3e-4), ("weight_decay", 0.2),
                          ("warmup_steps", 0), ("n_no_prompts", 16), ("on_error", "skip")):
        if getattr(args, name) is None:
            setattr(args, name, default)
    # cheap checks first: arguments, then paths, then the pairs (read, not decoded), then the model
    for flag, value, least in (("--epochs", args.epochs, 1), ("--batch-size", args.batch_size, 1),
                               ("--n-no-prompts", args.n_no_prompts, 1), ("--warmup-steps", args.warmup_steps, 0),
                               ("--seed", args.seed, 0)):
        if value < least:
            raise _UsageError(f"{flag} must be >= {least}, got {value}")
    for flag, value, zero in (("--lr", args.lr, False), ("--weight-decay", args.weight_decay, True),
                              ("--grad-clip", args.grad_clip, False)):
        if value is not None and (value < 0 or (value == 0 and not zero)):
            raise _UsageError(f"{flag} must be {'>= 0' if zero else '> 0'}, got {value}")
    _require_nonempty(args, "--data", "--caption-column", "--image-column", "--split", "--run-dir")
    data = args.data
    hf = data.startswith("hf:")
    tar = not hf and data.lower().endswith(".tar")
    if args.split is not None and not hf:
        raise _UsageError(f"--split chooses a split of a Hugging Face dataset (--data hf:NAME); --data "
                          f"{printable(data)} is not one: drop --split")
    columns = [f for f in ("--caption-column", "--image-column") if _given(args, f)]
    if tar and columns:
        raise _UsageError(f"{' and '.join(columns)} name{'s' if len(columns) == 1 else ''} manifest or dataset "
                          "columns; .tar shards hold each sample's caption in KEY.txt (or KEY.json): drop "
                          f"{'them' if len(columns) > 1 else 'it'}")
    if not hf and not any(ch in data for ch in "*?[{") and not os.path.exists(os.path.expanduser(data)):
        raise _UsageError(f"--data {printable(data)} not found")
    spec = parse_spec(args.model)
    if spec.backend != "open_clip":
        raise _UsageError(f"CLIPN needs an open_clip model with a causal text tower; {spec} is a Hugging Face "
                          "transformers model")
    out = _check_output_file(args.out, "--out")
    if out.suffix != ".safetensors":
        raise _UsageError(f"--out {printable(args.out)} must end in .safetensors (the CLIPN file format)")
    run = _check_output_dir(args.run_dir if args.run_dir is not None else str(out.with_suffix(".run")), "--run-dir")
    if os.path.abspath(run) == os.path.abspath(out):
        raise _UsageError(f"--run-dir {printable(str(run))} is --out itself; give another --run-dir")
    if (run / CHECKPOINT).is_file() and not args.resume:
        raise _UsageError(f"--run-dir {printable(str(run))} already holds a run ({CHECKPOINT}); pass --resume to "
                          "continue it, or choose another --run-dir (or --out)")
    pairs = as_pairs(data, caption_column=args.caption_column or "caption", image_column=args.image_column,
                     split=args.split)
    rank, world = init_distributed(args.device)
    try:
        encoder = load_encoder(spec, device=args.device, precision=args.precision)
        trainer = CLIPNTrainer(encoder, n_prompts=args.n_no_prompts, lr=args.lr, weight_decay=args.weight_decay,
                               warmup_steps=args.warmup_steps, grad_clip=args.grad_clip,
                               grad_checkpointing=args.grad_checkpointing, seed=args.seed)
        model = trainer.fit(pairs, epochs=args.epochs, batch_size=args.batch_size, out=run, resume=args.resume,
                            progress=args.progress, on_error=args.on_error)
        if rank != 0:
            return 0
        out.parent.mkdir(parents=True, exist_ok=True)  # --run-dir may live elsewhere
        model.save(out, encoder_spec=None if ":" in args.model else args.model)  # a model name stays a name
    finally:
        if world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
    print(_clipn_summary(model.meta, args.epochs))
    print(f"wrote {printable(str(out))}; log {printable(str(run / LOG))}; checkpoint "
          f"{printable(str(run / CHECKPOINT))}")
    no, model_arg = printable(shlex.quote(str(out))), printable(shlex.quote(args.model))
    print(f"use it: vlmood score --model {model_arg} --method clipn --no {no} --classes ... --images ... --out "
          f"scores.csv; vlmood eval --model {model_arg} --methods clipn-ctw,clipn-atd --no {no} --classes ... --id "
          "... --ood ... --report DIR")
    return 0


def _clipn_summary(meta: dict[str, Any], epochs: int) -> str:
    """One line: pairs used, skipped (by reason) and truncated; steps; the last epoch's mean loss and its parts."""
    data, final = meta.get("data", {}), meta.get("final", {})
    skipped = data.get("skipped") or {}
    n_skipped = sum(skipped.values())
    why = f" ({', '.join(f'{k}: {v}' for k, v in skipped.items())})" if n_skipped else ""

    def num(key: str) -> str:
        v = final.get(key)
        return "n/a" if v is None else f"{v:.4f}"

    return (f"trained clipn on {data.get('pairs')} pair(s), skipped {n_skipped}{why}, {data.get('truncated', 0)} "
            f"caption(s) truncated; {epochs} epoch(s), {meta.get('steps')} step(s) of {meta.get('batch_size')} x "
            f"{meta.get('world_size', 1)} process(es): last-epoch loss {num('loss')} (bin_yes {num('bin_yes')}, "
            f"bin_no {num('bin_no')}, tso {num('tso')})")


def _cmd_demo(args: argparse.Namespace) -> int:
    from . import toyworld
    from .encoders import load_encoder

    if args.n < 10:
        raise _UsageError(f"--n must be at least 10, got {args.n}")
    _check_output_dir(args.report, "--report")
    encoder = load_encoder("toyworld", device=args.device)
    report = toyworld.demo(encoder, args.n)
    paths = report.save(args.report, plots=not args.no_plots)
    print(report.to_markdown())
    if args.no_plots:
        _name_stale_figures(Path(args.report))
    print(f"wrote {', '.join(printable(str(p)) for p in paths.values())}")
    return 0


def _cmd_mine_negatives(args: argparse.Namespace) -> int:
    from .detectors import NegLabel
    from .encoders import load_encoder, parse_spec
    from .text import load_classes

    from . import lexicons

    _require_nonempty(args, "--classes", "--lexicon")
    spec = parse_spec(args.model)
    classes = load_classes(args.classes)
    out = _check_output_file(args.out, "--out")
    if not 0.0 <= args.percentile <= 1.0:
        raise _UsageError(f"--percentile must be in [0, 1], got {args.percentile}")
    if not 0.0 < args.ratio <= 1.0:
        raise _UsageError(f"--ratio must be in (0, 1], got {args.ratio}")
    if args.ngroups < 1:
        raise _UsageError(f"--ngroups must be >= 1, got {args.ngroups}")
    if out.suffix.lower() not in (".txt", ".vlmood"):
        raise _UsageError(f"--out {printable(args.out)}: give FILE.txt (the word list) or FILE.vlmood (a detector: "
                          "one format for every detector, safetensors + JSON metadata; .json files are no longer "
                          "written)")
    detector = out.suffix.lower() == ".vlmood"
    if args.seed is not None and not detector:
        raise _UsageError("--seed sets the grouping a saved detector scores with; a .txt list of negatives has none")
    lexicons.load(args.lexicon)  # a bad lexicon fails before the model loads
    encoder = load_encoder(spec, device=args.device, precision=args.precision)
    det = NegLabel(encoder, classes, lexicon=args.lexicon, pool=args.pool, percentile=args.percentile,
                   ratio=args.ratio, ngroups=args.ngroups if detector else 1,
                   **({} if args.seed is None else {"seed": args.seed})).fit()
    out.parent.mkdir(parents=True, exist_ok=True)
    if detector:
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
    print(f"mined {len(det.negatives_)} negatives ({', '.join(f'{k}: {v}' for k, v in counts.items())}); "
          f"wrote {printable(str(out))}")
    return 0


def _short(text: Any, width: int = 48) -> str:
    """One printable line of at most ``width`` characters (a preprocessing repr spans several lines)."""
    line = " ".join(printable(str(text or "")).split())
    return line if len(line) <= width else line[: width - 3] + "..."


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def _cmd_cache(args: argparse.Namespace) -> int:
    """``vlmood cache info`` / ``vlmood cache clear [--encoder FP] [--older-than DAYS]``."""
    import datetime

    from ._paths import cache_root
    from .text.cache import cache_info, clear_cache

    root = printable(str(cache_root()))
    if args.cache_command == "info":
        rows = cache_info()
        if not rows:
            print(f"the cache in {root} is empty")
            return 0
        print(f"cache: {root}")
        w = csv.writer(sys.stdout, delimiter="\t", lineterminator="\n")
        w.writerow(["kind", "encoder", "spec", "precision", "detail", "entries", "size", "last written"])
        for r in rows:
            when = "" if r["modified"] is None else datetime.datetime.fromtimestamp(r["modified"]).strftime(
                "%Y-%m-%d %H:%M")
            w.writerow([r["kind"], printable(str(r["fingerprint"])), printable(str(r["spec"] or "")),
                        r["precision"] or "", _short(r.get("detail")), r["entries"],
                        _size(r["bytes"]), when])
        print(f"total: {len(rows)} folder(s), {sum(r['entries'] for r in rows)} entries, "
              f"{_size(sum(r['bytes'] for r in rows))}")
        return 0
    if args.older_than is not None and args.older_than < 0:
        raise _UsageError(f"--older-than must be a number of days >= 0, got {args.older_than}")
    done = clear_cache(encoder=args.encoder, older_than_days=args.older_than)
    for e in done["errors"]:
        print(f"vlmood cache: could not remove {printable(str(e))}", file=sys.stderr)
    print(f"removed {len(done['removed'])} folder(s), {done['entries']} entries, {_size(done['bytes'])} from {root}")
    return 1 if done["errors"] else 0


def _cmd_embed_texts(args: argparse.Namespace) -> int:
    from .encoders import load_encoder, parse_spec
    from .text import class_prompts, embed_texts, load_classes, load_templates
    from .text.embed import default_cache

    _check_counts(args)
    _require_nonempty(args, "--prompts", "--classes", "--templates")
    if args.prompts is None and args.classes is None:
        raise _UsageError("give --prompts FILE and/or --classes FILE_OR_LIST")
    if args.templates is not None and args.classes is None:
        raise _UsageError("--templates expands --classes; give --classes too (templates are not applied to --prompts)")
    spec = parse_spec(args.model)
    prompts: list[str] = []
    if args.prompts is not None:
        p = Path(args.prompts)
        if not p.is_file():
            raise _UsageError(f"prompts file not found: {printable(str(p))}")
        prompts += [ln.strip() for ln in read_text(p, "prompts file").splitlines() if ln.strip()]
    if args.classes is not None:
        prompts += class_prompts(load_classes(args.classes), load_templates(args.templates))
    if not prompts:
        raise _UsageError(f"no prompts in {printable(str(args.prompts))}")
    encoder = load_encoder(spec, device=args.device, precision=args.precision)
    embed_texts(encoder, prompts, batch_size=args.batch_size, cache=True, progress=True)
    root = printable(str(default_cache().root))
    print(f"cached {len(set(prompts))} prompt embedding(s) for {encoder.spec} in {root}")
    return 0


class _UsageError(Exception):
    pass


def _non_utf8(argv: Sequence[str]) -> str | None:
    """The first argument holding bytes that are not UTF-8 (decoded by Python as lone surrogates), if any."""
    for a in argv:
        try:
            a.encode("utf-8")
        except UnicodeEncodeError:
            return a
    return None


def _show_warning(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
    """Warnings in the CLI: one line each, ``vlmood: warning: ...``."""
    print(f"vlmood: warning: {printable(str(message))}", file=sys.stderr)


def _os_error(e: OSError) -> str:
    """One line for an OS failure: the reason and, when known, the file."""
    name = e.filename
    if name is None:
        return printable(e.strerror or str(e))
    name = os.fsdecode(name) if isinstance(name, (str, bytes)) else str(name)
    return f"{printable(e.strerror or str(e))}: {printable(name)}"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    bad = _non_utf8(argv)
    if bad is not None:
        print(f"vlmood: error: argument '{printable(bad)}' is not valid UTF-8; arguments must be UTF-8 text "
              "(rename a file or folder with such a name, e.g. convmv -f latin1 -t utf8 --notest NAME)",
              file=sys.stderr)
        return 2
    for stream in (sys.stdout, sys.stderr):  # a Latin-1 or ASCII console must not turn the table's arrows into a crash
        if hasattr(stream, "reconfigure") and getattr(stream, "errors", None) == "strict":
            stream.reconfigure(errors="backslashreplace")
    if argv == ["--version"]:  # answered without building the parser, which imports the detectors (and torch)
        from . import __version__

        print(f"vlmood {__version__}")
        return 0
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a bad argument (2, already printed as one line): a status, not an exit
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 2
    commands = {"score": _cmd_score, "calibrate": _cmd_calibrate, "cache": _cmd_cache, "eval": _cmd_eval,
                "train": _cmd_train, "demo": _cmd_demo,
                "mine-negatives": _cmd_mine_negatives, "embed-texts": _cmd_embed_texts, "lvlm": _cmd_lvlm}
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            return commands[args.command](args)
        except KeyboardInterrupt:
            how = ("the run folder keeps the last checkpoint: run the same command with "
                   "--resume to continue" if args.command == "train" else
                   "the response cache keeps every answer received: run the same command again to resume"
                   if args.command == "lvlm" else
                   "the feature cache keeps what was encoded: run the same command again to resume")
            print(f"vlmood {args.command}: interrupted ({how})", file=sys.stderr)
            return 130
        except ImageLoadError as e:
            hint = (" (use --on-error skip to go on)" if getattr(args, "on_error", None) is not None
                    else "")  # only where the option exists (train coop/locoop has none)
            print(f"vlmood {args.command}: error: {printable(str(e))}{hint}", file=sys.stderr)
            return 1
        except (EncoderLoadError, WorkerKilledError) as e:  # the environment failed, not the arguments
            print(f"vlmood {args.command}: error: {printable(str(e))}", file=sys.stderr)
            return 2 if isinstance(e, InvalidInputError) else 1  # an unknown architecture or tag is a usage error
        except (_UsageError, VlmoodError) as e:
            print(f"vlmood {args.command}: error: {printable(str(e))}", file=sys.stderr)
            return 1 if isinstance(e, OSError) else 2  # no room for the view features: the environment, not usage
        except OSError as e:  # the environment failed (disk full, permission denied, ...): one line, no traceback
            print(f"vlmood {args.command}: error: {_os_error(e)}", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
