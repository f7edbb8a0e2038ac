"""CLI: bad input gets one line on stderr (exit 2, or 1 when the environment fails), checked before the model
loads; nothing is silently replaced or dropped; NaN scores are OOD; odd file names survive into every output."""
import csv
import errno
import json
import os

import numpy as np
import pytest
from PIL import Image

import vlmood.cli
from vlmood.cli import main
from vlmood.testing import TINY_ARCH


@pytest.fixture
def world(tiny, tmp_path):
    """A checkpoint of the tiny encoder, a labelled ID folder, two OOD folders, and a regular file."""
    ckpt = tmp_path / "tiny.safetensors"
    tiny.save(ckpt)
    rng = np.random.default_rng(0)
    for folder in ("id/red", "id/blue", "green", "gray"):
        (tmp_path / folder).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / folder / f"{i}.png")
    (tmp_path / "afile").write_text("not a folder")
    return {"model": f"open_clip:{TINY_ARCH}@{ckpt}", "root": tmp_path}


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if the CLI gets as far as loading the model."""
    def boom(*a, **k):
        raise AssertionError("the model was loaded before the bad argument was noticed")

    monkeypatch.setattr("vlmood.encoders.load_encoder", boom)


def one_line(capsys) -> str:
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1, err
    return err[0]


def score_args(w, *extra):
    return ["score", "--model", w["model"], "--classes", "red,blue", "--images", str(w["root"] / "green"),
            "--out", str(w["root"] / "s.csv"), *extra]


def eval_args(w, *extra, report=None, id=None):
    r = w["root"]
    return ["eval", "--model", w["model"], "--classes", "red,blue", "--id", str(id or r / "id"),
            "--report", str(report or r / "rep"), "--workers", "0", *extra]


@pytest.mark.parametrize("ood", [["x=green", "x=gray"], ["near/x=green", "far/x=gray"], ["x=green", " x =gray"]])
def test_repeated_ood_name_is_refused(world, no_model, capsys, ood):
    args = eval_args(world)
    for o in ood:
        name, src = o.split("=")
        args += ["--ood", f"{name}={world['root'] / src}"]
    assert main(args) == 2
    assert "'x' is given twice" in one_line(capsys)


@pytest.mark.parametrize("ood", ["mean=green", "far/mean=green", "ID/x=green"])
def test_reserved_ood_names_are_refused(world, no_model, capsys, ood):
    name, src = ood.split("=")
    assert main(eval_args(world, "--ood", f"{name}={world['root'] / src}")) == 2
    assert "a name other than 'ID' and 'mean', and a group other than 'ID'" in one_line(capsys)


@pytest.mark.parametrize("methods", ["mcm,mcm", "mcm,MCM", "glmcm,energy,GL-MCM"])
def test_repeated_method_is_refused(world, no_model, capsys, methods):
    assert main(eval_args(world, "--ood", f"g={world['root'] / 'green'}", "--methods", methods)) == 2
    assert "twice" in one_line(capsys)


def test_method_typo_is_one_line(world, no_model, capsys):
    assert main(eval_args(world, "--ood", f"g={world['root'] / 'green'}", "--methods", "mcm,mcmm")) == 2
    line = one_line(capsys)
    assert "unknown method 'mcmm'" in line and "mcm" in line.split("'mcmm'")[1]


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf"])
def test_threshold_must_be_finite(world, no_model, capsys, value):
    assert main(score_args(world, f"--threshold={value}")) == 2
    assert f"--threshold: must be a finite number, got '{value}'" in one_line(capsys)


def test_nan_scores_are_flagged_ood(world, monkeypatch, capsys):
    from vlmood.detectors import MCM

    real = MCM.score_features

    def with_nan(self, feats):
        s = np.asarray(real(self, feats), dtype=np.float64).copy()
        s[0] = np.nan
        return s

    monkeypatch.setattr(MCM, "score_features", with_nan)
    assert main(score_args(world, "--threshold", "-1")) == 0  # every finite score is >= -1 (MCM is in [0, 1])
    rows = list(csv.DictReader(open(world["root"] / "s.csv", newline="")))
    assert [r["score"] for r in rows] == ["nan", rows[1]["score"], rows[2]["score"]]
    assert [r["is_ood"] for r in rows] == ["1", "0", "0"]
    assert "1 flagged OOD" in capsys.readouterr().out


@pytest.mark.parametrize("flag", ["--classes", "--images"])
def test_arguments_that_are_not_utf8(world, no_model, capsys, flag):
    bad = os.fsdecode(b"caf\xe9")  # what Python makes of a Latin-1 argument on a UTF-8 system
    args = score_args(world)
    args[args.index(flag) + 1] = bad
    assert main(args) == 2
    assert "argument 'caf\\xe9' is not valid UTF-8" in one_line(capsys)


def _non_utf8_names(folder):
    try:
        Image.new("RGB", (32, 32), (200, 10, 10)).save(folder / os.fsdecode(b"caf\xe9.png"))
        (folder / os.fsdecode(b"\xffbroken.png")).write_bytes(b"not a png")
    except (OSError, UnicodeError):
        pytest.skip("this file system refuses non-UTF-8 file names")


def test_score_survives_non_utf8_file_names(world, capsys):
    _non_utf8_names(world["root"] / "green")
    out = world["root"] / "s.csv"
    assert main(score_args(world, "--on-error", "skip", "--no-cache", "--threshold", "0.5")) == 0
    rows = list(csv.DictReader(open(out, encoding="utf-8", newline="")))  # valid UTF-8
    names = {os.path.basename(r["path"]): r for r in rows}
    assert set(names) == {"0.png", "1.png", "2.png", "caf\\xe9.png", "\\xffbroken.png"}
    assert names["caf\\xe9.png"]["score"] and not names["caf\\xe9.png"]["error"]
    assert "\\xffbroken.png" in names["\\xffbroken.png"]["error"]
    captured = capsys.readouterr()
    assert "skipped 1" in captured.out and "vlmood: skipped:" in captured.err and "\\xffbroken.png" in captured.err


def test_eval_report_survives_non_utf8_file_names(world, capsys):
    _non_utf8_names(world["root"] / "green")
    rep = world["root"] / "rep"
    assert main(eval_args(world, "--ood", f"g={world['root'] / 'green'}", "--on-error", "skip", "--no-cache")) == 0
    assert "\\xffbroken.png" in (rep / "report.md").read_text(encoding="utf-8")
    data = json.loads((rep / "results.json").read_text(encoding="utf-8"))
    assert data["skipped"][0]["id"].endswith("\\xffbroken.png") and data["counts"]["g"] == 4
    assert "\\xffbroken.png" in capsys.readouterr().out


@pytest.mark.parametrize("cmd,flag,needle", [
    ("score", ["--out", "afile/x.csv"], "afile is a file, not a folder"),
    ("score", ["--out", "afile/sub/x.csv"], "afile is a file, not a folder"),
    ("eval", ["--report", "afile/sub"], "afile is a file, not a folder"),
    ("eval", ["--report", "afile"], "exists and is not a folder"),
    ("demo", ["--report", "afile/sub"], "afile is a file, not a folder"),
])
def test_output_under_a_file_is_refused_before_the_model_loads(world, no_model, capsys, cmd, flag, needle):
    r = world["root"]
    flag = [flag[0], str(r / flag[1])]
    args = {"score": score_args(world)[:-2] + flag,
            "eval": eval_args(world, "--ood", f"g={r / 'green'}", report=flag[1]),
            "demo": ["demo", *flag]}[cmd]
    assert main(args) == 2
    assert needle in one_line(capsys)


@pytest.mark.parametrize("cmd", ["score", "eval"])
def test_unwritable_output_is_refused_before_the_model_loads(world, no_model, monkeypatch, capsys, cmd):
    locked = world["root"] / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(vlmood.cli.os, "access", lambda p, mode, **k: False if str(p) == str(locked)
                        else real(p, mode, **k))  # chmod does not stop root: simulate a read-only folder
    args = (score_args(world)[:-2] + ["--out", str(locked / "new" / "s.csv")] if cmd == "score"
            else eval_args(world, "--ood", f"g={world['root'] / 'green'}", report=locked / "rep"))
    assert main(args) == 2
    assert f"cannot write into {locked} (permission denied)" in one_line(capsys)


@pytest.mark.parametrize("error,code,needle", [
    (OSError(errno.ENOSPC, "No space left on device", "s.csv"), 1, "No space left on device: s.csv"),
    (PermissionError(errno.EACCES, "Permission denied"), 1, "Permission denied"),
])
def test_os_error_while_writing_is_one_line(world, monkeypatch, capsys, error, code, needle):
    from vlmood.text import cache

    real = cache.atomic_write_bytes

    def fail(path, data):
        if path.name != "s.csv":
            return real(path, data)
        raise error

    monkeypatch.setattr(cache, "atomic_write_bytes", fail)
    assert main(score_args(world)) == code
    line = one_line(capsys)
    assert line.startswith("vlmood score: error: ") and needle in line


def test_genuine_bugs_still_raise(world, monkeypatch):
    def bug(self, feats):
        raise TypeError("a bug")

    monkeypatch.setattr("vlmood.detectors.MCM.score_features", bug)
    with pytest.raises(TypeError, match="a bug"):
        main(score_args(world))


def _suite(tmp_path, text, encoding="utf-8"):
    path = tmp_path / "my-suite.json"
    path.write_bytes(text.encode(encoding))
    return path


@pytest.mark.parametrize("text,needle", [
    ('{"classes": "cifar10", "id": "a",', "is not valid JSON: Expecting property name enclosed in double quotes "
                                          "(line 1, column 34)"),
    ('{"classes": "cifar10", "id": "a", "id": "b", "ood": {"f": {"x": "x"}}}', "key 'id' appears twice"),
    ('{"classes": "cifar10", "id": "a", "ood": {"f": {"x": "x", "x": "y"}}}', "key 'x' appears twice"),
    ('{"classes": "cifar10", "ood": {"f": {"x": "x"}}}', "missing key(s) 'id'"),
    ('{"classes": "cifar10", "id": 3, "ood": {"f": {"x": "x"}}}', "'id' must be a non-empty path"),
    ('{"classes": "cifar10", "id": "a", "ood": ["x"]}', "'ood' must be an object"),
    ('{"classes": "cifar10", "id": "a", "ood": {"f": {"x": ""}}}', "'ood' set 'x' in group 'f' must have a non-empty"),
    ('["not", "a", "suite"]', "expected a JSON object, got list"),
])
def test_invalid_suite_file_is_one_line(world, no_model, capsys, text, needle):
    path = _suite(world["root"], text)
    args = ["eval", "--model", world["model"], "--suite", str(path), "--root", str(world["root"]),
            "--report", str(world["root"] / "rep")]
    assert main(args) == 2
    line = one_line(capsys)
    assert str(path) in line and needle in line


def test_latin1_suite_file_is_one_line(world, no_model, capsys):
    path = _suite(world["root"], '{"name": "caf\u00e9", "classes": "cifar10", "id": "a", "ood": {"f": {"x": "x"}}}',
                  encoding="latin-1")
    assert main(["eval", "--model", world["model"], "--suite", str(path), "--root", str(world["root"]),
                 "--report", str(world["root"] / "rep")]) == 2
    line = one_line(capsys)
    assert str(path) in line and "not UTF-8" in line


@pytest.mark.parametrize("args,needle", [
    (["score", "--images", ""], "--images is empty"),
    (["score", "--out", ""], "--out is empty"),
    (["score", "--templates", ""], "--templates is empty"),
    (["eval", "--id", ""], "--id is empty"),
    (["eval", "--ood", "x="], "the SOURCE is empty"),
    (["eval", "--ood", "x=  "], "the SOURCE is empty"),
    (["eval", "--report", ""], "--report is empty"),
    (["eval", "--templates", ""], "--templates is empty"),
])
def test_empty_paths_are_refused_before_the_model_loads(world, no_model, capsys, args, needle):
    cmd, flag, value = args
    base = score_args(world) if cmd == "score" else eval_args(world, "--ood", f"g={world['root'] / 'green'}")
    if flag in base and flag != "--ood":
        base[base.index(flag) + 1] = value
    else:
        base += [flag, value]
    assert main(base) == 2
    assert needle in one_line(capsys)


@pytest.mark.parametrize("extra,needle", [
    (["--suite", "imagenet-mos", "--root", "."], "--suite defines the classes and image sets; drop --classes, --id"),
    (["--root", "."], "--root is only used with --suite"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
])
def test_ignored_or_meaningless_eval_options_are_refused(world, no_model, capsys, extra, needle):
    assert main(eval_args(world, "--ood", f"g={world['root'] / 'green'}", *extra)) == 2
    assert needle in one_line(capsys)


def test_outputs_that_would_destroy_or_pollute_inputs(world, no_model, capsys):
    r = world["root"]
    manifest = r / "list.csv"
    manifest.write_text("path\ngreen/0.png\n")
    assert main(score_args(world)[:-4] + ["--images", str(manifest), "--out", str(manifest)]) == 2
    assert "is the --images manifest itself" in one_line(capsys)
    assert manifest.read_text() == "path\ngreen/0.png\n"
    for report in (r / "green", r / "id" / "report"):  # plots would become images of the next run
        assert main(eval_args(world, "--ood", f"g={r / 'green'}", report=report)) == 2
        assert "is inside the image folder" in one_line(capsys)


def test_suite_with_empty_root_is_refused(world, no_model, capsys):
    assert main(["eval", "--model", world["model"], "--suite", "imagenet-mos", "--root", "",
                 "--report", str(world["root"] / "rep")]) == 2
    assert "--root is empty" in one_line(capsys)


def test_missing_ood_folder_is_found_before_the_model_loads(world, no_model, capsys):
    assert main(eval_args(world, "--ood", f"g={world['root'] / 'nowhere'}")) == 2
    assert "image source not found" in one_line(capsys)


def test_embed_texts_templates_without_classes(world, no_model, capsys):
    prompts = world["root"] / "p.txt"
    prompts.write_text("a photo of a cat\n")
    assert main(["embed-texts", "--model", world["model"], "--prompts", str(prompts), "--templates", "imagenet7"]) == 2
    assert "--templates expands --classes" in one_line(capsys)


def test_unlabelled_id_set_warns_in_one_line(world, capsys):
    r = world["root"]
    assert main(eval_args(world, "--ood", f"g={r / 'green'}", id=r / "gray")) == 0
    captured = capsys.readouterr()
    warn = [ln for ln in captured.err.splitlines() if "warning" in ln]
    assert warn == ["vlmood: warning: ID set has no labels: ID accuracy not computed (give an ImageFolder layout "
                    "or a manifest label column)"]
    assert "Note: ID set has no labels" in captured.out and "| n/a |" in captured.out
    assert main(eval_args(world, "--ood", f"g={r / 'green'}")) == 0  # labelled: no warning, an accuracy
    assert "warning" not in capsys.readouterr().err
