"""Ray Data engine (vlmood.scale.score_with_ray) on a local 2-CPU Ray started here: the same scores as the
single-process path, unreadable images recorded per row, a worker killed mid-run loses and duplicates no row, an
unreachable cluster is one line; the out-of-memory halving on a fake encoder."""
import socket
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

ray = pytest.importorskip("ray")
pq = pytest.importorskip("pyarrow.parquet")

import vlmood  # noqa: E402
from vlmood.errors import InvalidInputError, ServiceError  # noqa: E402
from vlmood.features import extract_features  # noqa: E402
from vlmood.scale import encode_in_chunks, score_with_ray  # noqa: E402
from vlmood.testing import TINY_ARCH, tiny_encoder  # noqa: E402

CLASSES = ["cat", "dog", "bird"]
RUN = {"num_workers": 1, "num_cpus_per_worker": 1, "batch_size": 6, "progress": False}  # the other CPU decodes


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"VLMOOD_CACHE": str(root / "worker-cache")}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny CLIP saved to a checkpoint (its spec loads in the workers), 30 images and a broken one, a small
    lexicon, and the single-process scores: extract_features + det.score_features."""
    root = tmp_path_factory.mktemp("scale")
    ckpt = root / "tiny.safetensors"
    tiny_encoder(0).save(ckpt)
    spec = f"open_clip:{TINY_ARCH}@{ckpt}"
    imgs = root / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(30):
        Image.fromarray(rng.integers(0, 255, (36 + i, 44, 3), dtype=np.uint8)).save(imgs / f"{i:02d}.png")
    (imgs / "broken.jpg").write_bytes(b"not a jpeg")
    lex = root / "lex"
    lex.mkdir()
    (lex / "noun.things.txt").write_text("rock\ncloud\nviolin\nocean\nlamp\ngarden\nbridge\nengine\npencil\nriver\n")
    (lex / "adj.all.txt").write_text("striped\nwooden\nbright\nfrozen\nhollow\nvelvet\n")
    enc = vlmood.load_encoder(spec, device="cpu")
    dets = {"mcm": vlmood.MCM(enc, CLASSES), "glmcm": vlmood.GLMCM(enc, CLASSES, lam=0.5),
            "neglabel": vlmood.NegLabel(enc, CLASSES, lexicon=str(lex), ratio=0.5, ngroups=2, seed=3)}
    feats = extract_features(enc, imgs, local=True, cache=False, on_error="skip", num_workers=0)
    expected = {name: dict(zip(feats.ids, det.score_features(feats))) for name, det in dets.items()}
    classes = dict(zip(feats.ids, (CLASSES[k] for k in dets["mcm"].classify_features(feats))))
    return {"root": root, "spec": spec, "imgs": imgs, "enc": enc, "dets": dets, "expected": expected,
            "classes": classes, "lex": str(lex), "broken": str(imgs / "broken.jpg")}


def check_scores(df, world, names):
    assert list(df["row"]) == list(range(len(df)))  # every row once, in source order
    good = df[df["error"].isna()]
    assert len(good) == len(world["expected"]["mcm"])
    for name in names:
        got = good[f"score_{name}"].to_numpy()
        want = np.array([world["expected"][name][i] for i in good["id"]])
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6, err_msg=name)
    assert list(good["class"]) == [world["classes"][i] for i in good["id"]]


def test_scores_equal_single_process_and_bad_image_is_a_row(cluster, world, tmp_path):
    """Method names (built on the driver) and a fitted NegLabel (shipped as a detector file): GL-MCM needs the
    patch features, NegLabel its mined negatives; the written Parquet file holds every image, the broken one with
    its error and no scores."""
    out = score_with_ray(world["imgs"], world["spec"], ["mcm", "glmcm", world["dets"]["neglabel"]], classes=CLASSES,
                         params={"glmcm": {"lam": 0.5}}, out=tmp_path / "scores.parquet", features=True, **RUN)
    df = pq.read_table(out).to_pandas()
    assert len(df) == 31 and not list(tmp_path.glob(".*tmp"))
    check_scores(df, world, ["mcm", "glmcm", "neglabel"])
    bad = df[df["error"].notna()]
    assert list(bad["id"]) == [world["broken"]] and "not an image" in bad["error"].iloc[0]
    assert bad[["class", "score_mcm", "score_neglabel", "features"]].isna().all(axis=None)
    good = df[df["error"].isna()]
    ref = extract_features(world["enc"], list(good["id"]), cache=False, num_workers=0).features.numpy()
    np.testing.assert_allclose(np.stack(good["features"].to_list()), ref, atol=1e-6)


def test_killed_worker_loses_and_duplicates_no_row(cluster, world, tmp_path):
    """Parquet of image bytes (two files, several row groups) with a scoring actor that kills its own process on
    its second batch: Ray restarts it and retries the batch; the output has each row exactly once, right scores.
    A calibrated detector gives an is_ood column."""
    paths = sorted(world["imgs"].glob("*.png"))
    import pyarrow as pa

    for k, part in enumerate((paths[:17], paths[17:])):
        t = pa.table({"image": [p.read_bytes() for p in part], "name": [str(p) for p in part]})
        pq.write_table(t, tmp_path / f"part{k}.parquet", row_group_size=5)
    det = vlmood.MCM(world["enc"], CLASSES)
    thr = det.calibrate(np.array(list(world["expected"]["mcm"].values())), tpr=0.5)
    marker = tmp_path / "crashed"
    df = score_with_ray(str(tmp_path / "part*.parquet"), world["enc"], det, _crash_once=marker, **RUN)
    assert marker.exists()  # an actor did die mid-run
    assert len(df) == len(paths) and df["error"].isna().all()
    assert list(df["id"]) == [f"{tmp_path / 'part0.parquet'}[{i}]" for i in range(17)] + \
        [f"{tmp_path / 'part1.parquet'}[{i}]" for i in range(len(paths) - 17)]
    df["id"] = [str(p) for p in paths]  # row i is image i
    check_scores(df, world, ["mcm"])
    np.testing.assert_array_equal(df["is_ood_mcm"], ~(df["score_mcm"] >= thr))
    assert 0 < df["is_ood_mcm"].sum() < len(df)


def test_hf_dataset_into_a_folder_of_parquet_files(cluster, world, tmp_path):
    """A datasets.Dataset (encoded image bytes) scored into a folder the workers write; rows there are in any
    order and carry their index."""
    datasets = pytest.importorskip("datasets")
    paths = sorted(world["imgs"].glob("*.png"))[:8]
    ds = datasets.Dataset.from_dict({"image": [{"bytes": p.read_bytes(), "path": None} for p in paths]},
                                    features=datasets.Features({"image": datasets.Image()}))
    out = score_with_ray(ds, world["spec"], "mcm", classes=CLASSES, out=tmp_path / "scores", **RUN)
    assert out == tmp_path / "scores" and not list(tmp_path.glob(".scores*"))  # the temporary folder renamed
    df = pq.read_table(out).to_pandas().sort_values("row").reset_index(drop=True)
    assert list(df["id"]) == [f"hf[{i}]" for i in range(8)]
    df["id"] = [str(p) for p in paths]
    check_scores(df, {**world, "expected": {"mcm": {str(p): world["expected"]["mcm"][str(p)] for p in paths}}},
                 ["mcm"])


def test_unreachable_cluster_is_one_line(world):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ServiceError) as e:
        score_with_ray(world["imgs"], world["spec"], "mcm", classes=CLASSES, address=f"127.0.0.1:{port}")
    msg = str(e.value)
    assert "\n" not in msg and f"Ray cluster at 127.0.0.1:{port} is not reachable" in msg


@pytest.mark.parametrize("kw,needle", [
    ({"num_workers": 0}, "num_workers must be an integer >= 1"),
    ({"device": "cuda"}, "needs num_gpus_per_worker > 0"),
    ({"address": "nowhere"}, "must be 'auto', 'HOST:PORT'"),
    ({"detectors": ["mcm", "mcm"]}, "two detectors are named 'mcm'"),
    ({"detectors": "knn"}, "unknown method 'knn'"),
    ({"out": "IMGS"}, "is a folder that is not empty"),
])
def test_bad_arguments_are_one_line(world, kw, needle):
    args = {"detectors": "mcm", **{k: world["imgs"] if v == "IMGS" else v for k, v in kw.items()}}
    with pytest.raises(InvalidInputError, match=needle) as e:
        score_with_ray(world["imgs"], world["spec"], args.pop("detectors"), classes=CLASSES, **args)
    assert "\n" not in str(e.value)


def test_parquet_without_image_column(world, tmp_path):
    pq.write_table(__import__("pyarrow").table({"x": [1, 2]}), tmp_path / "t.parquet")
    with pytest.raises(InvalidInputError, match="has no image column .*columns: x"):
        score_with_ray(tmp_path / "t.parquet", world["spec"], "mcm", classes=CLASSES)


class FakeEncoder:
    """Runs out of memory on batches larger than ``limit`` images."""

    def __init__(self, limit):
        self.limit, self.sizes = limit, []

    def encode_images(self, x, local=False, batch_size=None):
        self.sizes.append(len(x))
        if len(x) > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        g = x.flatten(1)[:, :4] * 2
        return (g, x[:, :, :2, 0]) if local else g


def test_out_of_memory_halves_the_batch():
    x = torch.randn(10, 3, 4, 4)
    enc = FakeEncoder(limit=3)
    with pytest.warns(UserWarning, match="out of GPU memory on a batch of 10 images: retrying in batches of 5"):
        g, loc, chunk = encode_in_chunks(enc, x, True, 10)
    assert chunk == 2 and enc.sizes == [10, 5, 2, 2, 2, 2, 2]
    torch.testing.assert_close(g, x.flatten(1)[:, :4] * 2)
    torch.testing.assert_close(loc, x[:, :, :2, 0])
    with warnings.catch_warnings(), pytest.raises(torch.cuda.OutOfMemoryError):
        warnings.simplefilter("ignore")
        encode_in_chunks(FakeEncoder(limit=0), x, False, 4)


def test_cli_engine_ray_writes_the_local_engines_csv(cluster, world, tmp_path, capsys):
    """`vlmood score --engine ray` writes the same CSV as the local engine (path, class, score, is_ood, error)."""
    import csv

    from vlmood.cli import main

    def rows(path):
        with open(path, newline="") as f:
            return list(csv.DictReader(f))

    common = ["score", "--model", world["spec"], "--classes", ",".join(CLASSES), "--images", str(world["imgs"]),
              "--threshold", "0.34", "--on-error", "skip"]
    assert main([*common, "--out", str(tmp_path / "local.csv"), "--workers", "0"]) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main([*common, "--engine", "ray", "--workers", "1", "--out", str(tmp_path / "ray.csv")]) == 0
    local, remote = rows(tmp_path / "local.csv"), rows(tmp_path / "ray.csv")
    assert [r["path"] for r in remote] == [r["path"] for r in local]
    for a, b in zip(local, remote):
        assert (a["class"], a["is_ood"], bool(a["error"])) == (b["class"], b["is_ood"], bool(b["error"]))
        if a["score"]:
            assert abs(float(a["score"]) - float(b["score"])) <= 1e-6
    assert main([*common, "--address", "auto", "--out", str(tmp_path / "x.csv")]) == 2
    assert "--address apply to --engine ray" in capsys.readouterr().err
