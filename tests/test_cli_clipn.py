"""`vlmood train clipn` and `score`/`eval --no`: a toy-world run end to end (48 captioned PNGs in a CSV manifest),
resume of a finished and of an interrupted run, torchrun's rank handling, and bad input refused in one line before
the model loads, with nothing written."""
import contextlib
import csv
import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import vlmood
from vlmood.cli import build_parser, main
from vlmood.clipn import CLIPNModel
from vlmood.detectors import CLIPN
from vlmood.toyworld import ID_SHAPES, OOD_SHAPES, World, load_images

CLASSES = ",".join(ID_SHAPES)
FAST = {"--epochs": "2", "--batch-size": "16", "--n-no-prompts": "4", "--seed": "3", "--lr": "0.001",
        "--warmup-steps": "1", "--weight-decay": "0.1", "--grad-clip": "5"}


def captioned(folder, seed=5, n=48):
    """``n`` toy-world PNGs in ``folder`` and ``folder/pairs.csv`` (path,caption); returns the manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays, captions, _ = World(seed).batch(n)
    with open(folder / "pairs.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "caption"])
        for i, (a, c) in enumerate(zip(arrays, captions)):
            Image.fromarray(a).save(folder / f"{i}.png")
            w.writerow([f"{i}.png", c])
    return folder / "pairs.csv"


def train(data, out, *extra, method="clipn"):
    """argv of a fast clipn run; ``extra`` options replace the defaults of the same name."""
    args = {"--model": "toyworld", "--data": str(data), "--out": str(out), **FAST}
    flags, i = [], 0
    while i < len(extra):
        if i + 1 < len(extra) and not extra[i + 1].startswith("--"):
            args[extra[i]] = extra[i + 1]
            i += 2
        else:
            flags.append(extra[i])
            i += 1
    return ["train", method, *[x for kv in args.items() for x in kv], "--no-progress", *flags]


def err_line(capsys) -> str:
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1, err
    return err[0]


def tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The manifest, ID images (ImageFolder) and OOD images, plus one finished 2-epoch run (``out``, ``run``,
    its stdout ``text``), trained with an isolated cache."""
    root = tmp_path_factory.mktemp("clipn-cli")
    data = captioned(root / "pairs")
    images, names = load_images(2, 24, ID_SHAPES)
    for i, (im, name) in enumerate(zip(images, names)):
        (root / "id" / name).mkdir(parents=True, exist_ok=True)
        im.save(root / "id" / name / f"{i}.png")
    (root / "ood").mkdir()
    for i, im in enumerate(load_images(3, 12, OOD_SHAPES)[0]):
        im.save(root / "ood" / f"{i}.png")
    out = root / "trained" / "clipn.safetensors"
    with pytest.MonkeyPatch.context() as m:
        m.setenv("VLMOOD_CACHE", str(root / "cache"))
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            assert main(train(data, out)) == 0
    return {"root": root, "data": data, "out": out, "run": root / "trained" / "clipn.run", "text": buf.getvalue()}


@pytest.fixture
def no_model(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the model was loaded before the bad argument was noticed")

    monkeypatch.setattr("vlmood.encoders.load_encoder", boom)


def test_train_writes_a_loadable_file_and_says_how_to_use_it(world):
    out, run, text = world["out"], world["run"], world["text"]
    log = [json.loads(ln) for ln in (run / "log.jsonl").read_text().splitlines()]
    last = [r for r in log if r.get("summary")][-1]
    assert [r["epoch"] for r in log if r.get("summary")] == [1, 2]
    assert [r["step"] for r in log if "step" in r] == [1, 2, 3, 4, 5, 6]  # 48 pairs / 16 per step, 2 epochs
    lines = text.splitlines()
    assert lines[0] == (f"trained clipn on 48 pair(s), skipped 0, 0 caption(s) truncated; 2 epoch(s), 6 step(s) of 16 "
                        f"x 1 process(es): last-epoch loss {last['loss']:.4f} (bin_yes {last['bin_yes']:.4f}, "
                        f"bin_no {last['bin_no']:.4f}, tso {last['tso']:.4f})")
    assert lines[1] == f"wrote {out}; log {run / 'log.jsonl'}; checkpoint {run / 'checkpoint.pt'}"
    assert f"vlmood score --model toyworld --method clipn --no {out} " in lines[2]
    assert f"vlmood eval --model toyworld --methods clipn-ctw,clipn-atd --no {out} " in lines[2]
    model = CLIPNModel.load(out, encoder=vlmood.load_encoder("toyworld"))
    assert model.no.n_prompts == 4
    assert model.meta["hyperparameters"] == {"n_prompts": 4, "lr": 0.001, "betas": [0.9, 0.98], "eps": 1e-6,
                                             "weight_decay": 0.1, "warmup_steps": 1, "grad_clip": 5.0,
                                             "grad_checkpointing": False, "seed": 3}
    assert model.meta["epochs"] == 2 and model.meta["batch_size"] == 16 and model.meta["data"]["pairs"] == 48
    mine, runs = tensors(out), tensors(run / "clipn.safetensors")
    assert mine.keys() == runs.keys() and all(torch.equal(mine[k], runs[k]) for k in mine)
    assert not torch.equal(mine["prompt_no"], torch.zeros_like(mine["prompt_no"]))  # it trained


def test_score_and_eval_with_the_no_file(world, tmp_path, capsys):
    root, out = world["root"], world["out"]
    scores = tmp_path / "s.csv"
    assert main(["score", "--model", "toyworld", "--method", "clipn-atd", "--no", str(out), "--classes", CLASSES,
                 "--images", str(root / "ood"), "--out", str(scores)]) == 0
    assert "with clipnatd" in capsys.readouterr().out
    with open(scores, newline="") as f:
        rows = list(csv.DictReader(f))
    det = CLIPN(vlmood.load_encoder("toyworld"), list(ID_SHAPES), score="atd", no=out)
    np.testing.assert_allclose([float(r["score"]) for r in rows], det.score([r["path"] for r in rows]), rtol=1e-5)

    rep = tmp_path / "rep"
    assert main(["eval", "--model", "toyworld", "--methods", "clipn-ctw,clipn-atd,mcm", "--no", str(out),
                 "--classes", CLASSES, "--id", str(root / "id"), "--ood", f"far/ood={root / 'ood'}",
                 "--report", str(rep), "--workers", "0"]) == 0
    results = json.loads((rep / "results.json").read_text())
    assert {r["method"] for r in results["rows"]} == {"clipnctw", "clipnatd", "mcm"}
    ood_atd = next(r for r in results["rows"] if r["method"] == "clipnatd" and r["dataset"] == "ood")
    id_s = det.score(sorted(str(p) for p in (root / "id").rglob("*.png")))[:, None]
    ood_s = det.score([r["path"] for r in rows])[None, :]
    pairs = (id_s > ood_s).mean() + 0.5 * (id_s == ood_s).mean()  # Mann-Whitney: P(ID scores above OOD)
    assert ood_atd["auroc"] == pytest.approx(pairs, abs=1e-9)
    assert set(results["id_accuracy"]) == {"clipnctw", "clipnatd", "mcm"}


def test_the_shipped_no_side_is_the_default(world, tmp_path, capsys, monkeypatch):
    """Without --no the toy-world model uses vlmood's shipped file (here: the trained one put in its place)."""
    import vlmood.toyworld.model as toy

    monkeypatch.setattr(toy, "CLIPN_CHECKPOINT", world["out"])
    argv = ["score", "--model", "toyworld", "--method", "clipn", "--classes", CLASSES, "--images",
            str(world["root"] / "ood")]
    assert main([*argv, "--out", str(tmp_path / "a.csv")]) == 0
    assert main([*argv, "--no", str(world["out"]), "--out", str(tmp_path / "b.csv")]) == 0
    assert (tmp_path / "a.csv").read_text() == (tmp_path / "b.csv").read_text()


def test_resume_of_a_finished_run_rewrites_the_same_file(world, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    out = tmp_path / "again.safetensors"
    with monkeypatch.context() as m:  # without --resume the run folder is not touched, and no model loads
        m.setattr("vlmood.encoders.load_encoder", lambda *a, **k: pytest.fail("model loaded"))
        assert main(train(world["data"], out, "--run-dir", str(run))) == 2
        assert f"--run-dir {run} already holds a run (checkpoint.pt); pass --resume" in err_line(capsys)
    assert not out.exists()
    assert main(train(world["data"], out, "--run-dir", str(run), "--resume", "--seed", "4")) == 2
    line = err_line(capsys)
    assert f"cannot resume {run}: its run differs in hyperparameters" in line, line
    assert not out.exists()
    assert main(train(world["data"], out, "--run-dir", str(run), "--resume")) == 0
    mine, first = tensors(out), tensors(world["out"])
    assert mine.keys() == first.keys() and all(torch.equal(mine[k], first[k]) for k in first)
    assert "trained clipn on 48 pair(s)" in capsys.readouterr().out


def test_resume_after_an_interruption_equals_an_uninterrupted_run(world, tmp_path, capsys, monkeypatch):
    from vlmood.clipn.trainer import CLIPNTrainer

    real = CLIPNTrainer._epoch

    def interrupted(self, loop, epoch, step):
        if epoch == 1:
            raise KeyboardInterrupt
        return real(self, loop, epoch, step)

    out = tmp_path / "cut.safetensors"
    monkeypatch.setattr(CLIPNTrainer, "_epoch", interrupted)
    assert main(train(world["data"], out)) == 130
    assert "with --resume to continue" in err_line(capsys)
    assert not out.exists() and (tmp_path / "cut.run" / "checkpoint.pt").is_file()
    monkeypatch.setattr(CLIPNTrainer, "_epoch", real)
    assert main(train(world["data"], out, "--resume")) == 0
    mine, full = tensors(out), tensors(world["out"])
    assert mine.keys() == full.keys() and all(torch.equal(mine[k], full[k]) for k in full)
    log = [json.loads(ln) for ln in (tmp_path / "cut.run" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log if r.get("summary")] == [1, 2]


def test_unreadable_training_images_are_skipped_or_stop_the_run(tmp_path, capsys):
    data = captioned(tmp_path / "pairs", n=20)
    (tmp_path / "pairs" / "3.png").write_bytes(b"not a png")
    out = tmp_path / "o.safetensors"
    assert main(train(data, out, "--on-error", "error", "--epochs", "1")) == 1
    line = err_line(capsys)
    assert "3.png" in line and line.endswith("(use --on-error skip to go on)"), line
    assert not out.exists()
    out = tmp_path / "new" / "o.safetensors"  # its folder is made even though the run folder lies elsewhere
    assert main(train(data, out, "--epochs", "1", "--run-dir", str(tmp_path / "r2"))) == 0
    captured = capsys.readouterr()
    assert "trained clipn on 19 pair(s), skipped 1 (unreadable image: 1)," in captured.out
    warns = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert len(warns) == 1 and "skipped 1 pair(s) whose image could not be read" in warns[0], warns
    assert CLIPNModel.load(out, encoder=vlmood.load_encoder("toyworld")).meta["data"]["skipped"] == \
        {"unreadable image": 1}


@pytest.mark.parametrize("extra, needle", [
    (["--epochs", "0"], "--epochs must be >= 1, got 0"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--n-no-prompts", "0"], "--n-no-prompts must be >= 1, got 0"),
    (["--warmup-steps", "-1"], "--warmup-steps must be >= 0, got -1"),
    (["--lr", "0"], "--lr must be > 0, got 0.0"),
    (["--lr", "inf"], "must be a finite number, got 'inf'"),
    (["--weight-decay", "-0.1"], "--weight-decay must be >= 0, got -0.1"),
    (["--grad-clip", "0"], "--grad-clip must be > 0, got 0.0"),
    (["--progress"], "--progress given after --no-progress; give one of them once"),
    (["--on-error", "raise"], "invalid choice: 'raise'"),
    (["--data", "{tmp}/nowhere.csv"], "--data {tmp}/nowhere.csv not found"),
    (["--data", " "], "--data is empty"),
    (["--data", "{tmp}/x.tar", "--caption-column", "text"], "--caption-column names manifest or dataset columns"),
    (["--split", "train"], "--split chooses a split of a Hugging Face dataset"),
    (["--caption-column", "text"], "has no caption column 'text'; columns: 'path', 'caption'"),
    (["--shots", "2", "--classes", "a,b"], "--classes, --shots are options of prompt learning (coop, locoop); "
                                           "clipn trains on image-caption pairs (--data): drop them"),
    (["--out", "{tmp}"], "is a folder; give a file path"),
    (["--out", "{tmp}/blocker/o.safetensors"], "blocker is a file, not a folder"),
    (["--out", "{tmp}/o.pt"], "must end in .safetensors"),
    (["--run-dir", "{tmp}/blocker"], "--run-dir {tmp}/blocker exists and is not a folder"),
    (["--run-dir", "{tmp}/o.safetensors"], "is --out itself"),
    (["--model", "hf:org/clip"], "CLIPN needs an open_clip model"),
])
def test_bad_train_clipn_arguments_fail_before_the_model_loads(world, tmp_path, no_model, capsys, extra, needle):
    (tmp_path / "blocker").write_text("a file")
    (tmp_path / "x.tar").write_bytes(b"")
    out = tmp_path / "o.safetensors"
    extra = [x.format(tmp=tmp_path) for x in extra]
    assert main(train(world["data"], out, *extra)) == 2
    line = err_line(capsys)
    assert line.startswith("vlmood") and needle.format(tmp=tmp_path) in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker", "vlmood-cache", "x.tar"] or \
        sorted(p.name for p in tmp_path.iterdir()) == ["blocker", "x.tar"]


def test_missing_data_and_options_of_the_other_family(world, tmp_path, no_model, capsys):
    out = str(tmp_path / "o.safetensors")
    assert main(["train", "clipn", "--model", "toyworld", "--out", out]) == 2
    assert "train clipn needs --data SOURCE" in err_line(capsys)
    assert main(["train", "coop", "--model", "toyworld", "--out", out, "--train", str(world["root"] / "id"),
                 "--classes", CLASSES, "--data", str(world["data"]), "--grad-checkpointing"]) == 2
    assert "--data, --grad-checkpointing are options of clipn training; coop learns prompts from labelled images " \
           "(--train, --classes): drop them" in err_line(capsys)
    assert main(["train", "locoop", "--model", "toyworld", "--out", out, "--classes", CLASSES]) == 2
    assert "train locoop needs --train SOURCE" in err_line(capsys)
    assert main([*train(world["data"], out), "--epochs", "3"]) == 2
    assert "--epochs given twice (2 and 3); give it once" in err_line(capsys)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def tiny_no(tmp_path_factory):
    """An (untrained) CLIPN file of another base model, the tiny test CLIP; and a safetensors file without
    ``prompt_no``."""
    from safetensors.torch import save_file

    from vlmood.testing import tiny_encoder

    root = tmp_path_factory.mktemp("tiny-no")
    CLIPNModel(tiny_encoder(0), n_prompts=2).save(root / "tiny.safetensors")
    save_file({"ctx": torch.zeros(2, 3)}, str(root / "other.safetensors"))
    (root / "notes.safetensors").write_text("not safetensors")
    return root


def test_bad_no_options_fail_before_the_model_loads(world, tmp_path, tiny_no, no_model, capsys, monkeypatch):
    import vlmood.toyworld.model as toy

    monkeypatch.setattr(toy, "CLIPN_CHECKPOINT", tmp_path / "absent.safetensors")  # whether or not one ships
    no = str(world["out"])
    score = ["score", "--model", "toyworld", "--classes", CLASSES, "--images", str(world["root"] / "ood"),
             "--out", str(tmp_path / "s.csv")]
    ev = ["eval", "--model", "toyworld", "--classes", CLASSES, "--id", str(world["root"] / "id"),
          "--ood", f"ood={world['root'] / 'ood'}", "--report", str(tmp_path / "rep")]
    cases = [
        (score + ["--no", no], "--no FILE is CLIPN's no side, used only by the clipn methods (clipn, clipn-ctw, "
                               "clipn-atd), and --method mcm has none"),
        (ev + ["--methods", "mcm,energy", "--no", no], "and --methods mcm,energy has none"),
        (score + ["--method", "clipn"], "the clipn methods need --no FILE, CLIPN's trained no side for "
                                        "open_clip:vlmood-toyworld@"),
        (ev + ["--methods", "mcm,clipn-atd"], "vlmood ships one only for the toy-world model"),
        (score + ["--method", "clipn", "--no", str(tmp_path / "none.safetensors")], "CLIPN file not found"),
        (score + ["--method", "clipn", "--no", str(tmp_path)], "is a folder; give the CLIPN file"),
        (score + ["--method", "clipn", "--no", ""], "--no is empty"),
        (score + ["--method", "clipn", "--no", str(tiny_no / "other.safetensors")],
         "is not a CLIPN file (it has no 'prompt_no' tensor)"),
        (score + ["--method", "clipn", "--no", str(tiny_no / "notes.safetensors")],
         "is not a readable safetensors file"),
        (score + ["--method", "clipn-atd", "--no", no, "--prompts", no], "do not apply to CLIPN"),
        (ev + ["--methods", "clipn,mcm", "--no", no, "--prompts", no, "--no-zero-shot"],
         "the clipn methods (clipn) take no learned prompts"),
        (score + ["--method", "clipn", "--no", no, "--no", str(tiny_no / "tiny.safetensors")], "--no given twice"),
    ]
    for argv, needle in cases:
        assert main(argv) == 2, argv
        line = err_line(capsys)
        assert needle in line, (argv, line)
    monkeypatch.setattr(toy, "CLIPN_CHECKPOINT", world["out"])  # a shipped side serves the toy world alone
    assert main(["score", "--model", "open_clip:vlmood-tiny-vit/none", "--method", "clipn", "--classes", CLASSES,
                 "--images", str(world["root"] / "ood"), "--out", str(tmp_path / "s.csv")]) == 2
    assert "the clipn methods need --no FILE" in err_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vlmood-cache"] or list(tmp_path.iterdir()) == []


def test_a_no_side_of_another_model_is_refused_in_one_line(world, tmp_path, tiny_no, capsys, monkeypatch):
    score = ["score", "--model", "toyworld", "--classes", CLASSES, "--images", str(world["root"] / "ood"),
             "--out", str(tmp_path / "s.csv")]
    assert main([*score, "--method", "clipn", "--no", str(tiny_no / "tiny.safetensors")]) == 2
    line = err_line(capsys)
    assert "was trained on open_clip:vlmood-tiny-vit" in line and "fingerprint" in line, line
    import vlmood.toyworld.model as toy

    # a shipped file that is not the toy world's: the detector's own refusal, one line, exit 2
    monkeypatch.setattr(toy, "CLIPN_CHECKPOINT", tiny_no / "tiny.safetensors")
    assert main([*score, "--method", "clipn-atd"]) == 2
    assert "CLIPN needs a trained 'no' text tower for open_clip:vlmood-toyworld" in err_line(capsys)
    assert not (tmp_path / "s.csv").exists()


def test_under_torchrun_only_rank_0_prints_and_writes(world, tmp_path, capsys, monkeypatch):
    import vlmood.clipn.trainer as trainer_mod

    calls = []

    def fake_init(device=None):
        calls.append(device)
        return rank, 2

    def fake_fit(self, pairs, **kw):
        assert len(pairs) == 48 and kw["out"] == tmp_path / "o.run" and kw["batch_size"] == 16
        return CLIPNModel(self.encoder, n_prompts=self.n_prompts, meta={"data": {"pairs": 48}, "steps": 1})

    monkeypatch.setattr(trainer_mod, "init_distributed", fake_init)
    monkeypatch.setattr(trainer_mod.CLIPNTrainer, "fit", fake_fit)
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = tmp_path / "o.safetensors"
    for rank in (1, 0):
        monkeypatch.setenv("RANK", str(rank))
        assert main(train(world["data"], out, "--device", "cpu")) == 0
        captured = capsys.readouterr()
        if rank == 1:
            assert captured.out == "" and not out.exists()
        else:
            assert captured.out.startswith("trained clipn on 48 pair(s)") and out.is_file()
    assert calls == ["cpu", "cpu"]


def test_train_help_lists_both_families():
    choices = build_parser()._subparsers._group_actions[0].choices
    text = choices["train"].format_help()
    for flag in ("{coop,locoop,clipn}", "--data", "--caption-column", "--image-column", "--split", "--n-no-prompts",
                 "--weight-decay", "--warmup-steps", "--grad-clip", "--grad-checkpointing", "--on-error",
                 "--progress, --no-progress", "--shots", "--views"):
        assert flag in text, flag
    for command in ("score", "eval"):
        assert "--no FILE" in choices[command].format_help()
