"""NegLabel / CSP: lexicons, mining and the grouped kernel against direct computations; detector persistence."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vlmood
from vlmood import lexicons, scores
from vlmood.cli import main
from vlmood.detectors.persist import read_detector_meta
from vlmood.errors import InvalidInputError
from vlmood.negatives import CSP_SUPERCLASSES, candidate_pool, mine, percentile_similarity


# ------------------------------------------------------------------ kernel
def direct_neglabel(id_sims, neg_sims, T, ngroups, seed):
    m = neg_sims.shape[1]
    order = (torch.randperm(m, generator=torch.Generator().manual_seed(seed)).numpy() if seed is not None
             else np.arange(m))
    size = m // ngroups
    out = np.zeros(id_sims.shape[0])
    for g in range(ngroups):
        cols = order[g * size:(g + 1) * size]
        for n in range(id_sims.shape[0]):
            logits = np.concatenate([id_sims[n], neg_sims[n, cols]]) / T
            p = np.exp(logits - logits.max())
            p /= p.sum()
            out[n] += p[: id_sims.shape[1]].sum() / ngroups
    return out


@pytest.mark.parametrize("ngroups,seed,T", [(1, 0, 0.01), (7, 0, 0.01), (10, 3, 0.05), (4, None, 1.0)])
def test_neglabel_kernel_matches_direct(ngroups, seed, T):
    rng = np.random.default_rng(0)
    ids, neg = rng.uniform(0.1, 0.35, (6, 5)), rng.uniform(0.1, 0.35, (6, 43))  # 43 % 7 = 1, 43 % 10 = 3 dropped
    np.testing.assert_allclose(scores.neglabel(ids, neg, T, ngroups, seed), direct_neglabel(ids, neg, T, ngroups, seed),
                               rtol=1e-10)


def test_neglabel_kernel_hand_computed():
    # one ID label with logit ln 3, two negatives with logit 0: ID mass = 3 / (3 + 2)
    ids, neg = np.array([[math.log(3)]]), np.zeros((1, 2))
    assert scores.neglabel(ids, neg, temperature=1.0, ngroups=1)[0] == pytest.approx(0.6)
    # two groups of one negative each: mean of 3/4 and 3/4
    assert scores.neglabel(ids, neg, temperature=1.0, ngroups=2)[0] == pytest.approx(0.75)


def test_neglabel_kernel_errors():
    with pytest.raises(ValueError, match="ngroups=5 is larger than the number of negative labels \\(4\\)"):
        scores.neglabel(np.zeros((1, 2)), np.zeros((1, 4)), ngroups=5)
    with pytest.raises(ValueError, match="rows"):
        scores.neglabel(np.zeros((2, 2)), np.zeros((1, 4)), ngroups=1)


# ------------------------------------------------------------------ mining
def unit(rng, n, d=16):
    x = rng.normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def direct_mine(ids, cands, pct, ratio, groups, exclude):
    vals = np.quantile(cands @ ids.T, pct, axis=1, method="linear")
    out = []
    for g in dict.fromkeys(groups):
        members = [i for i in range(len(cands)) if groups[i] == g and not exclude[i]]
        members.sort(key=lambda i: vals[i])
        out += members[: int(math.floor(ratio * len(members)))]
    return out


@pytest.mark.parametrize("pct,ratio", [(0.95, 0.15), (0.5, 0.3), (1.0, 1.0)])
def test_mine_matches_direct(pct, ratio):
    rng = np.random.default_rng(1)
    ids, cands = unit(rng, 30), unit(rng, 500)
    groups = ["noun"] * 320 + ["adj"] * 180
    exclude = [i % 37 == 0 for i in range(500)]
    got = mine(ids, cands, pct, ratio, groups=groups, exclude=exclude, chunk_size=64)
    assert got.tolist() == direct_mine(ids, cands, pct, ratio, groups, exclude)
    assert len(got) == math.floor(ratio * 311) + math.floor(ratio * 175)


def test_percentile_chunking_and_push_above():
    rng = np.random.default_rng(2)
    ids, cands = unit(rng, 20), unit(rng, 300)
    np.testing.assert_allclose(percentile_similarity(ids, cands, 0.9, chunk_size=7),
                               percentile_similarity(ids, cands, 0.9, chunk_size=1000), rtol=1e-6)
    near = np.vstack([cands, ids[:3]])  # three candidates identical to ID classes
    got = mine(ids, near, 0.95, 1.0, push_above=0.95)
    assert sorted(got[-3:].tolist()) == [300, 301, 302]  # ranked last


def test_mine_errors():
    with pytest.raises(InvalidInputError, match="ratio must be in \\(0, 1\\], got 1.5"):
        mine(np.eye(2), np.eye(2), ratio=1.5)
    with pytest.raises(InvalidInputError, match="ratio must be in \\(0, 1\\], got 0"):
        mine(np.eye(2), np.eye(2), ratio=0)


# ------------------------------------------------------------------ lexicons
def test_bundled_wordnet_lexicon_counts():
    lex = lexicons.load("neglabel")
    assert len(lex) == len(set(lex.words))
    assert 69_000 < len(lex) < 72_000  # NegLabel's ~70k words
    assert set(lex.source) == set(lexicons.SELECTIONS["neglabel"]) and "noun.animal" not in lex.source
    assert lex.counts()["adj"] > 10_000
    assert all(w == w.lower() and "_" not in w for w in lex.words[:5000])
    plant = lexicons.load(["noun.plant"])
    assert len(plant) == int(open(Path(lexicons.__file__).parent.parent / "lexicons" / "wordnet-3.0" /
                                  "noun.plant.txt").read().split(": ")[1].split()[0])


def test_lexicon_errors(tmp_path):
    with pytest.raises(InvalidInputError, match="unknown lexicon selection 'neglabels'"):
        lexicons.load("neglabels")
    with pytest.raises(InvalidInputError, match="lexicon file not found: .*noun.nothing.txt"):
        lexicons.load(["noun.nothing"])
    (tmp_path / "noun.empty.txt").write_text("# only a comment\n")
    with pytest.raises(InvalidInputError, match="noun.empty.txt is empty"):
        lexicons.load(str(tmp_path))


@pytest.mark.skipif(not Path("/usr/share/wordnet/data.noun").exists(), reason="Debian wordnet-base not installed")
def test_generator_reproduces_committed_files(tmp_path):
    counts = lexicons.build("/usr/share/wordnet", tmp_path)
    bundled = Path(lexicons.__file__).parent.parent / "lexicons" / "wordnet-3.0"
    for name in ("noun.artifact", "noun.plant", "adj.all", "adj.ppl"):
        assert (tmp_path / f"{name}.txt").read_text() == (bundled / f"{name}.txt").read_text()
    assert counts["noun.artifact"] == 10329 and len(counts) == 29


# ------------------------------------------------------------------ pools and detectors
@pytest.fixture
def small_lexicon(tmp_path):
    d = tmp_path / "lex"
    d.mkdir()
    nouns = ["cat", "rock", "cloud", "violin", "ocean", "lamp", "garden", "bridge", "engine", "pencil", "river",
             "castle", "mirror", "candle", "tunnel", "forest", "ladder", "helmet", "window", "anchor"]
    adjs = ["striped", "wooden", "bright", "frozen", "hollow", "velvet", "rusty", "silent", "golden", "misty"]
    (d / "noun.things.txt").write_text("\n".join(nouns) + "\n")
    (d / "adj.all.txt").write_text("\n".join(adjs) + "\n")
    return d, nouns, adjs


def encode_direct(enc, prompts):
    with torch.inference_mode():
        return F.normalize(enc.model.encode_text(enc.tokenizer(prompts)), dim=-1).double().numpy()


def test_neglabel_detector_against_direct_computation(tiny, small_lexicon):
    d, nouns, adjs = small_lexicon
    classes = ["cat", "dog", "tree"]
    det = vlmood.NegLabel(tiny, classes, lexicon=str(d), ratio=0.5, ngroups=3, seed=1).fit()
    # independent: embeddings straight from open_clip, the mining rule by hand
    id_emb = encode_direct(tiny, [f"the nice {c}" for c in classes])
    cands = [w for w in nouns if w != "cat"]  # the ID class name is dropped first
    cand_emb = np.vstack([encode_direct(tiny, [f"the nice {w}" for w in cands]),
                          encode_direct(tiny, [f"This is a {w} photo" for w in adjs])])
    groups = ["noun"] * len(cands) + ["adj"] * len(adjs)
    idx = direct_mine(id_emb, cand_emb, 0.95, 0.5, groups, [False] * len(groups))
    words = cands + adjs
    assert det.negatives_ == [(words[i], groups[i]) for i in idx]
    assert len(det.negatives_) == 9 + 5
    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        img = F.normalize(tiny.model.encode_image(images), dim=-1).double().numpy()
    expected = direct_neglabel(img @ id_emb.T, img @ cand_emb[idx].T, 0.01, 3, 1)
    np.testing.assert_allclose(det.score(images), expected, atol=1e-5)


def test_neglabel_save_load_needs_no_mining(tiny, small_lexicon, tmp_path, monkeypatch):
    d, _, _ = small_lexicon
    det = vlmood.NegLabel(tiny, ["cat", "dog"], lexicon=str(d), ratio=0.4, ngroups=2)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    before = det.score(images)
    path = det.save(tmp_path / "neg.vlmood")
    data = read_detector_meta(path)
    assert data["negatives"][0].keys() == {"label", "pos"} and data["params"]["ngroups"] == 2
    import vlmood.detectors.neglabel as mod

    monkeypatch.setattr(mod, "mine", lambda *a, **k: pytest.fail("re-mined"))
    loaded = vlmood.NegLabel.load(path, tiny)
    np.testing.assert_allclose(loaded.score(images), before, rtol=1e-6)
    assert loaded.negatives_ == det.negatives_
    with pytest.warns(UserWarning, match="neg.vlmood was saved with .* its text side is recomputed"):
        from vlmood.testing import tiny_encoder

        vlmood.NegLabel.load(path, tiny_encoder(5))
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(InvalidInputError, match="bad.json is not a saved NegLabel/CSP detector"):
        vlmood.NegLabel.load(tmp_path / "bad.json", tiny)


def test_neglabel_bad_settings(tiny, small_lexicon):
    d, _, _ = small_lexicon
    with pytest.raises(InvalidInputError, match="ratio must be in \\(0, 1\\], got 0"):
        vlmood.NegLabel(tiny, ["cat"], lexicon=str(d), ratio=0.0)
    with pytest.raises(InvalidInputError, match="only 5 negatives were mined but ngroups=100"):
        vlmood.NegLabel(tiny, ["cat"], lexicon=str(d), ratio=0.2).fit()
    with pytest.raises(InvalidInputError, match="unknown lexicon selection 'wordnet-9'"):
        vlmood.NegLabel(tiny, ["cat"], lexicon="wordnet-9").fit()


def test_csp_pool_and_detector(tiny, small_lexicon, tmp_path):
    d, nouns, adjs = small_lexicon
    (d / "noun.person.txt").write_text("farmer\nsailor\n")
    pool = candidate_pool("csp", str(d), seed=0)
    assert "farmer" not in pool.labels and "cat" in pool.labels  # CSP excludes noun.person
    conj = [lb for lb, p in zip(pool.labels, pool.pos) if p == "adj"]
    assert [c.split(" ")[0] for c in conj] == adjs
    import random

    rng = random.Random(0)
    assert [c.split(" ", 1)[1] for c in conj] == [rng.choice(CSP_SUPERCLASSES) for _ in adjs]
    det = vlmood.CSP(tiny, ["cat", "dog"], lexicon=str(d), ratio=0.5, ngroups=2).fit()
    assert len(det.templates) == 8 and all(p in ("noun", "adj") for _, p in det.negatives_)
    assert any(" " in w and w.split(" ", 1)[1] in CSP_SUPERCLASSES for w, p in det.negatives_ if p == "adj")
    s = det.score(torch.randn(3, 3, 32, 32))
    assert s.shape == (3,) and np.all((s > 0) & (s <= 1))


def test_imagenet_neglabel_count_follows_rule(tiny):
    """The default lexicon with the ImageNet-1k names: floor(15%) of each part of speech after removing ID names."""
    det = vlmood.NegLabel(tiny, "imagenet1k").fit()
    lex = lexicons.load("neglabel")
    names = {c.lower() for c in vlmood.load_classes("imagenet1k")}
    kept = [p for w, p in zip(lex.words, lex.pos) if w not in names]
    expected = math.floor(0.15 * kept.count("noun")) + math.floor(0.15 * kept.count("adj"))
    assert len(det.negatives_) == expected and 10_000 < expected < 11_000


def test_cli_mine_negatives(tiny, small_lexicon, tmp_path):
    d, _, _ = small_lexicon
    ckpt = tmp_path / "t.safetensors"
    tiny.save(ckpt)
    spec = f"open_clip:vlmood-tiny-vit@{ckpt}"
    assert main(["mine-negatives", "--model", spec, "--classes", "cat,dog", "--lexicon", str(d), "--ratio", "0.5",
                 "--out", str(tmp_path / "neg.txt")]) == 0
    lines = [ln for ln in (tmp_path / "neg.txt").read_text().splitlines() if not ln.startswith("#")]
    assert len(lines) == 9 + 5 and all(ln.split("\t")[1] in ("noun", "adj") for ln in lines)
    assert main(["mine-negatives", "--model", spec, "--classes", "cat,dog", "--lexicon", str(d), "--ratio", "0.5",
                 "--ngroups", "2", "--out", str(tmp_path / "neg.vlmood")]) == 0
    loaded = vlmood.load_detector(tmp_path / "neg.vlmood", tiny)
    assert len(loaded.negatives_) == 14 and loaded.ngroups == 2
    direct = vlmood.NegLabel(tiny, ["cat", "dog"], lexicon=str(d), ratio=0.5, ngroups=2)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    np.testing.assert_allclose(loaded.score(images), direct.score(images), rtol=1e-6)
    # settings are checked before the model loads
    assert main(["mine-negatives", "--model", spec, "--classes", "cat,dog", "--percentile", "1.5",
                 "--out", str(tmp_path / "x.txt")]) == 2
    assert main(["mine-negatives", "--model", spec, "--classes", "cat,dog", "--lexicon", "nope",
                 "--out", str(tmp_path / "x.txt")]) == 2
    for name in ("x.json", "x.csv", "x"):  # only a word list (.txt) or a detector (.vlmood), never a guess
        assert main(["mine-negatives", "--model", spec, "--classes", "cat,dog", "--out", str(tmp_path / name)]) == 2


# ------------------------------------------------------------------ CSP pool against the reference's rule
WORDNET_DIR = Path(lexicons.__file__).parent.parent / "lexicons" / "wordnet-3.0"


def raw_words(path):
    """Words of a word file read directly: stripped lines, no blanks, no '#' comments."""
    return [ln.strip() for ln in open(path, encoding="utf-8") if ln.strip() and not ln.startswith("#")]


def test_csp_pool_drops_excluded_files_before_deduplicating():
    """The reference removes noun.person/quantity/group and adj.pert from the file list, then de-duplicates:
    words those files share with kept files stay ('aberrant' is also in noun.person, 'agency' in noun.group)."""
    pool = candidate_pool("csp", "neglabel", seed=0)
    excluded = {"noun.person", "noun.quantity", "noun.group", "adj.pert"}
    seen, nouns, adjs = set(), [], []
    for name in lexicons.SELECTIONS["neglabel"]:  # nouns first, then adjectives (vlmood's documented order)
        if name in excluded:
            continue
        for w in raw_words(WORDNET_DIR / f"{name}.txt"):
            if w not in seen:
                seen.add(w)
                (nouns if name.startswith("noun.") else adjs).append(w)
    assert (pool.pos.count("noun"), pool.pos.count("adj")) == (len(nouns), len(adjs)) == (47_287, 10_206)
    got_nouns = [w for w, p in zip(pool.labels, pool.pos) if p == "noun"]
    got_adjs = [w for w, p in zip(pool.labels, pool.pos) if p == "adj"]
    assert got_nouns == nouns
    import random

    rng = random.Random(0)  # the reference: random.seed(0), then one random.choice per adjective, in pool order
    assert got_adjs == [f"{a} {rng.choice(CSP_SUPERCLASSES)}" for a in adjs]
    assert {"agency", "acceptor"} <= set(got_nouns) and "aberrant" in adjs
    # a Lexicon object read from the same files gives the same pool
    assert candidate_pool("csp", lexicons.load("neglabel"), seed=0) == pool


def test_csp_pool_rule_on_a_small_folder(tmp_path):
    d = tmp_path / "lex"
    d.mkdir()
    (d / "noun.group.txt").write_text("band\ncrew\n")  # excluded, and read before noun.things
    (d / "noun.things.txt").write_text("band\nrock\n")
    (d / "adj.colour.txt").write_text("red\nband\n")  # any adj.* file but adj.pert counts, as in the reference
    (d / "adj.pert.txt").write_text("solar\n")
    (d / "verb.motion.txt").write_text("run\n")  # other parts of speech are no CSP candidates
    pool = candidate_pool("csp", str(d), seed=3)
    import random

    rng = random.Random(3)
    assert pool.labels == ("band", "rock", f"red {rng.choice(CSP_SUPERCLASSES)}")
    assert pool.pos == ("noun", "noun", "adj")
    assert "crew" not in pool.labels and not any(lb.startswith("solar") for lb in pool.labels)


# ------------------------------------------------------------------ lexicon files: encoding and selections
def test_lexicon_files_utf8_bom_and_latin1(tmp_path):
    d = tmp_path / "lex"
    d.mkdir()
    (d / "noun.things.txt").write_bytes("\ufeffcafé\nrock\n".encode("utf-8"))
    assert lexicons.load(str(d)).words == ("café", "rock")  # no '\ufeff' glued to the first word
    (d / "adj.all.txt").write_bytes("naïve\nred\n".encode("latin-1"))
    with pytest.raises(InvalidInputError, match=r"adj\.all\.txt is not UTF-8.*save it as UTF-8"):
        lexicons.load(str(d))


def test_lexicon_selection_mistakes(tmp_path, monkeypatch):
    with pytest.raises(InvalidInputError, match="listed more than once: noun.plant"):
        lexicons.load(["noun.plant", "adj.all", "noun.plant.txt"])
    monkeypatch.chdir(tmp_path)
    (tmp_path / "noun.stray.txt").write_text("stray\n")
    with pytest.raises(InvalidInputError, match="the lexicon selection is empty"):
        lexicons.load("")  # Path("") is the current folder: it used to be read as a lexicon folder
    d = tmp_path / "lex"
    d.mkdir()
    (d / "noun.things.txt").write_text("rock\n")
    (d / "._noun.things.txt").write_bytes(b"\x00\x05\x16\x07\xff\xfe")  # macOS resource fork, not a lexicon
    assert lexicons.load(str(d)).words == ("rock",)


# ------------------------------------------------------------------ saved detector files
def legacy_json(det):
    """What NegLabel.save wrote before detector files (format ``vlmood.neglabel``, version 1): the JSON that
    NegLabel.load, CSP.load and vlmood.load_detector still read."""
    det.fit()
    data = {"format": "vlmood.neglabel", "version": 1, "method": det.name, "pool": det.pool,
            "encoder": det.encoder.fingerprint, "classes": det.classes, "templates": det.templates,
            "neg_templates": det.saved_neg_templates(), "lexicon": det.get_params()["lexicon"],
            "params": {k: getattr(det, k) for k in ("percentile", "ratio", "temperature", "ngroups", "seed")},
            "negatives": [{"label": w, "pos": p} for w, p in det.negatives_]}
    if det.prompts is not None:
        from vlmood.detectors.neglabel import prompts_digest

        data["templates"] = []
        data["prompts"] = {"file": None if det.prompts_file is None else str(det.prompts_file),
                           "sha256": prompts_digest(det.prompts)}
    return data


@pytest.fixture
def saved(tiny, small_lexicon, tmp_path):
    d, _, _ = small_lexicon
    det = vlmood.NegLabel(tiny, ["cat", "dog"], lexicon=str(d), ratio=0.4, ngroups=2)
    data = legacy_json(det)
    return write_json(tmp_path / "neg.json", data), data, det


def write_json(path, data):
    path.write_text(json.dumps(data))
    return path


def test_saved_file_has_format_and_version(saved, tiny):
    path, data, det = saved
    meta = read_detector_meta(det.save(path.with_name("neg.vlmood")))
    assert (meta["format"], meta["version"]) == ("vlmood.detector", 1) and meta["method"] == "neglabel"
    assert set(meta["neg_templates"]) == {"noun", "adj"} and meta["templates"] == ["the nice {}"]
    assert meta["negatives"] == data["negatives"] and meta["params"] == {**data["params"], "pool": "neglabel",
                                                                         "lexicon": data["lexicon"]}
    assert vlmood.NegLabel.load(path, tiny).negatives_ == det.negatives_  # the JSON of earlier versions
    old = {k: v for k, v in data.items() if k not in ("format", "version")}  # a file from before the version
    loaded = vlmood.NegLabel.load(write_json(path.with_name("old.json"), old), tiny)
    assert loaded.negatives_ == det.negatives_ and loaded.ngroups == 2
    bom = path.with_name("bom.json")
    bom.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert vlmood.NegLabel.load(bom, tiny).negatives_ == det.negatives_


def test_csp_file_loads_as_csp_and_csp_load_refuses_neglabel(tiny, small_lexicon, saved, tmp_path):
    d, _, _ = small_lexicon
    csp = vlmood.CSP(tiny, ["cat", "dog"], lexicon=str(d), ratio=0.5, ngroups=2)
    for f in (csp.save(tmp_path / "csp.vlmood"), write_json(tmp_path / "csp.json", legacy_json(csp))):
        loaded = vlmood.NegLabel.load(f, tiny)
        assert type(loaded) is vlmood.CSP and loaded.negatives_ == csp.negatives_ and len(loaded.templates) == 8
        assert type(vlmood.CSP.load(f, tiny)) is vlmood.CSP
    for f in (saved[0], saved[2].save(tmp_path / "neg.vlmood")):
        with pytest.raises(InvalidInputError, match=r"neg\.(json|vlmood) holds a saved NegLabel detector, not CSP; "
                                                    r"load it with vlmood\.NegLabel\.load"):
            vlmood.CSP.load(f, tiny)


def _edit(data, field, value):
    out = json.loads(json.dumps(data))
    target = out
    keys = field.split(".")
    for k in keys[:-1]:
        target = target[int(k)] if k.isdigit() else target[k]
    if value is _DELETE:
        del target[keys[-1]]
    else:
        target[int(keys[-1]) if keys[-1].isdigit() else keys[-1]] = value
    return out


_DELETE = object()


@pytest.mark.parametrize("versioned", [True, False])
@pytest.mark.parametrize("field,value,match", [
    ("params.ngroups", 0, r"'params\.ngroups': ngroups must be a positive integer, got 0"),
    ("params.ratio", 2, r"'params\.ratio': ratio must be in \(0, 1\], got 2"),
    ("params.temperature", 0, r"'params\.temperature': temperature must be a positive finite number, got 0"),
    ("params.temperature", float("nan"), r"'params\.temperature': temperature must be .*got nan"),
    ("params.percentile", float("nan"), r"'params\.percentile': percentile must be in \[0, 1\], got nan"),
    ("params.ngroups", 99, r"'negatives': 11 negatives, fewer than params\.ngroups=99"),
    ("params.seed", "x", r"'params\.seed': seed must be an integer or None"),
    ("params.ngroup", 2, r"'params': expected an object with exactly"),
    ("negatives.0.label", "", r"'negatives\[0\]\.label': expected a non-empty string"),
    ("classes", [], r"'classes': the class list is empty"),
    ("classes", ["cat", "cat"], r"'classes': duplicate class names"),
    ("templates", ["a photo"], r"'templates': templates must contain exactly one"),
    ("method", "mcm", r"'method': expected one of neglabel, csp"),
    ("negatives", _DELETE, r"missing field\(s\) negatives|no 'format' or 'negatives'"),
    ("params_", {}, r"unknown field\(s\) 'params_'"),
])
def test_load_validates_every_field(saved, tiny, field, value, match, versioned):
    path, data, _ = saved
    if not versioned:  # files written before the format had a version get the same checks
        data = {k: v for k, v in data.items() if k not in ("format", "version")}
    bad = path.with_name("bad.json")
    bad.write_text(json.dumps(_edit(data, field, value)))  # json writes NaN for nan
    with pytest.raises(InvalidInputError, match=match) as e:
        vlmood.NegLabel.load(bad, tiny)
    assert "bad.json" in str(e.value) and "\n" not in str(e.value)


def test_negative_with_unknown_pos(saved, tiny):
    """Version 1 files store templates for every part of speech they use: an unknown one is an error. Files from
    before the version fell back to the noun templates (as the detector does): they still load that way."""
    path, data, det = saved
    data["negatives"][0]["pos"] = "verb"
    with pytest.raises(InvalidInputError, match=r"bad\.json: invalid field 'negatives\[0\]\.pos': 'verb' has no "
                                                r"templates in neg_templates \(noun, adj\)"):
        vlmood.NegLabel.load(write_json(path.with_name("bad.json"), data), tiny)
    old = {k: v for k, v in data.items() if k not in ("format", "version")}
    loaded = vlmood.NegLabel.load(write_json(path.with_name("old.json"), old), tiny)
    assert loaded.negatives_[0][1] == "verb" and loaded._templates_for("verb") == ["the nice {}"]


def test_saved_templates_cover_every_part_of_speech(tiny, small_lexicon, tmp_path):
    d, _, _ = small_lexicon
    (d / "verb.motion.txt").write_text("run\njump\nswim\nfly\n")
    det = vlmood.NegLabel(tiny, ["cat", "dog"], lexicon=str(d), ratio=0.5, ngroups=2)
    data = read_detector_meta(det.save(tmp_path / "verbs.vlmood"))
    assert "verb" in {n["pos"] for n in data["negatives"]} and data["neg_templates"]["verb"] == ["the nice {}"]
    assert vlmood.NegLabel.load(tmp_path / "verbs.vlmood", tiny).negatives_ == det.negatives_


@pytest.mark.parametrize("content,match", [
    ('[{"label": "rock", "pos": "noun"}]', r"not a saved NegLabel/CSP detector: it holds a JSON list"),
    ('{"id": "toy", "ood": {}, "metrics": {}}', r"not a saved NegLabel/CSP detector \(no 'format' or 'negatives'"),
    ('{"format": "vlmood.report", "version": 1}', r"its format is 'vlmood.report', not 'vlmood.neglabel'"),
    ('{"format": "vlmood.neglabel", "version": 7}', r"format version 7; this vlmood reads versions up to 1"),
    ('{"format": "vlmood.neglabel", "version": true}', r"'version': expected a positive integer"),
    ('{"negatives": ', r"invalid JSON"),
])
def test_load_refuses_other_kinds_of_file(tiny, tmp_path, content, match):
    f = tmp_path / "other.json"
    f.write_text(content)
    with pytest.raises(InvalidInputError, match=match) as e:
        vlmood.NegLabel.load(f, tiny)
    assert "other.json" in str(e.value)


def test_load_non_utf8_file_and_overrides(saved, tiny):
    path, data, _ = saved
    latin = path.with_name("latin.json")
    latin.write_bytes(json.dumps(data).replace('"cat"', '"caf\\u00e9"').encode().replace(b"\\u00e9", b"\xe9"))
    with pytest.raises(InvalidInputError, match=r"latin\.json is not UTF-8"):
        vlmood.NegLabel.load(latin, tiny)
    with pytest.raises(InvalidInputError, match=r"neg\.json holds 11 negatives, fewer than ngroups=12"):
        vlmood.NegLabel.load(path, tiny, ngroups=12)
    with pytest.raises(InvalidInputError, match="temperature must be a positive finite number, got nan"):
        vlmood.NegLabel.load(path, tiny, temperature=float("nan"))


@pytest.mark.parametrize("kw,match", [
    ({"temperature": float("nan")}, "temperature must be a positive finite number, got nan"),
    ({"temperature": -0.01}, "temperature must be a positive finite number, got -0.01"),
    ({"percentile": float("nan")}, r"percentile must be in \[0, 1\], got nan"),
    ({"ratio": float("nan")}, r"ratio must be in \(0, 1\], got nan"),
    ({"ngroups": True}, "ngroups must be a positive integer, got True"),
    ({"neg_templates": {"adj": "This is a {} photo"}}, "neg_templates must .* include 'noun'"),
])
def test_neglabel_settings_refuse_nan_and_wrong_types(tiny, small_lexicon, kw, match):
    d, _, _ = small_lexicon
    with pytest.raises(InvalidInputError, match=match):
        vlmood.NegLabel(tiny, ["cat"], lexicon=str(d), **kw)


def test_mining_refuses_non_finite_embeddings():
    ids, cands = np.eye(3), np.eye(3)
    cands[1, 0] = np.nan
    with pytest.raises(InvalidInputError, match="1 of the 3 candidate label embeddings contain NaN"):
        mine(ids, cands, 0.95, 1.0)
    with pytest.raises(InvalidInputError, match="percentile must be in"):
        percentile_similarity(ids, ids, float("nan"))


def test_given_negatives_replace_mining_and_score_by_hand(tmp_path):
    """negatives=[...] (e.g. an LLM's envisioned outlier classes) are the negative labels as given: no mining,
    repeats and ID names dropped with one warning, scores equal to scores.neglabel over their embeddings."""
    import vlmood
    from vlmood.text import class_embeddings

    enc = vlmood.load_encoder("toyworld")
    with pytest.warns(UserWarning, match=r"dropped 1 repeated word\(s\) and 1 ID class name\(s\); 3 negatives left"):
        det = vlmood.NegLabel(enc, ["circle", "square"], negatives=["ring", "Ring", "moon", "Circle", ("arrow", "noun")],
                              ngroups=1)
    assert det.negatives_ == [("ring", "noun"), ("moon", "noun"), ("arrow", "noun")]
    neg = class_embeddings(enc, ["ring", "moon", "arrow"], "the nice {}", check=False)
    assert torch.allclose(det.negative_features, neg)
    x = torch.nn.functional.normalize(torch.randn(5, enc.embed_dim, generator=torch.Generator().manual_seed(0)), dim=-1)
    want = scores.neglabel(x @ det.text_features.T, x @ neg.T, det.temperature, 1, det.seed)
    assert np.allclose(det.score_features(x), want)
    det.save(tmp_path / "n.json")  # the given negatives round-trip like mined ones
    assert vlmood.NegLabel.load(tmp_path / "n.json", enc).negatives_ == det.negatives_
    with pytest.raises(InvalidInputError, match=r"2 negatives given but ngroups=5"):
        vlmood.NegLabel(enc, ["circle"], negatives=["ring", "moon"], ngroups=5)
    with pytest.raises(InvalidInputError, match=r"negatives entry 2 must be a non-empty word"):
        vlmood.NegLabel(enc, ["circle"], negatives=["ring", " "], ngroups=1)
    with pytest.raises(InvalidInputError, match="not a single string"):
        vlmood.NegLabel(enc, ["circle"], negatives="ring", ngroups=1)
