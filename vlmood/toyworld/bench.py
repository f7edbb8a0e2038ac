"""The toy world's zero-shot OOD benchmark, the demo's detector set and what each of its report rows means.

The evaluation side is imported inside the functions, so importing :mod:`vlmood.toyworld` (which the encoders'
registry does to load the shipped model) never loads it.
"""
from __future__ import annotations

from typing import Any

from .world import ID_SHAPES, OOD_SHAPES, World


def load_images(seed: int, n: int, shapes=ID_SHAPES, empty: bool = False):
    """``n`` PIL images (and their shape names) of the given shapes, or of empty backgrounds."""
    from PIL import Image

    world = World(seed, shapes=shapes, p_empty=0.0)
    arrays, _, scenes = world.batch(n, empty=True if empty else False)
    return [Image.fromarray(a) for a in arrays], [s.shape for s in scenes]


def benchmark(n: int = 300, seed: int = 2024):
    """The world's OOD benchmark: ID = 6 shapes (labelled), near-OOD = the 6 other shapes, far-OOD = no object.

    Images are generated in memory from seeds that training never used.
    """
    from ..data import MemorySource
    from ..evaluation import Benchmark

    id_imgs, id_labels = load_images(seed, n, ID_SHAPES)
    near, _ = load_images(seed + 1, n, OOD_SHAPES)
    far, _ = load_images(seed + 2, n, empty=True)
    return Benchmark(
        id=MemorySource(id_imgs, id_labels, name="toyworld-id"),
        ood={"near": {"other shapes": MemorySource(near, name="other-shapes")},
             "far": {"empty backgrounds": MemorySource(far, name="empty")}},
        classes=list(ID_SHAPES), name="toy world: 6 ID shapes vs 6 other shapes (near) and empty backgrounds (far)",
    )


def demo_detectors() -> dict[str, Any]:
    """Every detector, configured for the world (NegLabel/CSP mine from the world's lexicon; CLIPN's CTW and ATD
    use the no side that ships for the world's CLIP, ``assets/toyworld-clipn.safetensors``, with the world's prompt
    ``a photo of a {}``)."""
    from . import lexicon_dir

    lex = str(lexicon_dir())
    no_shapes = [str(p) for p in sorted(lexicon_dir().glob("*.txt")) if p.name != "noun.shape.txt"]
    common = {"lexicon": lex, "ratio": 0.5, "ngroups": 1}
    return {
        "mcm": "mcm", "glmcm": "glmcm", "energy": "energy", "maxlogit": "maxlogit",
        "neglabel": {"method": "neglabel", **common},
        "neglabel (no shape nouns)": {"method": "neglabel", **common, "lexicon": no_shapes},
        "csp": {"method": "csp", **common},
        "clipn-ctw": {"method": "clipn", "templates": "simple"},
        "clipn-atd": {"method": "clipnatd", "templates": "simple"},
    }


def demo_descriptions() -> dict[str, str]:
    """One sentence per row of the demo's report (the labels of :func:`demo_detectors`): what the row is and why the
    demo shows it. Shown in ``report.md`` under the tables (:attr:`vlmood.evaluation.Report.descriptions`)."""
    mined = ("the toy lexicon has a few dozen words, so ratio=0.5 and one group replace the paper's 0.15 and 100 "
             "groups, which assume a 70,000-word lexicon")
    return {
        "mcm": "MCM (Ming et al., NeurIPS 2022): the highest softmax probability over the six ID shape names; the "
               "zero-shot baseline the other rows are compared with.",
        "glmcm": "GL-MCM (Miyai et al., 2023): MCM plus the best match of any image patch, so that a small ID shape "
                 "still scores high.",
        "energy": "Energy (Liu et al., NeurIPS 2020) on the zero-shot logits: the log-sum-exp over the ID shapes "
                  "instead of MCM's softmax maximum.",
        "maxlogit": "MaxLogit (Hendrycks et al., ICML 2022): the highest raw image-text logit over the ID shapes, "
                    "without a softmax.",
        "neglabel": "NegLabel (Jiang et al., ICLR 2024) with negative labels mined from the whole toy lexicon, whose "
                    "shape nouns include the six OOD shapes (ring, moon, ...): it shows NegLabel when its word list "
                    f"happens to name the OOD objects; {mined}.",
        "neglabel (no shape nouns)": "The same NegLabel with the shape nouns (noun.shape.txt) removed from the "
                                     "lexicon, so it cannot mine the OOD shapes' names and must rely on background "
                                     "and adjective words: the honest comparison for near-OOD, like a real lexicon "
                                     "that does not name the OOD classes (its gap to the row above is what naming "
                                     "them is worth).",
        "csp": "CSP (Chen et al., NeurIPS 2024): NegLabel's score with a conjugated pool (nouns, and adjectives "
               f"joined to superclass words such as 'object') mined from the whole toy lexicon; {mined}.",
        "clipn-ctw": "CLIPN-CTW (Wang et al., ICCV 2023): the 'yes' probability of the best ID shape against a "
                     "'no' text tower trained for the toy world's CLIP (shipped as assets/toyworld-clipn.safetensors), "
                     "prompt 'a photo of a {}'.",
        "clipn-atd": "CLIPN-ATD (Wang et al., ICCV 2023): the 'yes' probabilities of all ID shapes against the same "
                     "'no' tower, weighted by the zero-shot class probabilities.",
    }


def demo(encoder: Any = None, n: int = 300, seed: int = 2024, **run_kwargs: Any):
    """What ``vlmood demo`` runs: :func:`benchmark` with every detector of :func:`demo_detectors`, the report's
    rows described by :func:`demo_descriptions`. ``encoder``: default the shipped toy-world CLIP; ``run_kwargs`` go
    to :meth:`vlmood.evaluation.Benchmark.run` (``progress``, ``cache``, ...). Returns the
    :class:`~vlmood.evaluation.Report`."""
    if encoder is None:
        from ..encoders import load_encoder

        encoder = load_encoder("toyworld")
    report = benchmark(n, seed).run(encoder, demo_detectors(), **run_kwargs)
    report.descriptions.update(demo_descriptions())
    return report
