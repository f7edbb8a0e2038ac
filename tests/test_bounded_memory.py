"""Bounded memory: GL-MCM's patch features are reduced batch by batch (never held for a whole set), with the same
scores as the full-local path; cached, resumed, skipped and non-finite images behave as before."""
import numpy as np
import pytest
import torch
from PIL import Image

import vlmood
import vlmood.evaluation.benchmark as bench_mod
import vlmood.features as feats_mod
from vlmood.detectors.glmcm import GLMCM
from vlmood.errors import ImageLoadError, InvalidInputError
from vlmood.features import extract_features

BS = 3


def make_images(folder, n, seed):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40, 36, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")


@pytest.fixture
def world(tmp_path):
    make_images(tmp_path / "id" / "cat", 5, 1)
    make_images(tmp_path / "id" / "dog", 5, 2)
    make_images(tmp_path / "ood", 8, 3)
    lex = tmp_path / "lex"
    lex.mkdir()
    (lex / "noun.things.txt").write_text("\n".join(["rock", "cloud", "violin", "ocean", "lamp", "garden", "bridge",
                                                    "engine", "pencil", "river", "castle", "mirror"]) + "\n")
    bench = vlmood.Benchmark(id=tmp_path / "id", ood={"far": {"noise": tmp_path / "ood"}}, classes=["cat", "dog"])
    dets = {"glmcm": "glmcm", "mcm": "mcm",
            "neglabel": {"method": "neglabel", "lexicon": str(lex), "ratio": 0.5, "ngroups": 2}}
    return tmp_path, bench, dets


class Spy:
    """Records the largest batch of patch features GL-MCM's reducer sees, its calls, and the images encoded."""

    def __init__(self, monkeypatch, enc):
        self.rows, self.calls, self.encoded = 0, 0, 0
        make, encode = GLMCM.local_reducer, type(enc)._encode_image_batch

        def local_reducer(det):
            fn = make(det)

            def spy(loc):
                self.rows, self.calls = max(self.rows, loc.shape[0]), self.calls + 1
                return fn(loc)

            spy.cache_key = fn.cache_key
            return spy

        def spy_encode(this, batch, local):
            self.encoded += batch.shape[0]
            return encode(this, batch, local)

        monkeypatch.setattr(GLMCM, "local_reducer", local_reducer)
        monkeypatch.setattr(type(enc), "_encode_image_batch", spy_encode)


def reference(tiny, bench, dets):
    """The full-local path: every patch feature of a set in memory, scored by ``score_features``."""
    built = bench.build_detectors(tiny, dets)
    out = {}
    for name, src in (("ID", bench.id), ("noise", bench.ood["far"]["noise"])):
        f = extract_features(tiny, src, local=True, cache=False, batch_size=BS, num_workers=0, progress=False)
        assert f.local is not None and f.local.shape[0] == len(f)
        out[name] = {label: det.score_features(f) for label, det in built.items()}
    return out


def assert_same(report, ref, atol=0.0):
    for label in ("glmcm", "mcm", "neglabel"):
        for name in ("ID", "noise"):
            np.testing.assert_allclose(report.scores[label][name], ref[name][label], rtol=0, atol=atol)


def test_benchmark_scores_equal_full_local_path_without_whole_set_patches(tiny, world, monkeypatch):
    _, bench, dets = world
    ref = reference(tiny, bench, dets)
    calls = []
    real = bench_mod.extract_features

    def spy_extract(*a, **kw):
        calls.append(kw)
        f = real(*a, **kw)
        assert f.local is None and set(f.reduced) == {"glmcm"}
        return f

    monkeypatch.setattr(bench_mod, "extract_features", spy_extract)
    spy = Spy(monkeypatch, tiny)
    report = bench.run(tiny, dets, cache=False, batch_size=BS, num_workers=0, progress=False)
    assert [kw["local"] for kw in calls] == [False, False] and spy.encoded == 18
    assert 0 < spy.rows <= BS  # patch features of at most one batch at a time
    assert_same(report, ref)  # bit for bit


def test_cached_patch_features_are_read_back_per_batch(tiny, world, monkeypatch):
    _, bench, dets = world
    ref = reference(tiny, bench, dets)
    bench.extract(tiny, local=True, batch_size=BS, num_workers=0, progress=False)  # fp32 patches, as before
    spy = Spy(monkeypatch, tiny)
    report = bench.run(tiny, dets, batch_size=BS, num_workers=0, progress=False)
    assert spy.encoded == 0 and 0 < spy.rows <= BS  # read back shard by shard, reduced per batch
    assert_same(report, ref)
    spy.calls = 0
    again = bench.run(tiny, dets, batch_size=BS, num_workers=0, progress=False)
    assert spy.encoded == 0 and spy.calls == 0  # the reduced values themselves are cached, exactly
    assert_same(again, ref)


def test_warm_run_encodes_nothing_and_cache_local_keeps_fp16_patches(tiny, world, monkeypatch):
    _, bench, dets = world
    other = {"glmcm": {"method": "glmcm", "temperature": 0.5}}
    ref, ref2 = reference(tiny, bench, dets), reference(tiny, bench, other)
    spy = Spy(monkeypatch, tiny)
    assert_same(bench.run(tiny, dets, batch_size=BS, num_workers=0, progress=False, cache_local=True), ref)
    assert spy.encoded == 18
    spy.calls = 0
    assert_same(bench.run(tiny, dets, batch_size=BS, num_workers=0, progress=False), ref)
    assert spy.encoded == 18 and spy.calls == 0
    # another temperature: a new reducer; with cache_local=True computed from the float16 patches without encoding
    spy.rows = 0
    report = bench.run(tiny, other, batch_size=BS, num_workers=0, progress=False, cache_local=True)
    assert spy.encoded == 18 and 0 < spy.rows <= BS
    for name in ("ID", "noise"):
        np.testing.assert_allclose(report.scores["glmcm"][name], ref2[name]["glmcm"], rtol=0, atol=2e-3)
    spy.calls = 0
    bench.run(tiny, other, batch_size=BS, num_workers=0, progress=False, cache_local=True)
    assert spy.encoded == 18 and spy.calls > 0  # values of float16 patches are never cached as exact ones
    # a default run (no cache_local) never reads float16 patches: it encodes again and is exact
    report = bench.run(tiny, other, batch_size=BS, num_workers=0, progress=False)
    assert spy.encoded == 36
    for name in ("ID", "noise"):
        np.testing.assert_allclose(report.scores["glmcm"][name], ref2[name]["glmcm"], rtol=0, atol=1e-6)


def test_reduced_path_matches_local_true_and_bad_reducers(tiny, tmp_path):
    make_images(tmp_path / "imgs", 7, 4)
    det = GLMCM(tiny, ["cat", "dog"]).fit()
    full = extract_features(tiny, tmp_path / "imgs", local=True, cache=False, batch_size=BS, num_workers=0,
                            local_reducers={"g": det.local_reducer()})
    red = extract_features(tiny, tmp_path / "imgs", cache=False, batch_size=BS, num_workers=0,
                           local_reducers={"g": det.local_reducer()})
    assert red.local is None and red.ids == full.ids and torch.equal(red.features, full.features)
    assert np.array_equal(red.reduced["g"], full.reduced["g"]) and red.reduced["g"].shape == (7,)
    assert isinstance(red.reduced["g"], np.ndarray) and red.reduced["g"].dtype == np.float64
    assert np.array_equal(det.score_reduced(red, red.reduced["g"]), det.score_features(full))
    two = extract_features(tiny, tmp_path / "imgs", cache=False, num_workers=0,
                           local_reducers={"pair": lambda loc: loc[:, :2, 0]})
    assert two.reduced["pair"].shape == (7, 2)
    with pytest.raises(InvalidInputError, match="local_reducers must be a dict"):
        extract_features(tiny, tmp_path / "imgs", local_reducers=[det.local_reducer()])
    with pytest.raises(InvalidInputError, match=r"must return \[B\] or \[B, k\]"):
        extract_features(tiny, tmp_path / "imgs", cache=False, num_workers=0, local_reducers={"x": lambda loc: loc})


def test_non_finite_rows_score_nan(tiny):
    det = GLMCM(tiny, ["cat", "dog"]).fit()
    g, loc = tiny.encode_images(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5)), local=True)
    loc[1, 3, 0] = float("inf")
    g[2, 0] = float("nan")
    expected = det.score_features(g, loc)
    got = det.score_reduced(g, det.local_reducer()(loc))
    assert np.isnan(expected[[1, 2]]).all() and np.isnan(got[[1, 2]]).all()
    assert np.array_equal(got[[0, 3]], expected[[0, 3]])
    with pytest.raises(InvalidInputError, match="no local reducer"):
        vlmood.make_detector("mcm", tiny, ["cat", "dog"]).score_reduced(g, torch.zeros(4))


def test_skip_nonfinite_and_resume_on_the_reduced_path(tiny, tmp_path, monkeypatch):
    make_images(tmp_path / "imgs", 9, 6)
    Image.new("RGB", (40, 36), (0, 0, 0)).save(tmp_path / "imgs" / "004.png")
    (tmp_path / "imgs" / "zz_bad.png").write_bytes(b"not an image")
    det = GLMCM(tiny, ["cat", "dog"]).fit()
    red = {"g": det.local_reducer()}
    real = type(tiny)._encode_image_batch

    def broken(this, batch, local):  # NaN patches for the uniform (black) image
        g, loc = real(this, batch, local)
        flat = batch.flatten(2)
        loc = loc.clone()
        loc[(flat.amax(dim=2) - flat.amin(dim=2)).amax(dim=1) == 0] = float("nan")
        return g, loc

    monkeypatch.setattr(type(tiny), "_encode_image_batch", broken)
    with pytest.raises(ImageLoadError, match="zz_bad|004"):
        extract_features(tiny, tmp_path / "imgs", cache=False, batch_size=BS, num_workers=0, local_reducers=red)
    # an interrupted run keeps its finished batches (global features and reduced values) and resumes there
    monkeypatch.setattr(feats_mod, "_FLUSH_BYTES", 1)
    calls = {"n": 0}

    def crash_on_third(this, batch, local):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated crash")
        return broken(this, batch, local)

    monkeypatch.setattr(type(tiny), "_encode_image_batch", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        extract_features(tiny, tmp_path / "imgs", on_error="skip", batch_size=BS, num_workers=0, local_reducers=red)
    counter = {"n": 0}

    def count(this, batch, local):
        counter["n"] += batch.shape[0]
        return broken(this, batch, local)

    monkeypatch.setattr(type(tiny), "_encode_image_batch", count)
    f = extract_features(tiny, tmp_path / "imgs", on_error="skip", batch_size=BS, num_workers=0, local_reducers=red)
    assert counter["n"] == 4  # 004 (non-finite: never cached) and the crashed batch; zz_bad never decodes
    assert len(f) == 8 and [e[0][-10:] for e in f.errors] == ["/imgs/004.png"[-10:], "zz_bad.png"]
    assert "non-finite" in f.errors[0][1]
    assert np.isfinite(f.reduced["g"]).all()
    ref = extract_features(tiny, tmp_path / "imgs", local=True, on_error="skip", cache=False, num_workers=0)
    assert f.ids == ref.ids
    # other batches than the reference's (the encoder's float32 sums depend on the batch at ~1e-9): not bit for bit
    np.testing.assert_allclose(det.score_reduced(f, f.reduced["g"]), det.score_features(ref), rtol=0, atol=1e-6)


def test_pack_keeps_float64_bits():
    v = np.array([[0.0, 1e-310], [-0.0, -1.0], [1 / 3, 2.0], [-2.5e-300, 3.0], [1.7e308, np.inf], [np.pi, np.nan]])
    packed = feats_mod._pack_f64(v)
    assert packed.dtype == np.float32 and packed.shape == (6, 6) and np.isfinite(packed).all()
    assert packed.max() < 2 ** 22 and np.array_equal(packed, np.round(packed))  # whole numbers, exact in float32
    back = feats_mod._unpack_f64(packed)
    assert back.shape == (6, 2) and np.array_equal(back.view(np.int64), v.view(np.int64))  # every bit, NaN's too


def test_reduced_values_of_other_settings_are_refused(tiny, world):
    """Features extracted for one GL-MCM and passed back with features= under the same label, for a GL-MCM with
    another temperature: refused (never scored with the first one's values); the same settings are used as is."""
    _, bench, dets = world
    _, reducers = feats_mod.local_plan(bench.build_detectors(tiny, {"glmcm": "glmcm"}))
    feats = bench.extract(tiny, local=False, cache=False, local_reducers=reducers, batch_size=BS, num_workers=0,
                          progress=False)
    assert feats["ID"].reduced_keys["glmcm"] == reducers["glmcm"].cache_key
    same = bench.run(tiny, {"glmcm": "glmcm"}, features=feats, progress=False)
    fresh = bench.run(tiny, {"glmcm": "glmcm"}, cache=False, batch_size=BS, num_workers=0, progress=False)
    np.testing.assert_array_equal(same.scores["glmcm"]["noise"], fresh.scores["glmcm"]["noise"])
    with pytest.raises(InvalidInputError, match="reduced values under 'glmcm' were computed by another detector"):
        bench.run(tiny, {"glmcm": {"method": "glmcm", "temperature": 0.5}}, features=feats, progress=False)
