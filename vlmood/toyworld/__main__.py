"""``python -m vlmood.toyworld train [--steps N] [--out DIR]``: train the toy world's tiny CLIP."""
import argparse
import sys

from . import ASSETS
from .train import train


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vlmood.toyworld", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train the tiny CLIP on generated pairs")
    t.add_argument("--steps", type=int, default=1200)
    t.add_argument("--batch-size", type=int, default=256)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", default="toyworld-model",
                   help=f"output folder (default ./toyworld-model; the shipped model lives in {ASSETS})")
    args = ap.parse_args(argv)
    meta = train(args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    acc = meta["zero_shot_accuracy"]
    print(f"6-way ID zero-shot accuracy {100 * acc['id_6way']:.1f}%, 12-way {100 * acc['all_12way']:.1f}%; "
          f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
