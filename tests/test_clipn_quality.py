"""Quality floors of the toy world's shipped CLIPN no side (``vlmood/toyworld/assets/toyworld-clipn.safetensors``),
its recorded recipe, and a short training run that already beats MCM.

Measured on ``toyworld.benchmark(n=200, seed=777)`` (the held-out set of ``tests/test_toyworld.py``'s floors, not the
benchmark's 2024 set that ``benchmarks/toyworld_clipn.py`` reports), CPU fp32; floors a little below.
"""
import json

import numpy as np
import pytest
from safetensors import safe_open

import vlmood
from vlmood import toyworld
from vlmood.clipn import CLIPNModel
from vlmood.clipn.trainer import CLIPNTrainer
from vlmood.detectors.clipn import shipped_no_side
from vlmood.toyworld.clipn import DATA_TAG, RECIPE, main, train_clipn_logged
from vlmood.toyworld.model import CLIPN_CHECKPOINT

NEAR, FAR = "other shapes", "empty backgrounds"
CLASSES = list(toyworld.ID_SHAPES)
# method: (near AUROC floor, near FPR95 ceiling, far AUROC floor); measured values in the comments
FLOORS = {
    "clipn-ctw": (0.97, 0.10, 0.96),  # 0.991, 0.035, 0.983
    "clipn-atd": (0.97, 0.10, 0.96),  # 0.992, 0.025, 0.983
}
MCM_MARGIN = 0.02  # CLIPN's near AUROC beats MCM's (0.958, FPR95 0.150) by at least this (measured: 0.033, 0.034)
SHORT_MARGIN = 0.01  # short training (1024 pairs, 3 epochs) over MCM; measured, seeds 0/1/2: 0.982/0.983/0.981


@pytest.fixture(scope="module")
def toy():
    return vlmood.load_encoder("toyworld")


@pytest.fixture(scope="module")
def held_out(toy):
    bench = toyworld.benchmark(n=200, seed=777)
    return bench, bench.extract(toy, progress=False)


@pytest.fixture(scope="module")
def shipped_report(toy, held_out):
    bench, feats = held_out
    demo = toyworld.demo_detectors()  # the entries `vlmood demo` runs
    dets = {"mcm": "mcm", "clipn-ctw": demo["clipn-ctw"], "clipn-atd": demo["clipn-atd"]}
    return bench.run(toy, dets, features=feats, progress=False)


@pytest.mark.parametrize("method", list(FLOORS))
def test_shipped_clipn_quality_floor(shipped_report, method):
    near_auroc, near_fpr, far_auroc = FLOORS[method]
    r = shipped_report
    assert r.metric(method, NEAR, "auroc") >= near_auroc
    assert r.metric(method, NEAR, "auroc") >= r.metric("mcm", NEAR, "auroc") + MCM_MARGIN
    assert r.metric(method, NEAR, "fpr95") <= near_fpr
    assert r.metric(method, NEAR, "fpr95") < r.metric("mcm", NEAR, "fpr95")
    assert r.metric(method, FAR, "auroc") >= far_auroc
    # the yes side is the untouched CLIP: CLIPN classifies exactly as MCM does
    assert r.id_accuracy[method] == r.id_accuracy["mcm"]


def test_shipped_asset_records_its_recipe(toy):
    assert shipped_no_side(toy) == CLIPN_CHECKPOINT
    assert CLIPN_CHECKPOINT.stat().st_size < 4_000_000
    with safe_open(str(CLIPN_CHECKPOINT), framework="pt") as f:
        header = f.metadata()
    assert header["format"] == "vlmood.clipn"
    meta = json.loads(header["meta"])
    assert meta["encoder"]["fingerprint"] == toy.fingerprint
    recipe = meta["recipe"]
    assert {k: recipe[k] for k in RECIPE} == RECIPE
    assert recipe["function"] == "vlmood.toyworld.clipn.train_clipn" and recipe["data_tag"] == DATA_TAG
    # the trainer's own record agrees with the recipe, and its other hyper-parameters are the reference's defaults
    hp = meta["hyperparameters"]
    assert (hp["seed"], hp["lr"], meta["epochs"], meta["batch_size"], meta["data"]["pairs"]) == \
        (RECIPE["seed"], RECIPE["lr"], RECIPE["epochs"], RECIPE["batch_size"], RECIPE["pairs"])
    assert meta["steps"] == RECIPE["pairs"] // RECIPE["batch_size"] * RECIPE["epochs"]
    assert hp == CLIPNTrainer(toy, seed=RECIPE["seed"], lr=RECIPE["lr"]).hyperparameters()
    beside = json.loads(CLIPN_CHECKPOINT.with_suffix(".json").read_text(encoding="utf-8"))
    assert beside["recipe"] == recipe and beside["encoder"]["fingerprint"] == toy.fingerprint
    assert beside["command"] == "python -m vlmood.toyworld.clipn"
    # trained: the prompts moved away from their zero start and the no tower away from the yes tower it copied
    model = CLIPNModel.load(CLIPN_CHECKPOINT, encoder=toy)
    assert float(model.no.prompt_no.detach().abs().max()) > 1e-3
    untrained = CLIPNModel(toy).state_dict_no()
    assert any(not np.allclose(v.numpy(), untrained[k].numpy()) for k, v in model.state_dict_no().items()
               if k != "prompt_no")


def test_short_training_beats_mcm(toy, held_out):
    """1024 pairs, 3 epochs (12 steps): the loss falls and the near-OOD AUROC already beats MCM's."""
    bench, feats = held_out
    model, log = train_clipn_logged(seed=0, pairs=1024, epochs=3, encoder=toy)
    steps = [r for r in log if "step" in r and not r.get("summary")]
    assert len(steps) == 12 and model.meta["recipe"]["pairs"] == 1024
    assert np.mean([r["loss"] for r in steps[-3:]]) < np.mean([r["loss"] for r in steps[:3]])
    dets = {"mcm": vlmood.MCM(toy, CLASSES, templates="simple"),
            "ctw": vlmood.CLIPN(model, CLASSES, templates="simple")}
    r = bench.run(toy, dets, features=feats, progress=False)
    np.testing.assert_array_equal(dets["ctw"].classify(feats["ID"]), dets["mcm"].classify(feats["ID"]))
    assert r.metric("ctw", NEAR, "auroc") >= r.metric("mcm", NEAR, "auroc") + SHORT_MARGIN


def test_command_line_recipe_writes_a_loadable_file(toy, tmp_path, capsys):
    out = tmp_path / "run" / "no.safetensors"
    out.parent.mkdir()
    assert main(["--pairs", "300", "--epochs", "1", "--batch-size", "128", "--seed", "3", "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    model = CLIPNModel.load(out, encoder=toy)
    assert {k: model.meta["recipe"][k] for k in RECIPE} == {**RECIPE, "pairs": 300, "epochs": 1, "batch_size": 128,
                                                           "seed": 3}
    assert model.meta["steps"] == 2  # 300 // 128 full batches, 1 epoch
    beside = json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))
    assert beside["command"] == "python -m vlmood.toyworld.clipn --seed 3 --pairs 300 --epochs 1 --batch-size 128"
    assert [e["epoch"] for e in beside["epochs"]] == [1]
    assert sorted(p.name for p in out.parent.iterdir()) == ["no.json", "no.safetensors"]  # no temporary file left


@pytest.mark.parametrize("argv, message", [
    (["--pairs", "0"], "error: pairs must be an integer >= 1, got 0"),
    (["--data-seed", "-1"], "error: data_seed must be an integer >= 0, got -1"),
])
def test_command_line_bad_recipe_is_one_line(tmp_path, capsys, argv, message):
    out = tmp_path / "no.safetensors"
    assert main(argv + ["--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == message + "\n"
    assert not out.exists() and not out.with_suffix(".json").exists()


def test_command_line_refuses_a_missing_folder_before_training(tmp_path, capsys):
    out = tmp_path / "missing" / "no.safetensors"
    assert main(["--out", str(out)]) == 2  # the full recipe: it would take a minute if it trained first
    assert capsys.readouterr().err == f"error: cannot write {out}: folder {out.parent} does not exist\n"
