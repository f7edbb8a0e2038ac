"""Learned prompts as a detector's text side: every detector with ``prompts=``, the save/load round trip, the
evaluation harness comparing zero-shot and learned prompts in one image pass, NegLabel files, bad input."""
import json
import warnings

import numpy as np
import pytest
import torch

import vlmood
from vlmood import CSP, GLMCM, MCM, Benchmark, Energy, LearnedPrompts, MaxLogit, NegLabel, make_detector
from vlmood.data import MemorySource
from vlmood.errors import InvalidInputError
from vlmood.features import extract_features
from vlmood.negatives import candidate_pool, mine
from vlmood.text import class_embeddings
from vlmood.toyworld import ID_SHAPES, OOD_SHAPES, lexicon_dir, load_images
from vlmood.tuning import LoCoOp
from vlmood.tuning.learner import init_context

CLASSES = list(ID_SHAPES)
NEG = {"lexicon": str(lexicon_dir()), "ratio": 0.5, "ngroups": 1}  # the toy world's NegLabel setting (demo)


@pytest.fixture(scope="module")
def enc():
    return vlmood.load_encoder("toyworld")


@pytest.fixture(scope="module")
def learned(enc):
    """Prompts learned by a short LoCoOp run (their metadata names the toy-world encoder)."""
    images, names = load_images(11, 24, ID_SHAPES)
    return LoCoOp(enc, CLASSES, n_ctx=4, seed=0).fit(MemorySource(images, names), shots=2, epochs=3, batch_size=4,
                                                      views=2, progress=False, on_missing="use_all")


@pytest.fixture(scope="module")
def feats(enc):
    id_imgs, labels = load_images(21, 10, ID_SHAPES)
    ood_imgs, _ = load_images(22, 6, OOD_SHAPES)
    return extract_features(enc, MemorySource(id_imgs + ood_imgs, labels + [None] * 6), local=True, cache=False,
                            num_workers=0)


def one_line(err: Exception) -> str:
    msg = str(err)
    assert "\n" not in msg, msg
    return msg


# ------------------------------------------------------------------------------------------- scores
@pytest.mark.parametrize("cls", [MCM, GLMCM, Energy, MaxLogit])
def test_detector_scores_with_prompts_equal_an_independent_computation(enc, learned, feats, cls):
    det = cls(enc, prompts=learned)
    assert det.classes == CLASSES and det.templates == []
    text = learned.text_features(enc)
    assert torch.allclose(det.text_features, text)
    g, loc = feats.features.double(), feats.local.double()
    cos, cos_loc = g @ text.double().T, loc @ text.double().T
    scale = enc.logit_scale
    expected = {
        MCM: cos.softmax(-1).amax(-1),
        GLMCM: cos.softmax(-1).amax(-1) + cos_loc.softmax(-1).amax(-1).amax(-1),
        Energy: torch.logsumexp(scale * cos, dim=-1),
        MaxLogit: scale * cos.amax(-1),
    }[cls].numpy()
    np.testing.assert_allclose(det.score_features(feats), expected, rtol=1e-5, atol=1e-6)
    # the learned embeddings are really used: the zero-shot detector scores differently
    assert not np.allclose(cls(enc, CLASSES).score_features(feats), expected, rtol=1e-3)
    assert np.array_equal(det.classify_features(feats), cos.argmax(-1).numpy())


def test_init_phrase_context_reproduces_the_template_detector(enc, feats):
    """Context = the token embeddings of "a photo of a": MCM with these prompts is MCM with "a photo of a {}."."""
    prompts = LearnedPrompts(CLASSES, init_context(enc, len(CLASSES), None, "a photo of a", csc=False, seed=0))
    learned = GLMCM(enc, prompts=prompts).score_features(feats)
    zero_shot = GLMCM(enc, CLASSES, templates=["a photo of a {}."]).score_features(feats)
    np.testing.assert_allclose(learned, zero_shot, atol=1e-5)


@pytest.mark.parametrize("cls", [NegLabel, CSP])
def test_neglabel_with_prompts_replaces_only_the_id_side(enc, learned, feats, cls):
    det = cls(enc, prompts=learned, **NEG).fit()
    text = learned.text_features(enc)
    assert torch.allclose(det.text_features, text) and det.templates == []
    zero = cls(enc, CLASSES, **NEG)
    assert det.neg_templates == zero.neg_templates  # the negatives' templates are unchanged
    # mining compares the candidates with the learned ID embeddings
    cands = candidate_pool(det.pool, NEG["lexicon"], seed=0)
    cand_feats = torch.empty(len(cands.labels), enc.embed_dim)
    for pos in dict.fromkeys(cands.pos):
        idx = [i for i, p in enumerate(cands.pos) if p == pos]
        cand_feats[idx] = class_embeddings(enc, [cands.labels[i] for i in idx],
                                           det.neg_templates.get(pos) or det.neg_templates["noun"])
    exclude = [w.strip().lower() in CLASSES for w in cands.labels]
    push = 0.95 if cls is CSP else None
    idx = mine(text, cand_feats, 0.95, 0.5, groups=cands.pos, exclude=exclude, push_above=push)
    assert det.negatives_ == [(cands.labels[i], cands.pos[i]) for i in idx]
    # score (ngroups=1): ID softmax mass over [ID labels, negatives] with T = 0.01
    neg = cand_feats[torch.as_tensor(idx)]
    g = feats.features.double()
    e_id = torch.exp((g @ text.double().T) / 0.01).sum(-1)
    e_neg = torch.exp((g @ neg.double().T) / 0.01).sum(-1)
    np.testing.assert_allclose(det.score_features(feats), (e_id / (e_id + e_neg)).numpy(), rtol=2e-4)  # float32 cosines / T


# ------------------------------------------------------------------------------------------- files
def test_save_load_round_trip_gives_identical_scores(enc, learned, feats, tmp_path):
    path = learned.save(tmp_path / "p.safetensors")
    loaded = LearnedPrompts.load(path, enc)
    assert loaded.classes == learned.classes and torch.equal(loaded.ctx, learned.ctx)
    for method in ("mcm", "glmcm", "energy", "maxlogit"):
        before = make_detector(method, enc, CLASSES, prompts=learned).score_features(feats)
        from_obj = make_detector(method, enc, None, prompts=loaded).score_features(feats)
        from_path = make_detector(method, enc, None, prompts=str(path)).score_features(feats)
        assert np.array_equal(before, from_obj) and np.array_equal(before, from_path), method
    a = NegLabel(enc, prompts=learned, **NEG).score_features(feats)
    b = NegLabel(enc, prompts=path, **NEG).score_features(feats)
    assert np.array_equal(a, b)


def test_repr_names_the_learned_prompts(enc, learned, tmp_path):
    path = learned.save(tmp_path / "locoop.safetensors")
    r = repr(GLMCM(enc, prompts=path))
    assert "learned locoop prompts from locoop.safetensors (4 shared context tokens)" in r and "templates" not in r
    assert "1 templates" in repr(MCM(enc, CLASSES))


def test_neglabel_file_records_the_prompts_it_was_mined_with(enc, learned, feats, tmp_path):
    from test_neglabel import legacy_json  # NegLabel JSON files of earlier versions (record the prompts' file)

    p = learned.save(tmp_path / "p.safetensors")
    det = NegLabel(enc, prompts=p, **NEG)
    # a detector file holds the learned context itself: it loads without the prompts file
    new = det.save(tmp_path / "det.vlmood")
    (tmp_path / "det.json").write_text(json.dumps(legacy_json(det)))
    data = json.loads((tmp_path / "det.json").read_text())
    assert data["templates"] == [] and data["prompts"]["file"] == str(p)
    again = NegLabel.load(tmp_path / "det.json", enc)
    assert again.prompts_file == p and np.array_equal(again.score_features(feats), det.score_features(feats))
    # moved: pass the new place; the digest proves they are the same prompts
    moved = p.rename(tmp_path / "moved.safetensors")
    assert np.array_equal(NegLabel.load(new, enc).score_features(feats), det.score_features(feats))
    with pytest.raises(InvalidInputError, match="mined with learned prompts: learned-prompts file not found"):
        NegLabel.load(tmp_path / "det.json", enc)
    assert np.array_equal(NegLabel.load(tmp_path / "det.json", enc, prompts=moved).score_features(feats),
                          det.score_features(feats))
    # other prompts (same classes, another context) are refused
    other = LearnedPrompts(CLASSES, learned.ctx + 0.01, meta=learned.meta)
    with pytest.raises(InvalidInputError, match="differ from the learned prompts its negatives were mined with"):
        NegLabel.load(tmp_path / "det.json", enc, prompts=other)
    # prompts that were never in a file: the saved detector asks for them
    (tmp_path / "mem.json").write_text(json.dumps(legacy_json(NegLabel(enc, prompts=learned, **NEG))))
    with pytest.raises(InvalidInputError, match="not read from a file; pass prompts=FILE") as e:
        NegLabel.load(tmp_path / "mem.json", enc)
    one_line(e.value)
    assert np.array_equal(NegLabel.load(tmp_path / "mem.json", enc, prompts=learned).score_features(feats),
                          det.score_features(feats))
    # a zero-shot file scored with learned prompts keeps its negatives and drops its ID templates
    zero = NegLabel(enc, CLASSES, **NEG)
    for f in (zero.save(tmp_path / "zero.vlmood"), tmp_path / "zero.json"):
        if f.suffix == ".json":
            f.write_text(json.dumps(legacy_json(zero)))
        mixed = NegLabel.load(f, enc, prompts=learned)
        assert mixed.negatives_ == zero.fit().negatives_ and mixed.templates == []
        assert torch.allclose(mixed.text_features, learned.text_features(enc))


# ------------------------------------------------------------------------------------------- harness
def test_benchmark_compares_zero_shot_and_learned_in_one_image_pass(enc, learned, tmp_path, monkeypatch):
    from test_features import CallCounter

    path = learned.save(tmp_path / "p.safetensors")
    id_imgs, labels = load_images(31, 8, ID_SHAPES)
    ood_imgs, _ = load_images(32, 5, OOD_SHAPES)
    bench = Benchmark(id=MemorySource(id_imgs, labels, name="id"), ood={"far": {"x": MemorySource(ood_imgs, name="x")}},
                      classes=CLASSES, templates="imagenet7")  # the prompts entries must not get these templates
    counter = CallCounter(enc, monkeypatch)
    dets = {"mcm": "mcm", "glmcm": "glmcm", "mcm+locoop": {"method": "mcm", "prompts": learned},
            "glmcm+locoop": {"method": "glmcm", "prompts": str(path)},
            "mcm-own": {"method": "mcm", "templates": ["a {}"]}}  # an entry's own templates win over the benchmark's
    report = bench.run(enc, dets, cache=False, batch_size=4, num_workers=0, progress=False)
    assert counter.images == 13  # every image encoded once for zero-shot and learned detectors
    feats = bench.extract(enc, local=True, cache=False, num_workers=0)
    for label, det in (("mcm", MCM(enc, CLASSES, "imagenet7")), ("mcm+locoop", MCM(enc, prompts=learned)),
                       ("glmcm+locoop", GLMCM(enc, prompts=learned)), ("mcm-own", MCM(enc, CLASSES, ["a {}"]))):
        np.testing.assert_allclose(report.scores[label]["ID"], det.score_features(feats["ID"]), rtol=1e-6)
        np.testing.assert_allclose(report.scores[label]["x"], det.score_features(feats["x"]), rtol=1e-6)
    acc = np.mean(MCM(enc, prompts=learned).classify_features(feats["ID"]) ==
                  np.array([CLASSES.index(c) for c in labels]))
    assert report.id_accuracy["mcm+locoop"] == pytest.approx(acc)
    # a prompts entry whose classes differ from the benchmark's is refused before any image is encoded
    before = counter.images
    other = LearnedPrompts(CLASSES[::-1], learned.ctx)
    with pytest.raises(InvalidInputError, match="same classes in another order"):
        bench.run(enc, {"m": {"method": "mcm", "prompts": other}}, cache=False, progress=False)
    assert counter.images == before


# ------------------------------------------------------------------------------------------- bad input
def test_classes_must_equal_the_prompts_classes(enc, learned):
    assert MCM(enc, ",".join(CLASSES), prompts=learned).classes == CLASSES  # any class-list form, same names
    with pytest.raises(InvalidInputError, match="same classes in another order") as e:
        MCM(enc, CLASSES[::-1], prompts=learned)
    one_line(e.value)
    with pytest.raises(InvalidInputError, match=r"missing \['cross'\]"):
        GLMCM(enc, CLASSES[:-1], prompts=learned)
    with pytest.raises(InvalidInputError, match=r"not learned \['hexagon'\]"):
        NegLabel(enc, CLASSES + ["hexagon"], prompts=learned, **NEG)


@pytest.mark.parametrize("templates", ["simple", ["a photo of a {}"]])
def test_templates_and_prompts_together_are_refused(enc, learned, templates):
    for cls in (MCM, NegLabel):
        with pytest.raises(InvalidInputError, match="give templates or prompts, not both") as e:
            cls(enc, templates=templates, prompts=learned)
        one_line(e.value)


def test_no_classes_and_no_prompts(enc):
    with pytest.raises(InvalidInputError, match=r"MCM needs the ID classes \(classes=\.\.\.\), or learned prompts"):
        MCM(enc)


def test_bad_prompts_arguments_are_one_line(enc, learned, tiny, tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    NegLabel(enc, CLASSES, **NEG).save(tmp_path / "det.vlmood")
    cases = [
        (tmp_path / "missing.safetensors", "learned-prompts file not found"),
        (tmp_path / "notes.txt", "is not a readable safetensors file"),
        (str(tmp_path / "det.vlmood"), r"det\.vlmood is not a vlmood learned-prompts file \(format 'vlmood\.detector'"),
        ("", "prompts is an empty path"),
        (42, "prompts must be LearnedPrompts or the path of a learned-prompts file, got int"),
    ]
    for arg, needle in cases:
        with pytest.raises(InvalidInputError, match=needle) as e:
            MCM(enc, prompts=arg)
        one_line(e.value)
    # the context width of another model: refused when the detector is built, not when it scores
    with pytest.raises(InvalidInputError, match="context width 128 but .* width 64") as e:
        MCM(tiny, prompts=learned)
    one_line(e.value)


def test_prompts_from_another_encoder_warn_once(enc, learned, feats):
    meta = {**learned.meta, "encoder": {"spec": "open_clip:other/none", "fingerprint": "elsewhere"}}
    other = LearnedPrompts(CLASSES, learned.ctx, meta=meta)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        det = GLMCM(enc, prompts=other)
        det.score_features(feats)
    msgs = [str(w.message) for w in seen if "trained with" in str(w.message)]
    assert len(msgs) == 1 and "open_clip:other/none" in msgs[0], msgs
    np.testing.assert_array_equal(det.score_features(feats), GLMCM(enc, prompts=learned).score_features(feats))
