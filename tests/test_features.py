"""Feature extraction: sources, one pass for many detectors, the feature cache, resumable runs."""
import numpy as np
import pytest
import torch
from PIL import Image

import vlmood
from vlmood.errors import ImageLoadError, InvalidInputError
from vlmood.features import extract_features


def make_images(folder, n, seed=0, size=(40, 36)):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        p = folder / f"{i:03d}.png"
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


class CallCounter:
    def __init__(self, enc, monkeypatch):
        self.images = 0
        self.calls = 0
        real = type(enc)._encode_image_batch

        def spy(this, batch, local):
            self.calls += 1
            self.images += batch.shape[0]
            return real(this, batch, local)

        monkeypatch.setattr(type(enc), "_encode_image_batch", spy)


def test_features_match_direct_encoding(tiny, tmp_path):
    paths = make_images(tmp_path / "imgs", 7)
    f = extract_features(tiny, tmp_path / "imgs", local=True, batch_size=3, num_workers=0)
    g, loc = tiny.encode_images(paths, local=True)
    assert f.ids == [str(p) for p in paths] and f.labels is None
    assert torch.allclose(f.features, g, atol=1e-6) and torch.allclose(f.local, loc, atol=1e-6)


def test_one_image_pass_for_many_detectors(tiny, tmp_path, monkeypatch):
    make_images(tmp_path / "id" / "cat", 6, seed=1)
    make_images(tmp_path / "id" / "dog", 6, seed=2)
    make_images(tmp_path / "ood", 9, seed=3)
    counter = CallCounter(tiny, monkeypatch)
    bench = vlmood.Benchmark(id=tmp_path / "id", ood={"far": {"noise": tmp_path / "ood"}}, classes=["cat", "dog"])
    dets = {"mcm": "mcm", "glmcm": "glmcm", "energy": "energy", "maxlogit": "maxlogit",
            "mcm-T0.1": {"method": "mcm", "temperature": 0.1}}
    report = bench.run(tiny, dets, cache=False, batch_size=4, num_workers=0, progress=False)
    assert counter.images == 21  # every image encoded exactly once for 5 detectors
    assert set(report.scores) == {"mcm", "glmcm", "energy", "maxlogit", "mcm-T0.1"}
    # a warm feature cache encodes nothing at all
    bench.run(tiny, ["mcm", "glmcm"], batch_size=4, num_workers=0, progress=False)
    before = counter.images
    bench.run(tiny, ["energy", "glmcm"], batch_size=4, num_workers=0, progress=False)
    bench.run(tiny, ["maxlogit"], batch_size=4, num_workers=0, progress=False)  # global-only reuses them too
    assert counter.images == before


def test_sources_list_pil_and_hf(tiny, tmp_path):
    datasets = pytest.importorskip("datasets")
    paths = make_images(tmp_path / "imgs" / "a", 3) + make_images(tmp_path / "imgs" / "b", 2, seed=5)
    pil = [Image.open(p).convert("RGB") for p in paths]
    ref = tiny.encode_images(pil)
    f_pil = extract_features(tiny, pil, num_workers=0)
    assert torch.allclose(f_pil.features, ref, atol=1e-6) and f_pil.ids[0] == "images[0]"
    f_list = extract_features(tiny, [str(p) for p in paths], num_workers=0)
    assert torch.allclose(f_list.features, ref, atol=1e-6)
    ds = datasets.Dataset.from_dict({"img": [str(p) for p in paths], "y": [0, 0, 0, 1, 1]},
                                    features=datasets.Features({"img": datasets.Image(),
                                                                "y": datasets.ClassLabel(names=["a", "b"])}))
    f_hf = extract_features(tiny, datasets.DatasetDict({"test": ds}), split="test", image_column="img",
                            label_column="y", num_workers=0)
    assert torch.allclose(f_hf.features, ref, atol=1e-6) and f_hf.labels == ["a", "a", "a", "b", "b"]
    f_folder = extract_features(tiny, f"hf:{tmp_path / 'imgs'}:train", num_workers=0)  # imagefolder, offline
    assert len(f_folder) == 5 and sorted(f_folder.labels) == ["a", "a", "a", "b", "b"]
    ds.save_to_disk(str(tmp_path / "saved"))
    f_saved = extract_features(tiny, f"hf:{tmp_path / 'saved'}", image_column="img", label_column="y", num_workers=0)
    assert torch.allclose(f_saved.features, ref, atol=1e-6)
    with pytest.raises(InvalidInputError, match="no image column 'picture'"):
        extract_features(tiny, ds, image_column="picture")


def test_changed_file_is_reencoded(tiny, tmp_path, monkeypatch):
    paths = make_images(tmp_path / "imgs", 4)
    first = extract_features(tiny, tmp_path / "imgs", num_workers=0)
    Image.new("RGB", (40, 36), (255, 0, 0)).save(paths[2])
    counter = CallCounter(tiny, monkeypatch)
    second = extract_features(tiny, tmp_path / "imgs", num_workers=0)
    assert counter.images == 1
    assert torch.equal(second.features[[0, 1, 3]], first.features[[0, 1, 3]])
    assert not torch.allclose(second.features[2], first.features[2])


def test_skip_lists_bad_images_and_raise_stops(tiny, tmp_path):
    make_images(tmp_path / "imgs", 3)
    (tmp_path / "imgs" / "zz_bad.png").write_bytes(b"nope")
    f = extract_features(tiny, tmp_path / "imgs", on_error="skip", num_workers=0)
    assert len(f) == 3 and len(f.errors) == 1 and f.errors[0][0].endswith("zz_bad.png")
    with pytest.raises(ImageLoadError, match="zz_bad.png"):
        extract_features(tiny, tmp_path / "imgs", on_error="raise", cache=False, num_workers=0)


def test_interrupted_run_resumes(tiny, tmp_path, monkeypatch):
    import vlmood.features as feats_mod

    make_images(tmp_path / "imgs", 10)
    monkeypatch.setattr(feats_mod, "_FLUSH_BYTES", 1)  # write a shard after every batch
    real = type(tiny)._encode_image_batch
    calls = {"n": 0}

    def crash_on_third(this, batch, local):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated crash")
        return real(this, batch, local)

    monkeypatch.setattr(type(tiny), "_encode_image_batch", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        extract_features(tiny, tmp_path / "imgs", batch_size=3, num_workers=0)
    monkeypatch.setattr(type(tiny), "_encode_image_batch", real)
    counter = CallCounter(tiny, monkeypatch)
    f = extract_features(tiny, tmp_path / "imgs", batch_size=3, num_workers=0)
    assert counter.images == 4  # 2 batches of 3 were saved before the crash
    assert torch.allclose(f.features, extract_features(tiny, tmp_path / "imgs", cache=False, num_workers=0).features,
                          atol=1e-6)


def test_workers_give_same_features(tiny, tmp_path):
    make_images(tmp_path / "imgs", 9)
    a = extract_features(tiny, tmp_path / "imgs", batch_size=4, num_workers=2, cache=False)
    b = extract_features(tiny, tmp_path / "imgs", batch_size=4, num_workers=0, cache=False)
    assert a.ids == b.ids and torch.allclose(a.features, b.features, atol=1e-6)


def test_empty_sources(tiny, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInputError, match="no image files"):
        extract_features(tiny, tmp_path / "empty")
    with pytest.raises(InvalidInputError, match="empty"):
        extract_features(tiny, [])


def nan_for_black_images(enc, monkeypatch):
    """Make the encoder return NaN features (global and local) for uniformly coloured images."""
    real = type(enc)._encode_image_batch

    def broken(this, batch, local):
        out = real(this, batch, local)
        flat = batch.flatten(2)  # [N, C, H*W]: a uniform image is constant in every channel
        uniform = (flat.amax(dim=2) - flat.amin(dim=2)).amax(dim=1) == 0
        g, loc = out if local else (out, None)
        g = g.clone()
        g[uniform] = float("nan")
        if loc is not None:
            loc = loc.clone()
            loc[uniform] = float("inf")
        return (g, loc) if local else g

    monkeypatch.setattr(type(enc), "_encode_image_batch", broken)


@pytest.mark.parametrize("local", [False, True])
def test_non_finite_features_are_never_features(tiny, tmp_path, monkeypatch, local):
    make_images(tmp_path / "imgs", 5)
    Image.new("RGB", (40, 36), (0, 0, 0)).save(tmp_path / "imgs" / "002.png")
    real = type(tiny)._encode_image_batch
    nan_for_black_images(tiny, monkeypatch)
    with pytest.raises(ImageLoadError, match=r"non-finite features .*002\.png"):
        extract_features(tiny, tmp_path / "imgs", local=local, batch_size=2, num_workers=0, progress=False)
    f = extract_features(tiny, tmp_path / "imgs", local=local, on_error="skip", batch_size=2, num_workers=0)
    assert [p[-7:] for p in f.ids] == ["000.png", "001.png", "003.png", "004.png"]
    assert len(f.errors) == 1 and f.errors[0][0].endswith("002.png") and "non-finite" in f.errors[0][1]
    assert torch.isfinite(f.features).all() and (not local or torch.isfinite(f.local).all())
    monkeypatch.setattr(type(tiny), "_encode_image_batch", real)
    counter = CallCounter(tiny, monkeypatch)
    again = extract_features(tiny, tmp_path / "imgs", local=local, batch_size=2, num_workers=0)
    assert counter.images == 1  # the NaN row was never cached; the others were
    assert len(again) == 5 and torch.isfinite(again.features).all()


class KillWorkerOnSize:
    """A preprocessing transform that gets its DataLoader worker killed (like the OOM killer) on one image size."""

    def __init__(self, inner, size):
        self.inner, self.size = inner, size

    def __call__(self, img):
        if img.size == self.size:
            import os
            import signal
            import time

            time.sleep(0.5)  # let the main process encode the batches it already received
            os.kill(os.getpid(), signal.SIGKILL)
        return self.inner(img)

    def __repr__(self):  # same preprocessing, same cache namespace
        return repr(self.inner)


def test_killed_worker_names_the_images_in_flight(tiny, tmp_path, monkeypatch):
    from vlmood.errors import VlmoodError

    make_images(tmp_path / "imgs", 12)
    Image.new("RGB", (41, 37), (9, 9, 9)).save(tmp_path / "imgs" / "009.png")
    real = tiny.preprocess
    monkeypatch.setattr(tiny, "preprocess", KillWorkerOnSize(real, (41, 37)))
    with pytest.raises(VlmoodError, match=r"killed by the operating system.*009\.png.*--workers 0") as e:
        extract_features(tiny, tmp_path / "imgs", batch_size=2, num_workers=1, progress=False)
    assert "\n" not in str(e.value)
    monkeypatch.setattr(tiny, "preprocess", real)
    counter = CallCounter(tiny, monkeypatch)
    f = extract_features(tiny, tmp_path / "imgs", batch_size=2, num_workers=0, progress=False)
    assert len(f) == 12 and counter.images <= 10  # at least the batches received before the kill were cached
