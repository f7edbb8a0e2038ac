"""LVLMDetector (baseline and ReGuide prompting, S_max, invalid rules, class batches), its prompts, and a Benchmark
report mixing MCM (toy world) with the LVLM detector. A fake client answers by image colour / toy-world shape: no
server, no model."""
import json

import numpy as np
import pytest
from PIL import Image

import vlmood
from vlmood.errors import InvalidInputError
from vlmood.evaluation import Benchmark
from vlmood.lvlm.base import LVLMClient, Reply
from vlmood.lvlm.detector import LVLMDetector
from vlmood.lvlm import prompts as P
from vlmood.metrics import evaluate

NONE = P.NONE_CLASS
COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "gray": (128, 128, 128)}


def solid(name):
    return Image.new("RGB", (8, 8), COLOURS[name])


def colour_of(image):
    rgb = image.convert("RGB").getpixel((0, 0))
    return next(k for k, v in COLOURS.items() if v == rgb)


def listed(prompt):
    """The candidate classes a prompt lists ("- name" lines), without "none of these classes"."""
    return [ln[2:] for ln in prompt.splitlines() if ln.startswith("- ") and ln[2:] not in (NONE, "<class name>")]


def answer(conf, pred=None):
    pred = pred or max(conf, key=conf.get)
    return f"Prediction: {pred}\nConfidence: {json.dumps(conf)}"


class FakeClient(LVLMClient):
    """Answers each request with ``script(image, prompt, params)``; a text starting ``ERROR:`` is a failed request."""

    model_id = "fake"

    def __init__(self, script):
        self.script = script
        self.calls = []  # (number of requests, params) per generate_many call
        self.requests = []  # (prompt, params) per request

    def generate_many(self, requests, progress=None, **params):
        self.calls.append((len(requests), params))
        out = []
        for r in requests:
            self.requests.append((r.prompt, params))
            text = self.script(r.image, r.prompt, params)
            out.append(Reply(None, error=text[6:]) if text.startswith("ERROR:") else Reply(text, attempts=1))
        return out


# ------------------------------------------------------------------ prompts
def test_prompt_files_name_their_source_and_fill_placeholders():
    for name in ("baseline", "reguide_stage1", "reguide_stage2", "envision_near", "envision_far"):
        first = (vlmood._paths.data_root("prompts") / "lvlm" / f"{name}.txt").read_text().splitlines()[0]
        assert first.startswith("# ") and ("ReGuide" in first or "EOE" in first), name
    odd = ['say "hi"', "a: b", "{n}", "{classes}", "x}{y", "cat, dog"]
    text = P.baseline_prompt(odd)
    assert [ln[2:] for ln in text.splitlines() if ln.startswith("- ")] == odd + [NONE]  # verbatim, one per line
    assert "#" not in text.splitlines()[0] and 'Confidence: {"<class name>": <value>' in text
    s1 = P.reguide_stage1(["cat", "{n}"], 3)
    assert "Suggest 3 class names" in s1 and listed(s1) == ["cat", "{n}"]
    s2 = P.reguide_stage2(["cat", "dog"], ["lion", "Cat", " dog ", "lion", NONE, "fox"])
    assert listed(s2) == ["cat", "dog", "lion", "fox"]
    assert "Name 7 other classes" in P.envision_prompt(["cat"], 7, "near")
    assert "Name 2 classes of things that are unrelated" in P.envision_prompt(["cat"], 2, "far")


@pytest.mark.parametrize("call, message", [
    (lambda: P.baseline_prompt(["cat", "dog\nfox"]), "class name 2 ('dog\\nfox') contains a line break"),
    (lambda: P.baseline_prompt("cat"), "class names must be a list of strings, got str"),
    (lambda: P.baseline_prompt(["cat", ""]), "class name 2 is '': names must be non-empty strings"),
    (lambda: P.baseline_prompt(["None of these classes"]), "'none of these classes' cannot be a class name"),
    (lambda: P.reguide_stage1(["cat"], 0), "n must be a positive integer, got 0"),
    (lambda: P.envision_prompt(["cat"], 3, "middle"), "kind must be 'near' or 'far', got 'middle'"),
])
def test_prompt_bad_input_is_one_line(call, message):
    with pytest.raises(InvalidInputError) as e:
        call()
    assert message in str(e.value) and "\n" not in str(e.value)


def test_parse_suggestions():
    text = ("Sure! Here are the classes:\nSimilar:\n- lion\n- 2. Tiger.\n* \"Cats\"\nDissimilar: car, 'boat', dog\n"
            "- a long description of something that is not a class name\n<|im_end|>")
    assert P.parse_suggestions(text, ["cat", "dog"], 5) == ["lion", "Tiger", "car", "boat"]
    assert P.parse_suggestions(text, ["cat", "dog"], 1) == ["lion", "Tiger"]  # n similar + n dissimilar at most
    assert P.parse_suggestions(None, ["cat"], 2) == [] and P.parse_suggestions("I'm sorry, I can't.", ["cat"]) == []


# ------------------------------------------------------------------ scoring rules
CLASSES = ["red", "blue"]


def by_colour(conf_by_colour):
    return lambda image, prompt, params: conf_by_colour[colour_of(image)]


def test_smax_and_classify_by_hand():
    client = FakeClient(by_colour({
        "red": answer({"red": 80, "blue": 15, NONE: 5}),
        "blue": answer({"red": 10, "blue": 65, NONE: 25}),
        "green": answer({"red": 20, "blue": 30, NONE: 90}, pred=NONE),  # none's confidence never counts
    }))
    det = LVLMDetector(client, CLASSES, max_tokens=300)
    imgs = [solid("red"), solid("blue"), solid("green")]
    scores, labels = det.respond(imgs)
    assert scores.tolist() == pytest.approx([0.80, 0.65, 0.30]) and labels.tolist() == [0, 1, 1]
    assert det.statuses_ == {"complete": 3} and det.n_invalid_ == 0 and det.attempts_ == [1, 1, 1]
    assert client.calls == [(3, {"max_tokens": 300})]  # one batched call, the generation params passed on
    assert listed(client.requests[0][0]) == CLASSES
    assert det.calibrate(imgs[:2], tpr=1.0) == pytest.approx(0.65)
    pred = det.predict(imgs)
    assert pred.is_ood.tolist() == [False, False, True] and pred.class_names == ["red", "blue", "blue"]


def flaky_script(image, prompt, params):
    """red: a valid answer; blue: a refusal on the first ask, valid when re-asked with seed 2; gray: always refuses;
    green: the request fails (the server rejected the image)."""
    c = colour_of(image)
    if c == "red":
        return answer({"red": 70, "blue": 20, NONE: 10})
    if c == "blue" and params.get("seed") == 2:
        return answer({"red": 5, "blue": 55, NONE: 40})
    if c == "green":
        return "ERROR:HTTP 400: image rejected"
    return "I'm sorry, I can't help with identifying this image."


def test_invalid_rules_exclude_ood_and_retry():
    imgs = [solid("red"), solid("blue"), solid("gray"), solid("green")]
    ex = LVLMDetector(FakeClient(flaky_script), CLASSES, invalid="exclude")
    s, lab = ex.respond(imgs)
    assert s[0] == pytest.approx(0.7) and np.isnan(s[1:]).all() and lab.tolist() == [0, -1, -1, -1]
    assert ex.statuses_ == {"complete": 1, "refusal": 2, "error": 1} and ex.n_invalid_ == 3
    assert ex.responses_[3].reason == "HTTP 400: image rejected"
    assert ex.predict(imgs, threshold=0.1).class_names == ["red", None, None, None]

    ood = LVLMDetector(FakeClient(flaky_script), CLASSES, invalid="ood")
    assert ood.score(imgs).tolist() == pytest.approx([0.7, 0.0, 0.0, 0.0])

    client = FakeClient(flaky_script)
    rt = LVLMDetector(client, CLASSES, invalid="retry", retries=2, temperature=0.0)
    s = rt.score(imgs)
    assert s[:2].tolist() == pytest.approx([0.7, 0.55]) and np.isnan(s[2:]).all()
    assert rt.statuses_ == {"complete": 2, "refusal": 1, "error": 1} and rt.attempts_ == [1, 3, 3, 3]
    # attempt k re-asks only the invalid images, with its own seed (its own cache key) and the retry temperature
    assert client.calls == [(4, {"temperature": 0.0}), (3, {"temperature": 0.7, "seed": 1}),
                            (3, {"temperature": 0.7, "seed": 2})]
    once = LVLMDetector(FakeClient(flaky_script), CLASSES, invalid="retry", retries=1)
    assert np.isnan(once.score(imgs)[1]) and once.attempts_ == [1, 2, 2, 2]  # seed 2 never reached


def test_class_batches_combine_by_the_documented_rule():
    classes = ["c1", "c2", "c3", "c4", "c5"]
    table = {"red": {"c1": 10, "c2": 30, "c3": 5, "c4": 70, "c5": 20}, "blue": {"c1": 60, "c2": 10, "c3": 60,
                                                                                  "c4": 20, "c5": 60}}

    def script(image, prompt, params):
        c, names = colour_of(image), listed(prompt)
        if c == "green" and names == ["c3", "c4"]:
            return 'Prediction: c4\nConfidence: {"c3": 40, "c4": 5'  # cut off: the kept entries do not decide
        conf = {n: table.get(c, {}).get(n, 1) for n in names}
        return answer({**conf, NONE: 100 - max(conf.values())})

    client = FakeClient(script)
    det = LVLMDetector(client, classes, class_batch=2)
    s, lab = det.respond([solid("red"), solid("blue"), solid("green")])
    # red: batch maxima 30, 70, 20 -> S_max 0.70, argmax c4; blue: 60 in all three batches -> first in class order
    assert s[:2].tolist() == pytest.approx([0.70, 0.60]) and lab[:2].tolist() == [3, 0]
    assert np.isnan(s[2]) and lab[2] == -1 and det.responses_[2].status == "truncated"  # one bad batch: invalid
    assert det.responses_[0].confidences == table["red"] and det.responses_[0].prediction == "c4"
    assert client.calls == [(9, {})]  # 3 images x 3 batches in one call
    assert sorted(tuple(listed(p)) for p, _ in client.requests[:3]) == [("c1", "c2"), ("c3", "c4"), ("c5",)]


def test_reguide_two_stages():
    def script(image, prompt, params):
        if "Suggest 2 class names" in prompt:  # stage 1
            return {"red": "Similar:\n- orange\n- Red\nDissimilar:\n- ocean\n- sky",
                    "blue": "I'm sorry, I can't."}[colour_of(image)]
        names = listed(prompt)
        if colour_of(image) == "red":
            assert names == ["red", "blue", "orange", "ocean", "sky"]  # ID first, then the new suggestions
            return answer({"red": 35, "blue": 5, "orange": 55, "ocean": 1, "sky": 1, NONE: 3})
        assert names == CLASSES  # no usable suggestion: stage 2 over the ID classes only
        return answer({"red": 10, "blue": 85, NONE: 5})

    client = FakeClient(script)
    det = LVLMDetector(client, CLASSES, prompt="reguide", n_suggest=2)
    s, lab = det.respond([solid("red"), solid("blue")])
    assert s.tolist() == pytest.approx([0.35, 0.85]) and lab.tolist() == [0, 1]  # S_max over the ID classes only
    assert det.suggestions_ == [["orange", "ocean", "sky"], []]
    assert [n for n, _ in client.calls] == [2, 2]  # stage 1 for both images, then stage 2 for both


@pytest.mark.parametrize("kw, message", [
    ({"prompt": "fancy"}, "prompt must be 'baseline' or 'reguide', got 'fancy'"),
    ({"invalid": "drop"}, "invalid must be 'exclude', 'ood' or 'retry', got 'drop'"),
    ({"retries": -1}, "retries must be an integer >= 0, got -1"),
    ({"class_batch": 0}, "class_batch must be an integer >= 1, got 0"),
])
def test_bad_arguments_are_one_line(kw, message):
    with pytest.raises(InvalidInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        LVLMDetector(FakeClient(lambda *a: ""), CLASSES, **kw)
    with pytest.raises(InvalidInputError, match="contains a line break"):
        LVLMDetector(FakeClient(lambda *a: ""), ["a", "b\nc"])
    with pytest.raises(InvalidInputError, match="no threshold"):
        LVLMDetector(FakeClient(lambda *a: ""), CLASSES).predict([solid("red")])


# ------------------------------------------------------------------ the benchmark harness
N = 10


@pytest.fixture(scope="module")
def toy():
    from vlmood import toyworld

    ids, id_shapes = toyworld.load_images(2024, N)
    near, near_shapes = toyworld.load_images(2025, N, toyworld.OOD_SHAPES)
    far, _ = toyworld.load_images(2027, N, empty=True)
    truth = {}  # pixels -> (set, index, shape)
    for name, imgs, shapes in (("ID", ids, id_shapes), ("near", near, near_shapes), ("far", far, [None] * N)):
        for i, (im, sh) in enumerate(zip(imgs, shapes)):
            truth[im.tobytes()] = (name, i, sh)
    assert len(truth) == 3 * N  # every image has distinct pixels: the fake client can tell them apart
    bench = Benchmark(id=vlmood.data.MemorySource(ids, id_shapes, name="id"),
                      ood={"near": {"other shapes": vlmood.data.MemorySource(near, name="near")},
                           "far": {"empty": vlmood.data.MemorySource(far, name="far")}},
                      classes=list(toyworld.ID_SHAPES), name="toy world + LVLM")
    return bench, truth, vlmood.load_encoder("toyworld")


def shape_script(truth):
    """Scripted by shape: an ID shape gets 90 - 5 i on its class (i = its index in the set), another shape 30 on
    the first listed class, an empty background 10. ID images 0 and 1 and near image 3 are refused; far image 4's
    answer is cut off by the token limit."""
    def script(image, prompt, params):
        name, i, shape = truth[image.tobytes()]
        if (name, i) in {("ID", 0), ("ID", 1), ("near", 3)}:
            return "I'm sorry, but I can't identify objects in this image."
        if (name, i) == ("far", 4):
            return 'Prediction: none of these classes\nConfidence: {"circle": 2, "squ'
        names = listed(prompt)
        conf = {n: 0 for n in names}
        if name == "ID":
            conf[shape] = 90 - 5 * i
        else:
            conf[names[0]] = 30 if name == "near" else 10
        return answer({**conf, NONE: 100 - max(conf.values())})
    return script


def expected_scores(truth):
    out = {"ID": [], "near": [], "far": []}
    for name, i, shape in sorted(truth.values(), key=lambda t: (t[0], t[1])):
        out[name].append((90 - 5 * i) / 100 if name == "ID" else (0.30 if name == "near" else 0.10))
    return out


def test_benchmark_report_mixes_mcm_and_the_lvlm_detector(toy, tmp_path):
    bench, truth, enc = toy
    classes = bench.classes
    lvlm = LVLMDetector(FakeClient(shape_script(truth)), classes)
    lvlm_ood = LVLMDetector(FakeClient(shape_script(truth)), classes, invalid="ood")
    report = bench.run(enc, {"mcm": "mcm", "lvlm": lvlm, "lvlm (invalid=ood)": lvlm_ood}, progress=False)

    # MCM: the same numbers as a CLIP-only run
    clip_only = bench.run(enc, {"mcm": "mcm"}, progress=False)
    for r in clip_only.rows:
        assert report.metric("mcm", r["dataset"], "auroc", r["group"]) == r["auroc"]
    assert clip_only.invalid == {} and "invalid" not in clip_only.to_dict()
    assert "Invalid responses" not in clip_only.to_markdown()

    # LVLM, invalid="exclude": the refused / truncated images are dropped from the metrics, by hand
    exp = expected_scores(truth)
    s_id, s_near, s_far = (np.delete(np.array(exp[k]), d) for k, d in (("ID", [0, 1]), ("near", [3]), ("far", [4])))
    assert report.scores["lvlm"]["ID"] == pytest.approx(s_id) and report.scores["lvlm"]["empty"] == pytest.approx(s_far)
    for name, s in (("other shapes", s_near), ("empty", s_far)):
        for k, v in evaluate(s_id, s).items():
            assert report.metric("lvlm", name, k) == pytest.approx(v)
    row = next(r for r in report.rows if r["method"] == "lvlm" and r["dataset"] == "other shapes")
    assert (row["n_id"], row["n_ood"], row["n_id_excluded"], row["n_ood_excluded"]) == (N - 2, N - 1, 2, 1)
    assert report.id_accuracy["lvlm"] == 1.0
    inv = report.invalid["lvlm"]
    assert inv["ID"] == {"images": N, "invalid": 2, "rate": 0.2, "excluded": 2,
                         "statuses": {"complete": N - 2, "refusal": 2}}
    assert inv["other shapes"]["invalid"] == 1 and inv["empty"]["statuses"] == {"complete": N - 1, "truncated": 1}

    # invalid="ood": nothing excluded, the invalid images score 0 and count as wrong in the ID accuracy
    assert report.invalid["lvlm (invalid=ood)"]["ID"]["excluded"] == 0
    assert report.scores["lvlm (invalid=ood)"]["ID"][:3].tolist() == pytest.approx([0.0, 0.0, 0.80])
    assert report.id_accuracy["lvlm (invalid=ood)"] == pytest.approx((N - 2) / N)
    assert report.metric("lvlm (invalid=ood)", "other shapes", "auroc") == pytest.approx(
        evaluate(np.r_[0.0, 0.0, s_id], np.r_[s_near[:3], 0.0, s_near[3:]])["auroc"])

    files = report.save(tmp_path / "out")
    md = files["report"].read_text()
    assert "## Invalid responses (vision-language model detectors)" in md
    assert "| lvlm | ID | 10 | 2 | 20.00 | 2 | complete: 8, refusal: 2 |" in md
    assert "| lvlm | empty | 10 | 1 | 10.00 | 1 | complete: 9, truncated: 1 |" in md
    assert "| lvlm (invalid=ood) | other shapes | 10 | 1 | 10.00 | 0 | complete: 9, refusal: 1 |" in md
    data = json.loads(files["json"].read_text())
    assert data["invalid"]["lvlm"]["other shapes"]["statuses"] == {"complete": 9, "refusal": 1}
    assert {"hist_lvlm", "roc"} <= set(files)


def test_benchmark_with_only_an_lvlm_detector_needs_no_encoder(toy):
    bench, truth, _ = toy
    det = LVLMDetector(FakeClient(shape_script(truth)), bench.classes)
    report = bench.run(None, {"lvlm": det}, progress=False)
    assert report.counts == {"ID": N, "other shapes": N, "empty": N} and report.id_accuracy["lvlm"] == 1.0
    with pytest.raises(InvalidInputError, match="detector 'mcm' scores image features: pass the encoder to run"):
        bench.run(None, {"lvlm": det, "mcm": "mcm"}, progress=False)
    with pytest.raises(InvalidInputError, match="has other ID classes"):
        bench.run(None, {"lvlm": LVLMDetector(FakeClient(shape_script(truth)), ["circle"])}, progress=False)
    refuse = LVLMDetector(FakeClient(lambda *a: "I'm sorry, I cannot help."), bench.classes)
    with pytest.raises(InvalidInputError, match="none of the 10 image\\(s\\) of set 'ID' got a valid response"):
        bench.run(None, {"lvlm": refuse}, progress=False)
