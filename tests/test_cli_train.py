"""`vlmood train coop|locoop` and `score`/`eval --prompts`: a toy-world run end to end, resume after an
interruption, and bad input refused in one line before the model loads."""
import csv
import json

import numpy as np
import pytest
import torch

import vlmood
from vlmood import GLMCM, LearnedPrompts
from vlmood.cli import main
from vlmood.toyworld import ID_SHAPES, OOD_SHAPES, load_images

CLASSES = ",".join(ID_SHAPES)
FAST = ["--shots", "2", "--epochs", "2", "--views", "2", "--batch-size", "4", "--n-ctx", "4"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Toy-world PNGs: train/<shape>/ (3 per class), id/<shape>/, ood/ (other shapes), flat/ (unlabelled)."""
    root = tmp_path_factory.mktemp("world")
    for split, seed, n in (("train", 1, 60), ("id", 2, 60)):
        images, names = load_images(seed, n, ID_SHAPES)
        kept: dict[str, int] = {}
        for i, (im, name) in enumerate(zip(images, names)):
            if kept.get(name, 0) < 3:
                kept[name] = kept.get(name, 0) + 1
                (root / split / name).mkdir(parents=True, exist_ok=True)
                im.save(root / split / name / f"{i}.png")
        assert sorted(kept) == sorted(ID_SHAPES) and set(kept.values()) == {3}
    for folder, shapes in (("ood", OOD_SHAPES), ("flat", ID_SHAPES)):
        (root / folder).mkdir()
        for i, im in enumerate(load_images(3, 6, shapes)[0]):
            im.save(root / folder / f"{i}.png")
    return root


@pytest.fixture
def no_model(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the model was loaded before the bad argument was noticed")

    monkeypatch.setattr("vlmood.encoders.load_encoder", boom)


def err_line(capsys) -> str:
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1, err
    return err[0]


def train(world, out, *extra, method="locoop"):
    """argv of a fast training run; ``extra`` options replace the defaults of the same name (an option may be
    given only once)."""
    args = {"--model": "toyworld", "--train": str(world / "train"), "--classes": CLASSES, "--out": str(out),
            **dict(zip(FAST[::2], FAST[1::2]))}
    flags, i = [], 0
    while i < len(extra):
        if i + 1 < len(extra) and not extra[i + 1].startswith("--"):
            args[extra[i]] = extra[i + 1]
            i += 2
        else:
            flags.append(extra[i])
            i += 1
    return ["train", method, *[x for kv in args.items() for x in kv], *flags]


def test_train_then_score_and_eval_with_the_prompts(world, tmp_path, capsys):
    out = tmp_path / "locoop.safetensors"
    assert main(train(world, out, "--lam", "0.5", "--top-k", "2")) == 0
    text = capsys.readouterr().out
    assert "trained locoop on 12 image(s)" in text and "final loss" in text and "train accuracy" in text
    run = tmp_path / "locoop.run"
    assert f"wrote {out}; log {run / 'log.jsonl'}" in text
    prompts = LearnedPrompts.load(out)
    assert prompts.classes == list(ID_SHAPES) and prompts.n_ctx == 4 and prompts.meta["method"] == "locoop"
    assert prompts.meta["hyperparameters"]["lam"] == 0.5 and prompts.meta["hyperparameters"]["top_k"] == 2
    assert prompts.meta["shots"] == 2 and prompts.meta["hyperparameters"]["epochs"] == 2
    assert torch.equal(LearnedPrompts.load(run / "prompts.safetensors").ctx, prompts.ctx)
    log = [json.loads(ln) for ln in (run / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log if r.get("summary")] == [1, 2]
    assert f"{log[-1]['loss']:.4f}" in text

    # score: --classes taken from the prompts; numbers equal the Python API's
    scores = tmp_path / "s.csv"
    assert main(["score", "--model", "toyworld", "--prompts", str(out), "--images", str(world / "ood"),
                 "--method", "glmcm", "--out", str(scores)]) == 0
    assert "with glmcm+locoop" in capsys.readouterr().out
    with open(scores, newline="") as f:
        rows = list(csv.DictReader(f))
    det = GLMCM(vlmood.load_encoder("toyworld"), prompts=out)
    np.testing.assert_allclose([float(r["score"]) for r in rows], det.score([r["path"] for r in rows]), rtol=1e-5)

    # eval: zero-shot and learned side by side; --no-zero-shot keeps the learned ones only
    rep = tmp_path / "rep"
    assert main(["eval", "--model", "toyworld", "--prompts", str(out), "--id", str(world / "id"),
                 "--ood", f"far/ood={world / 'ood'}", "--methods", "mcm,glmcm", "--templates", "imagenet7",
                 "--report", str(rep), "--workers", "0"]) == 0
    results = json.loads((rep / "results.json").read_text())
    methods = {r["method"] for r in results["rows"]}
    assert methods == {"mcm", "glmcm", "mcm+locoop", "glmcm+locoop"}, methods
    assert main(["eval", "--model", "toyworld", "--prompts", str(out), "--classes", CLASSES, "--id",
                 str(world / "id"), "--ood", f"ood={world / 'ood'}", "--methods", "mcm", "--no-zero-shot",
                 "--report", str(tmp_path / "rep2"), "--workers", "0"]) == 0
    results = json.loads((tmp_path / "rep2" / "results.json").read_text())
    assert {r["method"] for r in results["rows"]} == {"mcm+locoop"}


def test_resume_after_an_interruption_equals_an_uninterrupted_run(world, tmp_path, capsys, monkeypatch):
    from vlmood.tuning.trainer import PromptTrainer

    full = tmp_path / "full.safetensors"
    assert main(train(world, full, "--epochs", "3", method="coop")) == 0
    real = PromptTrainer._epoch

    def interrupted(self, loop, epoch, epochs, lr):
        if epoch == 1:
            raise KeyboardInterrupt
        return real(self, loop, epoch, epochs, lr)

    out = tmp_path / "cut.safetensors"
    monkeypatch.setattr(PromptTrainer, "_epoch", interrupted)
    capsys.readouterr()
    assert main(train(world, out, "--epochs", "3", method="coop")) == 130
    assert "with --resume to continue" in err_line(capsys)
    assert not out.exists() and (tmp_path / "cut.run" / "checkpoint.pt").is_file()
    monkeypatch.setattr(PromptTrainer, "_epoch", real)
    with monkeypatch.context() as m:  # without --resume the run folder is not overwritten, and no model loads
        m.setattr("vlmood.encoders.load_encoder", lambda *a, **k: pytest.fail("model loaded"))
        assert main(train(world, out, "--epochs", "3", method="coop")) == 2
        assert "already holds a run (checkpoint.pt); pass --resume" in err_line(capsys)
    assert main(train(world, out, "--epochs", "3", "--resume", method="coop")) == 0
    assert torch.equal(LearnedPrompts.load(out).ctx, LearnedPrompts.load(full).ctx)
    log = [json.loads(ln) for ln in (tmp_path / "cut.run" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log if r.get("summary")] == [1, 2, 3]


def test_on_missing_use_all_trains_on_what_there_is(world, tmp_path, capsys):
    out = tmp_path / "p.safetensors"
    assert main(train(world, out, "--shots", "5", "--on-missing", "use-all", method="coop")) == 0
    captured = capsys.readouterr()
    warns = [ln for ln in captured.err.splitlines() if ln.startswith("vlmood: warning:")]
    assert len(warns) == 1 and "fewer than 5 images for 6 of 6 classes" in warns[0]
    assert "trained coop on 18 image(s)" in captured.out


@pytest.mark.parametrize("extra, needle", [
    (["--shots", "0"], "--shots must be >= 1, got 0"),
    (["--epochs", "0"], "--epochs must be >= 1, got 0"),
    (["--views", "0"], "--views must be >= 1"),
    (["--n-ctx", "0"], "--n-ctx must be >= 1"),
    (["--lr", "0"], "--lr must be > 0"),
    (["--lr", "nan"], "must be a finite number"),
    (["--lam", "-1"], "--lam must be >= 0"),
    (["--top-k", "0"], "--top-k must be >= 1"),
    (["--init", " "], "--init is empty"),
    (["--shots", "4"], "has fewer than 4 images for 6 of 6 classes: 'circle' (3), "),
    (["--run-dir", "{out}"], "is --out itself"),
    (["--out", "{tmp}"], "is a folder; give a file path"),
    (["--on-missing", "skip"], "invalid choice: 'skip'"),
])
def test_bad_train_arguments_fail_before_the_model_loads(world, tmp_path, no_model, capsys, extra, needle):
    out = tmp_path / "p.safetensors"
    extra = [x.format(out=out, tmp=tmp_path) for x in extra]
    assert main(train(world, out, *extra)) == 2
    line = err_line(capsys)
    assert needle in line, line
    assert not out.exists() and not (tmp_path / "p.run").exists()


def test_bad_training_sets_fail_before_the_model_loads(world, tmp_path, no_model, capsys):
    out = str(tmp_path / "p.safetensors")
    base = ["--model", "toyworld", "--out", out, *FAST]
    cases = [
        (["coop", "--train", str(world / "train"), "--classes", CLASSES, "--lam", "0.25"],
         "--lam set LoCoOp's entropy term; CoOp has none"),
        (["locoop", "--train", str(world / "flat"), "--classes", CLASSES], "has no labels"),
        (["locoop", "--train", str(world / "train"), "--classes", "circle,square"], "has labels outside the class list: 'cross'"),
        (["locoop", "--train", str(world / "nowhere"), "--classes", CLASSES], "image source not found"),
        (["locoop", "--train", "", "--classes", CLASSES], "--train is empty"),
        (["locoop", "--train", str(world / "train"), "--classes", CLASSES, "--model", "hf:org/clip"],
         "needs an open_clip model"),
    ]
    for args, needle in cases:
        argv = ["train", args[0], *base, *args[1:]]
        if "--model" in args[1:]:
            argv = ["train", args[0], "--out", out, *FAST, *args[1:]]
        assert main(argv) == 2, args
        line = err_line(capsys)
        assert needle in line, (args, line)


@pytest.fixture(scope="module")
def saved_prompts(tmp_path_factory):
    """Learned prompts written without training (random context); their metadata names another model."""
    p = tmp_path_factory.mktemp("prompts") / "p.safetensors"
    ctx = torch.randn(4, 128, generator=torch.Generator().manual_seed(0)) * 0.02
    LearnedPrompts(list(ID_SHAPES), ctx, meta={"method": "coop",
                                               "encoder": {"spec": "open_clip:ViT-B-16/openai",
                                                           "fingerprint": "other-model"}}).save(p)
    return p


def test_prompts_from_another_model_warn_in_one_line(world, tmp_path, saved_prompts, capsys):
    assert main(["eval", "--model", "toyworld", "--prompts", str(saved_prompts), "--id", str(world / "id"),
                 "--ood", f"ood={world / 'ood'}", "--methods", "mcm,glmcm,energy", "--no-zero-shot",
                 "--report", str(tmp_path / "rep"), "--workers", "0"]) == 0
    warns = [ln for ln in capsys.readouterr().err.splitlines() if "warning" in ln]
    assert len(warns) == 1 and "trained with open_clip:ViT-B-16/openai" in warns[0], warns


def test_bad_prompts_options_fail_before_the_model_loads(world, tmp_path, saved_prompts, no_model, capsys):
    (tmp_path / "notes.txt").write_text("not prompts")
    p = str(saved_prompts)
    score = ["score", "--model", "toyworld", "--images", str(world / "ood"), "--out", str(tmp_path / "s.csv")]
    ev = ["eval", "--model", "toyworld", "--id", str(world / "id"), "--ood", f"ood={world / 'ood'}",
          "--report", str(tmp_path / "rep")]
    cases = [
        (score + ["--prompts", str(tmp_path / "none.safetensors")], "learned-prompts file not found"),
        (score + ["--prompts", str(tmp_path / "notes.txt")], "is not a readable safetensors file"),
        (score + ["--prompts", ""], "--prompts is empty"),
        (score + ["--prompts", p, "--templates", "simple"], "--templates and --prompts exclude each other"),
        (score + ["--prompts", p, "--classes", "circle,square"], "class list differs"),
        (score + ["--prompts", p, "--classes", ",".join(reversed(ID_SHAPES))], "same classes in another order"),
        (score, "give --classes FILE_OR_LIST (or --prompts FILE"),
        (ev + ["--prompts", p, "--classes", "circle,square"], "class list differs"),
        (ev + ["--classes", CLASSES, "--no-zero-shot"], "give --prompts"),
        (ev + ["--prompts", p, "--no-zero-shot", "--templates", "simple"], "which --no-zero-shot drops"),
        (ev + ["--prompts", str(tmp_path / "notes.txt")], "is not a readable safetensors file"),
    ]
    for argv, needle in cases:
        assert main(argv) == 2, argv
        line = err_line(capsys)
        assert needle in line, (argv, line)


def test_train_help():
    from vlmood.cli import build_parser

    text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    for flag in ("--shots", "--epochs", "--resume", "--run-dir", "--on-missing", "--lam", "--top-k", "--csc",
                 "--init", "--n-ctx", "--views", "--seed"):
        assert flag in text
    eval_help = build_parser()._subparsers._group_actions[0].choices["eval"].format_help()
    assert "METHOD+LEARNER" in eval_help and "--no-zero-shot" in eval_help


# ------------------------------------------------------------------------------------------- review fixes
def test_corrupt_training_image_hint_names_only_existing_options(world, tmp_path, capsys):
    import shutil

    train_dir = tmp_path / "train"
    shutil.copytree(world / "train", train_dir)
    for shape in ID_SHAPES:
        (train_dir / shape / "zz-bad.png").write_bytes(b"not a png")  # 4 images per class: --shots 4 takes all
    out = tmp_path / "p.safetensors"
    assert main(train(world, out, "--train", str(train_dir), "--shots", "4", method="coop")) == 1
    line = err_line(capsys)
    assert line.startswith("vlmood train: error: ") and "zz-bad.png" in line
    assert "--on-error" not in line  # train has no such option
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "bad.png").write_bytes(b"not a png")
    assert main(["score", "--model", "toyworld", "--classes", CLASSES, "--images", str(tmp_path / "imgs"),
                 "--out", str(tmp_path / "s.csv")]) == 1
    assert err_line(capsys).endswith("(use --on-error skip to go on)")  # score has it


def test_reordered_classes_message_fits_the_command_line(world, tmp_path, saved_prompts, no_model, capsys):
    argv = ["score", "--model", "toyworld", "--images", str(world / "ood"), "--out", str(tmp_path / "s.csv"),
            "--prompts", str(saved_prompts), "--classes", ",".join(reversed(ID_SHAPES))]
    assert main(argv) == 2
    line = err_line(capsys)
    assert "same classes in another order" in line
    assert line.endswith("omit the classes (--classes on the command line, classes=None in Python) to use the "
                         "prompts' own"), line


def test_run_dir_inside_the_training_folder_is_refused(world, tmp_path, no_model, capsys):
    inside = world / "train" / "runs"
    assert main(train(world, tmp_path / "p.safetensors", "--run-dir", str(inside))) == 2
    line = err_line(capsys)
    assert f"--run-dir {inside} is inside the image folder {world / 'train'}" in line
    assert main(train(world, world / "train" / "p.safetensors")) == 2  # the default run folder sits beside --out
    assert "the run folder (beside --out) " in err_line(capsys)
    assert main(train(world, tmp_path / "p.safetensors", "--run-dir", str(world / "train"))) == 2
    assert "is inside the image folder" in err_line(capsys)
    assert not inside.exists() and not (world / "train" / "p.run").exists()


def test_no_room_for_view_features_is_one_line_exit_1(world, tmp_path, capsys, monkeypatch):
    from vlmood.tuning import views as views_mod

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    monkeypatch.setenv("VLMOOD_CACHE", str(blocker))
    monkeypatch.setattr(views_mod, "MEMORY_LIMIT", 1000)
    assert main(train(world, tmp_path / "p.safetensors")) == 1
    line = err_line(capsys)
    assert "bytes) but cannot be stored in" in line and "set VLMOOD_CACHE" in line
