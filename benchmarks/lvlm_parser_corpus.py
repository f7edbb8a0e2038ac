"""Parser statuses on the hand-written LVLM reply corpus (tests/data/lvlm_replies.jsonl).

Parses every reply with :func:`vlmood.lvlm.parser.parse_response` and prints the count per status, how many are
valid, the share of the corpus, and how many lines match their expected status. Usage:

    python benchmarks/lvlm_parser_corpus.py [--by-tag]

Measured (258 replies, every one matching its expected status; 0.03 s for the whole corpus on one CPU core):

    status            count  valid  share
    complete            130    130  50.4%
    partial              22     22   8.5%
    truncated            15      8   5.8%
    single_value         13      6   5.0%
    none_of_these        18     18   7.0%
    bad_value             3      0   1.2%
    prediction_only      15      0   5.8%
    refusal              11      0   4.3%
    no_confidence        14      0   5.4%
    off_list              7      0   2.7%
    empty                10      0   3.9%
    total               258    184  71.3% valid
    expected status matched: 258/258

(The corpus is written to cover the deviations several times each, so these shares describe the corpus, not
how often a real model deviates.)
"""
from __future__ import annotations

import argparse
import json
import time
from collections import Counter, defaultdict
from pathlib import Path

from vlmood.lvlm.parser import STATUSES, parse_response

CORPUS = Path(__file__).resolve().parent.parent / "tests" / "data" / "lvlm_replies.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--by-tag", action="store_true", help="also print the statuses per deviation tag")
    args = ap.parse_args()
    rows = [json.loads(line) for line in CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()]
    t0 = time.perf_counter()
    parsed = [parse_response(r["text"], r["classes"]) for r in rows]
    elapsed = time.perf_counter() - t0
    count, valid = Counter(p.status for p in parsed), Counter(p.status for p in parsed if p.valid)
    print(f"{'status':<16} {'count':>6} {'valid':>6} {'share':>6}")
    for s in STATUSES:
        if count[s]:
            print(f"{s:<16} {count[s]:>6} {valid[s]:>6} {100 * count[s] / len(rows):>5.1f}%")
    n_valid = sum(valid.values())
    print(f"{'total':<16} {len(rows):>6} {n_valid:>6} {100 * n_valid / len(rows):>5.1f}% valid")
    ok = sum(p.status == r["expected_status"] for p, r in zip(parsed, rows))
    print(f"expected status matched: {ok}/{len(rows)}  ({elapsed:.3f} s)")
    if args.by_tag:
        tags: dict[str, Counter] = defaultdict(Counter)
        for p, r in zip(parsed, rows):
            tags[r["tag"]][p.status] += 1
        print()
        for tag, c in sorted(tags.items()):
            print(f"{tag:<12} " + ", ".join(f"{s} {n}" for s, n in c.most_common()))


if __name__ == "__main__":
    main()
