"""Detector files (vlmood.detectors.persist): every detector kind saves and loads with identical scores, settings,
threshold and TPR; the stored embeddings are really used; another encoder warns and recomputes; NegLabel JSON files of
earlier versions load; bad files are refused in one line naming the file and the field."""
import json
import os
import warnings

import numpy as np
import pytest
import torch
from lvlm_server import loopback, request_image  # noqa: F401 (loopback: a fixture)
from safetensors import safe_open
from safetensors.torch import save_file

import vlmood
from vlmood.clipn import CLIPNModel
from vlmood.detectors import CLIPN, CLIPNATD, NegLabel, make_detector
from vlmood.detectors.persist import read_detector_meta
from vlmood.encoders.open_clip_backend import OpenCLIPEncoder
from vlmood.errors import InvalidInputError
from vlmood.testing import TINY_ARCH, tiny_encoder
from vlmood.tuning import LearnedPrompts

CLASSES = ["cat", "dog", "bird"]
NEG = {"ratio": 0.5, "ngroups": 2, "seed": 3}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny CLIP loaded from a checkpoint the test wrote (so its spec loads anywhere), a lexicon, images and
    learned prompts made without training."""
    root = tmp_path_factory.mktemp("persist")
    ckpt = root / "tiny.safetensors"
    tiny_encoder(0).save(ckpt)
    enc = vlmood.load_encoder(f"open_clip:{TINY_ARCH}@{ckpt}", device="cpu")
    lex = root / "lex"
    lex.mkdir()
    (lex / "noun.things.txt").write_text("rock\ncloud\nviolin\nocean\nlamp\ngarden\nbridge\nengine\npencil\nriver\n")
    (lex / "adj.all.txt").write_text("striped\nwooden\nbright\nfrozen\nhollow\nvelvet\n")
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    ctx = torch.randn(4, 64, generator=torch.Generator().manual_seed(1)) * 0.02
    prompts = LearnedPrompts(CLASSES, ctx, meta={"method": "coop", "encoder": {"spec": str(enc.spec),
                                                                                "fingerprint": enc.fingerprint}})
    return {"enc": enc, "lex": str(lex), "images": images, "prompts": prompts}


KINDS = {  # name -> (method, keyword arguments)
    "mcm": ("mcm", {"temperature": 2.0}),
    "glmcm": ("glmcm", {"temperature": 0.5, "lam": 0.3}),
    "energy": ("energy", {"logit_scale": 50.0, "temperature": 2.0}),
    "maxlogit": ("maxlogit", {}),
    "neglabel": ("neglabel", {**NEG, "temperature": 0.02}),
    "csp": ("csp", NEG),
    "mcm+prompts": ("mcm", {"prompts": True}),
    "neglabel+prompts": ("neglabel", {**NEG, "prompts": True}),
}


def build(world, kind, encoder=None):
    method, kw = KINDS[kind]
    kw = dict(kw)
    if method in ("neglabel", "csp"):
        kw["lexicon"] = world["lex"]
    if kw.pop("prompts", False):
        kw["prompts"] = world["prompts"]
    return make_detector(method, encoder or world["enc"], None if "prompts" in kw else CLASSES, **kw)


@pytest.mark.parametrize("kind", list(KINDS))
def test_round_trip_keeps_scores_settings_and_calibration(world, kind, tmp_path):
    det = build(world, kind)
    before = det.score(world["images"])
    det.calibrate(before, tpr=0.9)
    path = det.save(tmp_path / "det.vlmood")
    meta = read_detector_meta(path)
    enc = world["enc"]
    assert meta["method"] == det.name and meta["params"] == det.get_params() and meta["classes"] == CLASSES
    assert meta["encoder"] == {"spec": str(enc.spec), "fingerprint": enc.fingerprint, "precision": "fp32"}
    assert (meta["threshold"], meta["tpr"]) == (det.threshold_, 0.9) and meta["vlmood"] == vlmood.__version__
    assert meta["templates"] == det.templates and (meta["prompts"] is None) == (det.prompts is None)
    given = vlmood.load_detector(path, enc)
    recorded = vlmood.load_detector(path, device="cpu")  # the encoder from the recorded spec
    assert recorded.encoder is not enc and recorded.encoder.fingerprint == enc.fingerprint
    for back in (given, recorded):
        assert type(back) is type(det) and back.classes == det.classes and back.get_params() == det.get_params()
        assert back.threshold_ == det.threshold_ and back.tpr_ == 0.9 and back.templates == det.templates
        assert torch.equal(back.text_features, det.text_features)
        if isinstance(det, NegLabel):
            assert back.negatives_ == det.negatives_ and torch.equal(back.negative_features, det.negative_features)
        if det.prompts is not None:
            assert torch.equal(back.prompts.ctx, det.prompts.ctx) and back.prompts.meta == det.prompts.meta
    assert np.array_equal(given.score(world["images"]), before)
    np.testing.assert_allclose(recorded.score(world["images"]), before, rtol=0, atol=1e-6)
    assert np.array_equal(given.predict(world["images"]).is_ood, det.predict(world["images"]).is_ood)


def _no_text_encoding(monkeypatch):
    def fail(*a, **k):
        pytest.fail("text was encoded")

    for target, name in ((OpenCLIPEncoder, "_encode_token_batch"), (OpenCLIPEncoder, "encode_texts"),
                         (CLIPNModel, "encode_no_tokens"), (LearnedPrompts, "text_features")):
        monkeypatch.setattr(target, name, fail)


@pytest.mark.parametrize("kind", ["mcm", "neglabel+prompts", "csp"])
def test_stored_embeddings_are_used(world, kind, tmp_path, monkeypatch):
    det = build(world, kind)
    before = det.score(world["images"])
    path = det.save(tmp_path / "det.vlmood")
    _no_text_encoding(monkeypatch)
    assert np.array_equal(vlmood.load_detector(path, world["enc"], cache=False).score(world["images"]), before)


@pytest.mark.parametrize("kind", ["mcm", "neglabel", "mcm+prompts"])
def test_another_encoder_warns_once_and_recomputes(world, kind, tmp_path):
    det = build(world, kind)
    det.calibrate(det.score(world["images"]), tpr=0.8)
    path = det.save(tmp_path / "det.vlmood")
    other = tiny_encoder(5)
    with pytest.warns(UserWarning) as record:
        back = vlmood.load_detector(path, other)
    msgs = [str(w.message) for w in record]
    assert len(msgs) == 1 and "\n" not in msgs[0], msgs
    assert f"det.vlmood was saved with {world['enc'].spec} (fingerprint {world['enc'].fingerprint})" in msgs[0]
    assert f"loaded with {other.spec} (fingerprint {other.fingerprint})" in msgs[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # learned prompts on another encoder warn on their own
        fresh = build(world, kind, encoder=other)
    if isinstance(det, NegLabel):
        fresh.negatives_ = det.negatives_  # the recorded negatives, embedded on the other encoder
        assert torch.equal(back.negative_features, fresh.negative_features)
    assert torch.equal(back.text_features, fresh.text_features)
    assert not torch.equal(back.text_features, det.text_features)
    assert np.array_equal(back.score(world["images"]), fresh.score(world["images"]))
    # the threshold was calibrated on the other model's scores: dropped, and the warning says so
    assert (back.threshold_, back.tpr_) == (None, None) and det.threshold_ is not None
    assert f"its threshold ({det.threshold_:.6g}) was calibrated on that model's scores and is dropped" in msgs[0]


def test_encoder_spec_string_recorded_precision_and_bad_encoder(world, tmp_path):
    det = build(world, "mcm")
    det.calibrate(det.score(world["images"]), tpr=0.9)
    path = det.save(tmp_path / "det.vlmood")
    back = vlmood.load_detector(path, str(world["enc"].spec))  # a spec string loads that model
    assert back.encoder.fingerprint == world["enc"].fingerprint and back.threshold_ == det.threshold_
    assert back.encoder.precision == "fp32"  # the recorded precision
    with pytest.warns(UserWarning) as record:  # bf16 on a CPU also warns that it is emulated
        vlmood.load_detector(path, precision="bf16")
    assert any("calibrated at fp32 and is scored at bf16" in str(w.message) for w in record)
    with pytest.raises(InvalidInputError, match=r"^encoder must be an Encoder, a model spec or None, got int$"):
        vlmood.load_detector(path, 3)


def test_neglabel_json_of_earlier_versions_loads(world, tmp_path):
    from test_neglabel import legacy_json

    det = build(world, "neglabel")
    path = tmp_path / "neg.json"
    path.write_text(json.dumps(legacy_json(det)))
    meta = read_detector_meta(path)
    assert (meta["format"], meta["version"], meta["method"]) == ("vlmood.neglabel", 1, "neglabel")
    assert meta["encoder"] == {"spec": None, "fingerprint": world["enc"].fingerprint, "precision": None}
    assert meta["params"] == det.get_params() and meta["negatives"] == [{"label": w, "pos": p}
                                                                        for w, p in det.negatives_]
    back = vlmood.load_detector(path, world["enc"])
    assert type(back) is NegLabel and back.negatives_ == det.negatives_ and back.threshold_ is None
    np.testing.assert_allclose(back.score(world["images"]), det.score(world["images"]), rtol=1e-6)
    with pytest.raises(InvalidInputError, match=r"neg\.json is a NegLabel file of an earlier vlmood version, which "
                                                r"records no encoder spec: pass the encoder"):
        vlmood.load_detector(path)


# ------------------------------------------------------------------ CLIPN (the toy world's shipped no side)
@pytest.fixture(scope="module")
def toy():
    from vlmood.toyworld import ID_SHAPES, OOD_SHAPES, load_images

    enc = vlmood.load_encoder("toyworld", device="cpu")
    images = load_images(31, 4, ID_SHAPES)[0] + load_images(32, 4, OOD_SHAPES)[0]
    return enc, list(ID_SHAPES), enc.encode_images(images)


@pytest.mark.parametrize("cls,kw", [(CLIPN, {"templates": ["a photo of a {}", "a {} shape"]}),
                                    (CLIPNATD, {"templates": ["a photo of a {}"], "logit_scale": 100.0})])
def test_clipn_round_trip(toy, cls, kw, tmp_path, monkeypatch):
    enc, classes, feats = toy
    det = cls(enc, classes, **kw)
    before = det.score_features(feats)
    det.calibrate(before, tpr=0.9)
    path = det.save(tmp_path / "clipn.vlmood")
    meta = read_detector_meta(path)
    assert meta["encoder"]["spec"] == "toyworld" and meta["params"] == det.get_params()
    assert meta["clipn"]["n_prompts"] == det.model.no.n_prompts
    with safe_open(str(path), framework="pt") as f:  # the trained no side itself, under the reference's names
        stored = {k[len("clipn."):]: f.get_tensor(k) for k in f.keys() if k.startswith("clipn.")}
    own = det.model.state_dict_no()
    assert stored.keys() == own.keys() and all(torch.equal(stored[k], own[k]) for k in own)
    back = vlmood.load_detector(path, device="cpu")
    assert type(back) is cls and back.score_rule == det.score_rule and back.tpr_ == 0.9
    assert back.model.fingerprint == det.model.fingerprint and back.threshold_ == det.threshold_
    assert np.array_equal(back.score_features(feats), before)
    _no_text_encoding(monkeypatch)
    assert np.array_equal(vlmood.load_detector(path, enc, cache=False).score_features(feats), before)


# ------------------------------------------------------------------ LVLM
def test_lvlm_round_trip_rebuilds_the_client_without_the_key(loopback, tmp_path, monkeypatch):
    pytest.importorskip("httpx")
    from vlmood.lvlm import OpenAIClient
    from vlmood.lvlm.detector import LVLMDetector
    from vlmood.toyworld import ID_SHAPES, load_images

    def by_red(req):  # the confidence follows the image's mean red value: scores differ per image
        red = int(np.asarray(request_image(req).convert("RGB"))[..., 0].mean())
        return f'Prediction: circle\nConfidence: {{"circle": {red % 100}, "square": 3, "none of these classes": 1}}'

    server = loopback(by_red)
    images = load_images(40, 5, ID_SHAPES)[0]
    client = OpenAIClient(server.base_url, "loopback-vl", api_key="sk-secret-123", max_retries=1, concurrency=2,
                          cache=False)
    det = LVLMDetector(client, ["circle", "square"], invalid="ood", retries=1, class_batch=1, max_tokens=200)
    before = det.score(images)
    assert len(set(before.tolist())) > 1
    det.calibrate(before, tpr=0.8)
    path = det.save(tmp_path / "lvlm.vlmood")
    assert b"sk-secret-123" not in path.read_bytes()
    meta = read_detector_meta(path)
    assert meta["encoder"] is None and meta["lvlm"]["client"] == "openai" and meta["lvlm"]["cache"] is False
    assert meta["params"]["generation"] == {"max_tokens": 200} and meta["params"]["class_batch"] == 1
    monkeypatch.setenv("VLMOOD_LVLM_API_KEY", "sk-from-env")
    back = vlmood.load_detector(path)
    assert isinstance(back.client, OpenAIClient) and back.client.model_id == client.model_id
    assert back.client._api_key == "sk-from-env" and back.client.concurrency == 2 and back.client.cache is None
    assert back.get_params() == det.get_params() and (back.threshold_, back.tpr_) == (det.threshold_, 0.8)
    assert np.array_equal(back.score(images), before)
    assert server.bodies[-1]["max_tokens"] == 200


def test_lvlm_transformers_client_is_rebuilt_from_its_folder(tmp_path):
    pytest.importorskip("transformers")
    from test_lvlm_hf import _tiny

    from vlmood.lvlm.detector import LVLMDetector
    from vlmood.lvlm.hf import TransformersClient
    from vlmood.toyworld import ID_SHAPES, load_images

    model, proc = _tiny()
    model.save_pretrained(tmp_path / "llava")
    proc.save_pretrained(tmp_path / "llava")
    client = TransformersClient(tmp_path / "llava", device="cpu", batch_size=2, max_new_tokens=6, cache=False)
    det = LVLMDetector(client, ["circle", "square"], invalid="ood")
    images = load_images(41, 2, ID_SHAPES)[0]
    before = det.score(images)
    meta = read_detector_meta(det.save(tmp_path / "hf.vlmood"))
    assert meta["lvlm"] == {"client": "transformers", "model": str(tmp_path / "llava"), "batch_size": 2,
                            "max_new_tokens": 6, "temperature": 0.0, "model_id": client.model_id, "cache": False}
    back = vlmood.load_detector(tmp_path / "hf.vlmood", device="cpu")
    assert isinstance(back.client, TransformersClient) and back.client.model_id == client.model_id
    assert back.client.cache is None and np.array_equal(back.score(images), before)


def test_lvlm_custom_client_must_be_given(tmp_path):
    from vlmood.lvlm.base import LVLMClient, Reply
    from vlmood.lvlm.detector import LVLMDetector

    class Fixed(LVLMClient):
        model_id = "fixed-model"

        def generate_many(self, requests, progress=None, **params):
            return [Reply("Prediction: cat\nConfidence: {cat: 70, dog: 2}") for _ in requests]

    path = LVLMDetector(Fixed(), ["cat", "dog"]).save(tmp_path / "fixed.vlmood")
    with pytest.raises(InvalidInputError, match=r"fixed\.vlmood was saved with a custom LVLM client \(Fixed, model "
                                                r"'fixed-model'\) that cannot be rebuilt: pass client="):
        vlmood.load_detector(path)
    back = vlmood.load_detector(path, client=Fixed())
    assert back.classes == ["cat", "dog"] and back.threshold_ is None and back.tpr_ is None
    assert isinstance(vlmood.load_detector(path, Fixed()).client, Fixed)  # a client in the encoder's place
    with pytest.raises(InvalidInputError, match=r"fixed\.vlmood is an LVLM detector: it takes no encoder"):
        vlmood.load_detector(path, tiny_encoder(0))


# ------------------------------------------------------------------ bad files
@pytest.fixture(scope="module")
def good(world, tmp_path_factory):
    det = build(world, "neglabel")
    det.calibrate(det.score(world["images"]), tpr=0.9)
    return det.save(tmp_path_factory.mktemp("good") / "good.vlmood")


def rewrite(src, dst, meta=None, arrays=None, header=None):
    """A copy of detector file ``src`` at ``dst`` with edited metadata, arrays or header fields."""
    with safe_open(str(src), framework="pt") as f:
        h = dict(f.metadata())
        t = {k: f.get_tensor(k) for k in f.keys()}
    m = json.loads(h["meta"])
    if meta:
        meta(m)
    h["meta"] = json.dumps(m)  # NaN written as NaN
    if arrays:
        arrays(t)
    h.update(header or {})
    save_file(t, str(dst), metadata={k: v for k, v in h.items() if v is not None})
    return dst


def _set(key, value):
    def edit(m):
        target, *path = key.split(".")
        if not path:
            m[target] = value
        else:
            m[target][path[0]] = value
    return edit


@pytest.mark.parametrize("edit,match", [
    (dict(header={"version": "2"}), r"has detector format version 2; this vlmood reads versions up to 1: "
                                    r"upgrade vlmood"),
    (dict(header={"format": None}), r"is not a vlmood detector file \(no format recorded\)"),
    (dict(header={"format": "vlmood.clipn"}), r"is not a vlmood detector file \(a CLIPN no side"),
    (dict(header={"meta": None}), r"invalid field 'meta': not JSON"),
    (dict(meta=_set("method", "mcmm")), r"invalid field 'method': unknown method 'mcmm'; did you mean 'mcm'\?"),
    (dict(meta=lambda m: m.pop("classes")), r"missing field\(s\) classes"),
    (dict(meta=_set("extra", 1)), r"unknown field\(s\) 'extra'"),
    (dict(meta=_set("threshold", float("nan"))), r"invalid field 'threshold': expected a finite number or null, "
                                                 r"got nan"),
    (dict(meta=_set("tpr", 1.5)), r"invalid field 'tpr': expected a number in \(0, 1\] or null, got 1\.5"),
    (dict(meta=_set("params.temperature", -1)), r"invalid field 'params\.temperature': temperature must be"),
    (dict(meta=_set("params.ngroups", 99)), r"invalid field 'negatives': \d+ negatives, fewer than params\.ngroups=99"),
    (dict(meta=lambda m: m["params"].pop("pool")), r"invalid field 'params': expected an object with exactly"),
    (dict(meta=_set("classes", ["cat", "cat", "bird"])), r"invalid field 'classes': duplicate class names"),
    (dict(meta=_set("encoder.spec", "")), r"invalid field 'encoder'"),
    (dict(meta=_set("negatives", [{"label": "rock"}])), r"invalid field 'negatives': expected a list of"),
    (dict(meta=lambda m: m["classes"].append("fish")), r"array 'text' has shape \[3, 64\], expected \[4, D\] "
                                                       r"\(4 classes\)"),
    (dict(arrays=lambda t: t.update(negatives=t["negatives"][:-1])), r"array 'negatives' has shape \[\d+, 64\], "
                                                                     r"expected \[\d+, 64\] \(\d+ negatives\)"),
    (dict(arrays=lambda t: t.pop("text")), r"missing array\(s\) 'text'"),
    (dict(arrays=lambda t: t.update(junk=torch.zeros(1))), r"unknown array\(s\) 'junk'"),
])
def test_bad_files_are_refused_in_one_line(good, tmp_path, edit, match):
    bad = rewrite(good, tmp_path / "bad.vlmood", **edit)
    for call in (read_detector_meta, vlmood.load_detector):
        with pytest.raises(InvalidInputError, match=match) as e:
            call(bad)
        assert str(e.value).startswith(str(bad)) and "\n" not in str(e.value)


def test_files_that_are_not_detector_files(world, tmp_path):
    with pytest.raises(InvalidInputError, match=r"detector file not found: .*missing\.vlmood"):
        vlmood.load_detector(tmp_path / "missing.vlmood")
    with pytest.raises(InvalidInputError, match=r"is a folder, not a file"):
        read_detector_meta(tmp_path)
    # noise that starts like neither a JSON text (the old NegLabel files: "{" or "[") nor a safetensors header
    # ("{" after the 8-byte length): random bytes alone did, about once in a hundred runs
    (tmp_path / "noise.vlmood").write_bytes(b"\x01" + os.urandom(7) + b"\x00" + os.urandom(55) + b"\x00")
    with pytest.raises(InvalidInputError, match=r"noise\.vlmood is not a vlmood detector file \(not a safetensors"):
        vlmood.load_detector(tmp_path / "noise.vlmood")
    prompts = world["prompts"].save(tmp_path / "p.safetensors")
    with pytest.raises(InvalidInputError, match=r"p\.safetensors is not a vlmood detector file \(learned prompts: "
                                                r"use them with make_detector\(\.\.\., prompts=FILE\)\)"):
        read_detector_meta(prompts)


def test_unwritable_output_and_unsaveable_detectors(world, tmp_path):
    det = build(world, "mcm").fit()
    out = tmp_path / "out"
    (out / "taken").mkdir(parents=True)
    with pytest.raises(InvalidInputError, match=r"cannot write detector file .*taken: ") as e:
        det.save(out / "taken")  # a folder is in the way
    assert "\n" not in str(e.value) and os.listdir(out) == ["taken"]  # no temporary file left
    (out / "file").write_text("x")
    with pytest.raises(InvalidInputError, match=r"cannot write detector file .*file/det\.vlmood: "):
        det.save(out / "file" / "det.vlmood")
    det.threshold_ = float("nan")
    with pytest.raises(InvalidInputError, match=r"cannot save .*nan\.vlmood: threshold_: threshold must be a finite"):
        det.save(out / "nan.vlmood")

    class Mine(vlmood.MCM):
        pass

    with pytest.raises(InvalidInputError, match=r"cannot save Mine to .*: only the registered detectors"):
        Mine(world["enc"], CLASSES).save(out / "mine.vlmood")
    assert sorted(os.listdir(out)) == ["file", "taken"]


def test_calibrate_records_the_tpr(world):
    det = build(world, "mcm")
    assert det.tpr_ is None
    scores = det.score(world["images"])
    assert det.calibrate(scores, tpr=0.5) == vlmood.metrics.threshold_at_tpr(scores, 0.5) and det.tpr_ == 0.5


def test_numpy_written_files_equal_torch_written_ones_and_bf16_files_load(tiny, tmp_path):
    """Detector files are written from numpy arrays: the bytes torch would write (0-d and empty dicts included);
    a file whose arrays another tool stored as bfloat16 (numpy has none) still loads, widened."""
    from safetensors.torch import save as save_torch

    from vlmood._io import save_safetensors

    cases = [{"s": np.array(2.5, np.float32), "m": np.arange(6, dtype=np.float32).reshape(2, 3)}, {}]
    for i, arrays in enumerate(cases):
        save_safetensors(arrays, tmp_path / f"n{i}.st", metadata={"a": "b"})
        want = save_torch({k: torch.from_numpy(v) for k, v in arrays.items()}, metadata={"a": "b"})
        assert (tmp_path / f"n{i}.st").read_bytes() == want
    det = make_detector("mcm", tiny, CLASSES)
    det.save(tmp_path / "d.vlmood")
    with safe_open(str(tmp_path / "d.vlmood"), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    (tmp_path / "bf16.vlmood").write_bytes(save_torch({k: v.bfloat16() for k, v in tensors.items()}, metadata=meta))
    back = vlmood.load_detector(tmp_path / "bf16.vlmood", tiny)
    np.testing.assert_allclose(back.text_features.numpy(), det.text_features.numpy(), atol=1e-2)
    assert back.text_features.dtype == torch.float32
