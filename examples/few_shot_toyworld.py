"""Few-shot prompt learning end to end, on the toy world: copy this file and edit the settings block.

    python examples/few_shot_toyworld.py [--out few-shot-run]

1. writes a labelled image folder, one subfolder per class (``train/circle/0000.png`` ...): the layout your own
   data should have;
2. trains LoCoOp (and CoOp) on ``SHOTS`` images per class of it;
3. compares them with zero-shot MCM / GL-MCM on one benchmark, every image encoded once;
4. saves the learned prompts, loads them back, and checks the loaded file scores identically.

Real data (ImageNet-style folders): set

    MODEL = "open_clip:ViT-B-16/openai"          # the reference's backbone (downloads once)
    CLASSES = "imagenet1k"                        # or your own list / file, in the order of the folders
    TRAIN = "/data/imagenet/train"                # train/n01440764/*.JPEG ... (WordNet-id folders map to the
                                                  # classes in sorted order, with a warning) or train/<name>/*.jpg
    bench = vlmood.Benchmark(id="/data/imagenet/val", classes=CLASSES,       # in step 3
                             ood={"far": {"textures": "/data/dtd/images", "places": "/data/places"}})

and skip step 1. On a GPU add ``device="cuda"`` to ``load_encoder``. The reference schedule (16 shots, 50
epochs, batch 32, lr 0.002) on 1000 classes x 16 shots encodes 8 views of 16k images once (``views=``), then
every epoch runs only the text tower. The same as a command:

    vlmood train locoop --model open_clip:ViT-B-16/openai --train /data/imagenet/train --classes imagenet1k \\
        --shots 16 --out locoop.safetensors
    vlmood eval --model open_clip:ViT-B-16/openai --suite imagenet-mos --root /data \\
        --methods mcm,glmcm --prompts locoop.safetensors --report report/

(``imagenet-mos``: ImageNet-1k val vs iNaturalist, SUN, Places, Textures, the LoCoOp paper's benchmark; or
``--classes imagenet1k --id /data/imagenet/val --ood far/textures=/data/dtd/images`` for your own sets.)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

import vlmood
from vlmood import toyworld
from vlmood.toyworld.fewshot import few_shot_images

# ----------------------------------------------------------------------------------------------- settings
MODEL = "toyworld"  # the tiny CLIP shipped with vlmood; e.g. "open_clip:ViT-B-16/openai" for real data
CLASSES = list(toyworld.ID_SHAPES)
SHOTS = 16  # labelled images per class (the reference uses 1, 2, 4, 8, 16)
EPOCHS = 50
SEED = 0
SPLIT = "cluttered"  # toy-world training images: "cluttered" (ID shape + a distractor shape) or "clean"


def write_image_folder(root: Path, per_class: int) -> Path:
    """Write toy-world training images as ``root/<class>/<n>.png`` (the ImageFolder layout)."""
    images, labels = few_shot_images(seed=SEED, per_class=per_class, kind=SPLIT, shapes=CLASSES)
    for i, (im, label) in enumerate(zip(images, labels)):
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        im.save(folder / f"{i:04d}.png")
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="few-shot-run", help="folder for the images, runs, prompts and report")
    ap.add_argument("--epochs", type=int, default=EPOCHS)
    args = ap.parse_args()
    out = Path(args.out)

    # 1. a labelled image folder (your own data: skip this and point TRAIN at it)
    train = write_image_folder(out / "train", per_class=2 * SHOTS)
    enc = vlmood.load_encoder(MODEL)  # device="cuda" on a GPU

    # 2. learn prompts; the run folder keeps a checkpoint per epoch, log.jsonl and sample.json. resume=True continues
    #    an interrupted run (or returns a finished one) when the arguments are the same, and refuses other arguments.
    learned = {}
    for name, cls in (("locoop", vlmood.LoCoOp), ("coop", vlmood.CoOp)):
        trainer = cls(enc, CLASSES, seed=SEED)  # n_ctx=16, random init; init="a photo of a" starts from zero-shot
        learned[name] = trainer.fit(str(train), shots=SHOTS, epochs=args.epochs, out=out / f"run-{name}",
                                    resume=True)
        print(f"{name}: final training loss {learned[name].meta['log']['final_loss']:.3f}")

    # 3. zero-shot and learned prompts on one benchmark: the images are encoded once for every detector
    bench = toyworld.benchmark(n=300)
    detectors = {"mcm": "mcm", "glmcm": "glmcm"}
    for name, prompts in learned.items():
        detectors[f"mcm+{name}"] = {"method": "mcm", "prompts": prompts}
        detectors[f"glmcm+{name}"] = {"method": "glmcm", "prompts": prompts}
    report = bench.run(enc, detectors)
    print(report.to_markdown())
    report.save(out / "report")

    # 4. save, load back (checks the encoder and the shapes), and score with the file
    path = learned["locoop"].save(out / "locoop.safetensors")
    loaded = vlmood.load_prompts(path, enc)
    images, _ = toyworld.load_images(seed=7, n=32)
    a = vlmood.GLMCM(enc, prompts=learned["locoop"]).score(images)
    b = vlmood.GLMCM(enc, prompts=str(path)).score(images)  # a path works too
    assert np.array_equal(a, b) and loaded.classes == CLASSES
    print(f"saved and reloaded {path}: {loaded}; identical GL-MCM scores on {len(images)} images")


if __name__ == "__main__":
    try:
        main()
    except vlmood.errors.VlmoodError as e:  # bad input: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
